"""peft LoRA on Flux's transformer blocks, its strength, and the kohya-layout file that stock ComfyUI loads.

The adapter lives on diffusers' `FluxTransformer2DModel` (adapter name "default") in one of two layouts:
- "fused" (kohya's and BFL's): the model is put in the fused layout (`models.fuse_projections`) and each fused q, k, v
  (and single blocks' `linear1`: q, k, v and the MLP input) has one LoRA; the kohya file holds it as trained.
- "split" (diffusers'): one LoRA per diffusers Linear; the kohya file fuses the per-part LoRAs exactly (stacked down,
  block-diagonal up) and `load_kohya_lora` splits them back. Runs made before the fused layout used it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn

from .checkpoints import save_safetensors
from .config import LORA_FORMATS, LORA_LAYOUTS
from .models import (DOUBLE_BLOCK_LINEARS, FUSIONS, SINGLE_BLOCK_LINEARS, fuse_projections, is_fused, part_sizes,
                     read_safetensors_header)

logger = logging.getLogger(__name__)

ADAPTER = "default"

MODULATION_MODULES = {"img_mod.lin", "txt_mod.lin", "modulation.lin"}

# block kind -> (diffusers ModuleList, BFL prefix, modules of one block: BFL Linear -> the split layout's Linears)
BLOCK_KINDS: dict[str, tuple[str, str, dict[str, tuple[str, ...]]]] = {
    "double": ("transformer_blocks", "double_blocks", DOUBLE_BLOCK_LINEARS),
    "single": ("single_transformer_blocks", "single_blocks", SINGLE_BLOCK_LINEARS),
}


def _fused_modules(kind: str, modules: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    by_parts = {parts: name for name, parts in FUSIONS[kind].items()}
    return {bfl: (by_parts[parts],) if parts in by_parts else parts for bfl, parts in modules.items()}


# layout -> BLOCK_KINDS with the Linears of that layout (in "fused", each BFL Linear is one module)
LAYOUT_BLOCKS = {
    "split": BLOCK_KINDS,
    "fused": {kind: (attr, bfl, _fused_modules(kind, modules)) for kind, (attr, bfl, modules) in BLOCK_KINDS.items()},
}


def model_layout(transformer: nn.Module) -> str:
    """"fused" or "split": the layout the transformer's block Linears are in."""
    return "fused" if is_fused(transformer) else "split"


def state_layout(state: dict[str, torch.Tensor]) -> str:
    """"fused" or "split": the layout of a `lora_state` (or diffusers-format tensors), from its module names."""
    return "fused" if any(_fused_name(k.split(".lora_")[0].removeprefix(DIFFUSERS_PREFIX)) for k in state) else "split"


def _in_block(module: str) -> tuple[str, str, str] | None:
    """"single_transformer_blocks.3.attn.to_q" -> ("single_transformer_blocks.3", "single", "attn.to_q")."""
    match = re.fullmatch(r"((single_)?transformer_blocks\.\d+)\.(.+)", module)
    return None if match is None else (match[1], "single" if match[2] else "double", match[3])


def _fused_name(module: str) -> tuple[str, ...] | None:
    """The parts of a fused block Linear ("transformer_blocks.0.attn.to_qkv" -> its q, k, v), None for others."""
    found = _in_block(module)
    if found is None or found[2] not in FUSIONS[found[1]]:
        return None
    return tuple(f"{found[0]}.{p}" for p in FUSIONS[found[1]][found[2]])


def _fused_of(part: str) -> tuple[str, tuple[str, ...]] | None:
    """(fused Linear, its parts) for a split Linear that belongs to one ("...attn.to_k" -> "...attn.to_qkv")."""
    found = _in_block(part)
    if found is None:
        return None
    block, kind, name = found
    return next(((f"{block}.{fused}", tuple(f"{block}.{p}" for p in parts))
                 for fused, parts in FUSIONS[kind].items() if name in parts), None)


KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
DIFFUSERS_PREFIX = "transformer."  # diffusers' LoRA files prefix the transformer's module names with it


