"""float8_e4m3fn storage of the frozen block Linears, computed in the compute dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored as float8_e4m3fn and upcast to the compute dtype at each call: the
    autocast dtype under autocast, else the input's dtype.

    Halves the base model's memory. Being an nn.Linear, peft still wraps it with LoRA; peft reads
    `compute_dtype` to create the LoRA weights in it rather than in float8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features), in the autocast dtype under autocast, else in x's dtype."""
        # Under autocast x can be fp32 (after a layer norm): upcasting the weight to it would make a 4-byte copy of
        # every weight, which autocast would then cast down to bf16 anyway. Cast x down instead, as autocast would.
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _UpcastLinearFunction.apply(x.to(dtype), self.weight, bias, self.upcast)

    @staticmethod
    def upcast(weight: Tensor, dtype: torch.dtype) -> Tensor:
        """The stored weight in `dtype` (subclasses storing other formats override it)."""
        return weight.to(dtype)


class _UpcastLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W upcast on the fly, keeping only the stored (float8 or quantized) W for backward.

    Plain autograd would save the upcast copy of W for the input gradient: a full-precision copy of every block
    weight until backward, which is the memory low-bit storage was meant to save. W and b are frozen: no grads.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, upcast) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.input_dtype, ctx.upcast = x.dtype, upcast
        return F.linear(x, upcast(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (weight,) = ctx.saved_tensors
        # compute in grad_out's dtype (the weight is upcast once, to the smaller of the two), return x's
        return (grad_out @ ctx.upcast(weight, grad_out.dtype)).to(ctx.input_dtype), None, None, None


FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def use_fp8_linears(model: nn.Module, compute_dtype: torch.dtype, under: tuple[str, ...] = FLUX_BLOCKS,
                    keep: tuple[str, ...] = ()) -> set[str]:
    """Swap the Linears named `under...` (the Flux transformer blocks by default), except those whose names end
    with one of `keep`, for `Fp8Linear`s (on meta); returns their weight names."""
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith(under) and not name.endswith(keep) and type(module) is nn.Linear
    ]
    for name in names:
        old = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, compute_dtype, device="meta")
        setattr(model.get_submodule(parent), child, new)
    return {f"{name}.weight" for name in names}


def to_fp8_linears(model: nn.Module, compute_dtype: torch.dtype, under: tuple[str, ...] = FLUX_BLOCKS,
                   keep: tuple[str, ...] = ()) -> None:
    """`use_fp8_linears` on a model already loaded: each swapped Linear's weight is cast to float8, its bias kept."""
    loaded = dict(model.named_modules())
    for weight_name in use_fp8_linears(model, compute_dtype, under, keep):
        name = weight_name.removesuffix(".weight")
        old, new = loaded[name], model.get_submodule(name)
        new.weight = nn.Parameter(old.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
