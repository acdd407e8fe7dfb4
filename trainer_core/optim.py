"""Optimizers and learning-rate schedules.

The learning rate is a pure function of the step (as in nanoGPT's `get_lr`), so a resumed run needs only the step
to be back on its schedule, and no scheduler object has to be saved.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import TrainConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then the chosen schedule over `total_steps`.

    Past `total_steps` the schedule holds its final value (`check_schedule_covers` keeps runs from going there).
    """
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return peak
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)  # 0 -> 1 over the schedule
    floor = peak * config.min_lr_ratio
    if config.lr_schedule == "cosine":
        phase = progress  # half a cosine: peak down to the floor
    elif config.lr_schedule == "cosine_restarts":
        phase = 1.0 if progress >= 1.0 else (progress * config.lr_cycles) % 1.0
    else:  # cyclic: a whole cosine period per cycle, down to the floor and back up
        phase = 2.0 * ((progress * config.lr_cycles) % 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * phase))


class PastScheduleError(ValueError):
    """Training up to step `end` would run past `total`, where a schedule that moves the LR has ended (it would hold
    its final value, 0 for a cosine without a floor). Raised before the first step; the caller says what to set."""

    def __init__(self, end: int, config: TrainConfig):
        self.end, self.total = end, config.total_steps
        super().__init__(f"training to step {end} runs past total_steps {config.total_steps}, where the "
                         f"{config.lr_schedule} schedule ends: steps {config.total_steps + 1}-{end} would train at "
                         f"learning rate {learning_rate(config.total_steps, config):.3g}")


def check_schedule_covers(end: int, config: TrainConfig) -> None:
    """Raise PastScheduleError if steps up to `end` (run steps, 1-based) pass the end of a schedule that moves the LR
    (a constant one never ends)."""
    if end > config.total_steps > 0 and config.lr_schedule != "constant":
        raise PastScheduleError(end, config)


def make_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], config: TrainConfig, device: torch.device
                   ) -> torch.optim.Optimizer:
    """`params`: tensors, or parameter groups whose `lr_scale` multiplies the scheduled rate (`set_learning_rate`)."""
    params = list(params)
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "adamw":
        # the fused kernel is one launch for all parameters; it exists for CUDA and CPU alike in torch >= 2.4
        tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in tensors)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError(
                "optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes, CUDA only); "
                "or choose adamw or adafactor"
            ) from e
        if device.type != "cuda":
            raise ValueError("optimizer: adamw8bit runs on CUDA GPUs only; choose adamw or adafactor on this device")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # an explicit LR (no relative step) so our schedule drives it like the others
        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False, warmup_init=False)
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr, weight_decay=wd)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
