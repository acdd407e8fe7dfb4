"""Files that must never be half-written: atomic safetensors writes, and the training state on disk.

A write goes to a temporary file in the destination folder, is fsynced, then renamed over the target, so a crash,
a full disk or a cancel leaves the previous file intact and never a partial file under the real name.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import filelock
import psutil
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

STATE_FORMAT = "flux-lora-trainer/state/1"
STATE_SUFFIX = ".state.safetensors"
_TMP_MARK = ".tmp-"
_STALE_TEMPORARY_SECONDS = 86400.0  # any temporary file untouched for a day is a leftover (a writer on another machine)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]  # which machine's pids a temporary file's are


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_path)`, then fsync and rename tmp_path to `path`; on any failure `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder {path.parent} for {path.name}: {e.strerror or e}; check the path "
                               "and its permissions") from e
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}-{_HOST}{uuid.uuid4().hex[:4]}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # writers may create 0600 files; the user's files follow their umask
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}; free disk space or fix the folder's permissions, "
                                   "earlier files were left as they were") from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems (Windows, network mounts) cannot fsync a folder; the rename is still atomic
    _sweep_stale_temporaries(path)
    return path


def _sweep_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of `path` that a killed writer left (no `except` ran in it): those of this machine
    whose process is gone, and any untouched for a day (a writer on another machine sharing the folder). Another
    live process's file still being written (a second server, a data-parallel process) is never one of them."""
    for leftover in path.parent.glob(f"{glob.escape(_tmp_prefix(path))}*"):
        match = re.fullmatch(r"(\d+)-([0-9a-f]{4})[0-9a-f]{4}", leftover.name[len(_tmp_prefix(path)):])
        try:
            idle = time.time() - leftover.stat().st_mtime
        except OSError:
            continue  # renamed or removed by its writer meanwhile
        writer_gone = match is not None and match[2] == _HOST and not psutil.pid_exists(int(match[1]))
        if writer_gone or idle > _STALE_TEMPORARY_SECONDS:
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it: setting it to read it (`os.umask`) would race with the other
    threads of ComfyUI's server. Linux has it in /proc/self/status; elsewhere (macOS, Windows, old kernels) the
    common 022 is assumed."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def folder_lock(folder: str | Path) -> filelock.FileLock:
    """The lock of a folder that several processes write (the run store): two ComfyUI servers or a CLI run sharing
    it take turns. One lock object per folder in a process, so a holder may take it again (nested)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(Path(folder) / ".lock", is_singleton=True)


def _tmp_prefix(path: Path) -> str:
    """Temporary files of `path` are named `.<name>.tmp-<pid>-<host><random>`: hidden, and never a model or state
    name."""
    return f".{path.name}{_TMP_MARK}"


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_png(image, path: str | Path) -> Path:
    """A PIL image as a PNG, atomically."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@dataclass
class TrainingState:
    """Everything a run needs to continue exactly: LoRA, optimizer, RNG, data position, history."""

    step: int
    epoch: int
    cursor: int  # index of the next batch within the epoch's order
    lora: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, torch.Tensor]
    losses: list[float]
    lrs: list[float]
    fingerprint: dict[str, str]  # settings that must match to resume (rank, blocks, base architecture, ...)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    dataset: str = ""  # identity.dataset_identity's key of the data trained on ("" = unknown: an older file)
    dataset_files: list = field(default_factory=list)  # its listing (each folder's files), to name what changed
    run: str = ""  # the run store identity of the run it belongs to ("" = none)
    chain: tuple[int, ...] = ()  # the loop lengths that led to it in that run
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # the LoRA's moving average ({} = none), as `lora`
    validation: list = field(default_factory=list)  # validation.validation_record of each point scored, oldest first

    def clone(self) -> "TrainingState":
        return copy.deepcopy(self)

    def light(self) -> "TrainingState":
        """The same point without optimizer moments (which the run store keeps): what a handle holds in RAM (its EMA
        and validation history stay: a checkpoint saves the one and shows the other)."""
        return replace(self, optimizer={})

    @property
    def is_light(self) -> bool:
        return not self.optimizer


def save_training_state(path: str | Path, state: TrainingState, config: dict | None = None) -> Path:
    tensors = {f"lora.{k}": v for k, v in state.lora.items()}
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
    scalars = {}
    for pid, values in state.optimizer["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    header = {
        "step": state.step, "epoch": state.epoch, "cursor": state.cursor, "id": state.id,
        "losses": state.losses, "lrs": state.lrs, "fingerprint": state.fingerprint,
        "param_groups": state.optimizer["param_groups"], "optimizer_scalars": scalars, "config": config or {},
        "dataset": state.dataset, "dataset_files": state.dataset_files, "run": state.run, "chain": list(state.chain),
        "validation": state.validation,
    }
    return save_safetensors(path, tensors, {"format": STATE_FORMAT, "state": json.dumps(header)})