def parse_blocks(blocks: str | Sequence[str], num_blocks: dict[str, int]) -> dict[str, list[int]]:
    """Block indices per kind ("double", "single") that `blocks` selects.

    Syntax: comma-separated items, each `all`, `double`, `single`, or a kind with an index or an inclusive range:
    "double:0-9,single:0-37", "double:3,single:10-20". A list of items works too.
    """
    items = [blocks] if isinstance(blocks, str) else list(blocks)
    items = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    chosen: dict[str, set[int]] = {kind: set() for kind in BLOCK_KINDS}
    for item in items:
        match = re.fullmatch(r"(all|double|single)(?::(\d+)(?:-(\d+))?)?", item)
        if match is None or (match[1] == "all" and match[2] is not None):
            raise ValueError(
                f"blocks: cannot read {item!r}; write 'all', 'double', 'single' or kind:index ranges "
                "such as 'double:0-9,single:0-37'"
            )
        for kind in BLOCK_KINDS if match[1] == "all" else [match[1]]:
            n = num_blocks[kind]
            first = 0 if match[2] is None else int(match[2])
            last = n - 1 if match[2] is None else int(match[3] or match[2])
            if match[2] is not None and not first <= last < n:
                raise ValueError(f"blocks: {item!r} is outside the model's {n} {kind} blocks (indices 0-{n - 1})")
            chosen[kind].update(range(first, last + 1))
    if not any(chosen.values()):
        raise ValueError(f"blocks: {blocks!r} selects no block; use 'all', 'double', 'single' or 'double:0-9'")
    return {kind: sorted(indices) for kind, indices in chosen.items()}


def _block_counts(transformer: nn.Module) -> dict[str, int]:
    return {kind: len(getattr(transformer, attr)) for kind, (attr, _, _) in BLOCK_KINDS.items()}


def target_regex(selection: dict[str, list[int]], include_modulation: bool = True, layout: str = "split") -> str:
    """peft `target_modules` regex (full match) for the block Linears of the selected blocks.

    Anchored on the block lists, so the top-level `proj_out`, `norm_out.linear` and the embedders never match.
    """
    alternatives = []
    for kind, indices in selection.items():
        if not indices:
            continue
        attr, _, modules = LAYOUT_BLOCKS[layout][kind]
        parts = [p for bfl, ps in modules.items() if include_modulation or bfl not in MODULATION_MODULES for p in ps]
        alternatives.append(
            rf"{attr}\.({'|'.join(map(str, indices))})\.({'|'.join(re.escape(p) for p in parts)})"
        )
    return "|".join(f"(?:{a})" for a in alternatives)


