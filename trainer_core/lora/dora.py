"""DoRA's magnitudes as ComfyUI reads them: the `dora_scale` written and read back, per fused or split Linear."""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .adapter import ADAPTER, _delta, _is_dora, _kohya_groups, _require_adapter, _row_norms
from .formats import DIFFUSERS_PREFIX


def _comfyui_dora_scale(layer: LoraLayer) -> torch.Tensor:
    """(out, 1) float32 `dora_scale` with which stock ComfyUI's loader reproduces peft's DoRA weight.

    peft: W' = m / ||W + ΔW|| * (W + ΔW), norms per output row. ComfyUI (`weight_decompose`, output axis when
    dora_scale has one entry per row) divides by the norm of the base W instead, so the file carries
    m * ||W|| / ||W + ΔW||. float32: the scale multiplies whole rows, so bf16 rounding would show.
    """
    delta = _delta(layer)
    m = layer.lora_magnitude_vector[ADAPTER].weight.float().to(delta.device)
    return (m * _row_norms(layer) / _row_norms(layer, delta)).unsqueeze(1).cpu()


def _magnitude_from_dora_scale(layer: LoraLayer, dora_scale: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `_comfyui_dora_scale` for the layer's current A, B; without a dora_scale (a plain LoRA
    file), the magnitude that makes DoRA equal that LoRA: ||W + ΔW||."""
    norms = _row_norms(layer, _delta(layer))
    return norms if dora_scale is None else dora_scale.float().flatten().to(norms.device) * norms / _row_norms(layer)


def kohya_dora_scales(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """`<kohya module>.dora_scale` for the fused BFL Linears of a DoRA adapter ({} without DoRA): the parts' scales
    stacked in row order (a row's norm involves that row only, so fusing is exact); parts without a LoRA get
    ||W||, which ComfyUI turns into no change."""
    layers = {n: layer for n, layer in _require_adapter(transformer).items() if _is_dora(layer)}
    state = {}
    for key, parts in _kohya_groups(transformer):
        if any(p in layers for p in parts):
            state[f"{key}.dora_scale"] = torch.cat([
                _comfyui_dora_scale(layers[p]) if p in layers
                else transformer.get_submodule(p).weight.float().norm(dim=1, keepdim=True).cpu() for p in parts
            ])
    return state


def dora_scales_by_linear(transformer: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `.dora_scale` tensors of a kohya or diffusers file's `state`, split per diffusers Linear."""
    groups = dict(_kohya_groups(transformer))
    per_linear = {}
    for k, v in state.items():
        if not k.endswith(".dora_scale"):
            continue
        module = k.removesuffix(".dora_scale")
        parts = groups.get(module, (module.removeprefix(DIFFUSERS_PREFIX),))
        outs = [transformer.get_submodule(p).out_features for p in parts]
        per_linear |= dict(zip(parts, v.flatten().split(outs)))
    return per_linear
