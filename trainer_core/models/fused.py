"""Flux's fused layout on diffusers' model: one `to_qkv` Linear per stream in double blocks and one `linear1`
(q, k, v and the MLP input) in single blocks, as in BFL's checkpoints and kohya's LoRAs.

diffusers splits those projections into separate Linears; fusing them back gives fewer, larger GEMMs and lets a
LoRA hold one down-projection per fused Linear (the kohya layout) instead of one per part. Rows are stacked in the
order of `FUSIONS`, so a fused weight is `torch.cat` of its parts and `y = x W^T` is the parts' outputs side by side.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import Tensor, nn

from .files import count_blocks
from .fp8 import Fp8Linear

# block kind -> fused Linear -> the diffusers Linears stacked into it, in row order
FUSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "double": {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
    "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
}
BLOCK_LISTS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


class FusedSingleTransformerBlock(FluxSingleTransformerBlock):
    """diffusers' single block with q, k, v and the MLP input in one `linear1`; the attention gets the fused q, k, v
    as its input and an identity `to_qkv` (diffusers' fused-projection path), the rest is diffusers' own."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        qkv, mlp = self.linear1(norm_hidden_states).split([3 * self.attn.inner_dim, self.mlp_hidden_dim], dim=-1)
        attn_output = self.attn(hidden_states=qkv, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
        hidden_states = torch.cat([attn_output, self.act_mlp(mlp)], dim=2)
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out(hidden_states)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def is_fused(model: nn.Module) -> bool:
    """Whether `fuse_projections` has been applied to this FluxTransformer2DModel."""
    return getattr(model, "_fused_layout", False)


def _fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One frozen Linear of the parts' kind (an `Fp8Linear` or a `GGUFLinear` stays one: a GGUF weight's rows are
    whole quantized blocks, so they stack as bytes) whose rows stack theirs; on their device."""
    first = parts[0]
    shape = (first.in_features, sum(p.out_features for p in parts), first.bias is not None)
    fused = (type(first)(*shape, first.compute_dtype, device="meta") if isinstance(first, Fp8Linear)
             else nn.Linear(*shape, device="meta"))
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def _set(module: nn.Module, name: str, child: nn.Module | None) -> None:
    parent, _, attr = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    if child is None:
        delattr(owner, attr)
    else:
        setattr(owner, attr, child)


def fuse_projections(model: nn.Module) -> None:
    """Put `model` (a FluxTransformer2DModel without adapters, weights loaded or on meta) in the fused layout, in
    place: each fused Linear replaces its parts, whose weights are freed. Idempotent."""
    if is_fused(model):
        return
    for kind, attr in BLOCK_LISTS.items():
        for block in getattr(model, attr):
            for fused_name, parts in FUSIONS[kind].items():
                fused = _fuse_linears([block.get_submodule(p) for p in parts])
                for p in parts:
                    _set(block, p, None)
                _set(block, fused_name, fused)
            block.attn.fused_projections = True  # diffusers' processor then reads attn.to_qkv (/ to_added_qkv)
            if kind == "single":
                block.attn.to_qkv = nn.Identity()  # linear1 has already projected
                block.__class__ = FusedSingleTransformerBlock
    model._fused_layout = True


def fuse_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers-named Flux state dict -> the names and tensors of the fused layout (pure; others pass through)."""
    sd = dict(state_dict)
    for kind, attr in BLOCK_LISTS.items():
        for i in range(count_blocks(sd, attr)):
            for fused_name, parts in FUSIONS[kind].items():
                for param in ("weight", "bias"):
                    names = [f"{attr}.{i}.{p}.{param}" for p in parts]
                    if all(n in sd for n in names):
                        sd[f"{attr}.{i}.{fused_name}.{param}"] = torch.cat([sd.pop(n) for n in names])
    return sd


def part_sizes(parts: int, out_features: int, width: int) -> list[int]:
    """Row counts of a fused Linear's `parts`: q, k, v are `width` (the model width, the Linear's input) each; the
    MLP input of a single block's linear1 takes the rest."""
    return [width] * (parts - 1) + [out_features - width * (parts - 1)]


def unfuse_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `fuse_state_dict` (pure; views, no copies): the fused layout's tensors -> diffusers' names."""
    sd = dict(state_dict)
    for kind, attr in BLOCK_LISTS.items():
        for i in range(count_blocks(sd, attr)):
            for fused_name, parts in FUSIONS[kind].items():
                weight = sd.get(f"{attr}.{i}.{fused_name}.weight")
                if weight is None:
                    continue
                sizes = part_sizes(len(parts), weight.shape[0], weight.shape[1])
                for param in ("weight", "bias"):
                    if f"{attr}.{i}.{fused_name}.{param}" in sd:
                        tensors = sd.pop(f"{attr}.{i}.{fused_name}.{param}").split(sizes)
                        sd |= {f"{attr}.{i}.{p}.{param}": t for p, t in zip(parts, tensors)}
    return sd


def split_names(names: set[str]) -> set[str]:
    """Inverse of `fuse_state_dict` on tensor names: each fused name -> the names of its parts."""
    out = set()
    for name in names:
        attr, _, rest = name.partition(".")
        index, _, tail = rest.partition(".")
        module, _, param = tail.rpartition(".")
        kind = next((k for k, a in BLOCK_LISTS.items() if a == attr), None)
        parts = FUSIONS[kind].get(module) if kind else None
        out |= {f"{attr}.{index}.{p}.{param}" for p in parts} if parts else {name}
    return out
