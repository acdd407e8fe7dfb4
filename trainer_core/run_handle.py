"""A training run as a node graph sees it: one live `Trainer`, and handles that are values.

ComfyUI caches node outputs and runs siblings in an order of its choosing, so a handle mutated in place would let a
node downstream of loop 1 see the weights of loop 2. Here a `TrainingHandle` is frozen and names one point of the
run (a `TrainingState`); every call first brings the trainer to the handle's state (restoring only when it stands
elsewhere). Re-running loop k from its input handle therefore re-trains from loop k-1, whatever ran in between.

Only one run holds models at a time: starting a run releases the previous one, and its handles then raise.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoints import STATE_SUFFIX, TrainingState, checkpoint_stem
from .config import TrainConfig
from .trainer import NonFiniteLossError, StepInfo, Trainer, preflight, strength_grid

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """`should_stop` ended a loop early; the steps done are kept and re-running the loop continues from them."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    lora_path: Path
    state: TrainingState  # in memory: the XY grid samples its LoRA without reading the file back


@dataclass(frozen=True, eq=False)
class TrainingHandle:
    """One point of a run: what a node receives and returns. Never mutated (eq=False: comparing by identity,
    never by the tensors inside)."""

    run: "TrainingRun"
    state: TrainingState
    checkpoints: tuple[Checkpoint, ...] = ()  # saved along the graph path that led here, oldest first

    @property
    def step(self) -> int:
        return self.state.step


