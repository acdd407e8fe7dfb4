"""Faults around a command-line run: Ctrl-C keeps every step done and resumes bit-identically, an unwritable or full
output folder fails before the first step (before any model loads), and a save that fails mid-run keeps the state in
a rescue folder with the command that resumes it."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core import cli, lora, output_guard
from trainer_core.checkpoints import STATE_SUFFIX, latest_state_file, load_training_state
from trainer_core.typed_fields import toml_text
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
NAME = "flux_tiny_demo"
STEPS = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("cli_faults") / "data", count=2, size=64)


def write_run(folder: Path, tiny_flux, dataset: Path, steps: int = STEPS, save_every: int = 100) -> Path:
    config = demo_config(tiny_flux, dataset, folder / "out", steps=steps).replace(
        resolutions=(64,), max_sequence_length=8, rank=4, alpha=4.0)
    lines = [f"{k} = {toml_text(v)}" for k, v in config.to_dict().items()]
    lines += ["[plan]", f"steps = {steps}", f"save_every = {save_every}", "prompts = []"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text("\n".join(lines) + "\n")
    return folder / "run.toml"


class Training:
    """`python -m trainer_core train CONFIG` as a user starts it, with its progress read as it comes."""

    def __init__(self, config: Path, interrupt_at: str | None = None):
        """`interrupt_at`: a log line at which Ctrl-C is sent, from the thread that reads the log as it comes. The
        run is niced, so on a busy machine that thread gets the CPU before the run goes on much past the line."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread: identical sums every run
        self.process = subprocess.Popen([sys.executable, "-m", "trainer_core", "train", str(config)], cwd=config.parent,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        preexec_fn=lambda: os.nice(10))
        self.err = b""
        self.interrupt_at = interrupt_at and interrupt_at.encode()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 4096):
            self.err += chunk
            if self.interrupt_at and self.interrupt_at in self.err:
                self.process.send_signal(signal.SIGINT)
                self.interrupt_at = None

    def steps_done(self) -> int:
        """The last step count the progress bar showed."""
        counts = re.findall(rf"(\d+)/{STEPS} \[", self.err.decode(errors="replace"))
        return int(counts[-1]) if counts else 0

    def wait_for_step(self, step: int) -> int:
        self._wait(lambda: self.steps_done() >= step, f"step {step}")
        return self.steps_done()

    def _wait(self, condition, what: str, timeout: float = 300.0) -> None:
        end = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended before {what}: {self.err.decode()}"
            assert time.monotonic() < end, f"no {what} after {timeout} s"
            time.sleep(0.01)

    def finish(self) -> tuple[int, str]:
        code = self.process.wait(timeout=300)
        self.reader.join(timeout=10)
        return code, self.err.decode(errors="replace")


def final_lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "out" / f"{NAME}_{STEPS:06d}.safetensors")


def test_ctrl_c_keeps_every_step_done_and_resuming_gives_the_uninterrupted_weights(tiny_flux, dataset, tmp_path):
    straight = Training(write_run(tmp_path / "straight", tiny_flux, dataset))
    code, err = straight.finish()
    assert code == 0, err

    config = write_run(tmp_path / "stopped", tiny_flux, dataset)
    run = Training(config)
    seen = run.wait_for_step(3)
    run.process.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130 and "Traceback" not in err, err
    stopped = int(re.search(r"stopped at step (\d+) \(Ctrl-C\): saved .* continue with: python -m trainer_core train "
                            + re.escape(str(config)), err)[1])
    state, _ = load_training_state(config.parent / "out" / f"{NAME}_{stopped:06d}{STATE_SUFFIX}")
    assert seen <= stopped < STEPS  # the step in progress was finished, none done was lost
    assert state.step == stopped and len(state.losses) == stopped

    run = Training(config, interrupt_at="resuming from")  # Ctrl-C while the models load: stops at once, no file harmed
    code, err = run.finish()
    assert code == 130 and "Traceback" not in err and "stopped" in err, err
    assert not list((config.parent / "out").glob(".*"))  # neither a temporary file nor the run's lock is left
    assert load_training_state(latest_state_file(config.parent / "out", NAME))[0].step >= stopped

    code, err = Training(config).finish()  # no argument: continues from the newest state
    assert code == 0 and re.search(r"resuming from .*_\d{6}\.state\.safetensors", err), err
    ours, reference = final_lora(config.parent), final_lora(tmp_path / "straight")
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(Trainer, "from_config", refuse)


def test_a_full_disk_fails_before_any_model_loads(tiny_flux, dataset, tmp_path, monkeypatch, capsys, no_model_loads):
    config = write_run(tmp_path, tiny_flux, dataset, steps=3000, save_every=250)
    monkeypatch.setattr(output_guard, "free_bytes", lambda folder: 5 * 2**20)  # the free-space probe: 5 MiB left
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: output_dir: {re.escape(str(tmp_path / 'out'))} has 5\.0 MiB free, but this run's "
                     r"checkpoints and states need about \d+\.\d MiB; free some space", err), err
    assert not list((tmp_path / "out").iterdir())  # no lock left, nothing written


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system instead
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode:
            pytest.skip("root without mount: cannot make a folder root may not write")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_an_unwritable_output_folder_fails_before_any_model_loads(tiny_flux, dataset, tmp_path, read_only_folder,
                                                                  capsys, no_model_loads):
    config = write_run(tmp_path, tiny_flux, dataset)
    text = config.read_text().replace(f'output_dir = "{tmp_path / "out"}"', f'output_dir = "{read_only_folder / "run"}"')
    config.write_text(text)
    assert cli.main(["train", str(config)]) == 2
    assert re.search(rf"error: output_dir: {re.escape(str(read_only_folder))} is not writable",
                     capsys.readouterr().err)


def test_a_save_failing_mid_run_keeps_the_state_in_a_rescue_folder(tiny_flux, dataset, tmp_path, monkeypatch, capsys):
    config = write_run(tmp_path, tiny_flux, dataset, steps=4, save_every=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    save_lora, calls = lora.save_kohya_state, []

    def disk_full_at_the_second_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, f"could not write {path}: No space left on device")
        return save_lora(path, *args, **kwargs)

    monkeypatch.setattr(lora, "save_kohya_state", disk_full_at_the_second_save)
    assert cli.main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    rescued = tmp_path / "home" / ".cache" / "flux-lora-trainer" / "rescue" / f"{NAME}_000004{STATE_SUFFIX}"
    assert "No space left on device" in err and "Traceback" not in err
    assert f"the run's state at step 4 was saved to {rescued}; fix {tmp_path / 'out'} and continue with: " \
           f"python -m trainer_core train {config} --resume {rescued}" in err
    state, _ = load_training_state(rescued)
    assert state.step == 4 and len(state.losses) == 4

    monkeypatch.setattr(lora, "save_kohya_state", save_lora)  # space freed: the printed command goes on from step 4
    config.write_text(config.read_text().replace("steps = 4", "steps = 6"))
    assert cli.main(["train", str(config), "--resume", str(rescued)]) == 0
    final, _ = load_training_state(tmp_path / "out" / f"{NAME}_000006{STATE_SUFFIX}")
    assert final.losses[:4] == state.losses and len(final.losses) == 6


def test_a_second_ctrl_c_stops_at_once():
    with output_guard.CtrlC() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)  # the first: only asks the loop to stop after its step
        time.sleep(0.01)  # a Python signal handler runs between bytecodes
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
