"""What a run does around the loop: train in stretches, save after each, sample, plot, and draw the XY grid.

The CLI's `train` and `demo` both go through `execute`, so a config file and the demo behave alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from . import plots
from .checkpoints import STATE_SUFFIX, atomic_write, checkpoint_stem
from .config import check_fields
from .trainer import StepInfo, Trainer, strength_grid


@dataclass(frozen=True)
class RunPlan:
    steps: int = 3000  # train until the run has done this many steps in all
    save_every: int = 750  # a LoRA file, a sample and a grid row every this many steps
    save_state: bool = True  # also write the full training state at each save, to resume from
    prompts: tuple[str, ...] = ()  # validation prompts; the grid uses the first
    strengths: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # LoRA strengths, the XY grid's columns
    sample_steps: int = 20  # sampling steps of each validation image
    sample_guidance: float = 3.5  # guidance of the validation images (Flux-dev's usual 3.5)
    sample_width: int = 512  # validation image width, a multiple of 16
    sample_height: int = 512  # validation image height, a multiple of 16
    sample_seed: int = 0  # the same noise at every checkpoint, so samples compare
    sample_negative_prompt: str = ""  # for true CFG
    sample_true_cfg_scale: float = 1.0  # true classifier-free guidance (de-distilled bases such as dev2pro); 1.0 = off
    validation_base: str = ""  # "" = the training base

    def __post_init__(self):
        check_fields(self, "plan.")
        if self.steps < 1:
            raise ValueError(f"plan.steps: {self.steps}; use 1 or more")
        if self.save_every < 1:
            raise ValueError(f"plan.save_every: {self.save_every}; use 1 or more (e.g. 750)")
        for name in ("sample_width", "sample_height"):
            if getattr(self, name) % 16:
                raise ValueError(f"plan.{name}: {getattr(self, name)} is not a multiple of 16")

    @classmethod
    def from_dict(cls, values: dict) -> "RunPlan":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"[plan]: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class RunResult:
    loras: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    loss_plot: Path | None = None
    grid: Path | None = None
    interrupted: bool = False  # `should_stop` ended the run before plan.steps; its last state is in `states`


def execute(trainer: Trainer, plan: RunPlan, should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Train to `plan.steps`. `should_stop()` (a Ctrl-C) ends it after the current step, with a LoRA and a state saved at
    that step so that no step done is lost. Of several data-parallel processes only the main one writes files and
    samples; the others train along and return an empty result."""
    if trainer.config.total_steps == 0:  # auto: the schedule spans the plan
        trainer.config = trainer.config.replace(total_steps=plan.steps)
    cfg = trainer.config
    main = trainer.processes.is_main
    out = Path(cfg.output_dir)
    result = RunResult()
    checkpoints: list[tuple[int, dict]] = []
    sample = dict(seed=plan.sample_seed, steps=plan.sample_steps, guidance=plan.sample_guidance,
                  width=plan.sample_width, height=plan.sample_height, base_path=plan.validation_base or None,
                  negative_prompt=plan.sample_negative_prompt, true_cfg_scale=plan.sample_true_cfg_scale)
    with tqdm(total=plan.steps, initial=min(trainer.step, plan.steps), desc="training", unit="step",
              disable=not main) as bar:
        while trainer.step < plan.steps:
            next_save = (trainer.step // plan.save_every + 1) * plan.save_every
            target = min(next_save, plan.steps)
            trainer.train(target - trainer.step, on_step=lambda info: _advance(bar, info), should_stop=should_stop)
            stopping = trainer.step < target  # every process stopped at the same step
            if not main:
                if stopping:
                    return result
                continue
            stem = checkpoint_stem(cfg.output_name, trainer.step)
            result.loras.append(trainer.save_lora(out / f"{stem}.safetensors"))
            if stopping:
                result.states.append(trainer.save_state(out / f"{stem}{STATE_SUFFIX}"))
                result.interrupted = True
                return result
            state = trainer.snapshot()
            if plan.save_state:
                result.states.append(trainer.save_state(out / f"{stem}{STATE_SUFFIX}", state))
            checkpoints.append((trainer.step, state.lora))
            for i, image in enumerate(trainer.sample(plan.prompts, **sample) if plan.prompts else []):
                result.samples.append(save_png(image, out / "samples" / f"{stem}_{i}.png"))
    if not main:
        return result
    result.loss_plot = out / f"{cfg.output_name}_loss.png"
    plots.loss_plot(trainer.losses, trainer.lrs, [s for s, _ in checkpoints], path=result.loss_plot)
    if plan.prompts and checkpoints:
        grid = strength_grid(trainer, checkpoints, plan.strengths, plan.prompts[0], **sample)
        result.grid = save_png(grid, out / f"{cfg.output_name}_xy_grid.png")
    return result


def save_png(image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def mean_losses(losses: list[float], window: int = 20) -> tuple[float, float]:
    """(mean of the first `window` losses, mean of the last `window`): the figure that says training worked."""
    window = max(1, min(window, len(losses) // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def _advance(bar: tqdm, info: StepInfo) -> None:
    bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
    bar.update(1)
