"""The run store: every loop's result on disk, keyed by what decides it, so the same steps are never trained twice.

Each loop result is one state file (LoRA, optimizer, RNG, data position, losses) under the run's identity
(`identity.run_identity`) and the chain of loop lengths that led to it:

    <store>/runs/<identity>/<chain>.state.safetensors     e.g. runs/3f09c1d2a4b5e6f7/750-750.state.safetensors

Its header repeats identity and chain. A file proven bad (truncated, not a state, another run's) is moved to
`<store>/damaged/` and its loop trained again; a file that merely could not be read (an I/O error) is left alone.
Validation samples and XY grids rendered from those states are kept beside them (`images/<key>_<i>.png`).

Several processes may share a store (two ComfyUI servers, a CLI run): writes and evictions take the store's file
lock, and every file is written atomically. The store stays within `store_max_gb`: after each save the least
recently used loops of other runs are deleted; states a user saved by name beside `runs/` and LoRA files elsewhere
are never touched.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .checkpoints import STATE_SUFFIX, TrainingState, folder_lock, load_training_state, save_png, save_training_state
from .config import TrainConfig
from .content_hash import ContentIndex
from .output_guard import state_bytes

log = logging.getLogger(__name__)

RUNS = "runs"  # the store's own subfolder; named states saved by users sit beside it
DAMAGED = "damaged"  # entries proven bad are moved here (never deleted: the user may want to look)
_HEADER_BYTES = 1 << 20  # a state's settings, loss history and RNG states, generously


class NotEnoughSpaceError(OSError):
    """The store's disk cannot hold the states a loop will write."""


def store_folder(config: TrainConfig) -> Path:
    return Path(config.store_dir or Path(config.output_dir) / "run_store")


def chain_key(chain: Sequence[int]) -> str:
    """"750-750" for loops of 750 and 750 steps; "start" for the run's starting point."""
    return "-".join(map(str, chain)) or "start"


def loop_bytes(lora: dict, optimizer: str) -> int:
    """What one stored loop of this LoRA takes on disk with `optimizer`."""
    return state_bytes(sum(t.numel() for t in lora.values()), optimizer) + _HEADER_BYTES


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class RunStore:
    folder: Path
    max_bytes: int = 10 * 10**9  # the budget: `store_max_gb`

    @classmethod
    def of(cls, config: TrainConfig) -> "RunStore":
        return cls(store_folder(config), int(config.store_max_gb * 1e9))

    @property
    def hashes(self) -> ContentIndex:
        """The index of model-file hashes kept in this store."""
        return ContentIndex(self.folder)

    def path(self, identity: str, chain: Sequence[int]) -> Path:
        return Path(self.folder) / RUNS / identity / f"{chain_key(chain)}{STATE_SUFFIX}"

    def load(self, identity: str, chain: Sequence[int], optimizer: bool = False) -> TrainingState | None:
        """The stored state after `chain`, or None (the loop is trained again). `optimizer=False` reads a light state
        (LoRA, RNG, losses). An unreadable file is logged and left in place; a file proven bad moves to damaged/."""
        path = self.path(identity, chain)
        if not path.is_file():
            return None
        try:
            state, _ = load_training_state(path, optimizer=optimizer)
            if (state.run, state.chain) != (identity, tuple(chain)):
                raise ValueError(f"{path} belongs to run {state.run} after loops {chain_key(state.chain)}")
        except OSError as e:  # a passing I/O error proves nothing about the file
            log.warning("run store: could not read %s (%s); training those steps again, the file is kept", path, e)
            return None
        except (ValueError, KeyError) as e:
            log.warning("run store: %s cannot be used (%s); training those steps again", path, e)
            self._set_aside(path, identity)
            return None
        try:
            os.utime(path)  # recently used loops are the last evicted
        except OSError:
            pass
        return state

    def _set_aside(self, path: Path, identity: str) -> None:
        target = Path(self.folder) / DAMAGED / f"{identity}_{path.name}"
        try:
            with folder_lock(self.folder):
                target.parent.mkdir(exist_ok=True)
                os.replace(path, target)
            log.warning("run store: moved it to %s (delete it when you like)", target)
        except OSError as e:
            log.warning("run store: could not move %s to %s (%s)", path, target.parent, e)

    def save(self, state: TrainingState, config: dict) -> Path:
        """Store a full state under its own `run` and `chain`, then evict other runs' loops beyond the budget."""
        with folder_lock(self.folder):
            path = save_training_state(self.path(state.run, state.chain), state, config)
            self.evict(current=state.run)
        return path

    def images(self, identity: str, key: str, count: int) -> list[Image.Image] | None:
        """The `count` images rendered before under `key` (see `identity.image_key`) in this run, or None."""
        paths = [Path(self.folder) / RUNS / identity / "images" / f"{key}_{i}.png" for i in range(count)]
        if not all(p.is_file() for p in paths):
            return None
        images = []
        try:
            for p in paths:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
        except OSError as e:  # evicted meanwhile, or damaged: render again
            log.warning("run store: could not read %s (%s); rendering again", paths[len(images)], e)
            return None
        log.info("run store: %d image(s) rendered before, loaded", count)
        return images

    def save_images(self, identity: str, key: str, images: Sequence[Image.Image]) -> None:
        with folder_lock(self.folder):
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
                f"{nbytes / 2**20:.0f} MiB; free disk space there, lower store_max_gb, or delete old runs in "
                f"{folder / RUNS}")

    def evict(self, current: str) -> None:
        """Delete the least recently used loops of runs other than `current` until the store's runs/ fit in the
        budget; a run left without loops goes with its images. Logs each loop deleted and what it freed."""
        runs = Path(self.folder) / RUNS
        files = [(p, p.stat()) for p in runs.rglob("*") if p.is_file()]
        total = sum(st.st_size for _, st in files)
        if total <= self.max_bytes:
            return
        loops = sorted(((st.st_mtime, p, st) for p, st in files
                        if p.name.endswith(STATE_SUFFIX) and p.parent.parent == runs and p.parent.name != current),
                       key=lambda item: item[0])
        freed = 0
        for _, path, st in loops:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st.st_size
            freed += st.st_size if st.st_nlink == 1 else 0  # a loop also saved by name stays on disk there
            log.info("run store: evicted loops %s of run %s (%s, least recently used)%s", path.name.removesuffix(
                STATE_SUFFIX), path.parent.name, _gb(st.st_size), "" if st.st_nlink == 1 else
                "; its disk space stays in use by the state saved under a name")
            if not any(path.parent.glob(f"*{STATE_SUFFIX}")):
                rest = sum(p.stat().st_size for p in path.parent.rglob("*") if p.is_file())
                shutil.rmtree(path.parent, ignore_errors=True)
                total, freed = total - rest, freed + rest
        log.info("run store: evicting freed %s; the store's runs take %s of store_max_gb %s", _gb(freed), _gb(total),
                 _gb(self.max_bytes))
        if total > self.max_bytes:
            log.warning("run store: this run's own loops take %s, over store_max_gb %s; none of them is evicted "
                        "while it runs (raise store_max_gb to keep other runs)", _gb(total), _gb(self.max_bytes))
