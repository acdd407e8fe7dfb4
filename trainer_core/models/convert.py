"""BFL <-> diffusers names of the Flux transformer: pure functions over state dicts, no model import."""
from __future__ import annotations

import torch
from torch import Tensor

from .files import count_blocks
from .fused import unfuse_state_dict

# BFL module -> the diffusers module(s) it holds, stacked along dim 0 in this order (the fused qkv / linear1), for
# the Linears of one block. Block modulations keep their chunk order (shift, scale, gate); only the final `norm_out`
# swaps its halves. The LoRA engine targets exactly these Linears and names its kohya keys after the BFL side.
DOUBLE_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_DOUBLE_BLOCK_NORMS = {
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
_SINGLE_BLOCK_NORMS = {"norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",)}


def flux_module_map(num_layers: int, num_single_layers: int) -> dict[str, tuple[str, ...]]:
    """BFL module name -> the diffusers module(s) it holds, in the order they are stacked along dim 0.

    The fused BFL modules (`img_attn.qkv`, `txt_attn.qkv`, single blocks' `linear1`) hold several diffusers
    modules; kohya LoRA names are the BFL ones (`lora_unet_double_blocks_0_img_attn_qkv`).
    """
    m = {
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
        "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
        "final_layer.linear": ("proj_out",),
        "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    }
    blocks = (
        ("double_blocks", "transformer_blocks", num_layers, DOUBLE_BLOCK_LINEARS | _DOUBLE_BLOCK_NORMS),
        ("single_blocks", "single_transformer_blocks", num_single_layers, SINGLE_BLOCK_LINEARS | _SINGLE_BLOCK_NORMS),
    )
    for bfl, diffusers, count, modules in blocks:
        for i in range(count):
            m |= {f"{bfl}.{i}.{k}": tuple(f"{diffusers}.{i}.{x}" for x in v) for k, v in modules.items()}
    return m


def _param_names(bfl_module: str) -> tuple[tuple[str, str], ...]:
    """(BFL, diffusers) parameter names of a module: BFL's RMSNorms call their weight `scale`."""
    return (("scale", "weight"),) if bfl_module.endswith("_norm") else (("weight", "weight"), ("bias", "bias"))


def _swap_halves(t: Tensor) -> Tensor:
    # BFL's final modulation yields (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
    return torch.cat(t.chunk(2)[::-1])


def _leftover_error(leftover, layout: str) -> ValueError:
    return ValueError(
        f"{len(leftover)} tensors are not {layout} Flux transformer weights: {sorted(leftover)[:10]}. "
        "This is not a Flux.1 transformer (or a variant this trainer does not know)."
    )


def bfl_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original BFL Flux transformer state dict -> diffusers `FluxTransformer2DModel` names.

    Widths are read from the tensors (diffusers' own converter assumes width 3072), so this is exact for real
    and tiny models alike. Accepts the `model.diffusion_model.` / `diffusion_model.` prefixes. Fused tensors are
    split into views, not copies. Raises ValueError listing any tensor it does not understand.
    """
    sd = {k.removeprefix("model.").removeprefix("diffusion_model."): v for k, v in state_dict.items()}
    if "img_in.weight" not in sd:
        raise ValueError("Not a BFL Flux transformer state dict: it has no img_in.weight.")
    hidden = sd["img_in.weight"].shape[0]
    modules = flux_module_map(count_blocks(sd, "double_blocks"), count_blocks(sd, "single_blocks"))
    out = {}
    for bfl, targets in modules.items():
        for bfl_param, param in _param_names(bfl):
            t = sd.pop(f"{bfl}.{bfl_param}", None)
            if t is None:
                continue  # e.g. no guidance_in in schnell; a real gap is caught when loading into the model
            if bfl == "final_layer.adaLN_modulation.1":
                t = _swap_halves(t)
            # q, k, v are `hidden` wide each; the MLP input of linear1 takes the rest.
            sizes = [hidden] * (len(targets) - 1) + [t.shape[0] - hidden * (len(targets) - 1)]
            for name, part in zip(targets, t.split(sizes)):
                out[f"{name}.{param}"] = part
    if sd:
        raise _leftover_error(sd, "BFL")
    return out


def bfl_names(names: set[str]) -> set[str]:
    """The BFL tensor names whose diffusers parts are all in `names` (diffusers tensor names)."""
    modules = flux_module_map(count_blocks(names, "transformer_blocks"),
                              count_blocks(names, "single_transformer_blocks"))
    return {f"{bfl}.{bfl_param}" for bfl, targets in modules.items() for bfl_param, param in _param_names(bfl)
            if all(f"{t}.{param}" in names for t in targets)}


def diffusers_to_bfl(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `bfl_to_diffusers`: diffusers `FluxTransformer2DModel` names, in diffusers' layout or the fused one
    (`fuse_projections`), -> original BFL names (no prefix)."""
    sd = unfuse_state_dict(state_dict)
    modules = flux_module_map(count_blocks(sd, "transformer_blocks"), count_blocks(sd, "single_transformer_blocks"))
    out = {}
    for bfl, targets in modules.items():
        for bfl_param, param in _param_names(bfl):
            names = [f"{name}.{param}" for name in targets]
            if not all(n in sd for n in names):
                continue
            t = torch.cat([sd.pop(n) for n in names])
            out[f"{bfl}.{bfl_param}"] = _swap_halves(t) if bfl == "final_layer.adaLN_modulation.1" else t
    if sd:
        raise _leftover_error(sd, "diffusers")
    return out
