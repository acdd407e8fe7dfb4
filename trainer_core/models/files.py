"""Loading the Flux model files users really have, from local files only.

- Transformer: a BFL single file (`flux1-dev.safetensors`, the fp8 files, with or without the
  `model.diffusion_model.` prefix, or a ComfyUI all-in-one checkpoint), a diffusers-layout single file, or a
  diffusers folder.
- VAE: BFL `ae.safetensors` or a diffusers folder.
- Text encoders: ComfyUI's `clip_l` / `t5xxl` single files (fp16, fp8, scaled fp8) or transformers folders, with
  the tokenizers from local folders (ComfyUI ships them in its source tree).

Nothing is fetched from a hub: the real Flux configs ship in `configs/` and the widths, depths and variant are
read off the tensors, so real files get exactly the real config and tiny test files load the same way.
Models are built on the meta device and the file's tensors are assigned into them, so a 12B file is never held
twice. Every model is returned frozen in eval mode; LoRA adds the trainable parameters.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..checkpoints import STATE_FORMAT

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parents[1] / "configs"
VAE_SCALE_FACTOR = 8  # pixels per latent: every Flux VAE (tiny included) has 4 blocks, 3 of them downsampling
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # Flux-dev's T5 length; a T5 file may declare its own in its metadata
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # BFL first released flux1-dev and ae as .sft; ComfyUI lists both

# What `detect_file_kind` can answer, as said to the user.
KIND_DESCRIPTIONS = {
    "flux_transformer": "a Flux transformer (original BFL layout)",
    "flux_transformer_diffusers": "a Flux transformer (diffusers layout)",
    "flux_checkpoint": "a Flux all-in-one checkpoint (transformer, VAE and text encoders)",
    "flux_vae": "the Flux VAE (ae.safetensors)",
    "sd_vae": "a Stable Diffusion VAE with 4 latent channels (Flux's VAE has 16)",
    "clip": "a CLIP text encoder (clip_l)",
    "t5": "a T5 text encoder (t5xxl)",
    "sdxl": "an SDXL checkpoint",
    "sd1": "a Stable Diffusion 1.x/2.x checkpoint",
    "sd3": "a Stable Diffusion 3 model",
    "lora": "a LoRA",
    "training_state": "a training state of this trainer (pick it as resume_state)",
    "bnb_quantized": "a bitsandbytes-quantised (NF4/FP4) model, which cannot be trained on",
    "unknown": "no model this trainer knows",
}
# Where a file of each kind belongs, to tell users who swapped two inputs.
_INPUT_OF_KIND = {
    "flux_transformer": "the transformer input",
    "flux_transformer_diffusers": "the transformer input",
    "flux_vae": "the VAE input",
    "clip": "the CLIP-L input",
    "t5": "the T5 input",
}


class ModelRole(NamedTuple):
    """A model input (transformer, VAE, CLIP-L, T5): what it is called and which files it takes."""

    what: str  # the input, as "... not found" messages name it
    kinds: tuple[str, ...]  # the `detect_file_kind` answers it accepts
    expected: str  # what to give it, as "appears to be ..., not ..." messages say


MODEL_ROLES = {
    "transformer": ModelRole("Flux transformer", ("flux_transformer", "flux_transformer_diffusers", "flux_checkpoint"),
                             "a Flux transformer (e.g. flux1-dev.safetensors or flux1-dev-fp8.safetensors)"),
    "vae": ModelRole("Flux VAE", ("flux_vae", "flux_checkpoint"), "the Flux VAE (ae.safetensors)"),
    "clip": ModelRole("CLIP-L text encoder", ("clip", "flux_checkpoint"),
                      "the CLIP-L text encoder (clip_l.safetensors)"),
    "t5": ModelRole("T5 text encoder", ("t5", "flux_checkpoint"), "the T5 text encoder (t5xxl_fp16.safetensors)"),
}


# ---------------------------------------------------------------------------------------------------------------
# Files: existence, safetensors headers, classification


class SafetensorsHeader(NamedTuple):
    shapes: dict[str, list[int]]  # tensor name -> shape
    metadata: dict[str, str]


def _existing_path(path: str | Path, what: str) -> Path:
    """`path` if it exists; else FileNotFoundError naming it and the closest names in its folder."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (its folder {path.parent} does not exist either).")
    names = sorted(p.name for p in path.parent.iterdir())
    close = difflib.get_close_matches(path.name, names, n=5, cutoff=0.5)
    hint = f"Did you mean: {', '.join(close)}?" if close else f"That folder holds: {', '.join(names[:20]) or 'nothing'}"
    raise FileNotFoundError(f"{what} not found: {path}. {hint}")


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Tensor names, shapes and metadata of a .safetensors file, reading only its header."""
    path = _existing_path(path, "Model file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle checkpoint ({suffix}). Unpickling can run arbitrary code, so it is refused: "
            "convert it to .safetensors (or download the .safetensors release of the model)."
        )
    if suffix == ".gguf":
        raise ValueError(f"{path} is a GGUF-quantised model, which cannot be trained on: use the bf16 or fp8 "
                         ".safetensors release of the model.")
    if path.is_dir() or suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{path} is not a .safetensors file: give the .safetensors model file.")
    try:
        with safe_open(path, "pt") as f:
            return SafetensorsHeader({k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}): download it again.") from e


def detect_file_kind(path: str | Path) -> str:
    """Classify a .safetensors model file from its header alone: one of `KIND_DESCRIPTIONS`' keys.

    Raises FileNotFoundError for a missing file and ValueError for a pickle, non-safetensors or corrupt file.
    """
    shapes, metadata = read_safetensors_header(path)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in shapes)

    if metadata.get("format") == STATE_FORMAT:
        return "training_state"
    if has(".lora_down.") or has(".lora_A.") or has(".lora_B."):
        return "lora"
    if has(".quant_state.bitsandbytes__"):
        return "bnb_quantized"
    # Stable Diffusion checkpoints embed an LDM VAE and a CLIP, so they are recognised first.
    if has("conditioner.embedders") or (has("input_blocks.") and has("label_emb.")):
        return "sdxl"
    if has("input_blocks."):
        return "sd1"
    if has("joint_blocks."):
        return "sd3"
    if has("double_blocks.") and has("single_blocks."):
        return "flux_checkpoint" if has("decoder.up.") and has("token_embedding") else "flux_transformer"
    if has("single_transformer_blocks.") and has("x_embedder."):
        return "flux_transformer_diffusers"
    if has("encoder.down.") and has("decoder.up."):
        conv_out = next(v for k, v in shapes.items() if k.endswith("encoder.conv_out.weight"))
        return "flux_vae" if conv_out[0] == 2 * 16 else "sd_vae"  # conv_out yields mean and logvar
    if has("SelfAttention.relative_attention_bias"):
        return "t5"
    if has("self_attn.q_proj") and has("token_embedding"):
        return "clip"
    return "unknown"


def _require_kind(path: Path, kinds: tuple[str, ...], expected: str) -> str:
    """The file's kind if it is one of `kinds`; else a ValueError saying what the file appears to be."""
    kind = detect_file_kind(path)
    if kind in kinds:
        return kind
    message = f"{path} appears to be {KIND_DESCRIPTIONS[kind]}, not {expected}."
    if kind in _INPUT_OF_KIND:
        message += f" It belongs in {_INPUT_OF_KIND[kind]}: were two model inputs swapped?"
    elif kind in ("sdxl", "sd1", "sd3", "sd_vae", "lora", "bnb_quantized"):
        message += " Flux LoRAs are trained on the Flux.1 model files (bf16 or fp8); pick those instead."
    raise ValueError(message)