def _grad_enabled(method):
    """ComfyUI runs nodes under `torch.inference_mode()`: tensors made there can never join autograd, so every
    call that trains, restores or creates trainer tensors runs with inference mode off."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapper


_active: "TrainingRun | None" = None  # the run holding models; a new run releases it first


class TrainingRun:
    def __init__(self, trainer: Trainer):
        self.trainer: Trainer | None = trainer
        self._at: str | None = None  # id of the TrainingState the trainer stands at; None = unknown
        # (id of the state a cancelled loop started from, the state it reached): lets a re-run continue it
        self._interrupted: tuple[str, TrainingState] | None = None

    @classmethod
    @_grad_enabled
    def start(
        cls,
        config: TrainConfig,
        resume: TrainingState | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        prompts: Sequence[str] = (),
    ) -> TrainingHandle:
        """Release the active run, load the models for `config` and return the handle at step 0 (or `resume`);
        the validation `prompts` are encoded along with the captions (see `Trainer.from_config`).

        Everything that needs no weights is checked first (`preflight`): a wrong file, rank or dataset raises while
        the active run still holds its models.
        """
        global _active
        records = preflight(config)
        if _active is not None:
            _active.release()
        trainer = Trainer.from_config(config, on_progress=on_progress, records=records, prompts=prompts)
        if resume is not None:
            trainer.restore(resume)
        run = _active = cls(trainer)
        state = resume if resume is not None else trainer.snapshot()
        run._at = state.id
        return TrainingHandle(run, state)

    def release(self) -> None:
        global _active
        if self.trainer is not None:
            self.trainer.release()
            self.trainer = None
        self._interrupted = None
        if _active is self:
            _active = None

    def _live(self) -> Trainer:
        if self.trainer is None:
            raise ValueError(
                "this training handle belongs to a run that was released because another InitTrainer started a new "
                "one; re-run InitTrainer (change any of its settings, or its seed) to train again"
            )
        return self.trainer

    def _bring_to(self, state: TrainingState) -> Trainer:
        trainer = self._live()
        if self._at != state.id:
            self._at = None  # a restore that fails half way leaves the trainer nowhere known
            trainer.restore(state)
            self._at = state.id
        return trainer

    @_grad_enabled
    def train(
        self,
        handle: TrainingHandle,
        steps: int,
        on_step: Callable[[StepInfo], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainingHandle:
        """The handle `steps` optimizer steps after `handle`.

        If the loop is cut short (an exception from `on_step`/`should_stop`, or `should_stop` returning True, which
        raises `TrainingInterrupted`), the steps done are kept; calling again with the same handle and steps
        continues from them instead of starting the loop over. A NaN/inf loss keeps nothing of the loop (its last
        steps led to the divergence): `handle` is saved as a state file, to resume from with a lower learning rate.
        """
        if steps < 1:
            raise ValueError(f"steps: {steps}; use 1 or more")
        target = handle.step + steps
        start = handle.state
        if self._interrupted is not None and self._interrupted[0] == start.id and self._interrupted[1].step <= target:
            start = self._interrupted[1]
            log.info("continuing the interrupted loop from step %d", start.step)
        trainer = self._bring_to(start)
        try:
            trainer.train(target - trainer.step, on_step=on_step, should_stop=should_stop)
        except NonFiniteLossError as e:
            self._at = None  # the trainer stands at weights that diverged; the next call restores a handle's state
            raise NonFiniteLossError(f"{e} {self._save_last_good(handle, trainer.step)}") from e
        except BaseException:
            self._keep_interrupted(handle)
            raise
        if trainer.step < target:
            self._keep_interrupted(handle)
            raise TrainingInterrupted(f"stopped at step {trainer.step} of {target}; run the loop again to continue")
        if self._interrupted is not None and self._interrupted[0] == handle.state.id:
            self._interrupted = None  # continued to the end: used up
        state = trainer.snapshot()
        self._at = state.id
        return replace(handle, state=state)

    def _keep_interrupted(self, handle: TrainingHandle) -> None:
        """Remember where a cut-short loop got to (each step is all-or-nothing, so the trainer is consistent)."""
        self._at = None
        state = self.trainer.snapshot()
        self._interrupted = (handle.state.id, state)
        self._at = state.id
        log.info("loop interrupted at step %d; its steps are kept", state.step)

    def _save_last_good(self, handle: TrainingHandle, diverged: int) -> str:
        """After the weights of step `diverged` gave a NaN loss: save the loop's input as SaveCheckpoint would, if it
        came before (a state of that step would only give the NaN again); -> what the user should do next."""
        if handle.step >= diverged:
            return (f"This loop's input (step {handle.step}) gave the NaN itself: lower learning_rate in InitTrainer "
                    f"and resume from a state saved before step {handle.step} (resume_state).")
        trainer = self._live()
        stem = checkpoint_stem(trainer.config.output_name, handle.step)
        path = Path(trainer.config.output_dir) / f"{stem}{STATE_SUFFIX}"
        try:
            trainer.save_state(path, handle.state)
        except OSError as e:
            log.error("could not save the state of step %d: %s", handle.step, e)
            return f"This loop's input (step {handle.step}) is unchanged; connect a SaveCheckpoint to it to keep it."
        return (f"This loop's input (step {handle.step}) is unchanged and saved as {path}: lower learning_rate in "
                "InitTrainer, set its resume_state to latest and queue again.")

    @_grad_enabled
    def save_checkpoint(self, handle: TrainingHandle, save_state: bool = False, folder: str | Path | None = None
                        ) -> TrainingHandle:
        """Write `<output_name>_<step:06d>.safetensors` (kohya LoRA) and optionally the training state beside it,
        in `folder` (default: the config's output_dir); returns the handle with the checkpoint recorded."""
        trainer = self._bring_to(handle.state)
        folder = Path(folder if folder is not None else trainer.config.output_dir)
        stem = checkpoint_stem(trainer.config.output_name, handle.step)
        path = trainer.save_lora(folder / f"{stem}.safetensors")
        if save_state:
            trainer.save_state(folder / f"{stem}{STATE_SUFFIX}", handle.state)
        return replace(handle, checkpoints=handle.checkpoints + (Checkpoint(handle.step, path, handle.state),))

    def _base_path(self, validation_base: bool) -> str | None:
        """The base to sample on: the config's validation base when asked for and set, else the training base."""
        path = self._live().config.validation_transformer_path or None
        if validation_base and path is None:
            log.info("no validation base was chosen; sampling on the training base")
        return path if validation_base else None

    @_grad_enabled
    def sample(self, handle: TrainingHandle, prompts: Sequence[str], validation_base: bool = False,
               **sample_kwargs) -> list:
        """`Trainer.sample` with the handle's LoRA -> PIL images; the trainer's own state is left where it stands."""
        return self._live().sample(prompts, lora_state=handle.state.lora, base_path=self._base_path(validation_base),
                                   **sample_kwargs)

    @_grad_enabled
    def strength_grid(self, handle: TrainingHandle, strengths: Sequence[float], prompt: str,
                      validation_base: bool = False, **sample_kwargs):
        """The XY grid over the checkpoints recorded on `handle` (rows) and `strengths` (columns) -> PIL image."""
        if not handle.checkpoints:
            raise ValueError("handle: no checkpoint was saved on the way to this node; connect it after SaveCheckpoint")
        rows = [(c.step, c.state.lora) for c in handle.checkpoints]
        return strength_grid(self._live(), rows, strengths, prompt, base_path=self._base_path(validation_base),
                             **sample_kwargs)
