"""What a training run writes and renders from its handles: LoRA checkpoints (raw and EMA) with their metadata and
validation loss, training-state files, and images (samples, the XY grid) kept in the run store by what made them.

`RunOutputs` is a part of `run_handle.TrainingRun` (its models, store and handles are the run's); the files' names
never take another run's file (`RUN_KEY` in a LoRA's metadata says which run and point wrote it).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from safetensors import SafetensorError, safe_open

from . import lora, validation
from .checkpoints import STATE_SUFFIX, TrainingState, checkpoint_stem, free_path, link_or_copy, read_state_header, \
    save_training_state
from .content_hash import content_identity
from .identity import image_key
from .inference_mode import outside_inference_mode
from .run_store import chain_key
from .validation import EMA, RAW

if TYPE_CHECKING:
    from .run_handle import TrainingHandle

log = logging.getLogger(__name__)

RUN_KEY = "flux_lora_trainer_run"  # LoRA file metadata: "<run identity>/<chain>", which run and point wrote it


@dataclass(frozen=True)
class Checkpoint:
    step: int
    lora_path: Path
    state: TrainingState  # in memory (light): the XY grid samples its LoRA without reading the file back
    state_path: Path | None = None  # the training state saved beside it, if asked for
    ema_path: Path | None = None  # the EMA LoRA saved beside it (`<name>_ema.safetensors`), when the run keeps one
    validation: dict | None = None  # its validation.validation_record (raw and EMA losses); None: validation off

    def rows(self, kinds: Sequence[str] = (RAW, EMA)) -> list[tuple[str, dict]]:
        """(kind, LoRA state) of each of `kinds` this checkpoint has: the XY grid's rows for it."""
        states = {RAW: self.state.lora, EMA: self.state.ema}
        return [(kind, states[kind]) for kind in kinds if states[kind]]


