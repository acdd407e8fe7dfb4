"""LoKr and LoHa, peft's LyCORIS layers, per layer: their peft config, a seeded init, and the scale each file key
carries in the LyCORIS/kohya layout stock ComfyUI loads (`comfy/weight_adapter/lokr.py`, `loha.py`).

peft (like LyCORIS) scales every LoKr / LoHa delta by alpha / r:
- LoKr: ΔW = (alpha / r) kron(w1, w2), w2 = lokr_w2_a @ lokr_w2_b when r is below half its size, else a full
  lokr_w2. ComfyUI applies alpha / r only when a factor is decomposed (r = lokr_w2_b's rows); with both factors
  full it takes scale 1, so such a file carries the scale in lokr_w2.
- LoHa: ΔW = (alpha / r) (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b); ComfyUI: alpha / hada_w1_b's rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.loha.layer import Linear as LoHaLinear
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lokr.layer import Linear as LoKrLinear
from peft.tuners.lycoris_utils import LycorisLayer
from torch import nn

from .linear import ADAPTER
# network -> (peft layer, the tensors peft starts at zero so that the adapter starts as the base, the tensor whose
# scale a file's alpha is folded into: the delta is linear in it)
LYCORIS = {
    "lokr": (LoKrLayer, ("lokr_w1", "lokr_w1_a"), ("lokr_w2_b", "lokr_w2")),
    "loha": (LoHaLayer, ("hada_w2_b",), ("hada_w2_b",)),
}
NAMES = {"lokr": "LoKr", "loha": "LoHa"}


def lycoris_config(network: str, rank: int, alpha: float, target: str, rank_pattern: dict[str, int],
                   lokr_factor: int = -1):
    """peft's config of `network` ("lokr" or "loha"): no dropout, w1 of a LoKr full (LyCORIS' default)."""
    if network == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=target, rank_pattern=rank_pattern,
                          decompose_factor=lokr_factor)
    return LoHaConfig(r=rank, alpha=alpha, target_modules=target, rank_pattern=rank_pattern)


def layer_network(layer: nn.Module) -> str:
    """"lokr" or "loha" for a peft LyCORIS layer."""
    return next(n for n, (cls, _, _) in LYCORIS.items() if isinstance(layer, cls))


def tensors(layer: LycorisLayer) -> dict[str, nn.Parameter]:
    """The layer's trainable tensors by their LyCORIS key suffix (`lokr_w1`, `hada_w2_b`, ...), in peft's order."""
    return {name: getattr(layer, name)[ADAPTER] for name in layer.adapter_layer_names
            if ADAPTER in getattr(layer, name)}


def init_lycoris(layer: LycorisLayer, dtype: torch.dtype, generator: torch.Generator | None) -> None:
    """peft's init (the zero tensors zero, the others Kaiming-uniform) in `dtype`, drawn from `generator` (the same
    numbers on any device) in peft's tensor order; the global torch RNG when None."""
    zeros = LYCORIS[layer_network(layer)][1]
    for name, param in tensors(layer).items():
        value = torch.zeros(param.shape, dtype=dtype)
        if name not in zeros:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        param.data = value.to(param.device)


class KroneckerProduct(torch.autograd.Function):
    """x @ kron(a, b)^T for a (out1 x in1) and b (out2 x in2), computed per token as a @ X @ b^T with x viewed as X
    (in1 x in2): two products as small as the factors, never the out x in matrix kron(a, b).

    Backward keeps only x, in the dtype the products take (autocast's: the copy a LoRA's down-projection keeps too),
    and the factors; it recomputes X b^T for a's gradient, where autograd's own path would keep it from the forward
    in every adapted Linear. The products are `F.linear`s, so autocast takes them as it takes the base Linear's, and
    backward computes in that same dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        xb = F.linear(x.to(a.dtype).unflatten(-1, (a.shape[1], b.shape[1])), b)  # (..., in1, out2)
        y = F.linear(xb.transpose(-1, -2), a)  # (..., out2, out1)
        ctx.save_for_backward(x.to(xb.dtype), a, b)
        ctx.x_dtype = x.dtype
        return y.transpose(-1, -2).flatten(-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            a_, b_ = a.to(x.dtype), b.to(x.dtype)
            x_ = x.unflatten(-1, (a.shape[1], b.shape[1])).flatten(0, -3)  # (n, in1, in2)
            g = grad.to(x.dtype).unflatten(-1, (a.shape[0], b.shape[0])).flatten(0, -3)  # (n, out1, out2)
            dx = da = db = None
            at_g = a_.t() @ g  # (n, in1, out2): shared by dx and db
            if ctx.needs_input_grad[0]:
                dx = (at_g @ b_).reshape(grad.shape[:-1] + (-1,)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # sum over tokens of G X_b^T, G laid out (out1, tokens * out2): one copy
                da = (g.transpose(0, 1).reshape(a.shape[0], -1) @ (b_ @ x_.transpose(1, 2)).reshape(-1, a.shape[1]))
                da = da.to(a.dtype)
            if ctx.needs_input_grad[2]:  # sum over tokens of (a^T G)^T X
                db = (at_g.reshape(-1, b.shape[0]).t() @ x_.reshape(-1, b.shape[1])).to(b.dtype)
        return dx, da, db


class BaseDtypeOut:
    """A peft LyCORIS Linear whose result is in the base layer's dtype, as peft's LoRA returns it. peft's LyCORIS
    forward returns its input's: float32 after a LayerNorm under autocast, which every later op of the block then
    computes, and keeps for backward, in float32. Otherwise peft's forward (its module-dropout draw included)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self._available_adapters:
                continue
            if not self.training or torch.rand(1) > self.module_dropout[adapter]:
                result = result + self._get_delta_activations(adapter, x, *args, **kwargs).to(result.dtype)
        return result


