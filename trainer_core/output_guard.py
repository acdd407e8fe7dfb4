"""What keeps a command-line run from losing or clobbering files: the output folder checked before anything loads, one
run per folder (a lock file), room for the planned files, Ctrl-C that ends at a step boundary, and a rescue folder for
a state whose save failed.

Light on purpose (no torch import): its checks run before the models and should fail in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

LOCK_NAME = ".flux-lora-train.lock"
_FRESH_LOCK_SECONDS = 10.0  # a lock file younger than this may still be being written by its run: never taken over
# bytes of optimizer state per LoRA parameter in a training state (Prodigy keeps four fp32 tensors, AdamW two)
_OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16}


def check_output_dir(folder: str | Path) -> Path:
    """`folder` is a folder, or can be made: raise naming `output_dir` otherwise. Creates nothing."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir: {path} is a file, not a folder; give a folder for the LoRAs and states")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output_dir: {path} cannot be made: {parent} is a file; give another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir: {parent} is not writable; fix its permissions or give another folder")
    return path


def run_files(folder: str | Path, name: str) -> list[Path]:
    """The files a run named `name` writes into `folder` (LoRAs, states, loss plot, grid, samples)."""
    pattern = re.compile(re.escape(name) + r"_(\d+(\.state)?\.safetensors|loss\.png|xy_grid\.png|\d+_\d+\.png)")
    folder = Path(folder)
    return sorted(p for d in (folder, folder / "samples") if d.is_dir() for p in d.iterdir()
                  if pattern.fullmatch(p.name))


def set_aside(files: list[Path], folder: Path, name: str) -> Path:
    """Move `files` (inside `folder`) into `folder/name`, keeping their relative paths: replaced, never deleted."""
    aside = folder / name
    for p in files:
        target = aside / p.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
    return aside


def planned_bytes(lora_params: int, optimizer: str, saves: int, save_state: bool, images_per_save: int,
                  image_pixels: int, steps: int, ema: bool = False) -> int:
    """What `saves` saves write at most: a bf16 LoRA (and its EMA's), an fp32 LoRA with its optimizer state (and the
    fp32 EMA), uncompressed images."""
    header = (1 << 16) + 32 * steps  # settings, names, and a state's loss and LR history
    state = state_bytes(lora_params, optimizer) + 4 * lora_params * ema + header if save_state else 0
    loras = (1 + ema) * (2 * lora_params + header)
    return saves * (loras + state + images_per_save * 3 * image_pixels) + (1 << 20)  # + loss plot


def state_bytes(lora_params: int, optimizer: str) -> int:
    """What a training state of `lora_params` LoRA parameters takes on disk, header aside: the float32 LoRA and the
    optimizer's state (the run store's budget and this folder's free-space check both count with it)."""
    return (4 + _OPTIMIZER_BYTES.get(optimizer, 16)) * lora_params


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_free_space(folder: str | Path, needed: int, field: str = "output_dir",
                     what: str = "this run's checkpoints and states",
                     advice: str = "save less often (plan.save_every, plan.save_state)") -> None:
    """Refuse, naming `field`, a `folder` whose disk has less than `needed` bytes free for `what`."""
    probe = Path(folder)
    while not probe.exists():  # the folder may not be made yet: its disk is its nearest existing parent's
        probe = probe.parent
    free = free_bytes(probe)
    if free < needed:
        raise ValueError(f"{field}: {folder} has {_mib(free)} free, but {what} need about {_mib(needed)}; free some "
                         f"space, give another {field}, or {advice}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class RunLock:
    """`<output_dir>/.flux-lora-train.lock`, naming the run that holds the folder (host, pid, start, command). A lock
    whose process has ended (crash, kill) is taken over; a live one, or one from another host, is refused by name."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "process_started": psutil.Process().create_time(),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)}

    def __enter__(self) -> "RunLock":
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"output_dir: cannot create {folder} ({e.strerror or e}); give another folder") from e
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_dead()
                continue
            except OSError as e:
                raise ValueError(f"output_dir: {folder} is not writable ({e.strerror or e}); fix its permissions, "
                                 "free space, or give another folder") from e
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            return self
        raise ValueError(f"output_dir: {folder}: could not take {self.path}; another run is starting there")

    def _take_over_if_dead(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            age = None
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder, age = {}, time.time() - self.path.stat().st_mtime
        if age is not None and age < _FRESH_LOCK_SECONDS:
            holder = {"host": "?", "pid": "?", "started": "just now", "command": "a run that is starting"}
        if not holder or (holder.get("host") == self.info["host"] and not _alive(holder)):
            log.warning("taking over %s from a run that is no longer running (pid %s, started %s)",
                        self.path, holder.get("pid", "?"), holder.get("started", "?"))
            self.path.unlink(missing_ok=True)
            return
        raise ValueError(
            f"output_dir: {self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')}: {holder.get('command')}); wait for it to end or give another output_dir. "
            f"If that run is gone, delete {self.path}"
        )

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == self.info["pid"]:
                self.path.unlink()


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs: the same pid started at the same time (a pid is reused after a reboot)."""
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder.get("process_started", process.create_time()))) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.AccessDenied:
        return True


class CtrlC:
    """A context in which the first Ctrl-C only sets `requested` (the loop ends after its current step and saves) and
    a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing the current step, then saving; press Ctrl-C again to stop at once "
                    "(the steps since the last save are then lost)")

    def __enter__(self) -> "CtrlC":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def rescue_folders() -> list[Path]:
    """Where a state goes when the output folder refuses it: the user's cache, then the temporary folder."""
    return [Path.home() / ".cache" / "flux-lora-trainer" / "rescue", Path(tempfile.gettempdir()) / "flux-lora-trainer-rescue"]
