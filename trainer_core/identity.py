"""What a run's result depends on, decided in one place: the run store's keys, the dataset's identity (the store,
ComfyUI's IS_CHANGED, resume), and whether a saved state may continue under a config.

A run's identity hashes exactly what decides its weights: the code's numerics (`NUMERICS_VERSION`), the settings on
the weights side of `SETTING_SIDES`, the content of its model files (`content_hash`), the dataset (each folder's
files by name, size and mtime, with its trigger word, resolutions and repeats), `validation_dir`'s images the same
way, and the state it started from.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import DatasetEntry, TrainConfig
from .content_hash import ContentIndex, content_identity
from .data import list_files
from .masks import MASK_FOLDER, is_mask_file

# Bump when a change to the code changes the numbers a run trains for the same settings and files (the loss, the
# optimizer, the LoRA's init or layout, sampling of noise or timesteps, the data order, caching): stored loops of
# the old code are then trained again instead of being handed back as if the new code had made them.
NUMERICS_VERSION = 2  # 2: LoRA init drawn from the run's CPU generator
# The same for one network's numbers alone, so that the stored runs of the others keep their keys.
# lokr 1: KroneckerLinear applies the update without building it; 2: its own backward, the base layer's dtype out;
# loha 1: the base layer's dtype out
NETWORK_NUMERICS = {"lokr": 2, "loha": 1}
# The same for the validation loss of runs whose data has masks or regularization images (it is in their stored loops)
WEIGHTED_VALIDATION_NUMERICS = 1  # 1: the validation loss weighs masks and regularization images as training does

WEIGHTS = "weights"  # decides the trained numbers: in the run identity by value
FILE = "file"  # a model file or folder: in the run identity by its content, never its path
DATASET = "dataset"  # in the run identity through the dataset identity (each folder's files and its settings)
NO_WEIGHT = "no weight"  # changes no trained number: left out, so changing it trains nothing again

# Every TrainConfig field and its side; tests/test_identity.py fails when a field is on neither.
SETTING_SIDES = {
    "transformer_path": FILE, "vae_path": FILE, "clip_path": FILE, "t5_path": FILE, "clip_tokenizer_dir": FILE,
    "t5_tokenizer_dir": FILE, "tokenizer_dir": FILE, "init_lora": FILE,
    "dataset_dir": DATASET, "datasets": DATASET, "control_dir": DATASET, "trigger_word": DATASET, "resolutions": DATASET, "repeats": DATASET,
    "batch_size": WEIGHTS, "flip_augment": WEIGHTS, "caption_dropout": WEIGHTS, "max_sequence_length": WEIGHTS,
    "rank": WEIGHTS, "alpha": WEIGHTS, "lora_dropout": WEIGHTS, "blocks": WEIGHTS, "dora": WEIGHTS,
    "lora_layout": WEIGHTS, "model_type": WEIGHTS, "network": WEIGHTS, "lokr_factor": WEIGHTS, "block_ranks": WEIGHTS,
    "block_lrs": WEIGHTS, "train_modulation": WEIGHTS, "loraplus_lr_ratio": WEIGHTS,
    "optimizer": WEIGHTS, "learning_rate": WEIGHTS, "weight_decay": WEIGHTS, "lr_schedule": WEIGHTS,
    "warmup_steps": WEIGHTS, "min_lr_ratio": WEIGHTS, "lr_cycles": WEIGHTS, "total_steps": WEIGHTS,
    "gradient_accumulation": WEIGHTS, "max_grad_norm": WEIGHTS, "timestep_sampling": WEIGHTS,
    "timestep_shift": WEIGHTS, "guidance": WEIGHTS, "seed": WEIGHTS,
    "mixed_precision": WEIGHTS, "fp8_base": WEIGHTS,  # the base's numbers in the forward pass
    "t5_on_cpu": WEIGHTS,  # the caption embeddings are computed in another dtype on the CPU
    "compile_blocks": WEIGHTS,  # compiled kernels fuse the same operations and round differently
    # memory options whose numbers are the same: recomputation and swapping replay the same operations, and every
    # random draw (LoRA init, noise, timesteps, flips) comes from the run's CPU generator, whatever the device
    "gradient_checkpointing": NO_WEIGHT, "checkpoint_blocks": NO_WEIGHT, "blocks_to_swap": NO_WEIGHT,
    "device": NO_WEIGHT,  # the same run on another GPU (or the CPU) differs only by float rounding
    "validation_transformer_path": NO_WEIGHT,  # samples only: images are keyed on its content (`RunStore.images`)
    "cache_dir": NO_WEIGHT, "output_dir": NO_WEIGHT, "output_name": NO_WEIGHT, "lora_format": NO_WEIGHT,
    "tensorboard": NO_WEIGHT, "store_dir": NO_WEIGHT, "store_max_gb": NO_WEIGHT,
    # no trained weight of the raw LoRA, but what a stored loop holds: its validation history and its EMA
    "validation_timesteps": WEIGHTS, "validation_split": WEIGHTS,
    "validation_dir": DATASET,  # its images, as a dataset folder's: by their files, never the folder's path
    "validation_every": WEIGHTS, "ema_decay": WEIGHTS,
    "ema_on_cpu": NO_WEIGHT,  # where the EMA lives; its numbers are the same fp32 operations
    # masks, regularization, caption tags, augmentations (masks' and regularization images' files: the dataset side)
    "alpha_mask": WEIGHTS, "mask_floor": WEIGHTS, "masked_prior_weight": WEIGHTS, "prior_loss_weight": WEIGHTS,
    "shuffle_caption": WEIGHTS, "keep_tokens": WEIGHTS, "caption_variants": WEIGHTS, "color_jitter": WEIGHTS,
    "color_jitter_strength": WEIGHTS, "random_crop": WEIGHTS, "random_crop_scale": WEIGHTS, "augment_variants": WEIGHTS,
}

# Settings added after runs were stored -> the value that reproduces the code before them. At that value a setting is
# left out of the run identity and a state saved without it counts as having it, so earlier runs keep their identity
# (the store hands them back) and resume unchanged.
SETTINGS_ADDED: dict[str, object] = {
    "lora_layout": "split", "validation_timesteps": 0, "validation_split": 0.0, "validation_dir": "",
    "validation_every": 0, "ema_decay": 0.0, "model_type": "flux",
    "network": "lora", "lokr_factor": -1, "block_ranks": "", "block_lrs": "", "train_modulation": True,
    "loraplus_lr_ratio": 1.0,
    "alpha_mask": False, "mask_floor": 0.0, "masked_prior_weight": 0.0, "prior_loss_weight": 1.0,
    "shuffle_caption": False, "keep_tokens": 1, "caption_variants": 8, "color_jitter": 0.0,
    "color_jitter_strength": (0.1, 0.1, 0.1, 0.02), "random_crop": 0.0, "random_crop_scale": 0.8, "augment_variants": 4,
    "compile_blocks": False,
}

# the settings a saved state must share with the run that continues it (the optimizer state's shapes, the data order,
# the kernels: compiled or eager)
RESUME_FIELDS = ("rank", "alpha", "blocks", "lora_layout", "optimizer", "batch_size", "gradient_accumulation", "seed",
                 "model_type", "network", "lokr_factor", "block_ranks", "block_lrs", "train_modulation",
                 "loraplus_lr_ratio", "compile_blocks")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the dataset
@dataclass(frozen=True)
class DatasetIdentity:
    key: str  # the hash: changes with any image or caption edited, added or removed, or a folder's settings
    listing: list  # per folder: {"folder", "settings", "files": {name: stamp}}, to name what changed


def dataset_identity(entries: Sequence[DatasetEntry]) -> DatasetIdentity:
    """The identity of a run's data (`TrainConfig.dataset_entries()`): every visible file of each folder and its
    direct subfolders by name and `_stamp` (and every file of its masks/ folder, however deep, and of its Kontext
    control folder, as "control/<name>"), and the folder's trigger word, resolutions, repeats and whether it holds
    regularization images. No image is read, so ComfyUI can ask on every queue. The folders' own paths are left out:
    a dataset moved elsewhere (with its mtimes) keeps its identity."""
    listing = []
    for entry in entries:
        folder = Path(entry.dataset_dir).expanduser()
        files = {}
        masks = folder / MASK_FOLDER
        deep = sorted(p for p in masks.rglob("*") if p.is_file()) if masks.is_dir() else []
        for p in [*(list_files(folder)[0] if folder.is_dir() else ()), *deep]:
            files[p.relative_to(folder).as_posix()] = _stamp(p)
        control = Path(entry.control_dir).expanduser() if entry.control_dir else None
        for p in list_files(control)[0] if control is not None and control.is_dir() else ():
            files["control/" + p.relative_to(control).as_posix()] = _stamp(p)
        settings = f"trigger word {entry.trigger_word!r}, resolutions {list(entry.resolutions)}, repeats {entry.repeats}"
        settings += ", regularization" if entry.is_reg else ""  # only then: earlier runs keep their identity
        listing.append({"folder": str(folder), "settings": settings, "files": files})
    return DatasetIdentity(_digest([[f["settings"], f["files"]] for f in listing]), listing)


def _stamp(path: Path) -> str:
    """A caption (.txt) by its text, so a caption saved unchanged is the same; any other file by size and mtime."""
    if path.suffix.lower() == ".txt":
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def dataset_changes(saved: list, now: list) -> str:
    """What differs between two listings, naming each folder: "in /data/b: added x.png; edited y.txt"."""
    if not saved:
        return "the state does not say which files it was trained on"

    def names(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    if len(saved) != len(now):
        return f"{len(saved)} dataset folder(s) then, {len(now)} now ({', '.join(f['folder'] for f in now)})"
    parts = []
    for old, new in zip(saved, now):
        added = sorted(new["files"].keys() - old["files"].keys())
        removed = sorted(old["files"].keys() - new["files"].keys())
        edited = sorted(k for k in new["files"].keys() & old["files"].keys() if new["files"][k] != old["files"][k])
        changes = [f"{what} {names(items)}" for what, items in (("added", added), ("removed", removed),
                                                                ("edited", edited)) if items]
        if old["settings"] != new["settings"]:
            changes.append(f"{old['settings']} then, {new['settings']} now")
        if changes:
            parts.append(f"in {new['folder']}: {'; '.join(changes)}")
    return "; ".join(parts) or "nothing that the listing shows"


# ------------------------------------------------------------------------------------------------ runs and images
def model_identities(config: TrainConfig, index: ContentIndex) -> dict[str, str]:
    """Each model file or folder setting that is set -> its content identity."""
    return {name: content_identity(getattr(config, name), index)
            for name, side in SETTING_SIDES.items() if side == FILE and getattr(config, name)}


def run_identity(config: TrainConfig, dataset: DatasetIdentity, index: ContentIndex, start: str = "") -> str:
    """The hash naming a run: code numerics, weight settings, model contents, dataset (and `validation_dir`'s
    images), and the id of the state it started from ("" = a fresh LoRA)."""
    settings = {k: v for k, v in config.to_dict().items()
                if SETTING_SIDES[k] == WEIGHTS and not (k in SETTINGS_ADDED and v == SETTINGS_ADDED[k])}
    held_out = dataset_identity([config.validation_entry()]) if config.validation_dir else None
    marks = [NETWORK_NUMERICS[config.network]] if config.network in NETWORK_NUMERICS else []
    if config.validation_timesteps and _weighted(config, [dataset, held_out]):
        marks.append(f"weighted validation {WEIGHTED_VALIDATION_NUMERICS}")
    parts = {"numerics": [NUMERICS_VERSION, *marks] if marks else NUMERICS_VERSION, "settings": settings,
             "files": model_identities(config, index), "dataset": dataset.key, "start": start}
    if held_out is not None:
        parts["validation images"] = held_out.key
    return _digest(parts)


def _weighted(config: TrainConfig, datasets: list[DatasetIdentity | None]) -> bool:
    """Whether a run's data has masks or regularization images, which weigh its loss: its settings, and mask files
    in the listings (no image read)."""
    if config.alpha_mask or any(e.is_reg for e in config.dataset_entries()):
        return True
    return any(is_mask_file(Path(f["folder"], name), Path(f["folder"]))
               for d in datasets if d is not None for f in d.listing
               for name in f["files"] if not name.startswith("control/"))


def image_key(*parts) -> str:
    """The name of rendered images from what decides them (JSON-able values: chains, prompts, sampling settings, the
    content identity of the base sampled on)."""
    return _digest([NUMERICS_VERSION, *parts])


# ------------------------------------------------------------------------------------------------ resume
def settings_mismatches(fingerprint: dict[str, str], config: TrainConfig) -> list[str]:
    """The settings a saved state was trained with that `config` does not share, as '<field> <ours> (state: <its>)'."""
    saved = {k: fingerprint.get(k, str(SETTINGS_ADDED[k]) if k in SETTINGS_ADDED else None) for k in RESUME_FIELDS}
    return [f"{k} {getattr(config, k)} (state: {saved[k]})" for k in RESUME_FIELDS if str(getattr(config, k)) != saved[k]]


def check_resume(state, config: TrainConfig, dataset: DatasetIdentity | None, source: str,
                 fresh: str = "start a fresh run") -> None:
    """Raise a ValueError naming `source` when `state` (a TrainingState) cannot continue under `config` on
    `dataset`: the settings that differ, and the dataset's files or folder settings that changed, each folder named.
    A state saved before dataset listings were kept is not checked against the dataset. `fresh`: the way out."""
    problems = settings_mismatches(state.fingerprint, config)
    if dataset is not None and state.dataset_files and state.dataset != dataset.key:
        problems.append(f"the dataset changed since it was saved ({dataset_changes(state.dataset_files, dataset.listing)}"
                        "; put those files back as they were)")
    if problems:
        raise ValueError(f"{source} belongs to a run with other settings: {', '.join(problems)}. Set them as the "
                         f"state had them, or {fresh}")
