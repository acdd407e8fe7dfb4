"""The loop really trains, resumes exactly, and never loses a good state to a bad step."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core import lora
from trainer_core.checkpoints import load_training_state
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.plan import mean_losses
from trainer_core.trainer import NonFiniteLossError, Trainer
from trainer_core.validation import strength_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=2, size=64)


def make_trainer(tiny_flux, dataset, tmp_path, **changes):
    config = demo_config(tiny_flux, dataset, tmp_path / "out", steps=100).replace(resolutions=(64,), **changes)
    return Trainer.from_config(config)


def test_overfitting_two_images_brings_the_loss_down(tiny_flux, dataset, tmp_path):
    """The classic sanity check: the same noise and timesteps every step, so the LoRA can memorise the batch.

    (With fresh noise each step a random tiny base learns far more slowly; the demo shows that curve.)
    """
    trainer = make_trainer(tiny_flux, dataset, tmp_path, learning_rate=3e-3, lr_schedule="constant", warmup_steps=0)
    trainer.train(100, on_step=lambda info: trainer.generator.manual_seed(0))
    first, last = mean_losses(trainer.losses)
    assert last < 0.6 * first, (first, last)


def test_snapshot_restore_continues_exactly(tiny_flux, dataset, tmp_path):
    straight = make_trainer(tiny_flux, dataset, tmp_path)
    straight.train(6)

    split = make_trainer(tiny_flux, dataset, tmp_path)
    split.train(3)
    state = split.snapshot()
    split.train(2)  # wander off, then come back
    split.restore(state)
    split.train(3)

    assert split.step == straight.step == 6
    assert split.losses == pytest.approx(straight.losses, rel=1e-5)
    for k, v in lora.lora_state(straight.transformer).items():
        torch.testing.assert_close(lora.lora_state(split.transformer)[k], v)


def test_a_failing_step_leaves_no_trace(tiny_flux, dataset, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_flux, dataset, tmp_path)
    trainer.train(2)
    before = trainer.snapshot()

    monkeypatch.setattr(trainer, "_loss", lambda batch: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="at step 3.*after step 2.*learning rate"):
        trainer.train(5)
    monkeypatch.undo()

    assert trainer.step == 2 and trainer.cursor == before.cursor and len(trainer.losses) == 2
    for k, v in before.lora.items():
        assert torch.equal(lora.lora_state(trainer.transformer)[k], v)
    # and it carries on as if nothing happened
    reference = make_trainer(tiny_flux, dataset, tmp_path)
    reference.train(4)
    trainer.train(2)
    assert trainer.losses == pytest.approx(reference.losses, rel=1e-5)


def test_should_stop_stops_between_steps(tiny_flux, dataset, tmp_path):
    trainer = make_trainer(tiny_flux, dataset, tmp_path)
    done = trainer.train(10, should_stop=lambda: trainer.step >= 3)
    assert done == 3 and trainer.step == 3


def _cli_config(tiny_flux, dataset, folder: Path, steps: int) -> Path:
    cfg = demo_config(tiny_flux, dataset, folder / "out", steps=8).replace(resolutions=(64,))
    lines = []
    for key, value in cfg.to_dict().items():
        lines.append(f"{key} = {list(value) if isinstance(value, tuple) else repr(value).lower() if isinstance(value, bool) else repr(value)}")
    lines += ["[plan]", f"steps = {steps}", "save_every = 3", "prompts = []"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.toml"
    path.write_text("\n".join(lines).replace("'", '"'))
    return path


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "trainer_core", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_save_load_in_a_new_process_continues_exactly(tiny_flux, dataset, tmp_path):
    """N steps, save, a new process loads and does M more == N+M in one go (the CLI auto-resumes)."""
    one_go = _cli_config(tiny_flux, dataset, tmp_path / "a", steps=6)
    _cli("train", str(one_go))
    interrupted = _cli_config(tiny_flux, dataset, tmp_path / "b", steps=3)
    _cli("train", str(interrupted))
    resumed = _cli_config(tiny_flux, dataset, tmp_path / "b", steps=6)
    _cli("train", str(resumed))

    a = load_file(tmp_path / "a/out/flux_tiny_demo_000006.safetensors")
    b = load_file(tmp_path / "b/out/flux_tiny_demo_000006.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6)
    state, _ = load_training_state(tmp_path / "b/out/flux_tiny_demo_000006.state.safetensors")
    assert state.step == 6 and len(state.losses) == 6


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_every_optimizer_trains_and_resumes_exactly_from_disk(tiny_flux, dataset, tmp_path, optimizer):
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    straight = make_trainer(tiny_flux, dataset, tmp_path, optimizer=optimizer, learning_rate=lr)
    straight.train(4)

    first = make_trainer(tiny_flux, dataset, tmp_path, optimizer=optimizer, learning_rate=lr)
    first.train(2)
    path = first.save_state(tmp_path / "s.state.safetensors")
    resumed = make_trainer(tiny_flux, dataset, tmp_path, optimizer=optimizer, learning_rate=lr)
    resumed.restore(load_training_state(path)[0])
    resumed.train(2)

    before = make_trainer(tiny_flux, dataset, tmp_path, optimizer=optimizer, learning_rate=lr)
    changed = [k for k, v in lora.lora_state(straight.transformer).items()
               if not torch.equal(v, lora.lora_state(before.transformer)[k])]
    assert changed, f"{optimizer} did not move the LoRA"
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for k, v in lora.lora_state(straight.transformer).items():
        torch.testing.assert_close(lora.lora_state(resumed.transformer)[k], v)


def test_accumulation_flips_and_caption_dropout_resume_exactly(tiny_flux, dataset, tmp_path):
    """The random draws of augmentation come from the run's saved generator, so they too replay on resume."""
    settings = dict(gradient_accumulation=2, flip_augment=True, caption_dropout=0.5, timestep_sampling="logit_normal")
    straight = make_trainer(tiny_flux, dataset, tmp_path, **settings)
    straight.train(4)
    split = make_trainer(tiny_flux, dataset, tmp_path, **settings)
    split.train(2)
    state = split.snapshot()
    split.train(1)
    split.restore(state)
    split.train(2)
    assert all(math.isfinite(x) for x in straight.losses)
    assert split.losses == pytest.approx(straight.losses, rel=1e-5)


def test_the_xy_grid_swaps_a_validation_base_in_once(tiny_flux, dataset, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_flux, dataset, tmp_path, validation_transformer_path=str(tiny_flux.transformer_fp8))
    first = trainer.snapshot().lora
    trainer.train(3)
    own = lora.lora_state(trainer.transformer)
    moved = []
    drop = trainer.drop_base
    monkeypatch.setattr(trainer, "drop_base", lambda model: (moved.append(model), drop(model)))

    grid = strength_grid(trainer, [(0, first), (3, own)], [0.0, 1.0], "fltglyph", base_path=str(tiny_flux.transformer_fp8),
                         steps=2, width=64, height=64)

    assert moved.count(trainer.transformer) == 1  # 4 cells, one swap of the bases
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
    for k, v in own.items():  # the run's own LoRA is back on the training base
        assert torch.equal(lora.lora_state(trainer.transformer)[k], v)
