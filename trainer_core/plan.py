"""What a run does around the loop: train in stretches, save after each, sample, plot, and draw the XY grid.

The CLI's `train` and `demo` both go through `execute`, so a config file and the demo behave alike, and both use the
run store the nodes use (`run_handle.TrainingRun`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps
from tqdm import tqdm

from . import data, plots, validation
from .checkpoints import STATE_SUFFIX, checkpoint_stem, save_png
from .config import TrainConfig
from .run_handle import TrainingHandle, TrainingInterrupted, TrainingRun
from .run_outputs import Checkpoint, grid_rows
from .trainer import StepInfo, Trainer
from .typed_fields import check_fields


GRID_ROWS = {"raw": (validation.RAW,), "ema": (validation.EMA,), "both": (validation.RAW, validation.EMA)}


def sample_control(plan: "RunPlan", records) -> Image.Image:
    """Kontext: the control image the plan's samples edit (`plan.sample_control`, else the first pair's), as RGB."""
    path = Path(plan.sample_control) if plan.sample_control else next(r.control for r in records if r.control)
    try:
        with Image.open(path) as im:
            return data.to_rgb(ImageOps.exif_transpose(im))
    except OSError as e:
        raise ValueError(f"plan.sample_control: {path} cannot be read as an image ({e}); give a PNG or JPEG") from e


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
    grid_rows: str = "raw"  # the XY grid's rows per checkpoint: raw, ema (with ema_decay set) or both
    sample_control: str = ""  # Kontext: the picture the samples and the grid edit; "" = the first pair's control image

    def __post_init__(self):
        check_fields(self, "plan.")
        if self.steps < 1:
            raise ValueError(f"plan.steps: {self.steps}; use 1 or more")
        if self.grid_rows not in GRID_ROWS:
            raise ValueError(f"plan.grid_rows: {self.grid_rows!r}; choose one of {', '.join(GRID_ROWS)}")
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
    cells: dict[tuple[int, str], list] = field(default_factory=dict)  # the grid's images: (step, "raw" or "ema")
    # -> a row, a column per strength
    ema_loras: list[Path] = field(default_factory=list)  # the EMA LoRA beside each checkpoint, when the run keeps one
    validation: list[dict] = field(default_factory=list)  # each checkpoint's validation.validation_record

    @property
    def best(self) -> tuple[int, str, float] | None:
        """(step, "raw" or "ema", loss): the checkpoint with the lowest validation loss; None without validation."""
        return validation.best(self.validation)


def execute(trainer: Trainer, plan: RunPlan, should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Train `trainer` (fresh, or restored to a saved state) to `plan.steps` in stretches of `save_every`, writing a
    LoRA, a state and samples after each, then the loss plot and the XY grid.

    Stretches the run store holds are loaded, not trained, so the same config run again trains nothing and rewrites
    no file. A trainer restored to a state of this very run starts from the fresh run and loads its stretches, so
    the plot and grid show the whole run. `should_stop()` (a Ctrl-C) ends it after the current step, with a LoRA and a
    state saved at that step so that no step done is lost. Of several data-parallel processes only the main one
    writes files, samples and the run store's entries (the others read them, and all skip the same stretches)."""
    trainer.config = cfg = planned_config(trainer.config, plan)
    if plan.grid_rows == "ema" and not cfg.ema_decay:
        raise ValueError("plan.grid_rows: ema, but ema_decay is 0 (no EMA is kept); set ema_decay (e.g. 0.99) or "
                         "grid_rows to raw")
    main = trainer.processes.is_main
    out = Path(cfg.output_dir)
    result = RunResult()
    sample = dict(seed=plan.sample_seed, steps=plan.sample_steps, guidance=plan.sample_guidance,
                  width=plan.sample_width, height=plan.sample_height, base_path=plan.validation_base or None,
                  negative_prompt=plan.sample_negative_prompt, true_cfg_scale=plan.sample_true_cfg_scale)
    if cfg.model_type == "kontext":
        sample["control_image"] = sample_control(plan, trainer.dataset.records)
    handle = TrainingRun.around(trainer)
    run = handle.run
    done = [run.stored(handle.chain[:i]) for i in range(1, len(handle.chain))]
    checkpoints: tuple[Checkpoint, ...] = ()

    def outputs(point: TrainingHandle) -> TrainingHandle:
        nonlocal checkpoints
        if not main:
            return point
        point = run.save_checkpoint(replace(point, checkpoints=checkpoints), save_state=plan.save_state, folder=out,
                                    state_folder=out)
        checkpoints = point.checkpoints
        result.loras.append(checkpoints[-1].lora_path)
        if checkpoints[-1].ema_path is not None:
            result.ema_loras.append(checkpoints[-1].ema_path)
        if checkpoints[-1].validation is not None:
            result.validation.append(checkpoints[-1].validation)
        if checkpoints[-1].state_path is not None:
            result.states.append(checkpoints[-1].state_path)
        stem = checkpoints[-1].lora_path.name.removesuffix(".safetensors")
        images = trainer.sample(plan.prompts, lora_state=point.state.lora, **sample) if plan.prompts else []
        for i, image in enumerate(images):
            result.samples.append(save_png(image, out / "samples" / f"{stem}_{i}.png"))
        return point

    for point in [p for p in done if p is not None] + ([handle] if handle.chain else []):
        handle = outputs(point)
    with tqdm(total=plan.steps, initial=min(handle.step, plan.steps), desc="training", unit="step",
              disable=not main) as bar:
        while handle.step < plan.steps:
            next_save = (handle.step // plan.save_every + 1) * plan.save_every
            try:
                handle = run.train(handle, min(next_save, plan.steps) - handle.step, should_stop=should_stop,
                                   on_step=lambda info: _advance(bar, info),
                                   on_known=lambda s: bar.update(s.step - bar.n))
            except TrainingInterrupted:  # every process stopped at the same step: keep it as the CLI's resume point
                result.interrupted = True
                if main:
                    stem = checkpoint_stem(cfg.output_name, trainer.step)
                    result.loras.append(trainer.save_lora(out / f"{stem}.safetensors"))
                    result.states.append(trainer.save_state(out / f"{stem}{STATE_SUFFIX}"))
                return result
            handle = outputs(handle)
    if not main:
        return result
    state = handle.state
    result.loss_plot = out / f"{cfg.output_name}_loss.png"
    plots.loss_plot(state.losses, state.lrs, [c.step for c in checkpoints], path=result.loss_plot,
                    validation=state.validation)
    if plan.prompts and checkpoints:
        kinds = GRID_ROWS[plan.grid_rows]
        rows, labels = grid_rows(checkpoints, kinds)
        cells = validation.strength_cells(trainer, rows, plan.strengths, plan.prompts[0], **sample)
        result.cells = dict(zip([(c.step, kind) for c in checkpoints for kind, _ in c.rows(kinds)], cells))
        grid = validation.label_grid(trainer, cells, [step for step, _ in rows], plan.strengths, plan.prompts[0],
                                     labels, sample.get("control_image"))
        result.grid = save_png(grid, out / f"{cfg.output_name}_xy_grid.png")
    return result


def validation_summary(result: RunResult) -> dict:
    """The validation loss of each checkpoint (raw and EMA) and the best one, as summary.json lists them."""
    found = result.best
    return {"checkpoints": [dict(r) for r in result.validation],
            "best": None if found is None else dict(zip(("step", "kind", "loss"), found))}


def validation_lines(result: RunResult) -> list[str]:
    """The validation loss per checkpoint, raw and EMA, and the best one named: the run's closing table."""
    if not result.validation:
        return []
    ema = any(r.get(validation.EMA) is not None for r in result.validation)
    lines = ["validation loss per checkpoint:", "step        raw" + ("        EMA" if ema else "")]
    for r in result.validation:
        lines.append(f"{r['step']:<8d}{r['raw']:>7.4f}" + (f"{r['ema']:>11.4f}" if ema else ""))
    step, kind, loss = result.best
    lines.append(f"best: step {step} {kind} (validation loss {loss:.4f})")
    return lines


def planned_config(config: TrainConfig, plan: RunPlan) -> TrainConfig:
    """`config` with total_steps 0 (auto) made the plan's steps: the LR schedule spans the run."""
    return config.replace(total_steps=plan.steps) if config.total_steps == 0 else config


def mean_losses(losses: list[float], window: int = 20) -> tuple[float, float]:
    """(mean of the first `window` losses, mean of the last `window`): the figure that says training worked."""
    window = max(1, min(window, len(losses) // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def _advance(bar: tqdm, info: StepInfo) -> None:
    bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
    bar.update(1)
