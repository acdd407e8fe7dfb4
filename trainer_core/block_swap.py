"""Block swap: keep the frozen weights of the last N transformer blocks in CPU RAM and stream each block to the GPU
just before it runs, so a 12B Flux trains on 12-16 GB cards. And partial gradient checkpointing, of the last N
blocks too, so that the swapped blocks are always among the checkpointed ones.

Only frozen tensors move; the LoRA parameters (and so the optimizer state) stay on the GPU. At most `resident`
swapped blocks are on the GPU at once: the one running and the one just used, which on the way back through
backward is the block whose gradients were just computed. The next block is prefetched on a side CUDA stream so
the copy overlaps compute. Needs gradient checkpointing during training: without it autograd would keep
references to the weights of every block until backward.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def model_blocks(transformer: nn.Module) -> list[nn.Module]:
    """Flux's blocks in execution order: the double-stream blocks, then the single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def checkpoint_blocks(transformer: nn.Module, count: int) -> int:
    """Gradient checkpointing of the last `count` blocks (all of them when `count` is -1 or more than there are);
    the others keep their activations for backward, which is faster where the card has room. Returns the count.

    All blocks use diffusers' own checkpointing; fewer wrap each chosen block's forward, recomputed in backward
    the same way (non-reentrant), so the weights trained are the same either way.
    """
    blocks = model_blocks(transformer)
    if count < 0 or count >= len(blocks):
        transformer.enable_gradient_checkpointing()
        return len(blocks)
    for block in blocks[len(blocks) - count:]:
        block.forward = functools.partial(_checkpointed, block.forward)
    return count


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class BlockSwap:
    def __init__(self, transformer: nn.Module, blocks_to_swap: int, device: torch.device, resident: int = 2):
        blocks = model_blocks(transformer)
        count = min(blocks_to_swap, len(blocks))
        if count < blocks_to_swap:
            log.warning("blocks_to_swap %d is more than the model's %d blocks; swapping all of them", blocks_to_swap, len(blocks))
        self.transformer, self.device, self.resident = transformer, torch.device(device), resident
        self.blocks = blocks[len(blocks) - count:]
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        self._on_device: OrderedDict[int, None] = OrderedDict()  # swapped blocks now on the GPU, least recent first
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ready: dict[int, torch.cuda.Event] = {}
        self._last = -1
        self._handles = []
        # CPU homes of the frozen tensors, pinned so copies can run asynchronously; they replace the originals
        self._home: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for block in self.blocks:
            self._home[id(block)] = [(t, self._pin(t.data)) for t in self._frozen(block)]
            for t, home in self._home[id(block)]:
                t.data = home

    @staticmethod
    def _frozen(block: nn.Module) -> list[torch.Tensor]:
        return [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")
        return t.pin_memory() if self._stream is not None else t

    def attach(self) -> "BlockSwap":
        """Move the model to the device, leaving the swapped blocks' frozen weights in RAM, and start swapping."""
        if self._handles:
            return self
        swapped = {id(t) for b in self.blocks for t in self._frozen(b)}
        for t in [*self.transformer.parameters(), *self.transformer.buffers()]:
            if id(t) not in swapped:
                t.data = t.data.to(self.device)
        self._on_device.clear()
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._before_block))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            self._evict(block)

    def _before_block(self, block: nn.Module, args) -> None:
        i = self._index[id(block)]
        self._bring_in(block)
        step = 1 if i > self._last else -1  # forward runs up the blocks, backward's recompute down
        self._last = i
        if 0 <= i + step < len(self.blocks) and self._stream is not None:
            self._bring_in(self.blocks[i + step], prefetch=True)

    def _bring_in(self, block: nn.Module, prefetch: bool = False) -> None:
        key = id(block)
        if key in self._on_device:
            self._on_device.move_to_end(key)
        else:
            while len(self._on_device) >= self.resident:
                self._evict(self._block(next(iter(self._on_device))))
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    for t, home in self._home[key]:
                        t.data = home.to(self.device, non_blocking=True)
                    self._ready[key] = torch.cuda.Event()
                    self._ready[key].record(self._stream)
            else:
                for t, home in self._home[key]:
                    t.data = home.to(self.device)
            self._on_device[key] = None
        if not prefetch and key in self._ready:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._ready.pop(key))
            for t, _ in self._home[key]:
                t.data.record_stream(compute)  # copied on the side stream, used here: free only after this use

    def _evict(self, block: nn.Module) -> None:
        key = id(block)
        for t, home in self._home[key]:
            t.data = home  # the device copy is freed once the compute stream is done with it
        self._on_device.pop(key, None)
        self._ready.pop(key, None)

    def _block(self, key: int) -> nn.Module:
        return self.blocks[self._index[key]]

    def on_device_count(self) -> int:
        return len(self._on_device)
