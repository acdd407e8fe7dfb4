"""Settings per block range (`block_ranks`, `block_lrs`): one parser, peft's rank pattern, and the optimizer's
parameter groups (per-block learning rates and LoRA+)."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from torch import nn

from .formats import BLOCK_KINDS


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


def parse_block_values(text: str, field: str, num_blocks: dict[str, int], convert: Callable[[str], float]
                       ) -> dict[str, dict[int, float]]:
    """Block kind -> index -> value from "double:0-9=32,single:0-37=8": comma-separated `blocks=value` items, the
    blocks written as for `blocks` (all, double, single, kind:index or kind:first-last); a later item overrides an
    earlier one. `convert` reads a value, raising ValueError on a bad one. Errors name `field` and the item."""
    values: dict[str, dict[int, float]] = {kind: {} for kind in BLOCK_KINDS}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        blocks, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError("no '=value'")
            number = convert(value.strip())
            selection = parse_blocks(blocks.strip(), num_blocks)
        except ValueError as e:
            raise ValueError(f"{field}: cannot read {item!r} ({str(e).removeprefix('blocks: ')}); write "
                             "blocks=value items such as 'double:0-9=32,single:0-37=8'") from None
        for kind, indices in selection.items():
            values[kind].update(dict.fromkeys(indices, number))
    return values


def positive_int(text: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{text!r} is not a positive number")
    return value


def rank_pattern(ranks: dict[str, dict[int, float]]) -> dict[str, int]:
    """peft's `rank_pattern` (a regex per module-name suffix -> rank) for per-block ranks."""
    pattern = {}
    for kind, by_index in ranks.items():
        attr = BLOCK_KINDS[kind][0]
        for rank in sorted(set(by_index.values())):
            indices = "|".join(str(i) for i, r in by_index.items() if r == rank)
            pattern[rf"{attr}\.({indices})\..*"] = int(rank)
    return pattern


def block_of(name: str) -> tuple[str, int] | None:
    """("double", 3) for "transformer_blocks.3.attn.to_qkv.lora_A.weight"; None outside the blocks."""
    match = re.match(r"(single_)?transformer_blocks\.(\d+)\.", name)
    return None if match is None else ("single" if match[1] else "double", int(match[2]))


def param_groups(params: dict[str, nn.Parameter], num_blocks: dict[str, int], block_lrs: str, learning_rate: float,
                 loraplus_lr_ratio: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups of the adapter's `params` (by name): `lr_scale` times the scheduled learning
    rate, from `block_lrs` (absolute rates, as a fraction of `learning_rate`) and LoRA+ (`lora_B` x the ratio).
    Groups in order of first appearance, parameters in their order: one group as before when nothing differs."""
    lrs = parse_block_values(block_lrs, "block_lrs", num_blocks, positive_float)
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in params.items():
        block = block_of(name)
        lr = learning_rate if block is None else lrs[block[0]].get(block[1], learning_rate)
        lr_scale = lr / learning_rate * (loraplus_lr_ratio if name.endswith(".lora_B.weight") else 1.0)
        groups.setdefault(lr_scale, []).append(param)
    return [{"params": ps, "lr_scale": s} for s, ps in groups.items()]