def check_model_file(path: str | Path, role: str) -> Path:
    """`path`, checked to exist and, for a file, to hold what the `role` input of `MODEL_ROLES` takes.

    Reads only the header: calling it for every input first makes a wrong file fail before minutes go into loading
    the others. Folders are checked when loaded.
    """
    what, kinds, expected = MODEL_ROLES[role]
    path = _existing_path(path, what)
    if path.is_file():
        _require_kind(path, kinds, expected)
    return path


def _key_prefix(path: Path, anchor: str, what: str) -> str:
    """The prefix in front of `anchor` among the file's tensor names ('' when unprefixed)."""
    for name in read_safetensors_header(path).shapes:
        if name.endswith(anchor):
            return name[: -len(anchor)]
    raise ValueError(f"{path} holds no {what} (no tensor named like {anchor}): pick the file that does.")


def _read_state_dict(
    path: Path, prefix: str = "", dtype: torch.dtype = torch.bfloat16, device="cpu", keep_fp8: bool = False
) -> dict[str, Tensor]:
    """The tensors named `prefix...` (prefix removed), floats cast to `dtype` on `device` one at a time.

    float8_e4m3fn tensors stay float8 when `keep_fp8`. ComfyUI's scaled-fp8 files (a `scale_weight` beside each
    float8 weight) are dequantised.
    """
    state_dict = {}
    with safe_open(path, "pt", device=str(device)) as f:
        names = f.keys()
        scales = {name for name in names if name.endswith(".scale_weight")}
        for name in names:
            if not name.startswith(prefix) or name.endswith((".scale_weight", ".scale_input", "scaled_fp8")):
                continue
            tensor = f.get_tensor(name)
            scale_name = name.removesuffix("weight") + "scale_weight"
            if scale_name in scales:
                tensor = (tensor.float() * f.get_tensor(scale_name).float()).to(dtype)
            elif tensor.is_floating_point() and not (keep_fp8 and tensor.dtype == torch.float8_e4m3fn):
                tensor = tensor.to(dtype)
            state_dict[name[len(prefix) :]] = tensor
    return state_dict


