"""Flux transformers in GGUF files, as the ComfyUI-GGUF pack's users keep them (`flux1-dev-Q8_0.gguf`, Q5_K_S, Q4_K_S,
...): read with the `gguf` package; the block Linears' weights stay quantized in memory and are dequantized at each
call by diffusers' GGUF kernels (plain torch, so on any device). Everything else is small and read as dense tensors.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter, dequantize_gguf_tensor
from gguf import GGMLQuantizationType, GGUFReader
from torch import Tensor, nn

from ..presets import BASE_FORMATS
from .convert import bfl_to_diffusers
from .files import is_gguf
from .fp8 import Fp8Linear

_DENSE = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)  # numpy reads these as float arrays
# the block weights kept quantized: the BFL block Linears (their norms are called `scale`, so `.weight` is a Linear)
_BFL_BLOCKS = ("double_blocks.", "single_blocks.")


def _reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)  # memory-mapped: the header is parsed, no weight is read
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}): download it "
                         "again.") from e


def _bfl_name(name: str) -> str:
    return name.removeprefix("model.").removeprefix("diffusion_model.")


def gguf_kind(path: Path) -> str:
    """`detect_file_kind` of a GGUF file: "flux_transformer_gguf", or "gguf" for another model's. A ValueError for a
    truncated file or a Flux file in a quantization this trainer cannot read. Reads the header only."""
    reader = _reader(path)
    names = {_bfl_name(t.name) for t in reader.tensors}
    if "img_in.weight" not in names or not any(n.startswith(_BFL_BLOCKS) for n in names):
        return "gguf"
    readable = set(SUPPORTED_GGUF_QUANT_TYPES) | set(_DENSE)
    unknown = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if unknown:
        raise ValueError(f"{path} holds tensors quantized as {', '.join(unknown)}, which this trainer cannot read: "
                         f"use a file in {', '.join(sorted(t.name for t in readable))} (Q8_0, Q6_K, Q5_K_S or "
                         "Q4_K_S are the common ones).")
    return "flux_transformer_gguf"


def base_format(path: Path) -> str:
    """How a GGUF base stores its block weights, as `presets.BASE_FORMATS` names it: its most common quantization
    ("Q4_K" for a Q4_K_S file), "bf16" for an unquantized file, "fp8" (8 bits, what the presets were tuned for) for a
    quantization the presets do not list; "" for a file that is not a GGUF (fp8 or bf16 by the run's fp8_base)."""
    if not is_gguf(path):
        return ""
    types = Counter(t.tensor_type.name for t in _reader(path).tensors if _bfl_name(t.name).startswith(_BFL_BLOCKS)
                    and len(t.shape) == 2)
    kind = types.most_common(1)[0][0] if types else "F16"
    return "bf16" if kind in ("F16", "BF16", "F32") else kind if kind in BASE_FORMATS else "fp8"


def gguf_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's logical shape (row-major, as torch has it), from the header alone."""
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in _reader(path).tensors}


def read_gguf_transformer(path: Path, dtype: torch.dtype, device="cpu", fp8_blocks: bool = False) -> dict[str, Tensor]:
    """The transformer's tensors under diffusers names: the quantized block Linear weights as diffusers'
    `GGUFParameter`s (raw blocks, on `device`), every other tensor dense in `dtype` (dequantized where quantized),
    except unquantized block Linear weights, which are float8_e4m3fn with `fp8_blocks`. One tensor at a time is
    copied out of the memory-mapped file."""
    state_dict = {}
    for t in _reader(path).tensors:
        name = _bfl_name(t.name)
        data = torch.from_numpy(np.array(t.data)).to(device)
        block_weight = name.startswith(_BFL_BLOCKS) and name.endswith(".weight") and len(t.shape) == 2
        if t.tensor_type in _DENSE:
            state_dict[name] = data.to(torch.float8_e4m3fn if block_weight and fp8_blocks else dtype)
            continue
        quantized = GGUFParameter(data, quant_type=t.tensor_type)
        if block_weight and t.tensor_type != GGMLQuantizationType.BF16:
            state_dict[name] = quantized
        else:
            dense = dequantize_gguf_tensor(quantized).to(dtype)
            state_dict[name] = dense.to(torch.float8_e4m3fn) if block_weight and fp8_blocks else dense
    return bfl_to_diffusers(state_dict)


class GGUFLinear(Fp8Linear):
    """A frozen nn.Linear whose weight stays GGUF-quantized (a `GGUFParameter`: raw blocks of bytes) and is
    dequantized at each call, with Fp8Linear's dtype rule and backward (only the quantized weight is kept)."""

    @staticmethod
    def upcast(weight: Tensor, dtype: torch.dtype) -> Tensor:
        return dequantize_gguf_tensor(weight).to(dtype)


def use_gguf_linears(model: nn.Module, state_dict: dict[str, Tensor], compute_dtype: torch.dtype) -> None:
    """Swap each Linear of the (meta-device) model whose weight in `state_dict` is quantized for a `GGUFLinear` shaped
    for the raw blocks, so `load_state_dict(assign=True)` takes them as they are."""
    for key, weight in state_dict.items():
        if not isinstance(weight, GGUFParameter):
            continue
        name = key.removesuffix(".weight")
        old = model.get_submodule(name)
        new = GGUFLinear(old.in_features, old.out_features, old.bias is not None, compute_dtype, device="meta")
        new.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
