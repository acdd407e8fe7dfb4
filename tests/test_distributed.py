"""Data-parallel training: two CPU processes (torchrun, gloo, accelerate's Accelerator) make the single-process run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core.checkpoints import load_training_state
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.distributed import Processes

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def test_shares_split_any_batch_in_order():
    class FakeAccelerator:
        def __init__(self, index, count):
            self.process_index, self.num_processes = index, count

    for batch in range(0, 7):
        for count in (1, 2, 3):
            shares = [Processes(FakeAccelerator(i, count)).share(batch) for i in range(count)]
            covered = [i for s in shares for i in range(batch)[s]]
            assert covered == list(range(batch)), (batch, count, shares)
            assert max(len(range(batch)[s]) for s in shares) - min(len(range(batch)[s]) for s in shares) <= 1


def write_config(folder: Path, tiny_flux, dataset: Path, out: str, steps: int, save_every: int) -> Path:
    config = demo_config(tiny_flux, dataset, folder / out, steps=steps).replace(
        resolutions=(64,), batch_size=2, learning_rate=1e-3, lr_schedule="constant", warmup_steps=0)
    lines = [f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in config.to_dict().items()]
    lines += ["[plan]", f"steps = {steps}", f"save_every = {save_every}"]
    path = folder / f"{out}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(command: list[str], config: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, "-m", "trainer_core", "train", str(config), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=4, size=64)


def test_two_processes_train_the_single_process_run(tiny_flux, dataset, tmp_path):
    single = train([sys.executable], write_config(tmp_path, tiny_flux, dataset, "single", steps=4, save_every=2))
    assert single.returncode == 0, single.stderr[-3000:]
    double = train(TORCHRUN, write_config(tmp_path, tiny_flux, dataset, "double", steps=4, save_every=2))
    assert double.returncode == 0, double.stderr[-3000:]
    assert "Traceback" not in double.stderr

    # each file written once, by the main process alone; the run store holds one complete state per loop
    assert "could not" not in double.stderr and "cannot be used" not in double.stderr
    (run,) = (tmp_path / "double" / "run_store" / "runs").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["2-2.state.safetensors", "2.state.safetensors"]
    assert [load_training_state(p)[0].step for p in sorted(run.iterdir())] == [4, 2]
    assert not list((tmp_path / "double").rglob(".*tmp-*"))
    names = sorted(p.name for p in (tmp_path / "double").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert double.stdout.count("LoRA: ") == 2
    for name in names:
        if name.endswith(".safetensors") and ".state." not in name:
            ours, theirs = load_file(tmp_path / "double" / name), load_file(tmp_path / "single" / name)
            assert ours.keys() == theirs.keys()
            for key in ours:  # bf16 files: the runs differ only in the order of float additions
                torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=2e-2, atol=1e-4)
    one = load_training_state(tmp_path / "single" / "flux_tiny_demo_000004.state.safetensors")[0]
    two = load_training_state(tmp_path / "double" / "flux_tiny_demo_000004.state.safetensors")[0]
    assert two.losses == pytest.approx(one.losses, rel=1e-4)
    for key, value in one.lora.items():  # AdamW's first steps move each weight by ~lr whatever the gradient's size,
        # so a last-bit difference in a tiny gradient shows: allow 1% of one step (lr 1e-3)
        torch.testing.assert_close(two.lora[key], value, rtol=1e-4, atol=1e-5)


def test_a_killed_process_stops_the_run_and_a_resume_with_one_process_continues(tiny_flux, dataset, tmp_path):
    config = write_config(tmp_path, tiny_flux, dataset, "killed", steps=400, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([*TORCHRUN, "-m", "trainer_core", "train", str(config)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out = tmp_path / "killed"
    deadline = time.monotonic() + 300
    while not list(out.glob("*_000004.state.safetensors")):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-f", "-P", str(run.pid), "trainer_core"], capture_output=True, text=True)
    victim = int(workers.stdout.split()[-1])
    os.kill(victim, signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0

    # every state left behind is complete; a single process resumes from the newest and finishes the run
    states = sorted(out.glob("*.state.safetensors"))
    assert states and not list(out.glob(".*tmp-*"))
    newest = max(load_training_state(p)[0].step for p in states)
    config.write_text(config.read_text().replace("steps = 400", f"steps = {newest + 2}"))
    resumed = train([sys.executable], config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from" in resumed.stderr and f"at step {newest}" in resumed.stderr
    assert load_training_state(out / f"flux_tiny_demo_{newest + 2:06d}.state.safetensors")[0].step == newest + 2
