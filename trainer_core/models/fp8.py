"""float8_e4m3fn storage of the frozen block Linears, computed in the compute dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored as float8_e4m3fn and upcast to the input's dtype at each call.

    Halves the base model's memory. Being an nn.Linear, peft still wraps it with LoRA; peft reads
    `compute_dtype` to create the LoRA weights in it rather than in float8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Fp8LinearFunction.apply(x, self.weight, bias)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W upcast on the fly, keeping only the float8 W for backward.

    Plain autograd would save the upcast copy of W for the input gradient: a full-precision copy of every block
    weight until backward, which is the memory fp8 storage was meant to save. W and b are frozen: no grads.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (weight,) = ctx.saved_tensors
        # under autocast grad_out may be bf16 while x was fp32: compute in grad_out's dtype, return x's
        return (grad_out @ weight.to(grad_out.dtype)).to(ctx.input_dtype), None, None


def use_fp8_linears(model: FluxTransformer2DModel, compute_dtype: torch.dtype) -> set[str]:
    """Swap the Linears of the transformer blocks for `Fp8Linear`s (on meta); returns their weight names."""
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and type(module) is nn.Linear
    ]
    for name in names:
        old = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, compute_dtype, device="meta")
        setattr(model.get_submodule(parent), child, new)
    return {f"{name}.weight" for name in names}