def _model_folder(folder: Path, subfolder: str) -> Path:
    """A model folder, or its `subfolder` when given a diffusers pipeline root (e.g. FLUX.1-dev/)."""
    for candidate in (folder, folder / subfolder):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"{folder} has no config.json (nor {subfolder}/config.json): not a model folder.")


def _assign(model: nn.Module, state_dict: dict[str, Tensor], path: Path) -> None:
    """Assign the tensors into a meta-device model (no copy), checking that every weight is there."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {type(model).__name__} it describes: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}. The file is incomplete or from another model: download it again."
        )
    model.eval().requires_grad_(False)


def _count_blocks(names, prefix: str) -> int:
    """Number of `prefix.N.` blocks among the names."""
    indices = [int(k[len(prefix) + 1 :].split(".")[0]) for k in names if k.startswith(prefix + ".")]
    return max(indices) + 1 if indices else 0


def shipped_config(name: str) -> dict:
    """A config shipped in `configs/` (the real Flux ones), as a dict to override."""
    return json.loads((CONFIG_DIR / name).read_text())


# ---------------------------------------------------------------------------------------------------------------
# Flux transformer


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
    modules = flux_module_map(_count_blocks(sd, "double_blocks"), _count_blocks(sd, "single_blocks"))
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


def diffusers_to_bfl(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `bfl_to_diffusers`: diffusers `FluxTransformer2DModel` names -> original BFL names (no prefix)."""
    sd = dict(state_dict)
    modules = flux_module_map(_count_blocks(sd, "transformer_blocks"), _count_blocks(sd, "single_transformer_blocks"))
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
    num_layers = _count_blocks(sd, "transformer_blocks")
    num_single_layers = _count_blocks(sd, "single_transformer_blocks")
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
        folder = _model_folder(path, "transformer")
        config = FluxTransformer2DModel.load_config(folder)
        if config.get("_class_name") != "FluxTransformer2DModel":
            raise ValueError(f"{folder} holds a {config.get('_class_name')}, not a FluxTransformer2DModel.")
        state_dict = {}
        for file in _weight_files(folder):
            state_dict |= _read_state_dict(file, **read)
    else:
        state_dict = _read_transformer_file(path, **read)
        config = infer_transformer_config(state_dict)

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    fp8_weights = use_fp8_linears(model, dtype) if fp8_base else set()
    for k in state_dict:  # in place, so the memory of a converted tensor is freed as the next is made
        state_dict[k] = state_dict[k].to(torch.float8_e4m3fn if k in fp8_weights else dtype)
    _assign(model, state_dict, path)
    logger.info("Loaded the Flux transformer %s: %d double and %d single blocks, width %d", path,
                config["num_layers"], config["num_single_layers"], model.inner_dim)  # fmt: skip
    return model


