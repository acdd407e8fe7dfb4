"""LoRA tensors between layouts and file formats, with no model: the kohya layout (BFL module names, fused qkv /
linear1), diffusers' keys, and the fused / split LoRA layouts (`split_fused_state`, `fuse_split_state`)."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data import ImageRecord, tag_frequency
from ..models import DOUBLE_BLOCK_LINEARS, FUSIONS, SINGLE_BLOCK_LINEARS, part_sizes


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


KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
# LyCORIS' key suffixes per network, as stock ComfyUI reads them (besides `.alpha`)
LYCORIS_KEYS = {"lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
                "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}


def file_network(keys: Sequence[str]) -> str:
    """"lora", "lokr" or "loha": the network of a LoRA file, from its keys' suffixes."""
    suffixes = {k.rpartition(".")[2] for k in keys}
    return next((n for n, names in LYCORIS_KEYS.items() if suffixes & set(names)), "lora")


DIFFUSERS_PREFIX = "transformer."  # diffusers' LoRA files prefix the transformer's module names with it


def _preview(keys: Sequence[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


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


def _key_parts(key: str) -> tuple[str, str, str]:
    """"transformer.x.attn.to_q.lora_A.weight" -> ("transformer.", "x.attn.to_q", "lora_A.weight")."""
    module, kind = key, ""
    for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale", ".lora_magnitude_vector.weight"):
        if key.endswith(suffix):
            module, kind = key.removesuffix(suffix), suffix[1:]
            break
    prefix = DIFFUSERS_PREFIX if module.startswith(DIFFUSERS_PREFIX) else ""
    return prefix, module.removeprefix(prefix), kind


def split_fused_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-named LoRA tensors with fused Linears (`attn.to_qkv`, `linear1`) -> the same LoRA on the split
    Linears (pure, exact): each part repeats the shared A and takes its rows of B and of a per-row tensor
    (`dora_scale`, DoRA's magnitudes); an alpha is repeated. Other keys pass through."""
    out = {}
    for key, tensor in state.items():
        prefix, module, kind = _key_parts(key)
        parts = _fused_name(module)
        if parts is None:
            out[key] = tensor
            continue
        if kind in ("lora_A.weight", "alpha"):
            out |= {f"{prefix}{p}.{kind}": tensor.clone() for p in parts}  # a file stores each apart
            continue
        down = f"{prefix}{module}.lora_A.weight"
        if down not in state:
            raise ValueError(f"LoRA state: {key} has no {down} beside it")
        width = state[down].shape[1]  # the model width: the rows of q, k and v each
        rows = tensor.split(part_sizes(len(parts), len(tensor), width))
        out |= {f"{prefix}{p}.{kind}": t for p, t in zip(parts, rows)}
    return out


def fuse_split_state(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `split_fused_state` for a file's diffusers-format tensors (pure): the parts of each fused Linear
    become one LoRA when they share one A (and alpha), as a fused-layout LoRA written split does; raises naming the
    file when they do not, since one LoRA of that rank cannot hold them."""
    groups: dict[str, dict[str, list]] = {}  # fused module -> kind -> tensors in part order
    out = {}
    for key, tensor in state.items():
        prefix, module, kind = _key_parts(key)
        found = _fused_of(module)
        if found is None:
            out[key] = tensor
            continue
        fused, parts = found
        groups.setdefault(prefix + fused, {}).setdefault(kind, [None] * len(parts))[parts.index(module)] = tensor
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


def lora_file_format(path: Path, keys: Sequence[str]) -> str:
    """"kohya" or "diffusers" from a LoRA file's keys; raises naming the file when it is neither."""
    if keys and all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if keys and all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale")) for k in keys):
        return "diffusers"
    raise ValueError(f"{path}: not a Flux LoRA file this trainer reads (kohya lora_unet_* keys, or diffusers "
                     f"<module>.lora_A/lora_B keys); its keys begin {_preview(sorted(keys), 3)}")


def network_metadata(config) -> dict[str, str]:
    """A TrainConfig's network and per-block settings as a LoRA file's header records them: LyCORIS' keys for a
    LoKr / LoHa (`ss_network_module` lycoris.kohya, `ss_network_args` {"algo": ...}), ours for the rest."""
    args = {"algo": config.network, "train_modulation": config.train_modulation}
    if config.network == "lokr":
        args["factor"] = config.lokr_factor
    if config.block_ranks:
        args["block_ranks"] = config.block_ranks
    out = {"network": config.network, "ss_network_args": json.dumps(args), "block_ranks": config.block_ranks,
           "block_lrs": config.block_lrs, "train_modulation": str(config.train_modulation),
           "loraplus_lr_ratio": str(config.loraplus_lr_ratio)}
    if config.network != "lora":
        out["ss_network_module"] = "lycoris.kohya"
    return out


def describe_network(config) -> str:
    """One line for the run's log: the network, its rank (per block too), and what sets the learning rates."""
    parts = [f"{config.network} rank {config.rank} alpha {config.alpha:g}"]
    if config.network == "lokr":
        parts.append(f"lokr_factor {config.lokr_factor}")
    parts += [f"{name} {getattr(config, name)}" for name in ("block_ranks", "block_lrs") if getattr(config, name)]
    if config.loraplus_lr_ratio != 1.0:
        parts.append(f"LoRA+ ratio {config.loraplus_lr_ratio:g}")
    if not config.train_modulation:
        parts.append("modulation not trained")
    return ", ".join(parts)


def _file_metadata(rank: int, alpha: float, metadata: dict[str, str]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be str (safetensors header); convert {bad} with str()")
    return {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **metadata}


def lora_metadata(config, step: int, records: Sequence[ImageRecord], base_fingerprint: str) -> dict[str, str]:
    """The settings a LoRA file carries in its header (kohya's `ss_*` keys, which tools and ComfyUI show)."""
    reg = {r.path for r in records if r.is_reg}
    return {
        "ss_base_model_version": "flux1",
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_steps": str(step),
        "ss_resolution": ",".join(dict.fromkeys(str(r) for e in config.dataset_entries() for r in e.resolutions)),
        "ss_num_train_images": str(len({r.path for r in records} - reg)),
        **({"ss_num_reg_images": str(len(reg))} if reg else {}),
        "ss_learning_rate": str(config.learning_rate),
        "ss_optimizer": config.optimizer,
        "ss_seed": str(config.seed),
        "ss_guidance_scale": str(config.guidance),
        "ss_timestep_sampling": config.timestep_sampling,
        "ss_discrete_flow_shift": str(config.timestep_shift),
        "ss_sd_model_name": Path(config.transformer_path).name,
        "ss_sd_model_hash": base_fingerprint,
        "ss_tag_frequency": json.dumps(tag_frequency(records)),
        "trigger_word": ", ".join(dict.fromkeys(e.trigger_word for e in config.dataset_entries() if e.trigger_word)),
        "training_guidance": str(config.guidance),
        "dora": str(config.dora),
        "lora_format": config.lora_format,
        **network_metadata(config),
    }
