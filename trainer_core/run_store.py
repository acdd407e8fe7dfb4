"""The run store: every loop's result on disk, keyed by what decides it, so the same steps are never trained twice.

A run's identity is a hash of everything that decides its weights: the training settings (not where files go, nor
memory options that change no number), the model files' fingerprints, the dataset's (names, sizes, mtimes,
captions) and the state it started from. Each loop result is one state file (LoRA, optimizer, RNG, data position,
losses) named by the chain of loop lengths that led to it:

    <store>/runs/<identity>/<chain>.state.safetensors     e.g. runs/3f09c1d2a4b5e6f7/750-750.state.safetensors

Its header repeats identity and chain, so a truncated or foreign file is detected, named in the log and trained
again, never loaded. Validation samples and XY grids rendered from those states are kept beside them
(`images/<key>_<i>.png`), so a graph queued again renders nothing either. Only the newest `keep_runs` runs are kept; states a user saved by name beside `runs/` and
LoRA files elsewhere are never deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .checkpoints import (STATE_SUFFIX, TrainingState, file_fingerprint, load_training_state, save_png,
                          save_training_state)
from .config import TrainConfig
from .data import ImageRecord, dataset_fingerprint

log = logging.getLogger(__name__)

RUNS = "runs"  # the store's own subfolder; named states saved by users sit beside it
# settings that change no weight: where things go, and memory options whose numbers are the same
_NOT_WEIGHTS = {"output_dir", "output_name", "store_dir", "keep_runs", "cache_dir", "device", "compile_blocks",
                "gradient_checkpointing", "blocks_to_swap", "validation_transformer_path", "dataset_dir"}
# path settings whose files count, not their paths (the same file in another folder is the same run)
_FILES = ("transformer_path", "vae_path", "clip_path", "t5_path", "tokenizer_dir", "clip_tokenizer_dir",
          "t5_tokenizer_dir")


class NotEnoughSpaceError(OSError):
    """The store's disk cannot hold the states a loop will write."""


def run_identity(config: TrainConfig, records: Sequence[ImageRecord], start: TrainingState | None = None) -> str:
    """The hash naming a run: settings that decide weights, model files, dataset, and the state it started from."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_WEIGHTS and k not in _FILES}
    files = {k: file_fingerprint(getattr(config, k)) for k in _FILES if getattr(config, k)}
    key = {"settings": settings, "files": files, "dataset": dataset_fingerprint(records),
           "start": start.id if start is not None else ""}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chain_key(chain: Sequence[int]) -> str:
    """"750-750" for loops of 750 and 750 steps; "start" for the run's starting point."""
    return "-".join(map(str, chain)) or "start"


def dataset_files(records: Sequence[ImageRecord]) -> dict[str, str]:
    """Each image file (relative to the dataset folder) -> "size mtime caption-hash": to name what changed."""
    root = Path(os.path.commonpath([r.path.parent for r in records])) if records else Path()
    files = {}
    for r in records:
        st = r.path.stat()
        caption = hashlib.sha256(r.caption.encode()).hexdigest()[:8]
        files[r.path.relative_to(root).as_posix()] = f"{st.st_size} {st.st_mtime_ns} {caption}"
    return files


def dataset_changes(saved: dict[str, str], now: dict[str, str]) -> str:
    """What differs between two `dataset_files` listings, in words: "added a.png; edited b.png (image or caption)"."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    added = sorted(now.keys() - saved.keys())
    removed = sorted(saved.keys() - now.keys())
    edited = sorted(k for k in now.keys() & saved.keys() if now[k] != saved[k])
    parts = [f"{what} {names(items)}" for what, items in
             (("added", added), ("removed", removed), ("edited (image or caption)", edited)) if items]
    return "; ".join(parts) or "the images' buckets or order"


def folder_listing(folder: str | Path) -> str:
    """A cheap identity of a dataset folder: names, sizes and mtimes of its files and its direct subfolders' files
    (images and captions alike), hashed; nothing is decoded. Changes whenever an image or caption is edited,
    added or removed."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted([*folder.iterdir(), *folder.glob("*/*")]):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = p.stat()
            h.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RunStore:
    folder: Path
    keep_runs: int = 3  # runs whose states are kept; older ones are deleted when a new run stores its first loop

    def path(self, identity: str, chain: Sequence[int]) -> Path:
        return Path(self.folder) / RUNS / identity / f"{chain_key(chain)}{STATE_SUFFIX}"

    def load(self, identity: str, chain: Sequence[int], optimizer: bool = False) -> TrainingState | None:
        """The stored state after `chain`, or None. `optimizer=False` reads a light state (LoRA, RNG, losses).
        A damaged or foreign file is named in the log and removed, so the loop is trained again."""
        path = self.path(identity, chain)
        if not path.is_file():
            return None
        try:
            state, _ = load_training_state(path, optimizer=optimizer)
            if (state.run, state.chain) != (identity, tuple(chain)):
                raise ValueError(f"{path} belongs to run {state.run} after loops {chain_key(state.chain)}")
        except (ValueError, KeyError, OSError) as e:
            log.warning("run store: %s cannot be used (%s); training those steps again", path, e)
            path.unlink(missing_ok=True)
            return None
        os.utime(path.parent)  # recently used runs are the last pruned
        return state

    def save(self, state: TrainingState, config: dict) -> Path:
        """Store a full state under its own `run` and `chain`, then prune old runs."""
        path = save_training_state(self.path(state.run, state.chain), state, config)
        self.prune(keep=state.run)
        return path

    def images(self, identity: str, key: str, count: int) -> list[Image.Image] | None:
        """The `count` images rendered before under `key` (see `image_key`) in this run, or None."""
        paths = [Path(self.folder) / RUNS / identity / "images" / f"{key}_{i}.png" for i in range(count)]
        if not all(p.is_file() for p in paths):
            return None
        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        log.info("run store: %d image(s) rendered before, loaded", count)
        return images

    def save_images(self, identity: str, key: str, images: Sequence[Image.Image]) -> None:
        for i, image in enumerate(images):
            save_png(image, Path(self.folder) / RUNS / identity / "images" / f"{key}_{i}.png")

    def check_space(self, nbytes: int) -> None:
        """Raise before any step if the store's disk cannot take `nbytes` more."""
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < nbytes:
            raise NotEnoughSpaceError(
                f"run store {folder}: {free / 2**20:.0f} MiB free, but this loop's training state needs "
                f"{nbytes / 2**20:.0f} MiB; free disk space there, lower keep_runs, or delete old runs in "
                f"{folder / RUNS}")

    def prune(self, keep: str) -> None:
        """Delete all but the `keep_runs` most recently used runs (`keep` always stays)."""
        runs = [p for p in (Path(self.folder) / RUNS).iterdir() if p.is_dir() and p.name != keep]
        runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in runs[max(0, self.keep_runs - 1):]:
            log.info("run store: deleting the states of an old run, %s (keep_runs %d)", old, self.keep_runs)
            shutil.rmtree(old, ignore_errors=True)


def image_key(*parts) -> str:
    """The name of rendered images from what decides them (JSON-able values: chains, prompts, sampling settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_bytes(lora: dict) -> int:
    """What a stored state of this LoRA takes on disk with AdamW: the LoRA and its two moments, all float32."""
    return 3 * sum(t.numel() * 4 for t in lora.values())
