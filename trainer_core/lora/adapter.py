"""The peft adapter on Flux's transformer blocks: where it goes (blocks, layout), its init, its strength and its
state under peft's names."""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from torch import nn

from ..config import LORA_LAYOUTS, NETWORKS
from ..models import fuse_projections, is_fused
from . import lycoris
from .formats import BLOCK_KINDS, LAYOUT_BLOCKS, _preview
from .linear import ADAPTER, FoldedLoraLinear
from .per_block import param_groups, parse_block_values, parse_blocks, positive_int, rank_pattern

logger = logging.getLogger(__name__)

MODULATION_MODULES = {"img_mod.lin", "txt_mod.lin", "modulation.lin"}


def model_layout(transformer: nn.Module) -> str:
    """"fused" or "split": the layout the transformer's block Linears are in."""
    return "fused" if is_fused(transformer) else "split"


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


def _lora_layers(transformer: nn.Module) -> dict[str, LoraLayer | LycorisLayer]:
    """The adapter's layers by module name: peft LoRA layers, or LoKr / LoHa ones."""
    return {n: m for n, m in transformer.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
            or isinstance(m, LycorisLayer) and ADAPTER in m._available_adapters}


def network_of(transformer: nn.Module) -> str:
    """"lora", "lokr" or "loha": the kind of the transformer's adapter."""
    layer = next(iter(_require_adapter(transformer).values()))
    return "lora" if isinstance(layer, LoraLayer) else lycoris.layer_network(layer)


def _require_adapter(transformer: nn.Module) -> dict[str, LoraLayer]:
    layers = _lora_layers(transformer)
    if not layers:
        raise ValueError("the transformer has no LoRA adapter; call add_lora(transformer, rank, alpha) first")
    return layers


def lora_parameters_by_name(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """peft/diffusers names (`transformer_blocks.0.attn.to_q.lora_A.weight`, DoRA's
    `...lora_magnitude_vector.weight`; LoKr / LoHa: `...attn.to_qkv.lokr_w1`, the LyCORIS key suffixes) -> the
    adapter's parameters."""
    params = {}
    for name, layer in _require_adapter(transformer).items():
        if isinstance(layer, LycorisLayer):
            params |= {f"{name}.{key}": p for key, p in lycoris.tensors(layer).items()}
            continue
        for ab in ("lora_A", "lora_B"):
            params[f"{name}.{ab}.weight"] = getattr(layer, ab)[ADAPTER].weight
        if ADAPTER in layer.lora_magnitude_vector:
            params[f"{name}.lora_magnitude_vector.weight"] = layer.lora_magnitude_vector[ADAPTER].weight
    return params


def _is_dora(layer: LoraLayer | LycorisLayer) -> bool:
    return isinstance(layer, LoraLayer) and ADAPTER in layer.lora_magnitude_vector


def _scale(layer: LoraLayer | LycorisLayer) -> float:
    """The layer's scale at strength 1 (peft's `scaling` also carries the current strength)."""
    if isinstance(layer, LycorisLayer):
        return lycoris.scale(layer)
    return layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]


def adapter_settings(config) -> dict:
    """`add_lora`'s settings from a TrainConfig (all but the init's generator and dtype)."""
    return dict(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, blocks=config.blocks,
                include_modulation=config.train_modulation, dora=config.dora, layout=config.lora_layout,
                network=config.network, lokr_factor=config.lokr_factor, block_ranks=config.block_ranks)


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
    network: str = "lora",
    lokr_factor: int = -1,
    block_ranks: str = "",
) -> None:
    """Add the peft LoRA adapter "default" to every Linear of the selected double/single blocks, in `layout`
    ("fused": the model is first put in the fused layout, in place, and each fused Linear gets one LoRA).

    `network` "lokr" / "loha": peft's LoKr / LoHa instead (fused layout only, no DoRA, no dropout: a stack of
    Kronecker or Hadamard products per q, k, v is not one product on the fused module ComfyUI loads). `block_ranks`
    ("double:0-9=32,single:0-37=8") gives those blocks another rank; alpha stays the same for all, as kohya's.

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
    if network not in NETWORKS:
        raise ValueError(f"network: {network!r}; choose one of {', '.join(NETWORKS)}")
    if network != "lora" and (layout != "fused" or dora or dropout):
        raise ValueError(f"network {network}: needs lora_layout fused, dora off and lora_dropout 0 (see TrainConfig)")
    selection = parse_blocks(blocks, _block_counts(transformer))
    ranks = parse_block_values(block_ranks, "block_ranks", _block_counts(transformer), positive_int)
    if layout == "fused":
        fuse_projections(transformer)
    target = target_regex(selection, include_modulation, layout)
    targeted = [m for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target, n)]
    width = min(min(m.in_features, m.out_features) for m in targeted)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= max([rank, *_values(ranks)]) <= width:
        raise ValueError(f"rank: must be an integer from 1 to {width} (the narrowest targeted layer), got {rank!r}"
                         + (f" and block_ranks {block_ranks!r}" if block_ranks else ""))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha: must be a number > 0 (alpha = rank gives scale 1), got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")

    if network != "lora":
        transformer.add_adapter(lycoris.lycoris_config(network, rank, alpha, target, rank_pattern(ranks), lokr_factor),
                                ADAPTER)
        for layer in _lora_layers(transformer).values():
            lycoris.init_lycoris(layer, lora_dtype, generator)
            lycoris.use_own_forward(layer)
        _log_added(transformer, network, rank, alpha, len(targeted), layout)
        return
    # Created without init: peft would init, then cast to the base dtype (rounding the init, or fp8).
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, init_lora_weights=False,
                        use_dora=dora, rank_pattern=rank_pattern(ranks))
    config._register_custom_module({nn.Linear: FoldedLoraLinear})
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
    _log_added(transformer, network, rank, alpha, len(targeted), layout)


def _values(by_kind: dict[str, dict[int, float]]) -> list[float]:
    return [v for by_index in by_kind.values() for v in by_index.values()]


def _log_added(transformer: nn.Module, network: str, rank: int, alpha: float, linears: int, layout: str) -> None:
    n_params = sum(p.numel() for p in lora_parameters(transformer))
    logger.info("%s rank %d alpha %g on %d Linears, %s layout (%d parameters)", network, rank, alpha, linears, layout,
                n_params)


def _row_norms(layer: LoraLayer, delta: torch.Tensor | None = None) -> torch.Tensor:
    """(out,) float32 L2 norms of the base weight's rows (plus `delta`, a weight difference), as DoRA measures."""
    weight = layer.get_base_layer().weight.float()
    return (weight if delta is None else weight + delta.to(weight.device)).norm(dim=1)


