"""Data-parallel training over several processes, on Hugging Face accelerate (torch.distributed underneath).

A LoRA on a frozen base needs no sharded weights (FSDP, DeepSpeed): every process holds the whole base and the
whole LoRA, trains on its share of each batch, and the processes add their LoRA gradients together once per
optimizer step. `batch_size` stays the batch of the whole run: each of N processes takes its share of every batch,
and the noise, timesteps, flips and caption dropout of the whole batch are drawn by every process from the one run
generator, so N processes make the same run as one process, up to the order of float additions, and a state saved
with N processes resumes with any other number.

Launched by `torchrun --nproc_per_node N -m trainer_core train CONFIG.toml` or `accelerate launch --multi_gpu
--num_processes N -m trainer_core train CONFIG.toml`; a plain run is one process and never touches torch.distributed.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch

# the main process samples and writes files while the others wait in the next step's gradient exchange
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class Processes:
    """The processes training one run, as one `Trainer` sees them: how many, which one this is, and the exchange."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator  # None: a single process

    @property
    def count(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def index(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, samples and reports progress."""
        return self.index == 0

    def share(self, batch_size: int) -> slice:
        """This process's part of a batch of `batch_size` (the first `batch_size % count` processes take one more)."""
        base, extra = divmod(batch_size, self.count)
        start = self.index * base + min(self.index, extra)
        return slice(start, start + base + (self.index < extra))

    def sum_gradients(self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Add every process's gradients of `params` and `loss` together, in one exchange; -> the summed loss.

        A process whose share of a batch was empty took part with zero gradients."""
        if self.count == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
        flat = self.accelerator.reduce(flat, reduction="sum")
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return flat[-1]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set in any process (a Ctrl-C reaches each process at its own moment; they must stop at
        the same step, or the others would wait for the stopped one's gradients)."""
        if self.count == 1:
            return flag
        flags = torch.tensor([float(flag)], device=self.accelerator.device)  # NCCL exchanges GPU tensors only
        return bool(self.accelerator.reduce(flags, reduction="sum").item())


SINGLE = Processes()


def launched_processes(device: str) -> Processes:
    """The processes a launcher started (torchrun or `accelerate launch` set WORLD_SIZE), else `SINGLE`.

    `device` is the config's: "cpu" trains on CPUs over gloo (how the tests run), anything else one GPU per process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(cpu=device == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    return Processes(accelerator)


def process_device(processes: Processes, device: str) -> torch.device | None:
    """The device of this process when several train (the launcher's choice: one GPU each), else None."""
    if processes.accelerator is None:
        return None
    device = torch.device(processes.accelerator.device)
    return torch.device("cpu") if device.type == "cpu" else device  # accelerate says "cpu:0", safetensors wants "cpu"


def resolve_device(name: str) -> torch.device:
    """The `device` setting as a torch device: auto is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} but no CUDA GPU is available; use 'auto' or 'cpu'")
    return device