class RunOutputs:
    """A run's checkpoints and images; mixed into `TrainingRun`, which owns `config`, `store`, `identity`,
    `records`, `_live`, `_bring_to`, `_full`, `_stamp` and `stored`."""

    @outside_inference_mode
    def save_checkpoint(self, handle: TrainingHandle, save_state: bool = False, folder: str | Path | None = None,
                        state_folder: str | Path | None = None) -> TrainingHandle:
        """Write `<output_name>_<step:06d>.safetensors` (a kohya LoRA from the handle's LoRA needs no model) in
        `folder` (default: the config's output_dir) and optionally the training state as
        `<same name>.state.safetensors` in `state_folder` (default: the run store's folder); returns the handle with
        the checkpoint recorded. A name another run's file holds gets a counter; this run's own file is kept."""
        if self.released:
            self._live()  # raises, naming what to do
        cfg = self.config
        tag = f"{self.identity}/{chain_key(handle.chain)}"
        state = handle.state
        path = free_path(folder if folder is not None else cfg.output_dir,
                         checkpoint_stem(cfg.output_name, handle.step), ".safetensors",
                         lambda p: lora_run(p) == tag)
        record = self._validation_record(handle)
        base = content_identity(cfg.transformer_path, self.store.hashes)
        metadata = {**lora.lora_metadata(cfg, handle.step, self.records, base), RUN_KEY: tag}
        if path.exists():
            log.info("LoRA at step %d is already saved as %s", handle.step, path)
        else:
            self._write_lora(path, handle, state.lora, _scored(metadata, record, RAW))
            log.info("saved LoRA at step %d to %s", handle.step, path)
        ema_path = None
        if state.ema:  # beside the raw file, whatever name that got
            ema_path = path.with_name(f"{path.name.removesuffix('.safetensors')}_ema.safetensors")
            if not (ema_path.exists() and lora_run(ema_path) == f"{tag}/ema"):
                self._write_lora(ema_path, handle, state.ema, {**_scored(metadata, record, EMA),
                                                               RUN_KEY: f"{tag}/ema", "ema_decay": str(cfg.ema_decay)})
        state_path = self._save_state(handle, path.name.removesuffix(".safetensors"), state_folder) if save_state \
            else None
        checkpoint = Checkpoint(handle.step, path, state.light(), state_path, ema_path, record)
        checkpoints = handle.checkpoints + (checkpoint,)
        if record is not None:
            log.info("checkpoint step %d: %s; %s", handle.step, validation.describe(record),
                     validation.describe_best([c.validation for c in checkpoints if c.validation is not None]))
        return replace(handle, checkpoints=checkpoints)

    def _write_lora(self, path: Path, handle: TrainingHandle, weights: dict, metadata: dict[str, str]) -> None:
        """`weights` (the handle's LoRA or its EMA, a LoRA state) as a LoRA file in the config's format."""
        cfg = self.config
        if cfg.lora_format == "kohya" and not cfg.dora and cfg.network == "lora":
            lora.save_kohya_state(path, weights, cfg.rank, cfg.alpha, metadata)
            return
        # written from the adapter: DoRA's scales are measured on the base weights, a LoKr's rank read from its layers
        transformer = self._bring_to(handle).transformer
        with validation.lora_weights(transformer, weights):
            lora.save_lora_file(path, transformer, metadata, cfg.lora_format)

    def _validation_record(self, handle: TrainingHandle) -> dict | None:
        """The handle's validation record at its step: from its state (scored when its loop ended), else scored now
        (a run's start, a state saved before validation was on). None when validation is off."""
        if not self.config.validation_timesteps:
            return None
        known = [r for r in handle.state.validation if r["step"] == handle.step]
        if known:
            return known[-1]
        trainer = self._live()
        with validation.lora_weights(trainer.transformer, handle.state.lora):
            return validation.validation_record(trainer, trainer.validation_samples, handle.step,
                                                handle.state.ema or None)

    def _save_state(self, handle: TrainingHandle, stem: str, folder: str | Path | None) -> Path:
        """The handle's full state as `<folder>/<stem>.state.safetensors`: the run store's file linked there when it
        holds it (no disk used twice), else written."""
        want = handle.state.id
        path = free_path(folder if folder is not None else self.store.folder, stem, STATE_SUFFIX,
                         lambda p: _state_id(p) == want)
        if path.exists():
            return path
        if handle.chain and self.stored(handle.chain) is not None:
            return link_or_copy(self.store.path(self.identity, handle.chain), path)
        return save_training_state(path, self._stamp(self._full(handle), handle.chain), self.config.to_dict())

    def _base_path(self, validation_base: bool) -> str | None:
        """The base to sample on: the config's validation base when asked for and set, else the training base."""
        path = self.config.validation_transformer_path or None
        if validation_base and path is None:
            log.info("no validation base was chosen; sampling on the training base")
        return path if validation_base else None

    def _rendered(self, what: str, count: int, render: Callable[[], list], validation_base: bool, *parts) -> list:
        """Images from the run store if rendered before with the same state(s) and settings, else `render()`d
        and stored. The sampling settings in `parts` are JSON-able; progress callbacks are left out of the key."""
        base = self._base_path(validation_base)
        key = image_key(what, content_identity(base, self.store.hashes) if base else "", *parts)
        images = self.store.images(self.identity, key, count)
        if images is None:
            images = render()
            self.store.save_images(self.identity, key, images)
        return images

    @outside_inference_mode
    def sample(self, handle: TrainingHandle, prompts: Sequence[str], validation_base: bool = False,
               **sample_kwargs) -> list:
        """`Trainer.sample` with the handle's LoRA -> PIL images; the trainer's own state is left where it stands."""
        def render():
            return self._live().sample(prompts, lora_state=handle.state.lora,
                                       base_path=self._base_path(validation_base), **sample_kwargs)

        return self._rendered("sample", len(prompts), render, validation_base, handle.chain, list(prompts),
                              _settings(sample_kwargs))

    @outside_inference_mode
    def strength_grid(self, handle: TrainingHandle, strengths: Sequence[float], prompt: str,
                      validation_base: bool = False, kinds: Sequence[str] = (RAW,), **sample_kwargs):
        """The XY grid over the checkpoints recorded on `handle` (rows: each checkpoint's LoRAs of `kinds`, raw and/or
        EMA) and `strengths` (columns) -> PIL image."""
        if not handle.checkpoints:
            raise ValueError("handle: no checkpoint was saved on the way to this node; connect it after SaveCheckpoint")
        rows, labels = grid_rows(handle.checkpoints, kinds)
        if not rows:
            raise ValueError(f"rows: {'/'.join(kinds)}, but the checkpoints have no EMA; set ema_decay in InitTrainer "
                             "(e.g. 0.99) or show the raw rows")

        def render():
            return [validation.strength_grid(self._live(), rows, strengths, prompt, labels=labels,
                                             base_path=self._base_path(validation_base), **sample_kwargs)]

        chains = [[c.step, list(c.state.chain)] for c in handle.checkpoints]
        return self._rendered("grid", 1, render, validation_base, chains, list(strengths), prompt, labels,
                              _settings(sample_kwargs))[0]


def grid_rows(checkpoints: Sequence[Checkpoint], kinds: Sequence[str]) -> tuple[list[tuple[int, dict]], list[str]]:
    """The XY grid's rows, (step, LoRA state), and their labels: each checkpoint's LoRAs of `kinds` with its
    validation loss, the lowest of them marked best."""
    found = validation.best([c.validation for c in checkpoints if c.validation is not None])
    rows, labels = [], []
    for c in checkpoints:
        for kind, weights in c.rows(kinds):
            rows.append((c.step, weights))
            labels.append(validation.row_label(c.step, kind, c.validation, found is not None and found[:2] == (c.step, kind)))
    return rows, labels


def _scored(metadata: dict[str, str], record: dict | None, kind: str) -> dict[str, str]:
    """A LoRA file's metadata with its validation loss (`validation_loss`), when it was scored."""
    if record is None or record.get(kind) is None:
        return metadata
    return {**metadata, "validation_loss": repr(record[kind])}


def _settings(sample_kwargs: dict) -> dict:
    """The sampling settings as a JSON-able part of an image key: a control image by its pixels' digest."""
    settings = {k: v for k, v in sample_kwargs.items() if k != "callback" and not (k == "control_image" and v is None)}
    if "control_image" in settings:
        image = settings["control_image"].convert("RGB")
        settings["control_image"] = hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()[:16]
    return settings


def lora_run(path: Path) -> str | None:
    """The run and point that wrote a LoRA file (`RUN_KEY` in its metadata), None if unknown or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(RUN_KEY)
    except (SafetensorError, OSError):
        return None


def _state_id(path: Path) -> str | None:
    try:
        return read_state_header(path).get("id")
    except (SafetensorError, ValueError, OSError):
        return None
