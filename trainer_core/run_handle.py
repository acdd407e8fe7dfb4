"""A training run as a node graph sees it: handles that are values, a run store behind them, models loaded lazily.

ComfyUI caches node outputs and runs siblings in an order of its choosing, so a handle mutated in place would let a
node downstream of loop 1 see the weights of loop 2. Here a `TrainingHandle` is frozen and names one point of the
run: the chain of loop lengths that led to it and its state (LoRA, RNG, position, losses; the optimizer moments
stay in the run store). Every call first brings the trainer to the handle's state (restoring only when it stands
elsewhere). Re-running loop k from its input handle therefore re-trains from loop k-1, whatever ran in between.

Every loop result goes to the run store (`run_store.py`), so a loop ComfyUI runs again after its cache forgot it
(another prompt, a restart) is loaded in seconds instead of trained, and models load only when a loop must really
train or a sample must render.

Only one run holds models at a time: starting a run releases the previous one (handing its models over when the new
run needs the same ones), and its handles then raise. `release_models()` lets another program have the memory
without ending the run: its models go, its handles stay valid, and the next loop or sample that needs the models
loads them again (`on_loaded` says how long that took).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from .checkpoints import STATE_SUFFIX, TrainingState, checkpoint_stem, save_training_state
from .config import TrainConfig
from .data import ImageRecord
from .identity import check_resume, dataset_identity, run_identity
from .inference_mode import outside_inference_mode
from .optim import check_schedule_covers
from .preflight import preflight
from .run_outputs import Checkpoint, RunOutputs
from .run_store import RunStore, chain_key, loop_bytes
from .trainer import NonFiniteLossError, StepInfo, Trainer

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """`should_stop` ended a loop early; the steps done are kept and re-running the loop continues from them."""


@dataclass(frozen=True, eq=False)
class TrainingHandle:
    """One point of a run: what a node receives and returns. Never mutated (eq=False: comparing by identity,
    never by the tensors inside)."""

    run: "TrainingRun"
    saved: TrainingState | None  # None: the run's fresh start, made (models loaded) only when first needed
    chain: tuple[int, ...] = ()  # loop lengths from the run's start to here: the run store's key
    checkpoints: tuple[Checkpoint, ...] = ()  # saved along the graph path that led here, oldest first

    @property
    def state(self) -> TrainingState:
        return self.saved if self.saved is not None else self.run.initial_state()

    @property
    def step(self) -> int:
        return self.saved.step if self.saved is not None else 0


_active: "TrainingRun | None" = None  # the run holding models; a new run releases it first


def loaded_bytes() -> int:
    """Bytes the active run's models hold (0 when none are loaded)."""
    trainer = _active._trainer if _active is not None else None
    return trainer.memory_bytes() if trainer is not None else 0


def models_loaded() -> bool:
    return _active is not None and _active.loaded


def release_models() -> int:
    """Free the memory of the active run's models without ending the run (`TrainingRun.unload`); -> bytes freed."""
    return _active.unload() if _active is not None else 0


