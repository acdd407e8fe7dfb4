"""The Flux transformer from a BFL / diffusers-layout single file or a diffusers folder, its config read off the
tensors (or the header alone) so real files get exactly the real config and tiny test files load the same way."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from .convert import bfl_names, bfl_to_diffusers
from .files import (
    SCALE_SUFFIXES,
    assign_weights,
    check_model_file,
    count_blocks,
    detect_file_kind,
    is_gguf,
    key_prefix,
    model_folder,
    read_safetensors_header,
    read_state_dict,
    shipped_config,
    weight_files,
)
from .fp8 import use_fp8_linears
from .gguf import gguf_shapes, read_gguf_transformer, use_gguf_linears
from .fused import fuse_state_dict, is_fused, split_names

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
    """Flux transformer from a BFL / diffusers-layout .safetensors file, a diffusers folder or a GGUF file.

    float8 files are upcast to `dtype`. With `fp8_base`, the Linear weights of the transformer blocks are kept
    (or stored) as float8_e4m3fn in `Fp8Linear`s and computed in the compute dtype; all else is in `dtype`. The
    model is built empty from the file's header and each tensor is cast as it is read, so a bf16 file loaded with
    `fp8_base` peaks at the fp8 model plus one tensor. A GGUF file's quantized block weights stay quantized in
    `GGUFLinear`s. Returned frozen, in eval mode.
    """
    path = check_model_file(path, "transformer")
    config = transformer_config(path)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    if is_gguf(path):
        state_dict = read_gguf_transformer(path, dtype, device, fp8_blocks=fp8_base)
        use_gguf_linears(model, state_dict, dtype)
        if fp8_base:
            use_fp8_linears(model, dtype)  # the block Linears the file does not quantize
    else:
        fp8_weights = use_fp8_linears(model, dtype) if fp8_base else set()
        state_dict = read_transformer_weights(path, dtype, device, fp8_weights)
    assign_weights(model, state_dict, path)
    logger.info("Loaded the Flux transformer %s: %d double and %d single blocks, width %d", path,
                config["num_layers"], config["num_single_layers"], model.inner_dim)  # fmt: skip
    return model


def transformer_config(path: str | Path) -> dict:
    """The FluxTransformer2DModel config of a transformer file or folder, from headers alone: no weight is read."""
    path = check_model_file(path, "transformer")
    if path.is_dir():
        folder = model_folder(path, "transformer")
        config = dict(FluxTransformer2DModel.load_config(folder))
        if config.get("_class_name") != "FluxTransformer2DModel":
            raise ValueError(f"{folder} holds a {config.get('_class_name')}, not a FluxTransformer2DModel.")
        return config
    if is_gguf(path):
        shapes = {k: torch.empty(shape, device="meta") for k, shape in gguf_shapes(path).items()}
        return infer_transformer_config(bfl_to_diffusers(shapes))
    kind = detect_file_kind(path)
    anchor = "x_embedder.weight" if kind == "flux_transformer_diffusers" else "img_in.weight"
    prefix = key_prefix(path, anchor, "Flux transformer")
    shapes = {k[len(prefix):]: torch.empty(shape, device="meta")
              for k, shape in read_safetensors_header(path).shapes.items()
              if k.startswith(prefix) and not k.endswith(SCALE_SUFFIXES)}
    return infer_transformer_config(shapes if kind == "flux_transformer_diffusers" else bfl_to_diffusers(shapes))


def read_transformer_weights(path: Path, dtype: torch.dtype, device, fp8: set[str]) -> dict[str, Tensor]:
    """A transformer file's or folder's tensors under diffusers names, whatever its layout and key prefix; those
    named in `fp8` (diffusers names) cast to float8_e4m3fn as read, the other floats to `dtype`."""
    if path.is_dir():
        state_dict = {}
        for file in weight_files(model_folder(path, "transformer")):
            state_dict |= read_state_dict(file, dtype=dtype, device=device, fp8=fp8)
        return state_dict
    if is_gguf(path):
        return read_gguf_transformer(path, dtype, device, fp8_blocks=bool(fp8))
    if detect_file_kind(path) == "flux_transformer_diffusers":
        return read_state_dict(path, key_prefix(path, "x_embedder.weight", "Flux transformer"), dtype, device, fp8)
    prefix = key_prefix(path, "img_in.weight", "Flux transformer")
    return bfl_to_diffusers(read_state_dict(path, prefix, dtype, device, bfl_names(fp8)))


def _frozen_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The base's (not LoRA's) frozen parameters under the names of the file's model (peft's `.base_layer` removed),
    each as (module, attribute)."""
    return {f"{module_name}.{name}".replace(".base_layer.", ".").lstrip("."): (module, name)
            for module_name, module in model.named_modules() if "lora_" not in module_name
            for name, param in module.named_parameters(recurse=False) if not param.requires_grad}


def drop_frozen_weights(model: nn.Module) -> None:
    """Free the frozen weights of a (LoRA-carrying) transformer, keeping their shapes and dtypes on the meta device:
    a base that is not in use costs no memory and is re-read from its file by `reload_frozen_weights`. The
    parameters are replaced, so whatever held the old ones (a `BlockSwap`) must be dropped too."""
    for module, name in _frozen_weights(model).values():
        meta = torch.empty_like(getattr(module, name), device="meta")
        setattr(module, name, nn.Parameter(meta, requires_grad=False))


def reload_frozen_weights(model: nn.Module, path: str | Path, dtype: torch.dtype, device="cpu") -> None:
    """Read the frozen weights dropped by `drop_frozen_weights` back from `path`, fp8 where they were fp8, in the
    model's layout (split, or fused by `fuse_projections`)."""
    frozen = _frozen_weights(model)
    fp8 = {key for key, (module, name) in frozen.items() if getattr(module, name).dtype == torch.float8_e4m3fn}
    fused = is_fused(model)
    state_dict = read_transformer_weights(check_model_file(path, "transformer"), dtype, device,
                                          split_names(fp8) if fused else fp8)
    if fused:
        state_dict = fuse_state_dict(state_dict)
    for key, (module, name) in frozen.items():
        setattr(module, name, nn.Parameter(state_dict.pop(key), requires_grad=False))
    assert not state_dict, f"{path} has tensors the model has not: {sorted(state_dict)[:5]}"
