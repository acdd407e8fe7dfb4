"""LoRA files: the adapter saved as kohya or diffusers format and read back (ours or other tools'), atomically."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoints import save_safetensors
from ..config import LORA_FORMATS
from ..models import read_safetensors_header
from . import lycoris
from .adapter import (ADAPTER, _is_dora, _kohya_groups, _rank_alpha, _require_adapter, _scale, lora_state,
                      model_layout, network_of)
from .dora import _comfyui_dora_scale, _magnitude_from_dora_scale, dora_scales_by_linear, kohya_dora_scales
from .formats import (DIFFUSERS_PREFIX, KOHYA_SUFFIXES, LYCORIS_KEYS, _file_metadata, _preview, _split_fused,
                      file_network, fuse_split_state, kohya_from_lora_state, lora_file_format, split_fused_state)

logger = logging.getLogger(__name__)


def kohya_state_dict(transformer: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The adapter at strength 1 in the kohya layout ComfyUI loads (`kohya_from_lora_state` of its tensors; a DoRA's
    magnitudes are saved apart, as `kohya_dora_scales`). A LoKr / LoHa: its LyCORIS keys (`lycoris.file_tensors`)
    under the same module names."""
    if network_of(transformer) != "lora":
        layers = _require_adapter(transformer)
        return {f"{key}.{suffix}": tensor for key, (module,) in _kohya_groups(transformer) if module in layers
                for suffix, tensor in lycoris.file_tensors(layers[module], dtype).items()}
    state = {k: v for k, v in lora_state(transformer).items() if ".lora_magnitude_vector." not in k}
    return kohya_from_lora_state(state, _rank_alpha(transformer)[1], dtype,
                                 out_features=lambda name: transformer.get_submodule(name).out_features)