def _return_freed_memory() -> None:
    """Collect what the dropped models leave in reference cycles, and have glibc give freed heap pages back to the
    system: a model's many mid-sized tensors live on the heap, which otherwise keeps them as the process's memory."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
    if trim is not None:  # glibc (musl has none)
        trim(0)


def active_config() -> TrainConfig | None:
    """The config of the run that holds models now (the one a new run replaces), if any."""
    return None if _active is None else _active.config


class TrainingRun(RunOutputs):
    def __init__(self, config: TrainConfig, records: Sequence[ImageRecord], resume: TrainingState | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None,
                 before_load: Callable[[], None] | None = None, prompts: Sequence[str] = (),
                 on_loaded: Callable[[int, float, bool], None] | None = None):
        """The run of `config` on `records` from `resume` (None: fresh). Raises if `resume` cannot continue under
        `config` (`identity.check_resume`). A resumed state of this very run continues its chain (and its stored
        loops)."""
        self.config = config
        self.records = list(records)
        self.prompts = tuple(prompts)  # validation prompts to encode with the captions when the models load
        self.store = RunStore.of(config)
        self.writes = True  # False in a data-parallel run's other processes: only the main one writes the store
        self.dataset = dataset_identity(config.dataset_entries())
        if resume is not None:
            check_resume(resume, config, self.dataset, "resume_state")
        self.load_key = run_identity(config, self.dataset, self.store.hashes)  # what the models and data depend on
        own = resume is not None and resume.run == self.load_key
        self.identity = self.load_key if resume is None or own else \
            run_identity(config, self.dataset, self.store.hashes, start=resume.id)
        self.start_handle = TrainingHandle(self, resume, resume.chain if own else ())
        self._start = None if resume is None or own else resume  # where chain () stands, when not the fresh init
        self._trainer: Trainer | None = None  # loaded when first needed (`trainer`)
        self.released = False
        self._fresh: TrainingState | None = None  # the trainer's state when its models were loaded (step 0)
        self._at: str | None = None  # id of the TrainingState the trainer stands at; None = unknown
        # (id of the state a cancelled loop started from, the state it reached): lets a re-run continue it
        self._interrupted: tuple[str, TrainingState] | None = None
        self._on_progress, self._before_load = on_progress, before_load
        self._on_loaded = on_loaded  # (bytes, seconds, again): after the models loaded; again: after release_models
        self._unloaded = False  # the models were loaded once and released by `unload`

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        resume: TrainingState | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        before_load: Callable[[], None] | None = None,
        prompts: Sequence[str] = (),
        on_loaded: Callable[[int, float, bool], None] | None = None,
    ) -> TrainingHandle:
        """Release the active run and return the handle at step 0 (or `resume`) of `config`'s run; no model loads
        until a loop must train or a sample must render (`before_load` runs then, and `on_loaded(bytes, seconds,
        again)` after; the validation `prompts` are encoded then along with the captions, see `Trainer.from_config`).

        Everything that needs no weights is checked first (`preflight`): a wrong file, rank or dataset raises while
        the active run still holds its models. A run of the same config and data takes the active run's models over.
        """
        global _active
        run = cls(config, preflight(config), resume, on_progress, before_load, prompts, on_loaded)
        if _active is not None:
            if (_active.config, _active.load_key) == (config, run.load_key) and _active._trainer is not None:
                run._trainer, run._fresh, run._at = _active._trainer, _active._fresh, _active._at
                run._interrupted, _active._trainer = _active._interrupted, None
            _active.release()
        _active = run
        return run.start_handle

    @classmethod
    def around(cls, trainer: Trainer) -> TrainingHandle:
        """A run over a loaded trainer (the CLI's), at the state it was last restored to (or fresh at step 0);
        it never becomes the active run of the nodes."""
        resume = None
        if trainer.step:
            r = trainer.restored
            resume = trainer.snapshot() if r is None or r.step != trainer.step else replace(
                trainer.snapshot(), id=r.id, run=r.run, chain=r.chain, dataset=r.dataset, dataset_files=r.dataset_files)
        run = cls(trainer.config, trainer.dataset.records, resume)
        run._trainer = trainer
        run.writes = trainer.processes.is_main
        if resume is None:
            run._fresh = trainer.snapshot()
        run._at = (resume or run._fresh).id
        return run.start_handle

    @property
    def trainer(self) -> Trainer | None:
        """The live trainer, its models loaded now if not yet; None once the run is released."""
        return None if self.released else self._live()

    @property
    def loaded(self) -> bool:
        """Whether the models are loaded (a run whose loops all come from the store never loads them)."""
        return self._trainer is not None

    def release(self) -> None:
        global _active
        self.released = True
        self.unload()
        self._interrupted = None
        if _active is self:
            _active = None

    def unload(self) -> int:
        """Drop the models from the device and the RAM, keeping the run: its handles stay valid (their states are in
        RAM and the run store) and the next call that needs the models loads them again. -> the bytes they held,
        0 if none were loaded."""
        if self._trainer is None:
            return 0
        trainer, self._trainer, self._at = self._trainer, None, None
        held = trainer.memory_bytes()
        trainer.release()
        del trainer
        self._unloaded = True
        _return_freed_memory()
        return held

    @outside_inference_mode
    def _live(self) -> Trainer:
        """The trainer, its models loaded now if this is the first call that needs them."""
        if self.released:
            raise ValueError(
                "this training handle belongs to a run that was released because another InitTrainer started a new "
                "one; re-run InitTrainer (change any of its settings, or its seed) to train again"
            )
        if self._trainer is None:
            if self._before_load is not None:
                self._before_load()
            start = time.perf_counter()
            self._trainer = Trainer.from_config(self.config, on_progress=self._on_progress, records=self.records,
                                                prompts=self.prompts)
            if self._fresh is None:  # a reload keeps the first fresh state: handles and a cut-short loop refer to it
                self._fresh = self._trainer.snapshot()
                self._at = self._fresh.id
            if self._on_loaded is not None:
                self._on_loaded(self._trainer.memory_bytes(), time.perf_counter() - start, self._unloaded)
        return self._trainer

    @outside_inference_mode
    def initial_state(self) -> TrainingState:
        """The state at the run's start (chain ()): the resumed state, or the fresh LoRA (models load for it)."""
        if self._start is not None:
            return self._start
        if self._fresh is None:
            self._live()
        return self._fresh

    def _stamp(self, state: TrainingState, chain: tuple[int, ...]) -> TrainingState:
        """`state` labelled with its place in this run, as stored and saved."""
        return replace(state, run=self.identity, chain=chain, dataset=self.dataset.key,
                       dataset_files=self.dataset.listing)

    def _full(self, handle: TrainingHandle) -> TrainingState:
        """The handle's state with its optimizer moments: from RAM, the run store, or (deleted there) trained again."""
        if not handle.state.is_light:
            return handle.state
        state = self.store.load(self.identity, handle.chain, optimizer=True)
        if state is None:
            log.warning("run store: no state after loops %s of this run (deleted or pruned); training them again",
                        chain_key(handle.chain))
            self._handle_at(handle.chain)
            state = self.store.load(self.identity, handle.chain, optimizer=True)
        return state

    def _handle_at(self, chain: tuple[int, ...]) -> TrainingHandle:
        """The handle after `chain`, from the store where it holds the loops, else trained."""
        if chain == self.start_handle.chain:
            return self.start_handle
        if not chain:
            return TrainingHandle(self, self._start)
        return self.train(self._handle_at(chain[:-1]), chain[-1])

    def stored(self, chain: tuple[int, ...]) -> TrainingHandle | None:
        """The handle after `chain` if the run store holds it (light), else None."""
        state = self.store.load(self.identity, chain)
        return None if state is None else TrainingHandle(self, state, chain)

    def _bring_to(self, handle: TrainingHandle) -> Trainer:
        trainer = self._live()
        if self._at != handle.state.id:
            state = self._full(handle)
            self._at = None  # a restore that fails half way leaves the trainer nowhere known
            trainer.restore(state)
            self._at = state.id
        return trainer

    @outside_inference_mode
    def train(
        self,
        handle: TrainingHandle,
        steps: int,
        on_step: Callable[[StepInfo], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_known: Callable[[TrainingState], None] | None = None,
    ) -> TrainingHandle:
        """The handle `steps` optimizer steps after `handle`: loaded from the run store if it holds them, else
        trained (and stored).

        `on_known(state)` gets the state that steps of this loop done earlier led to, before any new step: the loop
        loaded from the store, or the part of a cut-short loop that a re-run continues.
        If the loop is cut short (an exception from `on_step`/`should_stop`, or `should_stop` returning True, which
        raises `TrainingInterrupted`), the steps done are kept; calling again with the same handle and steps
        continues from them instead of starting the loop over. A NaN/inf loss keeps nothing of the loop (its last
        steps led to the divergence): `handle` is saved as a state file, to resume from with a lower learning rate.
        """
        if steps < 1:
            raise ValueError(f"steps: {steps}; use 1 or more")
        if self.released:
            self._live()  # raises, naming what to do
        chain = handle.chain + (steps,)
        stored = self.store.load(self.identity, chain)
        if self._trainer is not None and self._trainer.processes.any(stored is None):
            stored = None  # data-parallel processes train or load together (another machine may not see the store)
        if stored is not None:
            log.info("loops %s (step %d): loaded from the run store", chain_key(chain), stored.step)
            if on_known is not None:
                on_known(stored)
            return replace(handle, saved=stored, chain=chain)
        target = handle.step + steps
        check_schedule_covers(target, self.config)  # before any model loads or step runs
        start = handle.state
        if self._interrupted is not None and self._interrupted[0] == start.id and self._interrupted[1].step <= target:
            start = self._interrupted[1]
            log.info("continuing the interrupted loop from step %d", start.step)
            if on_known is not None:
                on_known(start)
            trainer = self._bring_to(TrainingHandle(self, start, chain))
        else:
            trainer = self._bring_to(handle)
        if self.writes:
            self.store.check_space(loop_bytes(start.lora, self.config.optimizer))
        try:
            trainer.train(target - trainer.step, on_step=on_step, should_stop=should_stop)
        except NonFiniteLossError as e:
            self._at = None  # the trainer stands at weights that diverged; the next call restores a handle's state
            # a state of the step that diverged would only give the NaN again: keep the loop's input if it came before
            e.start, e.saved = handle.step, self._save_last_good(handle) if handle.step < trainer.step else None
            raise
        except BaseException:
            self._keep_interrupted(handle)
            raise
        if trainer.step < target:
            self._keep_interrupted(handle)
            raise TrainingInterrupted(f"stopped at step {trainer.step} of {target}; run the loop again to continue")
        if self._interrupted is not None and self._interrupted[0] == handle.state.id:
            self._interrupted = None  # continued to the end: used up
        trainer.validate()  # a loop's end is where a checkpoint may be saved: its score goes into the stored state
        state = self._stamp(trainer.snapshot(), chain)
        self._at = state.id
        if not self.writes:  # the main process stores the same state; this one keeps its own in RAM
            return replace(handle, saved=state, chain=chain)
        try:
            self.store.save(state, self.config.to_dict())
        except OSError as e:  # the steps are done: keep them whole in RAM rather than lose them
            log.error("run store: could not store loops %s (%s); this handle keeps its optimizer state in RAM",
                      chain_key(chain), e)
            return replace(handle, saved=state, chain=chain)
        return replace(handle, saved=state.light(), chain=chain)

    def _keep_interrupted(self, handle: TrainingHandle) -> None:
        """Remember where a cut-short loop got to (each step is all-or-nothing, so the trainer is consistent)."""
        self._at = None
        state = self._trainer.snapshot()
        self._interrupted = (handle.state.id, state)
        self._at = state.id
        log.info("loop interrupted at step %d; its steps are kept", state.step)

    def _save_last_good(self, handle: TrainingHandle) -> Path | None:
        """The loop's input saved as SaveCheckpoint would (after a NaN) -> the file; None if saving failed."""
        if not self.writes:  # a data-parallel run's other processes: the main one saves it
            return None
        path = self.store.folder / f"{checkpoint_stem(self.config.output_name, handle.step)}{STATE_SUFFIX}"
        try:
            return save_training_state(path, self._stamp(self._full(handle), handle.chain), self.config.to_dict())
        except OSError as e:
            log.error("could not save the state of step %d: %s", handle.step, e)
            return None