def _delta(layer: LoraLayer) -> torch.Tensor:
    """(out, in) float32 weight change of the LoRA part at strength 1: (alpha / rank) B A."""
    return _scale(layer) * (layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float())


def check_lora_settings(transformer_config: dict, rank: int, alpha: float, **settings) -> int:
    """Raise now, naming the field, wherever `add_lora(rank, alpha, **settings)` would: it is tried on an empty
    (meta-device) model of that config, so a rank too wide or a mistyped `blocks` fails in a second instead of after
    the models load. Returns the adapter's parameter count (what its files will weigh)."""
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(transformer_config)
    add_lora(model, rank, alpha, **settings)
    return sum(p.numel() for p in lora_parameters(model))


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable tensors, for the optimizer."""
    return list(lora_parameters_by_name(transformer).values())


def optimizer_groups(transformer: nn.Module, block_lrs: str = "", learning_rate: float = 1.0,
                     loraplus_lr_ratio: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups of the adapter (`per_block.param_groups`): per-block rates and LoRA+."""
    return param_groups(lora_parameters_by_name(transformer), _block_counts(transformer), block_lrs, learning_rate,
                        loraplus_lr_ratio)


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


@contextmanager
def adapter_off(transformer: nn.Module) -> Iterator[None]:
    """The base model inside the block: peft's layers skip the adapter (no weight or strength is touched)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def _interpolate(base: torch.Tensor, out: torch.Tensor, strength: float) -> torch.Tensor:
    return base + strength * (out - base)


def lora_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft/diffusers names, cloned to the CPU."""
    return {k: p.detach().to("cpu", copy=True) for k, p in lora_parameters_by_name(transformer).items()}


def load_lora_state(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `lora_state` tensors into the adapter; the keys and shapes must match it exactly."""
    params = lora_parameters_by_name(transformer)
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match the adapter (missing: {_preview(missing) or 'none'}; unexpected: "
            f"{_preview(unexpected) or 'none'}); create the adapter with the network, rank, block_ranks, blocks, "
            "train_modulation, dora and lora_layout the state was saved with"
        )
    wrong = [k for k, p in params.items() if state[k].shape != p.shape]
    if wrong:
        raise ValueError(
            f"LoRA state shapes differ from the adapter's for {_preview(wrong)}; create the adapter with the rank "
            "(block_ranks, lokr_factor) the state was saved with"
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def _rank_alpha(transformer: nn.Module) -> tuple[int, float]:
    ref = next(iter(_require_adapter(transformer).values()))
    return ref.r[ADAPTER], ref.lora_alpha[ADAPTER] if isinstance(ref, LoraLayer) else ref.alpha[ADAPTER]


def _kohya_groups(transformer: nn.Module) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(kohya module name, the adapter's modules fused into it in row order) for every Linear of every block."""
    for attr, bfl_prefix, modules in LAYOUT_BLOCKS[model_layout(transformer)].values():
        for i in range(len(getattr(transformer, attr))):
            for bfl, parts in modules.items():
                yield f"lora_unet_{bfl_prefix}_{i}_{bfl.replace('.', '_')}", tuple(f"{attr}.{i}.{p}" for p in parts)
