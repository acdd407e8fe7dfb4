"""Validation loss, the EMA LoRA and the best checkpoint: one number per LoRA, held-out images kept out of training,
an EMA that is the average it claims to be and resumes exactly, and a raw LoRA that neither of them changes."""
import logging

import pytest
import torch
from safetensors import safe_open

from tests.numerics import assert_ulps
from trainer_core import lora, models, run_handle
from trainer_core.checkpoints import load_training_state
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.ema import LoraEma
from trainer_core.preflight import preflight
from trainer_core.run_handle import TrainingRun
from trainer_core.run_outputs import grid_rows
from trainer_core.trainer import Trainer
from trainer_core.validation import EMA, RAW, best, split_records, validation_loss, validation_sigmas

WATCHED = dict(validation_timesteps=4, ema_decay=0.9)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=4, size=64)


def config_for(tiny_flux, dataset, tmp_path, **changes):
    return demo_config(tiny_flux, dataset, tmp_path / "out", steps=20).replace(resolutions=(64,), **changes)


def make_trainer(tiny_flux, dataset, tmp_path, **changes) -> Trainer:
    return Trainer.from_config(config_for(tiny_flux, dataset, tmp_path, **changes))


def test_one_lora_gets_one_validation_loss_across_calls_and_resume(tiny_flux, dataset, tmp_path):
    trainer = make_trainer(tiny_flux, dataset, tmp_path, **WATCHED)
    trainer.train(3)
    generator = trainer.generator.get_state()
    first = validation_loss(trainer, trainer.validation_samples)
    assert validation_loss(trainer, trainer.validation_samples) == first
    assert torch.equal(trainer.generator.get_state(), generator)  # the run's own draws are untouched
    record = trainer.validate()
    assert record == {"step": 3, RAW: first, EMA: record[EMA]} and record[EMA] != first  # the EMA lags the weights
    path = trainer.save_state(tmp_path / "s.state.safetensors")

    resumed = make_trainer(tiny_flux, dataset, tmp_path, **WATCHED)
    resumed.restore(load_training_state(path)[0])
    assert resumed.validation == [record]  # the history is part of the state
    assert validation_loss(resumed, resumed.validation_samples) == first
    resumed.train(1)
    assert validation_loss(resumed, resumed.validation_samples) != first  # it measures the weights


def test_the_noise_levels_are_evenly_spaced_and_shifted_as_the_run_shifts(tiny_flux, dataset, tmp_path):
    config = config_for(tiny_flux, dataset, tmp_path)
    sigmas = validation_sigmas(8, config)
    assert sigmas.shape == (8,) and torch.all(sigmas[1:] > sigmas[:-1]) and 0 < sigmas[0] and sigmas[-1] < 1
    plain = validation_sigmas(8, config.replace(timestep_sampling="uniform"))
    assert torch.allclose(plain, (torch.arange(8) + 0.5) / 8)
    assert torch.all(sigmas > plain)  # shift 3.16 moves every level toward noise


def test_the_raw_lora_is_bit_identical_with_ema_and_validation_on_or_off(tiny_flux, dataset, tmp_path):
    plain = make_trainer(tiny_flux, dataset, tmp_path)
    plain.train(4)
    watched = make_trainer(tiny_flux, dataset, tmp_path, validation_every=2, **WATCHED)
    watched.train(4)
    raw, other = lora.lora_state(plain.transformer), lora.lora_state(watched.transformer)
    assert all(torch.equal(raw[k], other[k]) for k in raw)
    assert plain.losses == watched.losses
    assert [r["step"] for r in watched.validation] == [2, 4]