def transformer_config(path: str | Path) -> dict:
    """The FluxTransformer2DModel config of a transformer file or folder, from headers alone: no weight is read."""
    path = check_model_file(path, "transformer")
    if path.is_dir():
        return dict(FluxTransformer2DModel.load_config(_model_folder(path, "transformer")))
    kind = detect_file_kind(path)
    anchor = "x_embedder.weight" if kind == "flux_transformer_diffusers" else "img_in.weight"
    prefix = _key_prefix(path, anchor, "Flux transformer")
    shapes = {k[len(prefix):]: torch.empty(shape, device="meta")
              for k, shape in read_safetensors_header(path).shapes.items() if k.startswith(prefix)}
    return infer_transformer_config(shapes if kind == "flux_transformer_diffusers" else bfl_to_diffusers(shapes))


def _read_transformer_file(path: Path, **read) -> dict[str, Tensor]:
    """A single-file transformer's tensors under diffusers names, whatever its layout and key prefix."""
    if detect_file_kind(path) == "flux_transformer_diffusers":
        return _read_state_dict(path, _key_prefix(path, "x_embedder.weight", "Flux transformer"), **read)
    return bfl_to_diffusers(_read_state_dict(path, _key_prefix(path, "img_in.weight", "Flux transformer"), **read))


def _weight_files(folder: Path, name: str = "diffusion_pytorch_model") -> list[Path]:
    """The .safetensors file(s) of a diffusers (`diffusion_pytorch_model`) or transformers (`model`) model folder,
    sharded (with an index json) or not. A folder of pickle weights only (`*.bin`) is refused, never unpickled."""
    index = folder / f"{name}.safetensors.index.json"
    if index.exists():
        return sorted({folder / shard for shard in json.loads(index.read_text())["weight_map"].values()})
    if (folder / f"{name}.safetensors").exists():
        return [folder / f"{name}.safetensors"]
    pickles = sorted(p.name for p in folder.glob(f"*{name}*.bin"))
    if pickles:
        raise ValueError(f"{folder} holds only pickle weights ({pickles[0]}), which are refused: convert them to "
                         ".safetensors.")  # fmt: skip
    raise FileNotFoundError(f"{folder} has no {name}.safetensors (nor a sharded index): the folder is incomplete.")


# ---------------------------------------------------------------------------------------------------------------
# VAE


def infer_vae_config(state_dict: dict[str, Tensor]) -> dict:
    """AutoencoderKL config for a BFL/LDM-named VAE state dict: the real Flux VAE config, widths from the tensors.

    GroupNorm's group count is not stored in the weights: it is 32 (the real value) when every width allows it.
    """
    sd = state_dict
    num_blocks = _count_blocks(sd, "encoder.down")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(num_blocks)]
    config = shipped_config("flux-vae.json")
    config.update(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2,
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * num_blocks,
        up_block_types=["UpDecoderBlock2D"] * num_blocks,
        layers_per_block=_count_blocks(sd, "encoder.down.0.block"),
        norm_num_groups=math.gcd(32, *widths),
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )
    return config


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> AutoencoderKL:
    """Flux VAE from BFL `ae.safetensors` (or an all-in-one checkpoint) or a diffusers folder. Frozen, eval mode."""
    path = check_model_file(path, "vae")
    if path.is_dir():
        folder = _model_folder(path, "vae")
        _weight_files(folder)  # our messages for a pickle-only or incomplete folder
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
        if vae.config.latent_channels != 16:
            raise ValueError(f"{path} is a VAE with {vae.config.latent_channels} latent channels; Flux's has 16.")
        return vae.to(device).eval().requires_grad_(False)
    state_dict = _read_state_dict(path, _key_prefix(path, "encoder.conv_in.weight", "VAE"), dtype, device)
    config = infer_vae_config(state_dict)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    _assign(vae, convert_ldm_vae_checkpoint(state_dict, config), path)
    return vae