def _lora_layers(transformer: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def _require_adapter(transformer: nn.Module) -> dict[str, LoraLayer]:
    layers = _lora_layers(transformer)
    if not layers:
        raise ValueError("the transformer has no LoRA adapter; call add_lora(transformer, rank, alpha) first")
    return layers


def lora_parameters_by_name(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """peft/diffusers names (`transformer_blocks.0.attn.to_q.lora_A.weight`, DoRA's
    `...lora_magnitude_vector.weight`) -> the adapter's parameters."""
    params = {}
    for name, layer in _require_adapter(transformer).items():
        for ab in ("lora_A", "lora_B"):
            params[f"{name}.{ab}.weight"] = getattr(layer, ab)[ADAPTER].weight
        if ADAPTER in layer.lora_magnitude_vector:
            params[f"{name}.lora_magnitude_vector.weight"] = layer.lora_magnitude_vector[ADAPTER].weight
    return params


def _is_dora(layer: LoraLayer) -> bool:
    return ADAPTER in layer.lora_magnitude_vector


def _scale(layer: LoraLayer) -> float:
    """The layer's LoRA scale at strength 1 (peft's `scaling` also carries the current strength)."""
    return layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]


def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    blocks: str | Sequence[str] = "all",
    include_modulation: bool = True,
    lora_dtype: torch.dtype = torch.float32,
    dora: bool = False,
    generator: torch.Generator | None = None,
    layout: str = "fused",
) -> None:
    """Add the peft LoRA adapter "default" to every Linear of the selected double/single blocks, in `layout`
    ("fused": the model is first put in the fused layout, in place, and each fused Linear gets one LoRA).

    Only LoRA parameters stay trainable. Init is peft's default (A Kaiming-uniform, B zero) in `lora_dtype`, so a
    seed fixes it whatever the base dtype (bf16, fp8-storage Linear subclasses); A is drawn from `generator` (a CPU
    generator: the same numbers whatever device the base is on), or from the global torch RNG when None.
    `dora`: peft's DoRA, whose magnitude vector (one per output row) starts at the base weight's row norms, so the
    adapter starts as a no-op like a LoRA.
    """
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"lora_layout: {layout!r}; choose one of {', '.join(LORA_LAYOUTS)}")
    if layout == "split" and is_fused(transformer):
        raise ValueError("lora_layout: 'split' on a transformer already in the fused layout; load the base again")
    selection = parse_blocks(blocks, _block_counts(transformer))
    if layout == "fused":
        fuse_projections(transformer)
    target = target_regex(selection, include_modulation, layout)
    targeted = [m for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target, n)]
    width = min(min(m.in_features, m.out_features) for m in targeted)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= width:
        raise ValueError(f"rank: must be an integer from 1 to {width} (the narrowest targeted layer), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha: must be a number > 0 (alpha = rank gives scale 1), got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")

    # Created without init: peft would init, then cast to the base dtype (rounding the init, or fp8).
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, init_lora_weights=False,
                        use_dora=dora)
    transformer.add_adapter(config, ADAPTER)
    for layer in _lora_layers(transformer).values():
        layer.lora_A[ADAPTER].to(lora_dtype)
        layer.lora_B[ADAPTER].to(lora_dtype)
        layer.reset_lora_parameters(ADAPTER, True)
        if generator is not None:
            a = layer.lora_A[ADAPTER].weight
            a.data.copy_(nn.init.kaiming_uniform_(torch.empty(a.shape, dtype=a.dtype), a=math.sqrt(5),
                                                  generator=generator))
        if dora:  # peft measured the norms with the uninitialised B; B is zero now
            magnitude = layer.lora_magnitude_vector[ADAPTER]
            magnitude.weight = nn.Parameter(_row_norms(layer).to(lora_dtype))
    n_params = sum(p.numel() for p in lora_parameters(transformer))
    logger.info("LoRA rank %d alpha %g on %d Linears, %s layout (%d parameters)", rank, alpha, len(targeted), layout,
                n_params)


def _row_norms(layer: LoraLayer, delta: torch.Tensor | None = None) -> torch.Tensor:
    """(out,) float32 L2 norms of the base weight's rows (plus `delta`, a weight difference), as DoRA measures."""
    weight = layer.get_base_layer().weight.float()
    return (weight if delta is None else weight + delta.to(weight.device)).norm(dim=1)


def _delta(layer: LoraLayer) -> torch.Tensor:
    """(out, in) float32 weight change of the LoRA part at strength 1: (alpha / rank) B A."""
    return _scale(layer) * (layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float())


def check_lora_settings(transformer_config: dict, rank: int, alpha: float, dropout: float = 0.0,
                        blocks: str | Sequence[str] = "all", layout: str = "fused") -> int:
    """Raise now, naming the field, wherever `add_lora` would: it is tried on an empty (meta-device) model of that
    config, so a rank too wide or a mistyped `blocks` fails in a second instead of after the models load.
    Returns the LoRA's parameter count (what its files will weigh)."""
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(transformer_config)
    add_lora(model, rank, alpha, dropout=dropout, blocks=blocks, layout=layout)
    return sum(p.numel() for p in lora_parameters(model))


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable tensors, for the optimizer."""
    return list(lora_parameters_by_name(transformer).values())


def set_lora_strength(transformer: nn.Module, strength: float) -> None:
    """Scale the adapter's output by `strength` (0: the base model exactly, 1: as trained); weights are untouched.

    Never fused into the base weights: with peft 0.21, changing scales while fused corrupted the base. A DoRA
    layer is not linear in peft's scale (its norm moves too, and scale 0 is not the base), so it keeps scale 1 and
    its output is interpolated from the base's instead: y = base(x) + strength (dora(x) - base(x)), the same as
    ComfyUI's W + strength (W' - W).
    """
    for layer in _require_adapter(transformer).values():
        if not _is_dora(layer):
            layer.set_scale(ADAPTER, strength)
            continue
        layer.set_scale(ADAPTER, 1.0)
        hook = getattr(layer, "_dora_strength_hook", None)
        if hook is not None:
            hook.remove()
        layer._dora_strength_hook = None if strength == 1.0 else layer.register_forward_hook(
            lambda module, args, out, s=strength: _interpolate(module.get_base_layer()(args[0]), out, s))


def _interpolate(base: torch.Tensor, out: torch.Tensor, strength: float) -> torch.Tensor:
    return base + strength * (out - base)


def lora_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft/diffusers names, cloned to the CPU."""
    return {k: p.detach().to("cpu", copy=True) for k, p in lora_parameters_by_name(transformer).items()}