def test_the_ema_is_the_closed_form_average():
    decay, values = 0.8, [torch.tensor([1.0, -2.0, 0.5]) * (k + 1) for k in range(6)]
    param = torch.nn.Parameter(torch.tensor([0.25, 0.0, -1.0]))
    start = param.detach().clone()
    ema = LoraEma({"w": param}, decay)
    for v in values:
        param.data.copy_(v)
        ema.update()
    n = len(values)
    closed = decay ** n * start + sum((1 - decay) * decay ** (n - 1 - k) * v for k, v in enumerate(values))
    assert_ulps(ema.state()["w"], closed, ulps=16, what="EMA")


def test_the_ema_resumes_bit_identically(tiny_flux, dataset, tmp_path):
    straight = make_trainer(tiny_flux, dataset, tmp_path, ema_decay=0.9)
    straight.train(4)
    first = make_trainer(tiny_flux, dataset, tmp_path, ema_decay=0.9)
    first.train(2)
    path = first.save_state(tmp_path / "half.state.safetensors")
    resumed = make_trainer(tiny_flux, dataset, tmp_path, ema_decay=0.9, ema_on_cpu=True)
    resumed.restore(load_training_state(path)[0])
    resumed.train(2)
    for a, b in ((straight.ema.state(), resumed.ema.state()),
                 (lora.lora_state(straight.transformer), lora.lora_state(resumed.transformer))):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_held_out_images_never_enter_a_training_batch(tiny_flux, dataset, tmp_path, caplog):
    config = config_for(tiny_flux, dataset, tmp_path, validation_split=0.5, validation_timesteps=2)
    with caplog.at_level(logging.INFO, logger="trainer_core.validation"):
        train, held = split_records(preflight(config), config)
    held_paths = {r.path for r in held}
    assert len(held_paths) == 2 and not held_paths & {r.path for r in train}
    assert all(p.name in caplog.text for p in held_paths)  # the log names them
    assert split_records(preflight(config), config)[1] == held  # chosen by the seed

    trainer = Trainer.from_config(config)
    seen = []
    next_batch = trainer._next_batch
    trainer._next_batch = lambda: seen.append(batch := next_batch()) or batch
    trainer.train(6)  # three epochs of the two training images
    assert {trainer.dataset.records[i].path for batch in seen for i in batch} == {r.path for r in train}
    assert len(trainer.validation_samples) == 2
    assert {s.caption for s in trainer.validation_samples} == {r.caption for r in held}


def test_a_checkpoint_saves_the_ema_beside_the_lora_both_scored_and_the_best_marked(tiny_flux, dataset, tmp_path):
    if run_handle._active is not None:
        run_handle._active.release()
    config = config_for(tiny_flux, dataset, tmp_path, **WATCHED)
    h0 = TrainingRun.start(config)
    h1 = h0.run.save_checkpoint(h0.run.train(h0, 2), folder=tmp_path / "loras")
    h2 = h1.run.save_checkpoint(h1.run.train(h1, 2), folder=tmp_path / "loras")
    c = h2.checkpoints[-1]
    assert c.ema_path.name == "flux_tiny_demo_000004_ema.safetensors" and c.ema_path.parent == c.lora_path.parent
    for path, kind in ((c.lora_path, RAW), (c.ema_path, EMA)):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["validation_loss"] == repr(c.validation[kind])
    # the EMA file loads as a LoRA like the raw one (kohya layout, bf16 on disk)
    model = models.load_transformer(config.transformer_path, dtype=torch.float32)
    lora.add_lora(model, config.rank, config.alpha)
    lora.load_lora_file(c.ema_path, model)
    loaded = lora.lora_state(model)
    for key, value in c.state.ema.items():
        assert torch.allclose(loaded[key], value, rtol=2e-2, atol=1e-4), key
    rows, labels = grid_rows(h2.checkpoints, (RAW, EMA))
    assert [step for step, _ in rows] == [2, 2, 4, 4] and len(labels) == 4
    step, kind, loss = best([x.validation for x in h2.checkpoints])
    marked = [label for label in labels if label.endswith("* best")]
    assert marked == [f"step {step}{' EMA' if kind == EMA else ''}  val {loss:.4f}  * best"]
    h0.run.release()
