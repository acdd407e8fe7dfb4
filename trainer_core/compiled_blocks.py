"""Regional torch.compile of Flux's blocks (`compile_blocks`), switched in for the training step only.

Each block's own forward is compiled (`torch.compile` of the bound method, so the module's hooks, such as block
swap's, run eagerly around the compiled graph); blocks of one class share the compiled code. The block's `forward`
becomes a switch: the compiled forward inside `CompiledBlocks.training_step()` (forward and backward, gradient
checkpointing's recomputation included), the eager one everywhere else. Sampling, the XY grid and `sample()` change
the LoRA's strength per call (peft's scale is a Python float: each strength would be a recompile) and promise
strength 0 == the base bit for bit, which only the eager modules keep; the validation loss (no grad, another graph)
is eager too.

Shapes: a block compiles for the first shape it sees; a second (another bucket, Kontext's control tokens) compiles
it once more with dynamic sizes (dynamo's automatic dynamic shapes), which then serves every further shape.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import torch
from torch import nn


def check_compile_support(device: torch.device) -> None:
    """Raise a ValueError naming compile_blocks when torch.compile (inductor) cannot build kernels on `device`: a GPU
    needs triton, the CPU a C++ compiler. Checked at setup, so a run fails before its first step, not inside it."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("compile_blocks: torch.compile needs triton for CUDA GPUs and it is not installed (on "
                             "Windows: pip install triton-windows, matching your torch version); install it or turn "
                             "compile_blocks off")
    elif device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            raise ValueError("compile_blocks: torch.compile on the CPU needs a C++ compiler (g++ or clang; cl.exe on "
                             "Windows) and none was found on PATH; install one or turn compile_blocks off") from None
    else:
        raise ValueError(f"compile_blocks: torch.compile of the blocks is not supported on {device.type}; "
                         "turn compile_blocks off")


class CompiledBlocks:
    """The compiled forwards of `blocks` (none: compile_blocks off, and `training_step()` changes nothing).

    Install before gradient checkpointing wraps a block's forward, so that checkpointing recomputes through the
    switch: the compiled forward in backward too."""

    def __init__(self, blocks: Sequence[nn.Module]):
        self._on = False
        for block in blocks:
            eager = block.forward
            block.forward = functools.partial(self._forward, eager, torch.compile(eager))

    def _forward(self, eager, compiled, *args, **kwargs):
        return (compiled if self._on else eager)(*args, **kwargs)

    @contextlib.contextmanager
    def training_step(self) -> Iterator[None]:
        """The compiled forwards within: a training step's forward and backward."""
        self._on = True
        try:
            yield
        finally:
            self._on = False
