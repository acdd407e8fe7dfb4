"""Model files on disk: their kinds told from safetensors headers alone, checks that name the wrong file, and
reading a file's tensors one at a time.

Nothing is fetched from a hub: the real Flux configs ship in `configs/`. Pickle files are refused; a GGUF
file is taken as the Flux transformer only (`gguf.py`).
"""
from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Container
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..checkpoints import STATE_FORMAT

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parents[1] / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# ComfyUI's scaled-fp8 files: a scale beside each float8 weight (dequantised when read) and a marker tensor
SCALE_SUFFIXES = (".scale_weight", ".scale_input", "scaled_fp8")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # BFL first released flux1-dev and ae as .sft; ComfyUI lists both

# What `detect_file_kind` can answer, as said to the user.
KIND_DESCRIPTIONS = {
    "flux_transformer": "a Flux transformer (original BFL layout)",
    "flux_transformer_diffusers": "a Flux transformer (diffusers layout)",
    "flux_transformer_gguf": "a Flux transformer (GGUF)",
    "gguf": "a GGUF file of another model (a language model's or a text encoder's?)",
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
    "flux_transformer_gguf": "the transformer input",
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
    "transformer": ModelRole("Flux transformer", ("flux_transformer", "flux_transformer_diffusers", "flux_checkpoint",
                                                  "flux_transformer_gguf"),
                             "a Flux transformer (e.g. flux1-dev.safetensors or flux1-dev-fp8.safetensors)"),
    "vae": ModelRole("Flux VAE", ("flux_vae", "flux_checkpoint"), "the Flux VAE (ae.safetensors)"),
    "clip": ModelRole("CLIP-L text encoder", ("clip", "flux_checkpoint"),
                      "the CLIP-L text encoder (clip_l.safetensors)"),
    "t5": ModelRole("T5 text encoder", ("t5", "flux_checkpoint"), "the T5 text encoder (t5xxl_fp16.safetensors)"),
}


class SafetensorsHeader(NamedTuple):
    shapes: dict[str, list[int]]  # tensor name -> shape
    metadata: dict[str, str]


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (by its magic too, so a renamed one is known)."""
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def existing_path(path: str | Path, what: str) -> Path:
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
    path = existing_path(path, "Model file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle checkpoint ({suffix}). Unpickling can run arbitrary code, so it is refused: "
            "convert it to .safetensors (or download the .safetensors release of the model)."
        )
    if is_gguf(path):
        raise ValueError(f"{path} is a GGUF file: only the Flux transformer may be one. Give the .safetensors file "
                         "here.")  # callers that take a GGUF ask `detect_file_kind` first
    if path.is_dir() or suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{path} is not a .safetensors file: give the .safetensors model file.")
    try:
        with safe_open(path, "pt") as f:
            return SafetensorsHeader({k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}): download it again.") from e


def detect_file_kind(path: str | Path) -> str:
    """Classify a .safetensors or GGUF model file from its header alone: one of `KIND_DESCRIPTIONS`' keys.

    Raises FileNotFoundError for a missing file and ValueError for a pickle, non-safetensors or corrupt file, or a
    Flux GGUF in a quantization this trainer cannot read.
    """
    if is_gguf(Path(path)):
        from .gguf import gguf_kind  # here: gguf.py reads names through convert.py, which imports this module

        return gguf_kind(Path(path))
    shapes, metadata = read_safetensors_header(path)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in shapes)

    if metadata.get("format") == STATE_FORMAT:
        return "training_state"
    if has(".lora_down.") or has(".lora_A.") or has(".lora_B.") or has(".lokr_w") or has(".hada_w"):  # LyCORIS too
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
    path = existing_path(path, what)
    if path.is_file():
        _require_kind(path, kinds, expected)
    return path


def key_prefix(path: Path, anchor: str, what: str) -> str:
    """The prefix in front of `anchor` among the file's tensor names ('' when unprefixed)."""
    for name in read_safetensors_header(path).shapes:
        if name.endswith(anchor):
            return name[: -len(anchor)]
    raise ValueError(f"{path} holds no {what} (no tensor named like {anchor}): pick the file that does.")


def read_state_dict(
    path: Path, prefix: str = "", dtype: torch.dtype = torch.bfloat16, device="cpu", fp8: Container[str] = ()
) -> dict[str, Tensor]:
    """The tensors named `prefix...` (prefix removed), floats cast to `dtype` on `device` as each is read.

    The names in `fp8` (prefix removed) are cast to float8_e4m3fn instead, also as read, so a bf16 file loaded into
    an fp8 model never has more than one bf16 tensor in memory. ComfyUI's scaled-fp8 files (a `scale_weight` beside
    each float8 weight) are dequantised. The file is memory-mapped: only what is returned stays in RAM.
    """
    state_dict = {}
    with safe_open(path, "pt", device=str(device)) as f:
        names = f.keys()
        scales = {name for name in names if name.endswith(".scale_weight")}
        for name in names:
            if not name.startswith(prefix) or name.endswith(SCALE_SUFFIXES):
                continue
            key = name[len(prefix) :]
            tensor = f.get_tensor(name)
            scale_name = name.removesuffix("weight") + "scale_weight"
            if scale_name in scales:
                tensor = tensor.float() * f.get_tensor(scale_name).float()
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float8_e4m3fn if key in fp8 else dtype)
            state_dict[key] = tensor
    return state_dict


def model_folder(folder: Path, subfolder: str) -> Path:
    """A model folder, or its `subfolder` when given a diffusers pipeline root (e.g. FLUX.1-dev/)."""
    for candidate in (folder, folder / subfolder):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"{folder} has no config.json (nor {subfolder}/config.json): not a model folder.")


def assign_weights(model: nn.Module, state_dict: dict[str, Tensor], path: Path) -> None:
    """Assign the tensors into a meta-device model (no copy), checking that every weight is there."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {type(model).__name__} it describes: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}. The file is incomplete or from another model: download it again."
        )
    model.eval().requires_grad_(False)


def count_blocks(names, prefix: str) -> int:
    """Number of `prefix.N.` blocks among the names."""
    indices = [int(k[len(prefix) + 1 :].split(".")[0]) for k in names if k.startswith(prefix + ".")]
    return max(indices) + 1 if indices else 0


def shipped_config(name: str) -> dict:
    """A config shipped in `configs/` (the real Flux ones), as a dict to override."""
    return json.loads((CONFIG_DIR / name).read_text())


def weight_files(folder: Path, name: str = "diffusion_pytorch_model") -> list[Path]:
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
