"""Training options: continuing a LoRA file, DoRA, the file formats, auto total_steps, TensorBoard event files."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer_core import lora
from trainer_core.config import TrainConfig
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.flow_matching import image_ids, text_ids
from trainer_core.optim import PastScheduleError
from trainer_core.plan import RunPlan, execute
from trainer_core.preflight import preflight
from trainer_core.trainer import Trainer
from trainer_core.validation import strength_grid


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=2, size=64)


@pytest.fixture(scope="module")
def trained(tiny_flux, dataset, tmp_path_factory):
    """A run two steps in, that has rendered a sample and a grid (its TensorBoard files) and saved its LoRA in both
    formats (the files to continue from)."""
    folder = tmp_path_factory.mktemp("trained")
    trainer = Trainer.from_config(config(tiny_flux, dataset, folder))
    first = trainer.snapshot().lora
    trainer.train(2)
    trainer.sample(["fltglyph"], steps=1, width=64, height=64)
    strength_grid(trainer, [(2, first)], [0.0, 1.0], "fltglyph", steps=1, width=64, height=64)
    for lora_format in lora.LORA_FORMATS:
        lora.save_lora_file(folder / f"start.{lora_format}.safetensors", trainer.transformer, {}, lora_format)
    trainer.tensorboard.flush()
    return trainer, folder


def config(tiny_flux, dataset, tmp_path, **changes) -> TrainConfig:
    base = demo_config(tiny_flux, dataset, tmp_path / "out", steps=100).replace(resolutions=(64,), rank=4, alpha=4.0)
    return base.replace(**changes)


def probe(trainer: Trainer) -> torch.Tensor:
    """The transformer's prediction on fixed inputs, with the LoRA as it stands."""
    g = torch.Generator().manual_seed(0)
    tc = trainer.transformer.config
    with torch.no_grad():
        return trainer.transformer(
            hidden_states=torch.randn(1, 16, tc.in_channels, generator=g),  # an 8x8 latent
            encoder_hidden_states=torch.randn(1, 4, tc.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, tc.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]) if tc.guidance_embeds else None,
            img_ids=image_ids(8, 8), txt_ids=text_ids(4), return_dict=False,
        )[0]


# --------------------------------------------------------------------------------------------- init_lora
@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_init_lora_starts_from_the_files_weights(tiny_flux, dataset, tmp_path, trained, lora_format):
    trainer, folder = trained
    path = folder / f"start.{lora_format}.safetensors"
    continued = Trainer.from_config(config(tiny_flux, dataset, tmp_path, init_lora=str(path), seed=99))
    assert continued.step == 0
    # the file holds bf16: the continued run starts from those values exactly (alpha = rank: scale 1, no rounding)
    own = lora.lora_state(trainer.transformer)
    rounded = {k: v.bfloat16().float() for k, v in own.items()}
    for k, v in lora.lora_state(continued.transformer).items():
        assert torch.equal(v, rounded[k]), k
    lora.load_lora_state(trainer.transformer, rounded)
    assert torch.equal(probe(continued), probe(trainer))
    lora.load_lora_state(trainer.transformer, own)
    continued.train(1)  # and it trains on from there
    assert any(not torch.equal(v, rounded[k]) for k, v in lora.lora_state(continued.transformer).items())


def test_init_lora_rank_mismatch_and_missing_file_fail_in_preflight(tiny_flux, dataset, tmp_path, trained):
    path = trained[1] / "start.kohya.safetensors"
    with pytest.raises(ValueError, match=r"^init_lora: .*start\.kohya\.safetensors has rank 4, but rank is 8; set rank to 4"):
        preflight(config(tiny_flux, dataset, tmp_path, init_lora=str(path), rank=8))
    with pytest.raises(FileNotFoundError, match=r"^init_lora: .*nope\.safetensors does not exist"):
        preflight(config(tiny_flux, dataset, tmp_path, init_lora=str(tmp_path / "nope.safetensors")))


