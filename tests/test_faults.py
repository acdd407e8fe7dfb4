"""Faults lose nothing: a NaN loss, a cancel in a save or a sample, a full disk, a refused folder, a process killed
mid-save, and a restart. Everything goes through the nodes (or the CLI) as a user meets it, and every run that
continues afterwards is compared with one that never met the fault.

The crash tests kill real processes with SIGKILL. They are forked from a forkserver that imported the trainer
once, so each start costs a fork, not the ten seconds of importing torch, diffusers and peft again.
"""
from __future__ import annotations

import errno
import math
import multiprocessing
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from test_nodes import ROOT, SAMPLE, TINY_WIDGETS, assert_lora_equal, bridge, init, load_pack, loop, nodes, save
from test_nodes import base_dir, comfyui_inference_mode, straight  # noqa: F401  (fixtures)
from test_bad_inputs import toml_value

from trainer_core import checkpoints, cli, lora
from trainer_core.checkpoints import STATE_SUFFIX, checkpoint_stem, latest_state_file, load_training_state
from trainer_core.config import TrainConfig
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.trainer import NonFiniteLossError, Trainer

NAN_LR = 10.0  # the learning_rate widget's maximum: on the tiny model the loss becomes NaN within a few steps


class Cancel(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


_run: dict = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and on a shared machine two threads spin against each other
    (this module ran 3x slower with them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def h0(base_dir):  # noqa: F811
    """The module's run at step 0 (TINY_WIDGETS), started again if a test replaced it."""
    if "h0" not in _run or _run["h0"].run.released:
        _run["h0"] = init()
    return _run["h0"]


def loras_dir(base: Path) -> Path:
    return base / "models" / "loras"


def states_dir(base: Path) -> Path:
    return base / "models" / bridge.STATES


def tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every visible file of `folder`, by name."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def scaling(handle) -> set[float]:
    """The LoRA strength of every adapter layer of the run's transformer (peft's scale / (alpha / rank))."""
    layers = lora._lora_layers(handle.run.trainer.transformer).values()
    return {round(layer.scaling[lora.ADAPTER] / lora._scale(layer), 6) for layer in layers}


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf loss


def test_nan_loss_stops_at_once_keeps_the_last_good_state_and_a_lower_lr_continues(base_dir, monkeypatch):  # noqa: F811
    h3 = loop(init(learning_rate=NAN_LR, output_name="nan_run"), 3)
    bar_updates = []
    monkeypatch.setattr(bridge, "progress_bar", lambda total: type("Bar", (), {
        "update_absolute": lambda self, value, total=None: bar_updates.append(value)})())
    with pytest.raises(NonFiniteLossError) as error:
        loop(h3, 30)
    monkeypatch.undo()
    message = str(error.value)
    state_file = states_dir(base_dir) / "nan_run_000003.state.safetensors"
    found = re.search(r"the loss became nan at step (\d+); .*Likely cause: too high a learning rate "
                      r"\(learning_rate 10\)", message)
    bad = int(found[1])  # where depends on the data: a step well inside the 30 of the loop
    assert 5 < bad < 30
    assert message.endswith(f"This loop's input (step 3) is unchanged and saved as {state_file}: lower learning_rate "
                            "in InitTrainer, set its resume_state to latest and queue again.")
    assert bar_updates == list(range(1, bad - 3))  # steps 4..bad-1 done; stopped at the first bad step, none after

    # the run stays usable from the loop's input, whatever the trainer went through
    assert_lora_equal(load_training_state(state_file)[0].lora, h3.state.lora)
    saved, lora_path = save(h3)
    assert saved.checkpoints[-1].step == 3 and Path(lora_path).is_file()
    image = nodes["ValidationSample"].sample(h3, "fltglyph", 1.0, **SAMPLE)["result"][0]
    assert torch.isfinite(image).all()
    with pytest.raises(NonFiniteLossError, match=f"at step {bad};"):  # queued again unchanged: the same NaN, same step
        loop(h3, 30)
    before = loop(h3, bad - 4)  # a loop that ends just before the NaN: its output's weights are the ones that give it
    with pytest.raises(NonFiniteLossError, match=rf"at step {bad}; .*This loop's input \(step {bad - 1}\) gave the NaN "
                                                 r"itself: lower learning_rate in InitTrainer and resume from a state "
                                                 rf"saved before step {bad - 1}"):
        loop(before, 5)
    assert not (states_dir(base_dir) / f"nan_run_{bad - 1:06d}.state.safetensors").exists()  # never offered as latest

    # the user lowers the learning rate and resumes from the newest state: training goes on from step 3
    resumed = init(learning_rate=1e-3, output_name="nan_run", resume_state="latest")
    assert resumed.step == 3 and resumed.state.losses == h3.state.losses
    after = loop(resumed, 3)
    assert after.step == 6 and all(math.isfinite(x) for x in after.state.losses)


def test_cli_nan_keeps_the_saved_states_and_resumes_with_a_lower_lr(tiny_flux, tmp_path, capsys):
    dataset = write_demo_dataset(tmp_path / "data", count=2, size=64)
    config = demo_config(tiny_flux, dataset, tmp_path / "out", steps=30).replace(
        resolutions=(64,), max_sequence_length=8, lr_schedule="constant", warmup_steps=0)

    def run(learning_rate: float, *args: str) -> int:
        values = config.replace(learning_rate=learning_rate).to_dict()
        lines = [f"{k} = {toml_value(v)}" for k, v in values.items()] + ["[plan]", "steps = 12", "save_every = 2"]
        (tmp_path / "run.toml").write_text("\n".join(lines))
        return cli.main(["train", str(tmp_path / "run.toml"), *args])

    with torch.inference_mode(False):  # a CLI run, not a ComfyUI node
        assert run(NAN_LR) == 2
    err = capsys.readouterr().err
    step = int(re.search(r"the loss became nan at step (\d+)", err)[1])
    # the weights after step - 1 gave the NaN: the state to go on from is the newest saved before that step
    good = tmp_path / "out" / f"flux_tiny_demo_{(step - 2) // 2 * 2:06d}{STATE_SUFFIX}"
    assert step > 4 and "too high a learning rate (learning_rate 10)" in err
    assert f"Lower learning_rate in {tmp_path / 'run.toml'} and run it again with --resume {good}." in err
    assert not re.search(r"InitTrainer|resume_state|queue|loop's input", err), err  # node terms, not a CLI user's
    first_run, _ = load_training_state(good)

    with torch.inference_mode(False):
        assert run(1e-3, "--resume", str(good)) == 0
    state, _ = load_training_state(tmp_path / "out" / f"flux_tiny_demo_000012{STATE_SUFFIX}")
    assert state.losses[: first_run.step] == first_run.losses and len(state.losses) == 12
    assert all(math.isfinite(x) for x in state.losses)


# ---------------------------------------------------------------------------------------------------------------
# Cancel (or Ctrl+C) inside a save, and inside a sample


def half_then(exception: BaseException, calls_before: int = 0):
    """A stand-in for safetensors' writer: after `calls_before` normal writes, write half the file, then raise."""
    calls = []

    def writer(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata)
        calls.append(filename)
        if len(calls) <= calls_before:
            Path(filename).write_bytes(data)
            return
        Path(filename).write_bytes(data[: len(data) // 2])
        raise exception

    return writer


@pytest.mark.parametrize("exception", [Cancel(), KeyboardInterrupt()], ids=["cancel", "ctrl-c"])
def test_a_save_cut_short_leaves_the_previous_files_and_no_partial_one(h0, base_dir, monkeypatch,  # noqa: F811
                                                                       exception):
    loras, states = loras_dir(base_dir), states_dir(base_dir)
    h2, _ = save(loop(h0, 2), save_state=True)
    h4 = loop(h2, 2)
    before = file_bytes(loras)

    # the same checkpoint saved again (a re-queue): its files are this run's, so nothing is written, nothing cut
    monkeypatch.setattr(checkpoints, "save_file", half_then(exception))
    save(h2, save_state=True)
    assert file_bytes(loras) == before and not tmp_files(loras)

    # a new checkpoint cut in its LoRA write: no LoRA file and no state file at all, never half of one
    for earlier in [*loras.glob("nodes_test_000004*"), *states.glob("nodes_test_000004*")]:  # from another test
        earlier.unlink()
    before = file_bytes(loras)
    with pytest.raises(type(exception)):
        save(h4, save_state=True)
    assert file_bytes(loras) == before and not tmp_files(loras)
    assert not (states / f"nodes_test_000004{STATE_SUFFIX}").exists() and not tmp_files(states)

    monkeypatch.undo()  # queued again: both files written, and the run never noticed
    saved, _ = save(h4, save_state=True)
    assert [c.step for c in saved.checkpoints] == [2, 4]
    assert load_file(loras / "nodes_test_000004.safetensors")
    assert_lora_equal(load_training_state(states / f"nodes_test_000004{STATE_SUFFIX}")[0].lora, h4.state.lora)


class CancellingBar:
    """ComfyUI's progress bar raises the interrupt from `update_absolute`; this one on its `at`-th update."""

    at = 1

    def __init__(self, total: int):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        if value >= self.at:
            raise Cancel


def test_a_cancelled_sample_or_grid_leaves_the_run_as_if_never_tried(h0, straight, monkeypatch):  # noqa: F811
    h3, _ = save(loop(h0, 3))
    h5, _ = save(loop(h3, 2))  # the trainer stands at step 5; h3's LoRA is another checkpoint's
    monkeypatch.setattr(bridge, "progress_bar", CancellingBar)

    sample = nodes["ValidationSample"].sample
    attempts = [  # (what, the progress update the cancel comes at); SAMPLE has 2 denoising steps
        *[(lambda: sample(h3, "fltglyph", 0.5, **SAMPLE), at) for at in (1, 2)],  # another LoRA, another strength
        (lambda: sample(h5, "fltglyph", 0.5, **{**SAMPLE, "base": "validation base"}), 2),  # another base
        (lambda: nodes["XYLoraStrengthGrid"].grid(h5, "0, 0.5, 1", "fltglyph", **SAMPLE), 3),  # in row 1 (step 3)
        (lambda: nodes["XYLoraStrengthGrid"].grid(h5, "0, 0.5, 1", "fltglyph", **SAMPLE), 8),  # in row 2 (step 5)
    ]
    for attempt, at in attempts:
        CancellingBar.at = at
        with pytest.raises(Cancel):
            attempt()
        assert scaling(h5) == {1.0}
        assert_lora_equal(lora.lora_state(h5.run.trainer.transformer), h5.state.lora)
        assert h5.run.trainer.vae.device.type == "cpu"

    monkeypatch.undo()
    assert_lora_equal(loop(h5, 2).state.lora, straight[7])  # as if no sample had been tried


# ---------------------------------------------------------------------------------------------------------------
# A full disk, a folder that refuses writes


def refusing(error: int):
    def writer(tensors, filename, metadata=None):
        if error == errno.ENOSPC:  # the disk fills part way through
            data = safetensors.torch.save(tensors, metadata)
            Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(error, os.strerror(error), str(filename))

    return writer


@pytest.mark.parametrize("error, advice", [(errno.ENOSPC, "No space left on device; free disk space"),
                                           (errno.EACCES, "Permission denied; free disk space or fix the folder's "
                                                          "permissions")], ids=["disk full", "permission denied"])
def test_a_refused_write_names_the_path_and_keeps_the_previous_checkpoint(  # noqa: F811
        h0, base_dir, monkeypatch, error, advice):
    loras = loras_dir(base_dir)
    loras.mkdir(parents=True, exist_ok=True)
    h1 = loop(h0, 1)
    for earlier in [*loras.glob("nodes_test_000001*"), *loras.glob("nodes_test_000002*")]:  # these must be new
        earlier.unlink()
    before = file_bytes(loras)
    h2 = loop(h1, 1)
    monkeypatch.setattr(checkpoints, "save_file", refusing(error))
    with pytest.raises(OSError) as raised:
        save(h1, save_state=True)
    target = loras / "nodes_test_000001.safetensors"
    assert raised.value.errno == error and f"could not write {target}: {advice}" in str(raised.value)
    assert "earlier files were left as they were" in str(raised.value)
    assert file_bytes(loras) == before and not tmp_files(loras)

    with pytest.raises(OSError, match=f"could not write {loras / 'nodes_test_000002'}"):
        save(h2, save_state=True)  # the next checkpoint fails the same way, and leaves nothing half-written
    assert file_bytes(loras) == before and not tmp_files(loras)
    monkeypatch.undo()
    assert save(h2, save_state=True)[0].checkpoints[-1].step == 2  # space freed: the run saves on


def test_a_read_only_folder_is_named(h0, tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions do not bite (the EACCES case above covers the message)")
        with pytest.raises(OSError, match=f"could not write {folder}/nodes_test_000000.safetensors: Permission denied"):
            h0.run.save_checkpoint(h0, folder=folder)
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


def test_an_output_folder_that_cannot_be_made_is_named(h0, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match=f"cannot create the folder {tmp_path}/a_file/loras for nodes_test_000000"):
        h0.run.save_checkpoint(h0, folder=tmp_path / "a_file" / "loras")


# ---------------------------------------------------------------------------------------------------------------
# Crash: a real process killed with SIGKILL in the middle of writing its checkpoints


@pytest.fixture(scope="module")
def processes():
    """New processes forked from a server that has imported the trainer (and, by name, this module)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["trainer_core.run_handle", "trainer_core.plots"])
    return context


CHUNK = 4096  # bytes per write of the slowed writer: a LoRA file takes ~11 writes, a state file ~43


def _slow_save_file(tensors, filename, metadata=None):
    """safetensors' writer with the file written in slices, so that a kill lands mid-write (the window of a real
    Flux LoRA state, hundreds of MB, is seconds long; a tiny one's would be microseconds)."""
    data = safetensors.torch.save(tensors, metadata)
    with open(filename, "wb") as f:
        for i in range(0, len(data), CHUNK):
            f.write(data[i : i + CHUNK])
            f.flush()
            time.sleep(0.003)


def _train_and_save_until_killed(config: dict, started: str) -> None:
    """A child: resume from the newest complete state (if any), then train and save LoRA + state every step."""
    torch.set_num_threads(1)
    checkpoints.save_file = _slow_save_file
    config = TrainConfig(**config)
    out = Path(config.output_dir)
    trainer = Trainer.from_config(config)
    latest = latest_state_file(out, config.output_name)
    if latest is not None:
        trainer.restore(load_training_state(latest)[0])
    Path(started).write_text(str(trainer.step))
    while True:
        trainer.train(1)
        stem = checkpoint_stem(config.output_name, trainer.step)
        trainer.save_lora(out / f"{stem}.safetensors")
        trainer.save_state(out / f"{stem}{STATE_SUFFIX}")


def _wait_for(condition, what: str, timeout: float = 120.0, poll: float = 0.001):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(poll)


def test_sigkill_mid_save_loses_nothing_and_a_restart_resumes_the_last_complete_state(processes, tiny_flux, tmp_path):
    dataset = write_demo_dataset(tmp_path / "data", count=2, size=64)
    out = tmp_path / "out"
    config = demo_config(tiny_flux, dataset, out, steps=100).replace(resolutions=(64,), max_sequence_length=8,
                                                                     rank=4, alpha=4.0)
    name = config.output_name
    rng = random.Random(0)
    started = tmp_path / "started"
    kills_mid_write = 0
    for target in ("state", "LoRA", "state"):  # the write each kill lands in
        latest = latest_state_file(out, name)
        expected_start = load_training_state(latest)[0].step if latest else 0
        started.unlink(missing_ok=True)
        child = processes.Process(target=_train_and_save_until_killed, args=(config.to_dict(), str(started)))
        child.start()
        try:
            _wait_for(started.exists, "the child to start")
            _wait_for(lambda: started.read_text() != "", "the child to report its step")
            assert int(started.read_text()) == expected_start, "a restart did not resume the last complete state"
            _wait_for(lambda: (out / f"{checkpoint_stem(name, expected_start + 2)}{STATE_SUFFIX}").exists(),
                      "two steps saved")
            _wait_for(lambda: any((STATE_SUFFIX in p.name) == (target == "state") for p in tmp_files(out)),
                      f"a {target} write to begin")
            time.sleep(rng.uniform(0.0, 0.01))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.join(30)
        assert child.exitcode == -signal.SIGKILL
        kills_mid_write += bool(tmp_files(out))

        # what the crash left: every visible file is whole, and the newest state is the newest complete one
        visible = sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
        for path in visible:
            assert load_file(path), path  # raises on a partial file
        states = [p for p in visible if p.name.endswith(STATE_SUFFIX)]
        assert latest_state_file(out, name) == max(states, key=lambda p: load_training_state(p)[0].step)
    assert kills_mid_write >= 2, "the kills should land inside writes"

    # a last restart, here: it resumes the newest complete state, its saves clear the dead child's leftovers, and
    # the LoRA equals a run that was never killed
    with torch.inference_mode(False):  # plain Trainers, not ComfyUI nodes
        resumed = Trainer.from_config(config)
        resumed.restore(load_training_state(latest_state_file(out, name))[0])
        resumed.train(1)
        stem = checkpoint_stem(name, resumed.step)
        resumed.save_lora(out / f"{stem}.safetensors")
        resumed.save_state(out / f"{stem}{STATE_SUFFIX}")
        assert not tmp_files(out)
        never_killed = Trainer.from_config(config)
        never_killed.train(resumed.step)
    assert resumed.losses == pytest.approx(never_killed.losses, rel=1e-5)
    assert_lora_equal(lora.lora_state(resumed.transformer), lora.lora_state(never_killed.transformer))


def _resume_through_nodes(base: str, state_name: str, result: str) -> None:
    """A child, as ComfyUI after a restart: InitTrainer resumes (a named state, then "latest"), TrainLoop goes on."""
    torch.set_num_threads(1)
    os.environ[bridge.BASE_DIR_ENV] = base
    pack_nodes = {n.removeprefix("FluxLoRA_"): cls() for n, cls in load_pack().NODE_CLASS_MAPPINGS.items()}
    loras = {}
    with torch.inference_mode():
        for resume_state in (state_name, "latest"):
            widgets = {**TINY_WIDGETS, "output_name": "restart", "resume_state": resume_state}
            handle = pack_nodes["InitTrainer"].init(**widgets)[0]
            after = pack_nodes["TrainLoop"].train(handle, 2)[0]
            loras |= {f"{resume_state}/{k}": v for k, v in after.state.lora.items()}
            loras[f"{resume_state}/step"] = torch.tensor(after.step)
    safetensors.torch.save_file(loras, result)


def test_init_trainer_in_a_new_process_resumes_the_uninterrupted_run(processes, straight, base_dir,  # noqa: F811
                                                                     tmp_path):
    states = states_dir(base_dir)
    save(loop(init(output_name="restart"), 3), save_state=True)
    state_name = f"restart_000003{STATE_SUFFIX}"
    # newer states of a run whose name starts alike, and a dead process's leftover: "latest" must skip them all
    for step in (4, 5):
        (states / f"restart_v2_{step:06d}{STATE_SUFFIX}").write_bytes((states / state_name).read_bytes())
    (states / f".restart_000009{STATE_SUFFIX}.tmp-1-dead").write_bytes(b"partial")
    listed = nodes["InitTrainer"].INPUT_TYPES()["required"]["resume_state"][0]
    assert state_name in listed and "latest" in listed and not any(".tmp-" in name for name in listed)
    child = processes.Process(target=_resume_through_nodes, args=(str(base_dir), state_name, str(tmp_path / "r")))
    child.start()
    child.join(300)
    assert child.exitcode == 0
    result = load_file(tmp_path / "r")
    for resume_state in (state_name, "latest"):
        assert result.pop(f"{resume_state}/step").item() == 5
        assert_lora_equal({k.split("/", 1)[1]: v for k, v in result.items() if k.startswith(resume_state + "/")},
                          straight[5])


def test_latest_starts_fresh_when_nothing_was_saved_and_refuses_another_runs_settings(h0, base_dir):  # noqa: F811
    fresh = init(output_name="never_saved", resume_state="latest")
    assert fresh.step == 0
    save(loop(fresh, 1), save_state=True)
    with pytest.raises(ValueError, match=r"resume_state: never_saved_000001.state.safetensors belongs to a run "
                                         r"with other settings: rank 8 \(state: 4\)"):
        init(output_name="never_saved", resume_state="latest", rank=8)


def test_latest_state_file_ignores_partial_temporary_and_other_runs_files(h0, tmp_path):
    for step in (2, 4):
        h0.run.trainer.save_state(tmp_path / f"run_{step:06d}{STATE_SUFFIX}")
    complete = (tmp_path / f"run_000004{STATE_SUFFIX}").read_bytes()
    (tmp_path / f"run_000006{STATE_SUFFIX}").write_bytes(complete[: len(complete) // 2])  # a copy cut short
    (tmp_path / f".run_000008{STATE_SUFFIX}.tmp-123-abcd1234").write_bytes(complete)  # renamed never
    (tmp_path / f"run_v2_000010{STATE_SUFFIX}").write_bytes(complete)  # another run whose name starts alike
    (tmp_path / "run_000012.safetensors").write_bytes(complete)  # not a state name
    assert latest_state_file(tmp_path, "run") == tmp_path / f"run_000004{STATE_SUFFIX}"
    assert latest_state_file(tmp_path, "run_v2") == tmp_path / f"run_v2_000010{STATE_SUFFIX}"
    assert latest_state_file(tmp_path / "missing", "run") is None


# ---------------------------------------------------------------------------------------------------------------
# Security: files are read as safetensors only, and no widget reaches outside ComfyUI's folders


def test_no_code_path_can_unpickle():
    forbidden = re.compile(r"torch\.load\b|pickle\.loads?\b|weights_only\s*=\s*False|use_safetensors\s*=\s*False")
    sources = [*ROOT.glob("trainer_core/**/*.py"), *ROOT.glob("nodes/**/*.py"), ROOT / "__init__.py"]
    assert len(sources) > 20
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in sources for n, line in enumerate(p.read_text().splitlines(), 1)
            if forbidden.search(line)]
    assert hits == []


@pytest.mark.parametrize("widget, value, error, match", [
    ("transformer", "../vae/ae.safetensors", FileNotFoundError, r"transformer: '../vae/ae.safetensors' is not in"),
    ("vae", "../../input/data/glyph_00.png", FileNotFoundError, r"vae: '../../input/data/glyph_00.png' is not in"),
    ("clip_l", "tiny/../../vae/ae.safetensors", FileNotFoundError, r"clip_l: 'tiny/../../vae/ae.safetensors' is not"),
    ("resume_state", "../diffusion_models/flux-tiny-bf16.safetensors", FileNotFoundError, r"resume_state: '\.\./"),
    ("dataset_dir", "..", ValueError, r"dataset_dir: '\.\.' points outside ComfyUI's input folder .*give an absolute"),
    ("dataset_dir", "../models", ValueError, r"dataset_dir: '../models' points outside ComfyUI's input folder"),
    ("dataset_dir", "data/../../models", ValueError, r"dataset_dir: 'data/../../models' points outside"),
], ids=["transformer ..", "vae ../..", "clip_l in/../..", "resume_state ..", "dataset ..", "dataset ../x",
        "dataset in/../.."])
def test_no_widget_path_leaves_comfyuis_folders(h0, base_dir, widget, value, error, match):  # noqa: F811
    with pytest.raises(error, match=match):
        init(**{widget: value})


def test_an_absolute_path_typed_by_the_user_is_taken_as_given(h0, base_dir):  # noqa: F811
    handle = init(dataset_dir=str(base_dir / "input" / "data"), t5=str(base_dir / "models/text_encoders/tiny/"
                                                                        "t5xxl_tiny.safetensors"))
    assert handle.run.trainer.config.dataset_dir == str(base_dir / "input" / "data")
