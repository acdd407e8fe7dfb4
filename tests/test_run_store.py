"""The run store: a run's identity, loops loaded instead of trained (bit for bit), damaged entries trained again,
disk checked and pruned, LoRA files never overwritten by another run, and the CLI trains nothing twice."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from trainer_core import cli, run_handle, run_store
from trainer_core.checkpoints import STATE_SUFFIX, load_training_state
from trainer_core.config import TrainConfig
from trainer_core.data import scan_dataset
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.run_handle import TrainingRun
from trainer_core.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=2, size=64)


@pytest.fixture
def config(tiny_flux, dataset, tmp_path) -> TrainConfig:
    return demo_config(tiny_flux, dataset, tmp_path / "out", steps=20).replace(resolutions=(64,), rank=4, alpha=4.0)


@pytest.fixture(autouse=True)
def no_active_run():
    yield
    if run_handle._active is not None:
        run_handle._active.release()


def start(config, **kwargs):
    return TrainingRun.start(config, **kwargs)


def assert_exactly_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def counting_steps(monkeypatch) -> list[int]:
    """Every optimizer step any Trainer takes, by run step."""
    steps = []
    real = Trainer.train

    def train(self, num_steps, on_step=None, should_stop=None):
        def count(info):
            steps.append(info.step)
            if on_step is not None:
                on_step(info)
        return real(self, num_steps, on_step=count, should_stop=should_stop)

    monkeypatch.setattr(Trainer, "train", train)
    return steps


# ------------------------------------------------------------------------------------------------ identity
def test_identity_changes_with_every_weight_setting_and_dataset_edit_and_only_then(config, dataset, tmp_path):
    records = scan_dataset(config.dataset_dir, config.trigger_word, config.resolutions)
    base = run_store.run_identity(config, records)
    assert run_store.run_identity(config, records) == base
    for same in (dict(output_name="other"), dict(output_dir=str(tmp_path)), dict(device="cpu"),
                 dict(cache_dir=str(tmp_path)), dict(keep_runs=5), dict(store_dir=str(tmp_path))):
        assert run_store.run_identity(config.replace(**same), records) == base, same
    changed = [dict(rank=8), dict(alpha=2.0), dict(learning_rate=1e-3), dict(seed=1), dict(total_steps=21),
               dict(blocks="double"), dict(timestep_sampling="sigmoid"), dict(guidance=3.5), dict(fp8_base=True),
               dict(caption_dropout=0.1), dict(flip_augment=True), dict(lr_schedule="constant"),
               dict(mixed_precision="bf16"), dict(repeats=2), dict(trigger_word="other")]
    ids = {run_store.run_identity(config.replace(**c), records) for c in changed}
    assert len(ids) == len(changed) and base not in ids
    other_base = config.replace(transformer_path=str(Path(config.transformer_path).with_name("other.safetensors")))
    shutil.copy(config.transformer_path, other_base.transformer_path)
    assert run_store.run_identity(other_base, records) == base  # the same file elsewhere: the same run

    listing = run_store.folder_listing(dataset)
    caption = dataset / "glyph_00.txt"
    text = caption.read_text()
    try:
        caption.write_text(text + " in the rain")
        edited = scan_dataset(config.dataset_dir, config.trigger_word, config.resolutions)
        assert run_store.run_identity(config, edited) != base
        assert run_store.folder_listing(dataset) != listing
        assert "edited (image or caption) glyph_00.png" in run_store.dataset_changes(
            run_store.dataset_files(records), run_store.dataset_files(edited))
    finally:
        caption.write_text(text)
    shutil.copy(dataset / "glyph_01.png", dataset / "glyph_02.png")
    try:
        added = scan_dataset(config.dataset_dir, config.trigger_word, config.resolutions)
        assert run_store.run_identity(config, added) != base
        assert run_store.dataset_changes(run_store.dataset_files(records), run_store.dataset_files(added)) == \
            "added glyph_02.png"
    finally:
        (dataset / "glyph_02.png").unlink()


# ------------------------------------------------------------------------------------------------ loading = training
def test_a_stored_loop_loads_bit_identical_without_loading_models(config, monkeypatch, caplog):
    h0 = start(config)
    h1 = h0.run.train(h0, 3)
    h2 = h1.run.train(h1, 2)
    trained = (h1.state, h2.state)
    h0.run.release()  # as after a restart: nothing loaded

    steps = counting_steps(monkeypatch)
    monkeypatch.setattr(Trainer, "from_config", None)  # any model load would fail
    with caplog.at_level(logging.INFO):
        h0 = start(config.replace(output_name="renamed"))
        k1 = h0.run.train(h0, 3)
        k2 = k1.run.train(k1, 2)
    assert steps == [] and not h0.run.loaded
    assert "loops 3-2 (step 5): loaded from the run store" in caplog.text
    for ours, stored in zip(trained, (k1.state, k2.state)):
        assert_exactly_equal(ours.lora, stored.lora)
        assert ours.losses == stored.losses and ours.id == stored.id
        assert stored.is_light  # the handle holds no optimizer moments


def test_training_on_from_a_loaded_loop_equals_training_straight(config):
    straight = Trainer.from_config(config)
    straight.train(5)
    expected = straight.snapshot()
    straight.release()
    h0 = start(config)
    h0.run.train(h0, 3)
    h0.run.release()
    h0 = start(config)  # a new run (after a restart): loop 1 comes from the store
    h1 = h0.run.train(h0, 3)
    assert not h0.run.loaded
    h2 = h1.run.train(h1, 2)  # continues with the stored optimizer moments, RNG and data position
    assert_exactly_equal(h2.state.lora, expected.lora)
    assert h2.state.losses == expected.losses


def test_a_truncated_or_foreign_entry_is_named_and_trained_again(config, monkeypatch, caplog):
    h0 = start(config)
    h1 = h0.run.train(h0, 2)
    entry = h0.run.store.path(h0.run.identity, (2,))
    content = entry.read_bytes()
    entry.write_bytes(content[: len(content) // 2])
    steps = counting_steps(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = h0.run.train(h0, 2)
    assert str(entry) in caplog.text and "training those steps again" in caplog.text
    assert steps == [1, 2]
    assert_exactly_equal(again.state.lora, h1.state.lora)

    shutil.copy(h0.run.store.path(h0.run.identity, (2,)), h0.run.store.path(h0.run.identity, (3,)))  # misfiled
    steps.clear()
    h0.run.train(h0, 3)
    assert steps == [1, 2, 3]


def test_a_missing_entry_behind_a_handle_is_trained_again(config):
    h0 = start(config)
    h1 = h0.run.train(h0, 2)
    h0.run.train(h1, 1)  # the trainer moves on
    shutil.rmtree(h0.run.store.folder / run_store.RUNS)  # the user cleared the store
    h2 = h0.run.train(h1, 2)  # needs loop 1's optimizer moments again: loop 1 is retrained, exactly
    straight = Trainer.from_config(config)
    straight.train(4)
    assert_exactly_equal(h2.state.lora, straight.snapshot().lora)


# ------------------------------------------------------------------------------------------------ disk
def test_not_enough_space_fails_before_any_step_naming_the_folder(config, monkeypatch):
    h0 = start(config)
    steps = counting_steps(monkeypatch)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(run_store.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    with pytest.raises(OSError, match=f"run store {h0.run.store.folder}: 0 MiB free.*free disk space there"):
        h0.run.train(h0, 2)
    assert steps == []


def test_only_the_newest_keep_runs_runs_are_kept(config, tmp_path):
    loras = []
    for seed in (1, 2, 3):
        h0 = start(config.replace(seed=seed, keep_runs=2))
        h = h0.run.train(h0, 1)
        loras.append(h.run.save_checkpoint(h, folder=tmp_path / "loras").checkpoints[-1].lora_path)
        os.utime(h0.run.store.folder / run_store.RUNS / h0.run.identity, (seed, seed))  # oldest first
    runs = sorted(p.name for p in (h0.run.store.folder / run_store.RUNS).iterdir())
    assert len(runs) == 2 and h0.run.identity in runs
    assert all(p.is_file() for p in loras)  # LoRA files are never deleted


# ------------------------------------------------------------------------------------------------ files
def test_lora_files_follow_the_umask_and_another_runs_name_gets_a_counter(config, tmp_path, caplog):
    folder = tmp_path / "loras"
    old = os.umask(0o022)
    try:
        h0 = start(config)
        h = h0.run.train(h0, 1)
        first = h.run.save_checkpoint(h, folder=folder, save_state=True).checkpoints[-1]
        assert stat.S_IMODE(first.lora_path.stat().st_mode) == 0o644
        digest = hashlib.sha256(first.lora_path.read_bytes()).hexdigest()
        again = h.run.save_checkpoint(h, folder=folder, save_state=True).checkpoints[-1]  # the same run: the same file
        assert (again.lora_path, again.state_path) == (first.lora_path, first.state_path)
        assert first.state_path.parent == h0.run.store.folder and first.state_path.name.endswith(STATE_SUFFIX)
        assert load_training_state(first.state_path)[0].id == h.state.id

        other = start(config.replace(seed=9))
        o = other.run.train(other, 1)
        with caplog.at_level(logging.INFO):
            theirs = o.run.save_checkpoint(o, folder=folder, save_state=True).checkpoints[-1]
    finally:
        os.umask(old)
    assert theirs.lora_path.name == "flux_tiny_demo_000001_00001_.safetensors"
    assert theirs.state_path.name == f"flux_tiny_demo_000001_00001_{STATE_SUFFIX}"
    assert "writing flux_tiny_demo_000001_00001_.safetensors instead" in caplog.text
    assert hashlib.sha256(first.lora_path.read_bytes()).hexdigest() == digest


def test_resuming_after_the_dataset_changed_is_refused_naming_the_change(config, dataset):
    h0 = start(config)
    h = h0.run.train(h0, 1)
    saved = h.run.save_checkpoint(h, folder=config.output_dir, save_state=True).checkpoints[-1].state_path
    state, _ = load_training_state(saved)
    image = dataset / "glyph_01.png"
    stamp = image.stat()
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ValueError, match=r"resume_state: the dataset changed since this state was saved "
                                             r"\(edited \(image or caption\) glyph_01.png\)"):
            start(config, resume=state)
    finally:
        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert start(config, resume=state).step == 1


# ------------------------------------------------------------------------------------------------ the CLI
def test_the_same_config_run_twice_trains_nothing_and_rewrites_no_file(config, tmp_path, monkeypatch):
    toml = tmp_path / "run.toml"
    values = {k: v for k, v in config.to_dict().items() if v not in ("", None)}
    lines = [f"{k} = {list(v)!r}" if isinstance(v, tuple) else f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}"
             for k, v in values.items()]
    toml.write_text("\n".join(lines) + "\n[plan]\nsteps = 4\nsave_every = 2\nprompts = ['fltglyph']\n"
                    "sample_steps = 2\nsample_width = 64\nsample_height = 64\nstrengths = [0.0, 1.0]\n")
    out = Path(config.output_dir)

    def hashes() -> dict[str, str]:
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in out.rglob("*") if p.is_file() and not {"run_store", "tensorboard"} & set(p.parts)}
    # (each run logs into a TensorBoard folder of its own, so a run's logs are never rewritten either)

    steps = counting_steps(monkeypatch)
    assert cli.main(["train", str(toml)]) == 0
    first = hashes()
    assert steps == [1, 2, 3, 4] and len(first) >= 8  # 2 LoRAs, 2 states, 2 samples, plot, grid
    steps.clear()
    assert cli.main(["train", str(toml)]) == 0  # resumes from its last state: the stretches come from the store
    assert cli.main(["train", str(toml), "--fresh"]) == 0
    assert steps == [] and hashes() == first