# ---------------------------------------------------------------------------------------------------------------
# Text encoders


def infer_clip_config(state_dict: dict[str, Tensor], metadata: dict[str, str]) -> CLIPTextConfig:
    """CLIPTextConfig for a CLIPTextModel state dict: the real CLIP-L config with the sizes read off the tensors.

    The head count is not in the weights: the file's `num_attention_heads` metadata when present (tiny files
    write it), else one head per 64 channels (CLIP-L: 12).
    """
    sd = state_dict
    vocab_size, hidden = sd["embeddings.token_embedding.weight"].shape
    config = shipped_config("clip-l.json")
    config.update(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "encoder.layers"),
        num_attention_heads=int(metadata.get("num_attention_heads", max(1, hidden // 64))),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
    )
    return CLIPTextConfig.from_dict(config)


def infer_t5_config(state_dict: dict[str, Tensor]) -> T5Config:
    """T5Config for a T5 encoder state dict: the real T5-XXL config with the sizes read off the tensors.

    The head count is the width of the relative-attention bias (buckets x heads).
    """
    sd = state_dict
    vocab_size, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    num_layers = _count_blocks(sd, "encoder.block")
    config = shipped_config("t5-xxl-encoder.json")
    config.update(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=wi.shape[0],
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        num_heads=heads,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5Config.from_dict(config)


def _load_clip(path: str | Path, dtype: torch.dtype, device) -> CLIPTextModel:
    path = check_model_file(path, "clip")
    if path.is_dir():
        return _load_pretrained(CLIPTextModel, _model_folder(path, "text_encoder"), dtype, device)
    prefix = _key_prefix(path, "embeddings.token_embedding.weight", "CLIP text encoder")
    state_dict = _read_state_dict(path, prefix, dtype, device)
    for extra in ("embeddings.position_ids", "text_projection.weight", "logit_scale"):  # not CLIPTextModel's
        state_dict.pop(extra, None)
    with init_empty_weights():
        model = CLIPTextModel(infer_clip_config(state_dict, read_safetensors_header(path).metadata))
    _assign(model, state_dict, path)
    return model.to(device)  # the position_ids buffer was created on the CPU


def _load_t5(path: str | Path, dtype: torch.dtype, device) -> T5EncoderModel:
    path = check_model_file(path, "t5")
    if path.is_dir():
        return _load_pretrained(T5EncoderModel, _model_folder(path, "text_encoder_2"), dtype, device)
    state_dict = _read_state_dict(path, _key_prefix(path, "shared.weight", "T5 text encoder"), dtype, device)
    state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"]  # tied; files usually omit it
    with init_empty_weights():
        model = T5EncoderModel(infer_t5_config(state_dict))
    _assign(model, state_dict, path)
    model.tie_weights()
    return model


def _load_pretrained(cls, folder: Path, dtype: torch.dtype, device):
    """A transformers text encoder from its local folder, checking first that the folder holds that model."""
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != cls.config_class.model_type:
        raise ValueError(f"{folder} holds a {model_type} model, not {cls.config_class.model_type}: "
                         "were the two text encoder inputs swapped?")  # fmt: skip
    _weight_files(folder, "model")  # our messages for a pickle-only or incomplete folder
    model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def _declared_sequence_length(t5_path: Path) -> int:
    """The T5 length a T5 file declares in its metadata (tiny files do), else Flux-dev's 512."""
    metadata = {} if t5_path.is_dir() else read_safetensors_header(t5_path).metadata
    return int(metadata.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))


def _load_tokenizer(folder: Path, cls, required: tuple[str, ...], model: nn.Module, what: str, **kwargs):
    """A tokenizer from a local folder, checked against the vocabulary of the model it feeds."""
    folder = _existing_path(folder, f"{what} tokenizer folder")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{what} tokenizer folder {folder} lacks {', '.join(missing)}.")
    tokenizer = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    if not 3 < len(tokenizer) <= model.config.vocab_size:
        raise ValueError(
            f"{what} tokenizer in {folder} has {len(tokenizer)} tokens but its text encoder has "
            f"{model.config.vocab_size}: the tokenizer does not belong to that model."
        )
    return tokenizer


@dataclass
class TextEncoders:
    """CLIP-L and T5 with their tokenizers; `encode` gives Flux's text conditioning as diffusers' FluxPipeline."""

    clip: CLIPTextModel
    clip_tokenizer: CLIPTokenizer
    t5: T5EncoderModel
    t5_tokenizer: PreTrainedTokenizerBase
    max_sequence_length: int  # T5 tokens: 512 for dev, 256 for schnell, small for tiny

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> prompt_embeds (B, max_sequence_length, t5_dim), pooled_projections (B, clip_dim).

        CLIP's pooled output at its full 77 tokens, T5's last hidden state padded to `max_sequence_length`.
        """
        clip_ids = _tokenize(self.clip_tokenizer, prompts, self.clip.config.max_position_embeddings, "CLIP")
        pooled = self.clip(clip_ids.to(self.clip.device)).pooler_output  # (B, clip_dim)
        t5_ids = _tokenize(self.t5_tokenizer, prompts, self.max_sequence_length, "T5")
        prompt_embeds = self.t5(t5_ids.to(self.t5.device)).last_hidden_state  # (B, L, t5_dim)
        return prompt_embeds, pooled

    def to(self, device) -> TextEncoders:
        """Move both encoders (e.g. off the GPU once the captions are cached); returns self."""
        self.clip.to(device)
        self.t5.to(device)
        return self


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int, what: str) -> Tensor:
    """(B, length) token ids, padded and truncated; warns about what truncation drops."""
    too_long = [p for p, ids in zip(prompts, tokenizer(prompts).input_ids) if len(ids) > length]
    if too_long:
        logger.warning("%d prompt(s) exceed %s's %d tokens and are truncated, e.g. %r",
                       len(too_long), what, length, too_long[0])  # fmt: skip
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def load_text_encoders(
    clip_path: str | Path,
    t5_path: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    max_sequence_length: int | None = None,
    *,
    clip_tokenizer_dir: str | Path | None = None,
    t5_tokenizer_dir: str | Path | None = None,
) -> TextEncoders:
    """CLIP-L and T5 from ComfyUI-style single files or transformers folders, tokenizers from local folders.

    Tokenizers: `tokenizer_dir/clip` (vocab.json + merges.txt, as ComfyUI's comfy/sd1_tokenizer) and
    `tokenizer_dir/t5` (tokenizer.json, as comfy/text_encoders/t5_tokenizer), or each folder given on its own.
    `max_sequence_length` defaults to the T5 file's `max_sequence_length` metadata, else 512 (Flux-dev).
    """
    if clip_tokenizer_dir is None or t5_tokenizer_dir is None:
        if tokenizer_dir is None:
            raise ValueError("No tokenizer folders: pass tokenizer_dir (holding clip/ and t5/) or both "
                             "clip_tokenizer_dir and t5_tokenizer_dir.")
        clip_tokenizer_dir = clip_tokenizer_dir or Path(tokenizer_dir) / "clip"
        t5_tokenizer_dir = t5_tokenizer_dir or Path(tokenizer_dir) / "t5"
    clip = _load_clip(clip_path, dtype, device)
    t5 = _load_t5(t5_path, dtype, device)
    # ComfyUI's CLIP tokenizer config says 8192 tokens; CLIP-L has 77 positions.
    clip_tokenizer = _load_tokenizer(Path(clip_tokenizer_dir), CLIPTokenizer, ("vocab.json", "merges.txt"), clip,
                                     "CLIP", model_max_length=clip.config.max_position_embeddings)  # fmt: skip
    t5_tokenizer = _load_tokenizer(Path(t5_tokenizer_dir), T5TokenizerFast, ("tokenizer.json",), t5, "T5")
    max_sequence_length = max_sequence_length or _declared_sequence_length(Path(t5_path))
    return TextEncoders(clip, clip_tokenizer, t5, t5_tokenizer, max_sequence_length)
