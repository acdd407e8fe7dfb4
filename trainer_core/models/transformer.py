"""The Flux transformer from a BFL / diffusers-layout single file or a diffusers folder, its config read off the
tensors (or the header alone) so real files get exactly the real config and tiny test files load the same way."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from torch import Tensor

from .convert import bfl_to_diffusers
from .files import (
    assign_weights,
    check_model_file,
    count_blocks,
    detect_file_kind,
    key_prefix,
    model_folder,
    read_safetensors_header,
    read_state_dict,
    shipped_config,
    weight_files,
)
from .fp8 import use_fp8_linears

logger = logging.getLogger(__name__)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per position axis (index, row, column), summing to `head_dim`: (16, 56, 56) for real Flux.

    Each axis needs an even size; rows and columns get equal shares, the index axis the rest (about 1/8).
    """
    rows = 2 * ((head_dim - head_dim // 8) // 4)
    return head_dim - 2 * rows, rows, rows


def infer_transformer_config(state_dict: dict[str, Tensor]) -> dict:
    """FluxTransformer2DModel config for a diffusers-named state dict.

    Starts from the real Flux-dev (guidance embedder present) or Flux-schnell config and overrides what the
    tensors tell: depths, widths, heads (from the qk-norm size), text and pooled widths, channels.
    """
    sd = state_dict
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    config = shipped_config("flux-dev-transformer.json" if guidance else "flux-schnell-transformer.json")
    hidden, in_channels = sd["x_embedder.weight"].shape
    num_layers = count_blocks(sd, "transformer_blocks")
    num_single_layers = count_blocks(sd, "single_transformer_blocks")
    block = "transformer_blocks.0." if num_layers else "single_transformer_blocks.0."
    head_dim = sd[block + "attn.norm_q.weight"].shape[0]
    mlp = sd[block + ("ff.net.0.proj.weight" if num_layers else "proj_mlp.weight")].shape[0]
    if mlp != 4 * hidden or hidden % head_dim:
        raise ValueError(
            f"Flux transformer with width {hidden}, MLP width {mlp} and head size {head_dim}: diffusers' Flux "
            "needs an MLP 4x as wide and a width divisible by the head size. Not a Flux.1 transformer."
        )
    out_channels = sd["proj_out.weight"].shape[0]
    config.update(
        in_channels=in_channels,
        out_channels=None if out_channels == in_channels else out_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        guidance_embeds=guidance,
        axes_dims_rope=list(rope_axes(head_dim)),
    )
    return config


def load_transformer(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu", fp8_base: bool = False
) -> FluxTransformer2DModel:
    """Flux transformer from a BFL / diffusers-layout .safetensors file or a diffusers folder.

    float8 files are upcast to `dtype`. With `fp8_base`, the Linear weights of the transformer blocks are kept
    (or stored) as float8_e4m3fn in `Fp8Linear`s and computed in the input's dtype; all else is in `dtype`.
    Returned frozen, in eval mode.
    """
    path = check_model_file(path, "transformer")
    read = dict(dtype=dtype, device=device, keep_fp8=fp8_base)
    if path.is_dir():
        folder = model_folder(path, "transformer")
        config = FluxTransformer2DModel.load_config(folder)
        if config.get("_class_name") != "FluxTransformer2DModel":
            raise ValueError(f"{folder} holds a {config.get('_class_name')}, not a FluxTransformer2DModel.")
        state_dict = {}
        for file in weight_files(folder):
            state_dict |= read_state_dict(file, **read)
    else:
        state_dict = _read_transformer_file(path, **read)
        config = infer_transformer_config(state_dict)

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    fp8_weights = use_fp8_linears(model, dtype) if fp8_base else set()
    for k in state_dict:  # in place, so the memory of a converted tensor is freed as the next is made
        state_dict[k] = state_dict[k].to(torch.float8_e4m3fn if k in fp8_weights else dtype)
    assign_weights(model, state_dict, path)
    logger.info("Loaded the Flux transformer %s: %d double and %d single blocks, width %d", path,
                config["num_layers"], config["num_single_layers"], model.inner_dim)  # fmt: skip
    return model


def transformer_config(path: str | Path) -> dict:
    """The FluxTransformer2DModel config of a transformer file or folder, from headers alone: no weight is read."""
    path = check_model_file(path, "transformer")
    if path.is_dir():
        return dict(FluxTransformer2DModel.load_config(model_folder(path, "transformer")))
    kind = detect_file_kind(path)
    anchor = "x_embedder.weight" if kind == "flux_transformer_diffusers" else "img_in.weight"
    prefix = key_prefix(path, anchor, "Flux transformer")
    shapes = {k[len(prefix):]: torch.empty(shape, device="meta")
              for k, shape in read_safetensors_header(path).shapes.items() if k.startswith(prefix)}
    return infer_transformer_config(shapes if kind == "flux_transformer_diffusers" else bfl_to_diffusers(shapes))


def _read_transformer_file(path: Path, **read) -> dict[str, Tensor]:
    """A single-file transformer's tensors under diffusers names, whatever its layout and key prefix."""
    if detect_file_kind(path) == "flux_transformer_diffusers":
        return read_state_dict(path, key_prefix(path, "x_embedder.weight", "Flux transformer"), **read)
    return bfl_to_diffusers(read_state_dict(path, key_prefix(path, "img_in.weight", "Flux transformer"), **read))
