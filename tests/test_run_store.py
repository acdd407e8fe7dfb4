"""The run store: a run's identity, loops loaded instead of trained (bit for bit), damaged entries trained again,
disk checked, the store evicted by size, one writer at a time, LoRA files never overwritten by another run, and the CLI trains nothing twice."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trainer_core import checkpoints, cli, run_handle, run_store
from trainer_core.checkpoints import STATE_SUFFIX, TrainingState, load_training_state, save_training_state
from trainer_core.config import TrainConfig
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
    damaged = h0.run.store.folder / run_store.DAMAGED / f"{h0.run.identity}_{entry.name}"
    assert damaged.read_bytes() == content[: len(content) // 2]  # moved aside, not deleted
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


def test_an_io_error_while_loading_keeps_the_entry(config, monkeypatch, caplog):
    h0 = start(config)
    h0.run.train(h0, 2)
    entry = h0.run.store.path(h0.run.identity, (2,))
    content = entry.read_bytes()

    def failing(path, optimizer=True):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(run_store, "load_training_state", failing)
    with caplog.at_level(logging.WARNING):
        assert h0.run.store.load(h0.run.identity, (2,)) is None
    assert entry.read_bytes() == content and "the file is kept" in caplog.text
    assert not (h0.run.store.folder / run_store.DAMAGED).exists()


def fake_state(run: str, numel: int) -> TrainingState:
    return TrainingState(step=1, epoch=0, cursor=1, lora={"w": torch.full((numel,), 0.5)},
                         optimizer={"state": {}, "param_groups": []}, rng={}, losses=[0.1], lrs=[1e-4],
                         fingerprint={}, run=run, chain=(1,))


def test_a_budget_smaller_than_five_runs_keeps_the_newest_and_says_what_it_evicted(tmp_path, caplog):
    folder = tmp_path / "store"
    entry = save_training_state(tmp_path / "probe.state.safetensors", fake_state("probe", 250_000), {}).stat().st_size
    store = run_store.RunStore(folder, max_bytes=int(2.5 * entry))  # room for two runs of one loop
    (folder / "mine.state.safetensors").parent.mkdir(parents=True)
    save_training_state(folder / "mine.state.safetensors", fake_state("named", 250_000), {})  # a user's named state
    with caplog.at_level(logging.INFO):
        for i in range(5):
            path = store.save(fake_state(f"run{i}", 250_000), {})
            os.utime(path, (1000 + i, 1000 + i))  # used in that order
    runs = sorted(p.name for p in (folder / run_store.RUNS).iterdir())
    assert runs == ["run3", "run4"]
    assert sum(p.stat().st_size for p in (folder / run_store.RUNS).rglob("*") if p.is_file()) <= store.max_bytes
    for i in range(3):
        assert f"evicted loops 1 of run run{i} (1 MB, least recently used)" in caplog.text
    assert "evicting freed" in caplog.text
    assert (folder / "mine.state.safetensors").is_file()  # outside runs/: never touched
    assert store.load("run4", (1,)) is not None


def test_the_current_runs_loops_are_never_evicted(tmp_path, caplog):
    store = run_store.RunStore(tmp_path / "store", max_bytes=1)
    store.save(fake_state("other", 1000), {})
    with caplog.at_level(logging.WARNING):
        for chain in ((1,), (1, 1)):
            store.save(replace(fake_state("current", 1000), chain=chain), {})
    assert sorted(p.name for p in (tmp_path / "store" / run_store.RUNS).iterdir()) == ["current"]
    assert store.load("current", (1,)) is not None and store.load("current", (1, 1)) is not None
    assert "over store_max_gb" in caplog.text


def test_an_old_toml_with_keep_runs_is_told_the_replacement(config):
    with pytest.raises(ValueError, match=r"run.toml: keep_runs is no longer a setting; .*set store_max_gb"):
        TrainConfig.from_dict({**config.to_dict(), "keep_runs": 3}, source="run.toml")


def _save_twenty(folder: str, me: int) -> None:
    store = run_store.RunStore(Path(folder))
    for i in range(20):  # each entry written by both processes at once, as a shared store's two servers would
        store.save(replace(fake_state("shared", 20_000), chain=(i + 1,)), {})
        store.save(replace(fake_state(f"own{me}", 20_000), chain=(i + 1,)), {})


def test_two_processes_saving_into_one_store_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_save_twenty, args=(str(tmp_path / "store"), me)) for me in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    store = run_store.RunStore(tmp_path / "store")
    for run in ("shared", "own0", "own1"):
        for i in range(20):
            state = store.load(run, (i + 1,), optimizer=True)
            assert state is not None and torch.equal(state.lora["w"], torch.full((20_000,), 0.5)), (run, i)
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]
    assert not (tmp_path / "store" / run_store.DAMAGED).exists()


# ------------------------------------------------------------------------------------------------ files
def test_a_writer_removes_only_its_own_and_dead_writers_temporary_files(tmp_path):
    target = tmp_path / "x.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = checkpoints._HOST
    live = tmp_path / f".x.safetensors.tmp-{os.getppid()}-{host}abcd"  # another process, still writing
    gone = tmp_path / f".x.safetensors.tmp-{int(dead.stdout)}-{host}abcd"  # killed mid-write
    other_host = tmp_path / f".x.safetensors.tmp-{int(dead.stdout)}-{'0000' if host != '0000' else '1111'}abcd"
    for p in (live, gone, other_host):
        p.write_bytes(b"partial")
    old = os.umask(0o077)
    try:
        checkpoints.save_safetensors(target, {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the umask read, not assumed
    assert live.exists() and other_host.exists() and not gone.exists()


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
        with pytest.raises(ValueError, match=r"resume_state belongs to a run with other settings: the dataset changed "
                                             rf"since it was saved \(in {dataset}: edited glyph_01.png; put those files back as they were\)"):
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