def read_state_header(path: str | Path) -> dict:
    """The JSON header of a state file (step, run, chain, dataset, config, ...) without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state of this trainer (a LoRA file?); pick a *{STATE_SUFFIX} file")
    return json.loads(meta["state"])


def load_training_state(path: str | Path, optimizer: bool = True) -> tuple[TrainingState, dict]:
    """-> (state, the config dict it was saved with); `optimizer=False` skips the moments (a light state).
    Raises ValueError naming the file if it is not a complete state file."""
    path = Path(path)
    if not path.is_file():
        tried = path if path.is_absolute() else f"{path} (relative to the working folder {Path.cwd()})"
        raise FileNotFoundError(f"training state {tried} does not exist; give a *{STATE_SUFFIX} file this trainer saved")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a training state of this trainer (a LoRA file?); pick a *{STATE_SUFFIX} file")
            tensors = {k: f.get_tensor(k) for k in f.keys() if optimizer or not k.startswith("optimizer.")}
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged or incomplete ({e}); pick an earlier state file") from e
    header = json.loads(meta["state"])
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    for key, value in header["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    state = TrainingState(
        step=header["step"], epoch=header["epoch"], cursor=header["cursor"], id=header["id"],
        lora={k[5:]: v for k, v in tensors.items() if k.startswith("lora.")},
        rng={k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
        optimizer={"state": opt_state, "param_groups": header["param_groups"]} if optimizer else {},
        losses=header["losses"], lrs=header["lrs"], fingerprint=header["fingerprint"],
        # older states kept the dataset identity in their fingerprint
        dataset=header.get("dataset") or header["fingerprint"].get("dataset", ""),
        dataset_files=_listing(header.get("dataset_files")), run=header.get("run", ""),
        chain=tuple(header.get("chain", ())), ema={k[4:]: v for k, v in tensors.items() if k.startswith("ema.")},
        validation=header.get("validation", []),
    )
    return state, header["config"]


def _listing(saved) -> list:
    """A state's dataset listing; an older state's (a flat dict of files, another identity) counts as unknown."""
    return saved if isinstance(saved, list) else []


def checkpoint_stem(output_name: str, step: int) -> str:
    """`<output_name>_<step:06d>`: the name, before its suffix, of a run's LoRA file and state file at `step`."""
    return f"{output_name}_{step:06d}"


def latest_state_file(folder: str | Path, stem: str, max_step: int | None = None) -> Path | None:
    """The newest complete state file `<stem>_<step>.state.safetensors` in `folder` (of step `max_step` at most),
    or None.

    Only that exact pattern matches: neither temporary files nor another run's `<stem>_v2_<step>` states.
    """
    pattern = re.compile(re.escape(stem) + r"_\d+" + re.escape(STATE_SUFFIX))
    best, best_step, damaged = None, -1, []
    for p in Path(folder).glob(f"{glob.escape(stem)}_*{STATE_SUFFIX}"):
        if not pattern.fullmatch(p.name):
            continue
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            step = json.loads(meta["state"])["step"] if meta.get("format") == STATE_FORMAT else -1
        except (SafetensorError, KeyError, ValueError, OSError) as e:
            damaged.append((p, e))
            continue
        if step > best_step and (max_step is None or step <= max_step):
            best, best_step = p, step
    for p, e in damaged:  # said once the scan knows whether an older state is there to use
        log.warning("skipped %s: damaged or incomplete (%s); %s", p, e,
                    f"the newest complete one, {best.name}, is used" if best else "there is no complete state to use")
    return best


def free_path(folder: str | Path, stem: str, suffix: str, is_ours: Callable[[Path], bool]) -> Path:
    """`<folder>/<stem><suffix>` unless another run's file holds that name; then the first free (or ours)
    `<stem>_00001_<suffix>`, `<stem>_00002_<suffix>`, ... (ComfyUI's counter convention), with a log line.

    `is_ours(path)` says whether an existing file is this very output (rewriting it changes nothing)."""
    path = Path(folder) / f"{stem}{suffix}"
    counter = 0
    while path.exists() and not is_ours(path):
        counter += 1
        path = Path(folder) / f"{stem}_{counter:05d}_{suffix}"
    if counter:
        log.info("%s%s holds another run's file; writing %s instead", stem, suffix, path.name)
    return path


def link_or_copy(source: str | Path, path: str | Path) -> Path:
    """`path` as the same file as `source` (a hard link: no disk used twice), or a copy where links are impossible;
    atomic either way."""
    def write(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)

    return atomic_write(path, write)