def _preview(keys: Sequence[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_lora_state(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `lora_state` tensors into the adapter; the keys and shapes must match it exactly."""
    params = lora_parameters_by_name(transformer)
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match the adapter (missing: {_preview(missing) or 'none'}; unexpected: "
            f"{_preview(unexpected) or 'none'}); create the adapter with the rank, blocks, include_modulation, "
            "dora and lora_layout the state was saved with"
        )
    wrong = [k for k, p in params.items() if state[k].shape != p.shape]
    if wrong:
        raise ValueError(
            f"LoRA state shapes differ from the adapter's for {_preview(wrong)}; create the adapter with the rank "
            "the state was saved with"
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def _kohya_groups(transformer: nn.Module) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(kohya module name, the adapter's modules fused into it in row order) for every Linear of every block."""
    for attr, bfl_prefix, modules in LAYOUT_BLOCKS[model_layout(transformer)].values():
        for i in range(len(getattr(transformer, attr))):
            for bfl, parts in modules.items():
                yield f"lora_unet_{bfl_prefix}_{i}_{bfl.replace('.', '_')}", tuple(f"{attr}.{i}.{p}" for p in parts)


def kohya_state_dict(transformer: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The adapter at strength 1 in the kohya layout ComfyUI loads (`kohya_from_lora_state` of its tensors; a DoRA's
    magnitudes are saved apart, as `kohya_dora_scales`)."""
    state = {k: v for k, v in lora_state(transformer).items() if ".lora_magnitude_vector." not in k}
    return kohya_from_lora_state(state, _rank_alpha(transformer)[1], dtype,
                                 out_features=lambda name: transformer.get_submodule(name).out_features)


def kohya_from_lora_state(state: dict[str, torch.Tensor], alpha: float, dtype: torch.dtype = torch.bfloat16,
                          out_features: Callable[[str], int] | None = None) -> dict[str, torch.Tensor]:
    """A `lora_state` (peft/diffusers names, one alpha) -> the kohya layout ComfyUI loads:
    `lora_unet_double_blocks_0_img_attn_qkv.*`. Pure: no model needed, so a saved handle's LoRA is written as is.

    In the fused layout each kohya module is one LoRA, written as trained (rank r, no zero). In the split layout,
    parts of a fused BFL Linear (k of them, each rank r) become one LoRA of rank k*r: down (k*r, in) stacks the A's,
    up (sum of outs, k*r) is block-diagonal in the B's, so up @ down stacks the B_j @ A_j. ComfyUI applies
    (alpha / rank) * up @ down, so alpha = peft alpha * k keeps each part's scale. `.alpha` is float32: a bf16 alpha
    could be rounded. Parts of a fused Linear without a LoRA get zero blocks, `out_features(name)` giving their
    width (our adapters always cover whole fused Linears). Keys it does not understand raise.
    """
    out, used = {}, set()
    for attr, bfl_prefix, modules in LAYOUT_BLOCKS[state_layout(state)].values():
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"{attr}.")})
        for i in indices:
            for bfl, parts in modules.items():
                names = [f"{attr}.{i}.{p}" for p in parts]
                keys = [(f"{n}.lora_A.weight", f"{n}.lora_B.weight") for n in names]
                have = [a in state and b in state for a, b in keys]
                if not any(have):
                    continue
                key = f"lora_unet_{bfl_prefix}_{i}_{bfl.replace('.', '_')}"
                r, width = state[keys[have.index(True)][0]].shape
                if not all(have) and out_features is None:
                    raise ValueError(f"LoRA state: {key} has a LoRA on only some of {', '.join(names)}; give "
                                     "out_features for the others' zero blocks")
                downs = [state[a].float().cpu() if ok else torch.zeros(r, width) for (a, _), ok in zip(keys, have)]
                ups = [state[b].float().cpu() if ok else torch.zeros(out_features(n), r)
                       for (_, b), ok, n in zip(keys, have, names)]
                down = torch.cat(downs)  # (k*r, in)
                up = torch.block_diag(*ups)  # (sum of outs, k*r)
                out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
                out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
                out[f"{key}.alpha"] = torch.tensor(alpha * down.shape[0] / r, dtype=torch.float32)
                used.update(k for pair, ok in zip(keys, have) if ok for k in pair)
    leftover = sorted(state.keys() - used)
    if leftover:
        raise ValueError(f"LoRA state: {len(leftover)} keys are not block LoRA tensors: {_preview(leftover)}")
    return out


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


def _rank_alpha(transformer: nn.Module) -> tuple[int, float]:
    ref = next(iter(_require_adapter(transformer).values()))
    return ref.r[ADAPTER], ref.lora_alpha[ADAPTER]


def _file_metadata(rank: int, alpha: float, metadata: dict[str, str]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be str (safetensors header); convert {bad} with str()")
    return {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **metadata}


def _split_fused(
    path: Path, key: str, down: torch.Tensor, up: torch.Tensor, outs: list[int], rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-part (A, B) of a fused kohya LoRA (down (R, in), up (sum(outs), R)) for parts of LoRA rank `rank`.

    R == k*rank: our layout, up must be block-diagonal. R == rank: one dense LoRA on the fused Linear (as
    sd-scripts trains it); each part shares the down matrix and takes its rows of up. Both are exact.
    """
    k, R = len(outs), down.shape[0]
    rows = up.split(outs)
    if R == rank:
        return [(down, b) for b in rows]
    if R != k * rank:
        split_file = "; a file of the split layout holds q, k, v block-diagonal at 3 or 4 x the rank: set " \
                     "lora_layout to 'split' to continue it" if k == 1 and R % rank == 0 else ""
        raise ValueError(
            f"{path}: {key} has rank {R}, which the adapter's rank {rank} cannot hold; create the adapter "
            f"with the rank the file was trained with (ss_network_dim in its metadata){split_file}"
        )
    parts = []
    for j, b in enumerate(rows):
        block = b[:, j * rank : (j + 1) * rank]
        if torch.count_nonzero(block) != torch.count_nonzero(b):
            raise ValueError(
                f"{path}: {key}.lora_up.weight is not block-diagonal, so it cannot be split into per-part "
                f"LoRAs of rank {rank}; create the adapter with rank={R} to load it"
            )
        parts.append((down[j * rank : (j + 1) * rank], block))
    return parts


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


# ----------------------------------------------------------------------------------------------------------- DoRA
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


# ------------------------------------------------------------------------------------------- the diffusers format
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


def _module_and_kind(key: str) -> tuple[str, str]:
    """"transformer.x.attn.to_q.lora_A.weight" -> ("transformer.x.attn.to_q", "lora_A.weight")."""
    for kind in (".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale", ".lora_magnitude_vector.weight"):
        if key.endswith(kind):
            return key.removesuffix(kind), kind[1:]
    return key, ""


def split_fused_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-named LoRA tensors with fused Linears (`attn.to_qkv`, `linear1`) -> the same LoRA on the split
    Linears (pure, exact): each part repeats the shared A and takes its rows of B and of a per-row tensor
    (`dora_scale`, DoRA's magnitudes); an alpha is repeated. Other keys pass through."""
    out = {}
    for key, tensor in state.items():
        module, kind = _module_and_kind(key)
        prefix = DIFFUSERS_PREFIX if module.startswith(DIFFUSERS_PREFIX) else ""
        parts = _fused_name(module.removeprefix(prefix))
        if parts is None:
            out[key] = tensor
            continue
        if kind in ("lora_A.weight", "alpha"):
            out |= {f"{prefix}{p}.{kind}": tensor.clone() for p in parts}  # a file stores each apart
            continue
        if f"{module}.lora_A.weight" not in state:
            raise ValueError(f"LoRA state: {key} has no {module}.lora_A.weight beside it")
        width = state[f"{module}.lora_A.weight"].shape[1]  # the model width: the rows of q, k and v each
        out |= {f"{prefix}{p}.{kind}": t for p, t in zip(parts, tensor.split(part_sizes(len(parts), len(tensor), width)))}
    return out


def fuse_split_state(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `split_fused_state` for a file's diffusers-format tensors (pure): the parts of each fused Linear
    become one LoRA when they share one A (and alpha), as a fused-layout LoRA written split does; raises naming the
    file when they do not, since one LoRA of that rank cannot hold them."""
    groups: dict[str, dict[str, list]] = {}  # fused module -> kind -> tensors in part order
    out = {}
    for key, tensor in state.items():
        module, kind = _module_and_kind(key)
        prefix = DIFFUSERS_PREFIX if module.startswith(DIFFUSERS_PREFIX) else ""
        found = _fused_of(module.removeprefix(prefix))
        if found is None:
            out[key] = tensor
            continue
        fused, parts = found
        groups.setdefault(prefix + fused, {}).setdefault(kind, [None] * len(parts))[
            parts.index(module.removeprefix(prefix))] = tensor
    for fused, kinds in groups.items():
        incomplete = [k for k, ts in kinds.items() if any(t is None for t in ts)]
        shared = [k for k in ("lora_A.weight", "alpha") if k in kinds and not incomplete
                  and not all(torch.equal(t, kinds[k][0]) for t in kinds[k])]
        if incomplete or shared:
            why = "some parts have none" if incomplete else "they have different down-projections"
            raise ValueError(f"{path}: the LoRAs on the parts of {fused} ({why}) cannot be held by the fused layout's "
                             "one LoRA of that rank; set lora_layout to 'split' to continue this file")
        for kind, tensors in kinds.items():
            out[f"{fused}.{kind}"] = tensors[0] if kind in ("lora_A.weight", "alpha") else torch.cat(tensors)
    return out




def save_lora_file(path: str | os.PathLike, transformer: nn.Module, metadata: dict[str, str],
                   lora_format: str = "kohya", dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the adapter as `lora_format` ("kohya": fused BFL modules; "diffusers": peft keys) with `metadata`,
    atomically; both load in stock ComfyUI's LoraLoader."""
    if lora_format == "kohya":
        save_kohya_lora(path, transformer, metadata, dtype)
        return
    if lora_format != "diffusers":
        raise ValueError(f"lora_format: {lora_format!r}; choose one of {', '.join(LORA_FORMATS)}")
    save_safetensors(path, diffusers_state_dict(transformer, dtype), _file_metadata(*_rank_alpha(transformer), metadata))


def lora_file_format(path: Path, keys: Sequence[str]) -> str:
    """"kohya" or "diffusers" from a LoRA file's keys; raises naming the file when it is neither."""
    if keys and all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if keys and all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale")) for k in keys):
        return "diffusers"
    raise ValueError(f"{path}: not a Flux LoRA file this trainer reads (kohya lora_unet_* keys, or diffusers "
                     f"<module>.lora_A/lora_B keys); its keys begin {_preview(sorted(keys), 3)}")


def lora_file_rank(path: str | os.PathLike) -> int:
    """The LoRA rank of a kohya or diffusers Flux LoRA file, from its header only.

    The narrowest down / A matrix: kohya files hold the fused qkv / linear1 at rank r (dense) or k*r (ours), every
    other module at r."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist; check the path")
    shapes = read_safetensors_header(path).shapes  # a pickle, empty, truncated or corrupt file is named and refused
    lora_format = lora_file_format(path, list(shapes))
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


def load_lora_file(path: str | os.PathLike, transformer: nn.Module) -> dict[str, str]:
    """A kohya or diffusers-format Flux LoRA (ours or another tool's) into the existing adapter, which then equals
    the file (DoRA magnitudes included); returns the file's metadata.

    A DoRA file needs a DoRA adapter; a plain LoRA file into a DoRA adapter starts the magnitudes where DoRA equals
    that LoRA."""
    path = Path(path)
    state, metadata = _read_lora_file(path)
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