# --------------------------------------------------------------------------------------------- DoRA
def test_dora_run_trains_its_magnitudes_resumes_exactly_and_saves_dora_scale(tiny_flux, dataset, tmp_path):
    trainer = Trainer.from_config(config(tiny_flux, dataset, tmp_path, dora=True, gradient_checkpointing=True))
    start = trainer.snapshot()
    magnitudes = [k for k in start.lora if k.endswith("lora_magnitude_vector.weight")]
    assert magnitudes and len(trainer.params) == len(start.lora)
    trainer.train(2)
    after = lora.lora_state(trainer.transformer)
    assert all(not torch.equal(after[k], start.lora[k]) for k in magnitudes)

    trainer.restore(start)
    trainer.train(2)
    for k, v in lora.lora_state(trainer.transformer).items():
        torch.testing.assert_close(v, after[k])
    path = trainer.save_lora(tmp_path / "dora.safetensors")
    assert "lora_unet_single_blocks_0_linear1.dora_scale" in load_file(path)


def test_dora_with_fp8_base_or_block_swap_fails_early_naming_dora(tiny_flux, dataset, tmp_path):
    with pytest.raises(ValueError, match=r"^dora cannot train on an fp8 base"):
        config(tiny_flux, dataset, tmp_path, dora=True, fp8_base=True)
    with pytest.raises(ValueError, match=r"^dora cannot be combined with blocks_to_swap"):
        config(tiny_flux, dataset, tmp_path, dora=True, gradient_checkpointing=True, blocks_to_swap=1)


# --------------------------------------------------------------------------------------------- total_steps
def test_auto_total_steps_is_the_plan_and_a_loop_past_the_schedule_refuses_before_its_first_step(
        tiny_flux, dataset, tmp_path):
    trainer = Trainer.from_config(config(tiny_flux, dataset, tmp_path, total_steps=0, tensorboard=False))
    with pytest.raises(ValueError, match=r"^total_steps: 0 \(auto\)"):
        trainer.train(1)
    execute(trainer, RunPlan(steps=2, save_every=2, save_state=False))
    assert trainer.config.total_steps == 2
    lora_before = {k: v.clone() for k, v in lora.lora_state(trainer.transformer).items()}
    with pytest.raises(PastScheduleError, match=r"^training to step 5 runs past total_steps 2, where the cosine "
                                                r"schedule ends: steps 3-5 would train at learning rate 0"):
        trainer.train(3)
    assert trainer.step == 2 and len(trainer.losses) == 2
    assert all(torch.equal(v, lora_before[k]) for k, v in lora.lora_state(trainer.transformer).items())
    constant = Trainer.from_config(config(tiny_flux, dataset, tmp_path, total_steps=1, lr_schedule="constant",
                                          tensorboard=False))
    assert constant.train(2) == 2  # a constant rate has no end to run past


# --------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files_hold_loss_lr_samples_and_grid(trained):
    trainer, folder = trained
    (run,) = (folder / "out" / "tensorboard" / "flux_tiny_demo").iterdir()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx(trainer.losses, rel=1e-6)
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx(trainer.lrs, rel=1e-6)
    sample = events.Images("samples/0")[0]  # the fixture's; later tests may render more
    assert sample.step == 2 and (sample.width, sample.height) == (64, 64)
    (grid,) = events.Images("xy_grid/0")
    assert grid.width > 2 * 64


def test_tensorboard_off_writes_nothing(tiny_flux, dataset, tmp_path):
    trainer = Trainer.from_config(config(tiny_flux, dataset, tmp_path, tensorboard=False))
    trainer.train(1)
    assert not (tmp_path / "out" / "tensorboard").exists()


# --------------------------------------------------------------------------------------------- true CFG
def test_true_cfg_renders_with_the_negative_prompt_only_when_on(trained):
    trainer, _ = trained
    render = dict(steps=2, width=64, height=64, seed=3)

    def pixels(**kwargs):
        return torch.from_numpy(np.asarray(trainer.sample(["fltglyph"], **render, **kwargs)[0]).copy())

    plain = pixels()
    assert torch.equal(pixels(negative_prompt="blurry"), plain)  # true_cfg_scale 1.0: off
    cfg = pixels(negative_prompt="blurry", true_cfg_scale=4.0)
    assert not torch.equal(cfg, plain)
    assert not torch.equal(pixels(negative_prompt="a cat", true_cfg_scale=4.0), cfg)  # the negative prompt counts