def save_kohya_lora(
    path: str | os.PathLike,
    transformer: nn.Module,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write `kohya_state_dict` with `metadata` in the safetensors header, atomically (temp file, fsync, rename).

    `ss_network_dim` / `ss_network_alpha` (kohya's keys for rank and alpha) are added unless given; a DoRA adapter
    adds `dora_scale` per module.
    """
    save_safetensors(path, kohya_state_dict(transformer, dtype) | kohya_dora_scales(transformer),
                     _file_metadata(*_rank_alpha(transformer), metadata))


def save_kohya_state(path: str | os.PathLike, state: dict[str, torch.Tensor], rank: int, alpha: float,
                     metadata: dict[str, str], dtype: torch.dtype = torch.bfloat16) -> None:
    """`save_kohya_lora` of a plain LoRA from its `lora_state` (no model needed; DoRA's scales need the base)."""
    save_safetensors(path, kohya_from_lora_state(state, alpha, dtype), _file_metadata(rank, alpha, metadata))


def _read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; FileNotFoundError naming it when it is not there."""
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist; check the path")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def load_kohya_lora(path: str | os.PathLike, transformer: nn.Module) -> dict[str, str]:
    """Load a kohya-layout Flux LoRA file into the existing adapter; returns the file's metadata.

    Reads our files (fused parts block-diagonal) and other tools' (a dense LoRA on the fused Linear); a missing
    `.alpha` means alpha = rank, as in ComfyUI. Scale differences from the adapter's alpha are folded into B.
    Adapter Linears the file does not cover are zeroed, so the adapter then equals the file.
    """
    path = Path(path)
    state, metadata = _read_lora_file(path)
    layers = _require_adapter(transformer)
    groups = dict(_kohya_groups(transformer))
    unknown = sorted(k for k in state if not (k.endswith(KOHYA_SUFFIXES) and k.split(".", 1)[0] in groups))
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} keys are not kohya LoRA keys of this Flux model's blocks: {_preview(unknown)}"
        )

    new = {}  # adapter Linear -> (A, B), all checked before any is written
    for key in sorted({k.split(".", 1)[0] for k in state}):
        parts = groups[key]
        if f"{key}.lora_down.weight" not in state or f"{key}.lora_up.weight" not in state:
            raise ValueError(f"{path}: {key} needs both .lora_down.weight and .lora_up.weight")
        down, up = state[f"{key}.lora_down.weight"].float(), state[f"{key}.lora_up.weight"].float()
        R = down.shape[0]
        scale = state[f"{key}.alpha"].item() / R if f"{key}.alpha" in state else 1.0
        linears = [transformer.get_submodule(p) for p in parts]
        outs = [m.out_features for m in linears]
        if down.shape[1] != linears[0].in_features or up.shape != (sum(outs), R):
            raise ValueError(
                f"{path}: {key} has down {tuple(down.shape)} / up {tuple(up.shape)}, but this model's "
                f"{'+'.join(parts)} needs ({R}, {linears[0].in_features}) / ({sum(outs)}, {R}); "
                "the LoRA was trained for a different model"
            )
        rank = next((layers[p].r[ADAPTER] for p in parts if p in layers), R)
        for part, (a, b) in zip(parts, _split_fused(path, key, down, up, outs, rank)):
            if part in layers:
                new[part] = (a, b * (scale / _scale(layers[part])))
            elif a.any() and b.any():  # zero blocks stand for parts without a LoRA
                raise ValueError(
                    f"{path}: {key} has a LoRA on {part}, which the adapter does not cover; call add_lora with "
                    "blocks and include_modulation that cover it"
                )

    uncovered = sorted(layers.keys() - new.keys())
    if uncovered:
        logger.warning("%s has no LoRA for %d adapter Linears; zeroed: %s", path, len(uncovered), _preview(uncovered))
    with torch.no_grad():
        for part, layer in layers.items():
            if part in new:
                layer.lora_A[ADAPTER].weight.copy_(new[part][0])
                layer.lora_B[ADAPTER].weight.copy_(new[part][1])
            else:
                layer.lora_B[ADAPTER].weight.zero_()
    return metadata


def load_kohya_lycoris(path: Path, state: dict[str, torch.Tensor], transformer: nn.Module) -> None:
    """A LoKr / LoHa file's tensors (kohya module names, LyCORIS suffixes) into the adapter of that network, which
    then equals the file (`lycoris.from_file_tensors`); adapter modules the file lacks are zeroed. All is checked
    before anything is written."""
    layers = _require_adapter(transformer)
    groups = dict(_kohya_groups(transformer))
    suffixes = (*LYCORIS_KEYS[network_of(transformer)], "alpha")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        key, _, suffix = k.partition(".")
        if key not in groups or suffix not in suffixes:
            raise ValueError(f"{path}: {k} is not a {network_of(transformer)} key of this Flux model's blocks")
        modules.setdefault(key, {})[suffix] = v
    new = {}
    for key, tensors in modules.items():
        (module,) = groups[key]
        if module not in layers:
            raise ValueError(f"{path}: {key} adapts {module}, which the adapter does not cover; set blocks and "
                             "train_modulation to cover it")
        new[module] = lycoris.from_file_tensors(layers[module], tensors, f"{path}: {key}")
    uncovered = sorted(layers.keys() - new.keys())
    if uncovered:
        logger.warning("%s has nothing for %d adapter Linears; zeroed: %s", path, len(uncovered), _preview(uncovered))
    with torch.no_grad():
        for module, layer in layers.items():
            if module not in new:
                lycoris.zero(layer)
                continue
            for name, param in lycoris.tensors(layer).items():
                param.copy_(new[module][name])


def diffusers_state_dict(transformer: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The adapter at strength 1 as a diffusers/peft Flux LoRA: `transformer.<module>.lora_A.weight` / `.lora_B.weight`
    for every LoRA Linear (q, k, v separate, so r per part instead of the kohya layout's fused k*r), plus
    `.dora_scale` for DoRA (ComfyUI's convention). alpha / rank is folded into lora_B, so the file needs no alpha:
    ComfyUI and diffusers both take alpha = rank when none is given. A fused-layout LoRA is written split
    (`split_fused_state`: exact)."""
    state = {}
    for name, layer in _require_adapter(transformer).items():
        key = DIFFUSERS_PREFIX + name
        state[f"{key}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().cpu().to(dtype)
        state[f"{key}.lora_B.weight"] = (layer.lora_B[ADAPTER].weight.detach().float().cpu() * _scale(layer)
                                         ).to(dtype)
        if _is_dora(layer):
            state[f"{key}.dora_scale"] = _comfyui_dora_scale(layer)
    return {k: v.contiguous() for k, v in split_fused_state(state).items()}


def save_lora_file(path: str | os.PathLike, transformer: nn.Module, metadata: dict[str, str],
                   lora_format: str = "kohya", dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the adapter as `lora_format` ("kohya": fused BFL modules; "diffusers": peft keys) with `metadata`,
    atomically; both load in stock ComfyUI's LoraLoader."""
    if lora_format == "kohya":
        save_kohya_lora(path, transformer, metadata, dtype)
        return
    if lora_format != "diffusers":
        raise ValueError(f"lora_format: {lora_format!r}; choose one of {', '.join(LORA_FORMATS)}")
    if network_of(transformer) != "lora":
        raise ValueError(f"lora_format: diffusers has no {network_of(transformer)} format for Flux; use kohya")
    save_safetensors(path, diffusers_state_dict(transformer, dtype),
                     _file_metadata(*_rank_alpha(transformer), metadata))


def lora_file_rank(path: str | os.PathLike) -> int | None:
    """The LoRA rank of a kohya or diffusers Flux LoRA file, from its header only (None: a LoKr whose factors are all
    full, in a file that does not say its rank).

    The narrowest down / A matrix: kohya files hold the fused qkv / linear1 at rank r (dense) or k*r (ours), every
    other module at r."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist; check the path")
    header = read_safetensors_header(path)  # a pickle, empty, truncated or corrupt file is named and refused
    shapes = header.shapes
    lora_format = lora_file_format(path, list(shapes))
    network = file_network(list(shapes))
    if network != "lora":  # LoKr: the rank of the decomposed factor; both factors full: the header's ss_network_dim
        ranks = [shapes[k][0] for k in shapes if k.endswith((".lokr_w2_b", ".hada_w1_b"))]
        return min(ranks) if ranks else int(header.metadata.get("ss_network_dim", 0)) or None
    downs = [k for k in shapes if k.endswith(".lora_down.weight" if lora_format == "kohya" else ".lora_A.weight")]
    return min(shapes[k][0] for k in downs)


def load_diffusers_lora(path: Path, state: dict[str, torch.Tensor], transformer: nn.Module) -> None:
    """diffusers/peft-format tensors (`transformer.` prefix optional; `.alpha` optional, default rank) into the
    adapter, which must have the file's rank and cover its modules; adapter Linears the file lacks are zeroed."""
    layers = _require_adapter(transformer)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():  # <module>.lora_A.weight, <module>.alpha, ...
        name, _, kind = k.removeprefix(DIFFUSERS_PREFIX).removesuffix(".weight").rpartition(".")
        modules.setdefault(name, {})[kind] = v
    unknown = sorted(n for n in modules if n not in layers)
    if unknown:
        raise ValueError(f"{path}: LoRA on modules this adapter does not have: {_preview(unknown)}; set blocks to "
                         "cover them, or use a LoRA trained for Flux")
    with torch.no_grad():
        for name, layer in layers.items():
            tensors = modules.get(name)
            if tensors is None:
                layer.lora_B[ADAPTER].weight.zero_()
                continue
            if "lora_A" not in tensors or "lora_B" not in tensors:
                raise ValueError(f"{path}: {name} needs both .lora_A.weight and .lora_B.weight")
            a, b = tensors["lora_A"].float(), tensors["lora_B"].float()
            if a.shape != layer.lora_A[ADAPTER].weight.shape or b.shape != layer.lora_B[ADAPTER].weight.shape:
                raise ValueError(f"{path}: {name} has A {tuple(a.shape)} / B {tuple(b.shape)}, but the adapter's are "
                                 f"{tuple(layer.lora_A[ADAPTER].weight.shape)} / "
                                 f"{tuple(layer.lora_B[ADAPTER].weight.shape)}; use the file's rank")
            scale = tensors["alpha"].item() / a.shape[0] if "alpha" in tensors else 1.0
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b * (scale / _scale(layer)))


def load_lora_file(path: str | os.PathLike, transformer: nn.Module) -> dict[str, str]:
    """A kohya or diffusers-format Flux LoRA (ours or another tool's) into the existing adapter, which then equals
    the file (DoRA magnitudes included); returns the file's metadata.

    A DoRA file needs a DoRA adapter; a plain LoRA file into a DoRA adapter starts the magnitudes where DoRA equals
    that LoRA."""
    path = Path(path)
    state, metadata = _read_lora_file(path)
    network, ours = file_network(list(state)), network_of(transformer)
    if network != ours:
        raise ValueError(f"{path} is a {network} file, the adapter a {ours}; set network to {network} to continue it")
    if network != "lora":
        load_kohya_lycoris(path, state, transformer)
        return metadata
    if lora_file_format(path, list(state)) == "kohya":
        load_kohya_lora(path, transformer)
    else:
        if model_layout(transformer) == "fused":
            state = fuse_split_state(path, state)
        load_diffusers_lora(path, state, transformer)
    layers = _require_adapter(transformer)
    scales = dora_scales_by_linear(transformer, state)
    dora = [n for n, layer in layers.items() if _is_dora(layer)]
    if scales and not dora:
        raise ValueError(f"{path} is a DoRA LoRA (it has dora_scale keys); turn dora on to continue it")
    with torch.no_grad():
        for name in dora:
            layers[name].lora_magnitude_vector[ADAPTER].weight.copy_(
                _magnitude_from_dora_scale(layers[name], scales.get(name)))
    return metadata
