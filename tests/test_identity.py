"""What a run's identity covers: every TrainConfig field on one side of the table, each weight setting changes it,
each no-weight setting changes neither it nor a trained number, model files count by content (not by header, size
or path), and a model file's hash is remembered so that a second lookup reads no weights."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from test_run_store import config, dataset, no_active_run  # noqa: F401 (the tiny run's fixtures, shared)
from trainer_core import content_hash, identity, lora
from trainer_core.config import DatasetEntry, TrainConfig
from trainer_core.content_hash import ContentIndex, content_identity
from trainer_core.identity import FILE, NO_WEIGHT, SETTING_SIDES, WEIGHTS, dataset_identity, image_key, run_identity
from trainer_core.run_handle import TrainingRun
from trainer_core.tiny import tiny_transformer_config, write_same_layout_copy
from trainer_core.trainer import Trainer

# a value other than the base config's, for every setting on the weights side
WEIGHT_FLIPS = dict(
    batch_size=2, flip_augment=True, caption_dropout=0.1, max_sequence_length=16, rank=8, alpha=2.0, lora_dropout=0.1,
    blocks="double", dora=True, optimizer="prodigy", learning_rate=1e-3, weight_decay=0.01, lr_schedule="constant",
    warmup_steps=0, min_lr_ratio=0.5, lr_cycles=2, total_steps=21, gradient_accumulation=2, max_grad_norm=0.5,
    timestep_sampling="sigmoid", timestep_shift=1.0, guidance=3.5, seed=1, mixed_precision="bf16", fp8_base=True,
    t5_on_cpu=True, lora_layout="split", validation_timesteps=8, validation_split=0.5, validation_every=5,
    ema_decay=0.9, network="lokr", lokr_factor=4, block_ranks="double:0=8", block_lrs="single=1e-3",
    train_modulation=False, loraplus_lr_ratio=16.0,
    model_type=dict(model_type="kontext", control_dir="DATASET"),  # Kontext trains on pairs: a control folder with it
    alpha_mask=True, mask_floor=0.1, masked_prior_weight=1.0, prior_loss_weight=0.5, shuffle_caption=True,
    keep_tokens=2, caption_variants=3, color_jitter=0.5, color_jitter_strength=(0.2, 0.1, 0.1, 0.02), random_crop=0.5,
    random_crop_scale=0.5, augment_variants=2, compile_blocks=True,
)
# and for every setting that changes no weight (blocks_to_swap needs checkpointing, so it is flipped with it)
NO_WEIGHT_FLIPS = dict(
    gradient_checkpointing=dict(gradient_checkpointing=True),
    checkpoint_blocks=dict(gradient_checkpointing=True, checkpoint_blocks=1),
    blocks_to_swap=dict(gradient_checkpointing=True, blocks_to_swap=2),
    device=dict(device="auto"),
    validation_transformer_path=dict(validation_transformer_path="elsewhere.safetensors"),
    cache_dir=dict(cache_dir="CACHE"), output_dir=dict(output_dir="OUT"), output_name=dict(output_name="renamed"),
    lora_format=dict(lora_format="diffusers"), tensorboard=dict(tensorboard=False), store_dir=dict(store_dir="STORE"),
    store_max_gb=dict(store_max_gb=1.0), ema_on_cpu=dict(ema_on_cpu=True),
)
# the no-weight settings that reach the training loop, trained with and without; device auto is the CPU only where no
# GPU is
TRAINED_FLIPS = ("gradient_checkpointing", "checkpoint_blocks", "blocks_to_swap", "cache_dir", "tensorboard",
                 "lora_format") + (() if torch.cuda.is_available() else ("device",))


def key(config: TrainConfig, index: ContentIndex) -> str:
    return run_identity(config, dataset_identity(config.dataset_entries()), index)


def paths_in(changes: dict, folder: Path) -> dict:
    return {k: str(folder / v) if isinstance(v, str) and v.isupper() else v for k, v in changes.items()}


def test_every_setting_is_on_one_side_of_the_table():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(SETTING_SIDES), f"put {sorted(fields ^ set(SETTING_SIDES))} in identity.SETTING_SIDES"
    assert set(WEIGHT_FLIPS) == {k for k, side in SETTING_SIDES.items() if side == WEIGHTS}
    assert set(NO_WEIGHT_FLIPS) == {k for k, side in SETTING_SIDES.items() if side == NO_WEIGHT}


def test_each_weight_setting_changes_the_identity_and_no_other_does(config, dataset, tmp_path, monkeypatch):
    index = ContentIndex(tmp_path / "store")
    base = key(config, index)
    for name, value in WEIGHT_FLIPS.items():
        changes = value if isinstance(value, dict) else {name: value}
        changes = {k: config.dataset_dir if v == "DATASET" else v for k, v in changes.items()}
        assert key(config.replace(**changes), index) != base, name
    for name, changes in NO_WEIGHT_FLIPS.items():
        assert key(config.replace(**paths_in(changes, tmp_path)), index) == base, name
    # the dataset side: its files and each folder's settings
    for changes in (dict(trigger_word="other"), dict(resolutions=(128,)), dict(repeats=2),
                    dict(dataset_dir="", datasets=(DatasetEntry(str(dataset), "other"),))):
        assert key(config.replace(**changes), index) != base, changes
    moved = shutil.copytree(dataset, tmp_path / "moved")  # the same files (and mtimes) elsewhere: the same run
    assert key(config.replace(dataset_dir=str(moved)), index) == base
    (moved / "glyph_00.txt").write_text("a new caption")
    assert key(config.replace(dataset_dir=str(moved)), index) != base
    # the code's numerics: one network's alone changes only its runs
    lokr = config.replace(network="lokr")
    lokr_base = key(lokr, index)
    monkeypatch.setitem(identity.NETWORK_NUMERICS, "lokr", identity.NETWORK_NUMERICS["lokr"] + 1)
    assert key(lokr, index) != lokr_base and key(config, index) == base
    monkeypatch.setattr(identity, "NUMERICS_VERSION", identity.NUMERICS_VERSION + 1)
    assert key(config, index) != base


def test_validation_images_count_by_their_files_and_masks_mark_the_validation_numerics(config, dataset, tmp_path,
                                                                                     monkeypatch):
    """A stored loop holds its validation losses: they belong to the held-out images' content (not their folder's
    path), and to the code that weighs masks and regularization images in them."""
    index = ContentIndex(tmp_path / "store")
    scored = config.replace(validation_timesteps=2)
    held = shutil.copytree(dataset, tmp_path / "held")
    with_held = key(scored.replace(validation_dir=str(held)), index)
    assert with_held != key(scored, index)
    moved = shutil.copytree(held, tmp_path / "moved")  # the same files (and mtimes) elsewhere: the same run
    assert key(scored.replace(validation_dir=str(moved)), index) == with_held
    (moved / "glyph_00.txt").write_text("a new caption")
    assert key(scored.replace(validation_dir=str(moved)), index) != with_held

    masked = shutil.copytree(dataset, tmp_path / "masked")
    shutil.copy(masked / "glyph_00.png", masked / "glyph_00_mask.png")
    runs = {"plain": scored, "masked": scored.replace(dataset_dir=str(masked)),
            "masked, no validation": config.replace(dataset_dir=str(masked)),
            "alpha masks": scored.replace(alpha_mask=True),
            "masked validation images": scored.replace(validation_dir=str(masked)),
            "regularization": scored.replace(dataset_dir="", datasets=(DatasetEntry(str(dataset)),
                                                                       DatasetEntry(str(held), is_reg=True)))}
    before = {name: key(c, index) for name, c in runs.items()}
    monkeypatch.setattr(identity, "WEIGHTED_VALIDATION_NUMERICS", identity.WEIGHTED_VALIDATION_NUMERICS + 1)
    changed = {name for name, c in runs.items() if key(c, index) != before[name]}
    assert changed == {"masked", "alpha masks", "masked validation images", "regularization"}


def test_a_setting_added_later_keeps_the_identity_and_resume_of_earlier_runs(config, tmp_path, monkeypatch):
    index = ContentIndex(tmp_path / "store")
    to_dict = TrainConfig.to_dict
    monkeypatch.setattr(TrainConfig, "to_dict", lambda self: {k: v for k, v in to_dict(self).items() if k != "seed"})
    before = key(config, index)  # the identity the code had before `seed` was a setting
    monkeypatch.setattr(TrainConfig, "to_dict", to_dict)
    assert key(config, index) != before
    monkeypatch.setitem(identity.SETTINGS_ADDED, "seed", config.seed)
    assert key(config, index) == before
    assert key(config.replace(seed=config.seed + 1), index) != before
    fingerprint = {k: str(getattr(config, k)) for k in identity.RESUME_FIELDS if k != "seed"}  # saved before it
    assert identity.settings_mismatches(fingerprint, config) == []
    assert identity.settings_mismatches(fingerprint, config.replace(seed=config.seed + 1))


def test_model_files_count_by_content_never_by_path(config, tiny_flux, tmp_path):
    index = ContentIndex(tmp_path / "store")
    base = key(config, index)
    for name, side in SETTING_SIDES.items():
        if side != FILE or not getattr(config, name):
            continue
        source = Path(getattr(config, name))
        copy = tmp_path / "copies" / name / source.name
        copy.parent.mkdir(parents=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy)
        assert key(config.replace(**{name: str(copy)}), index) == base, name
        edited = next(p for p in sorted(copy.rglob("*")) if p.is_file()) if copy.is_dir() else copy
        edited.write_bytes(edited.read_bytes()[:-1] + bytes([edited.read_bytes()[-1] ^ 1]))
        assert key(config.replace(**{name: str(copy)}), index) != base, name
    tokenizers = Path(config.tokenizer_dir)
    for name, folder in (("clip_tokenizer_dir", tokenizers / "clip"), ("t5_tokenizer_dir", tokenizers / "t5")):
        assert key(config.replace(**{name: str(folder)}), index) != base, name
    lora_file = tmp_path / "start.safetensors"
    save_file({"w": torch.zeros(4)}, lora_file)
    assert key(config.replace(init_lora=str(lora_file)), index) != base


def header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def test_two_bases_of_one_layout_are_two_runs_and_switching_trains_again(config, tmp_path, caplog):
    other = write_same_layout_copy(config.transformer_path, tmp_path / "other-base.safetensors")
    assert header(other) == header(Path(config.transformer_path))
    assert other.stat().st_size == Path(config.transformer_path).stat().st_size
    switched = config.replace(transformer_path=str(other), output_name="switched")
    index = ContentIndex(tmp_path / "store")
    assert key(switched, index) != key(config, index)
    assert image_key("sample", content_identity(other, index)) != \
        image_key("sample", content_identity(config.transformer_path, index))

    h0 = TrainingRun.start(config)
    first = h0.run.train(h0, 2)
    h0 = TrainingRun.start(switched)
    with caplog.at_level(logging.INFO):
        second = h0.run.train(h0, 2)
    assert "loaded from the run store" not in caplog.text and h0.run.loaded  # trained on the other base
    assert any(not torch.equal(first.state.lora[k], second.state.lora[k]) for k in first.state.lora)


def trained_lora(config: TrainConfig, steps: int = 3) -> dict[str, torch.Tensor]:
    trainer = Trainer.from_config(config)
    trainer.train(steps)
    state = trainer.snapshot().lora
    trainer.release()
    return state


def test_no_weight_settings_train_the_same_lora_bit_for_bit(config, tmp_path):
    config = config.replace(lora_dropout=0.0)
    expected = trained_lora(config)
    for name in TRAINED_FLIPS:
        flipped = config.replace(**paths_in(NO_WEIGHT_FLIPS[name], tmp_path))
        for _ in range(2 if name == "cache_dir" else 1):  # written to the cache, then read back from it
            got = trained_lora(flipped)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_the_lora_init_comes_from_the_generator_alone():
    from diffusers import FluxTransformer2DModel

    def init(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**tiny_transformer_config())
        torch.manual_seed(global_seed)  # what the device's own generator would draw differs
        lora.add_lora(model, 4, 4.0, generator=torch.Generator().manual_seed(7))
        return lora.lora_state(model)

    a, b = init(1), init(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_A" in k)


def test_a_model_hash_is_remembered_by_path_size_mtime_and_inode(tmp_path, monkeypatch, caplog):
    model = tmp_path / "model.safetensors"
    model.write_bytes(torch.randn(300_000).numpy().tobytes())
    index = ContentIndex(tmp_path / "store")
    hashed = []
    real_hash = content_hash.hash_file
    monkeypatch.setattr(content_hash, "hash_file", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(content_hash, "_CHUNK", 100_000)
    monkeypatch.setattr(content_hash, "_PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO):
        first = content_identity(model, index)
    assert len(hashed) == 1 and "hashing model.safetensors for its identity" in caplog.text
    monkeypatch.setattr(content_hash, "_remembered", {})  # as in a new process: only the index is left
    assert content_identity(model, index) == first and len(hashed) == 1
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    assert content_identity(link, index) == first and len(hashed) == 1  # the real path is the key
    model.write_bytes(model.read_bytes())  # rewritten as it was: another mtime, hashed again, the same identity
    assert content_identity(model, index) == first and len(hashed) == 2