class KroneckerLinear(BaseDtypeOut, LoKrLinear):
    """peft's LoKr Linear, its update applied without building it (`KroneckerProduct`). peft builds the whole out x in
    update (fp32) every call and autograd keeps it for backward. The same parameters, scale and strength (peft's
    `scaling`); the rounding differs from peft's."""

    def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training and self.rank_dropout[adapter_name]:  # peft's row dropout needs the built update
            return super()._get_delta_activations(adapter_name, input, *args, **kwargs)
        w1 = self.lokr_w1[adapter_name] if adapter_name in self.lokr_w1 else \
            self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        w2 = self.lokr_w2[adapter_name] if adapter_name in self.lokr_w2 else \
            self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
        # the scale goes on w1: out1 x in1 numbers, not tokens x out
        return KroneckerProduct.apply(input, w1 * self.scaling[adapter_name], w2)


class HadamardLinear(BaseDtypeOut, LoHaLinear):
    """peft's LoHa Linear (it builds each update), its result in the base layer's dtype."""


OWN_FORWARD = {LoKrLinear: KroneckerLinear, LoHaLinear: HadamardLinear}


def use_own_forward(layer: LycorisLayer) -> None:
    """A peft LoKr / LoHa Linear computes through `KroneckerLinear` / `HadamardLinear` from now on (the same module,
    parameters and state): peft's LyCORIS layers take no custom module class."""
    if type(layer) in OWN_FORWARD:
        layer.__class__ = OWN_FORWARD[type(layer)]


def scale(layer: LycorisLayer) -> float:
    """The layer's scale at strength 1 (peft's `scaling` also carries the current strength)."""
    return layer.alpha[ADAPTER] / layer.r[ADAPTER]


def comfyui_rank(network: str, keys: dict[str, torch.Tensor]) -> int | None:
    """The r ComfyUI divides a module's alpha by, from its tensors; None where it applies no alpha (a LoKr with
    both factors full)."""
    if network == "loha":
        return keys["hada_w1_b"].shape[0]
    decomposed = next((k for k in ("lokr_w2_b", "lokr_w1_b") if k in keys), None)
    return None if decomposed is None else keys[decomposed].shape[0]


def file_tensors(layer: LycorisLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer as one module of a LyCORIS file (key suffix -> tensor) that ComfyUI applies as peft's delta at
    strength 1: its tensors, and `alpha` (float32) where ComfyUI reads one, else the scale folded in."""
    network = layer_network(layer)
    out = {name: p.detach().float().cpu() for name, p in tensors(layer).items()}
    if comfyui_rank(network, out) is None:
        folded = next(k for k in LYCORIS[network][2] if k in out)
        out[folded] = out[folded] * scale(layer)
    else:
        out["alpha"] = torch.tensor(float(layer.alpha[ADAPTER]), dtype=torch.float32)
    return {k: v if k == "alpha" else v.to(dtype).contiguous() for k, v in out.items()}


def from_file_tensors(layer: LycorisLayer, keys: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Inverse of `file_tensors` for one module of a LyCORIS file (ours or another tool's): the layer's tensors
    (float32) that make peft's delta equal ComfyUI's at strength 1. Raises naming `where` when the file's factors
    are not the layer's (another rank or lokr_factor)."""
    network = layer_network(layer)
    own = tensors(layer)
    given = {k: v for k, v in keys.items() if k != "alpha"}
    shapes = {k: tuple(v.shape) for k, v in given.items()}
    if shapes != {k: tuple(p.shape) for k, p in own.items()}:
        raise ValueError(f"{where} has {NAMES[network]} tensors {shapes}, but the adapter's are "
                         f"{ {k: tuple(p.shape) for k, p in own.items()} }; set rank (and lokr_factor) as the file was "
                         "trained (ss_network_dim and ss_network_args in its metadata)")
    rank = comfyui_rank(network, given)
    file_scale = keys["alpha"].item() / rank if "alpha" in keys and rank is not None else 1.0
    out = {k: v.float() for k, v in given.items()}
    if file_scale != scale(layer):
        folded = next(k for k in LYCORIS[network][2] if k in out)
        out[folded] = out[folded] * (file_scale / scale(layer))
    return out


def zero(layer: LycorisLayer) -> None:
    """Make the layer's delta zero (a module a file does not cover), as its init does."""
    zeros = LYCORIS[layer_network(layer)][1]
    with torch.no_grad():
        for name, param in tensors(layer).items():
            if name in zeros:
                param.zero_()
