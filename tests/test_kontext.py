"""Kontext: control -> target pairs found by name, control latents cached beside the targets', the control tokens in
training and sampling as FluxKontextPipeline builds them."""
import dataclasses
from dataclasses import replace
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image

from trainer_core import augment, caching, data, dataset_report, lora, sampling
from trainer_core import flow_matching as fm
from trainer_core.config import DatasetEntry, TrainConfig
from trainer_core.demo import demo_config
from trainer_core.identity import dataset_changes, dataset_identity
from trainer_core.plan import RunPlan, execute, sample_control
from trainer_core.run_outputs import _settings
from trainer_core.trainer import Trainer
from trainer_core.validation import strength_grid
from pack import load_pack
from tests.test_sampling_plots import SCHEDULER, TRANSFORMER, VAE

SIZE = dict(width=32, height=48)
common = sys.modules[f"{load_pack().__name__}.nodes.common"]


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True).eval()


@pytest.mark.parametrize("control_size", [(6, 4), (4, 8)])  # the image's own latent size, and another
def test_sampling_with_a_control_image_matches_diffusers_kontext_pipeline(model, control_size):
    torch.manual_seed(0)
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**VAE),
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=model)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    embeds, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    control = torch.randn(1, 16, *control_size, generator=g)  # latents: the pipeline takes them as they are
    packed = pipe(image=control, generator=torch.Generator().manual_seed(5), output_type="latent",
                  num_inference_steps=4, guidance_scale=2.5, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                  max_area=SIZE["width"] * SIZE["height"], **SIZE).images
    ours = sampling.sample_latents(model, embeds, pooled, **SIZE, steps=4, guidance=2.5, seed=5,
                                   control_latents=control)
    torch.testing.assert_close(fm.pack_latents(ours), packed, rtol=0, atol=1e-4)
    plain = sampling.sample_latents(model, embeds, pooled, **SIZE, steps=4, guidance=2.5, seed=5)
    assert (plain - ours).abs().max() > 1e-3  # the control image is really seen


# ------------------------------------------------------------------------------------------------ pairs and caching
def write_pairs(folder, names=("a", "b"), size=(64, 64), control_size=(64, 64), extra_controls=()) -> tuple:
    """Targets with captions in folder/targets, controls of the same names (as .jpg) in folder/controls."""
    targets, controls = folder / "targets", folder / "controls"
    targets.mkdir(parents=True, exist_ok=True)
    controls.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (40 * i, 200, 90)).save(targets / f"{name}.png")
        (targets / f"{name}.txt").write_text(f"put the glyph on picture {name}")
    for i, name in enumerate([*names, *extra_controls]):
        Image.new("RGB", control_size, (200, 30 * i, 60)).save(controls / f"{name}.jpg")
    return targets, controls


def kontext_entry(targets, controls, resolutions=(64,)) -> DatasetEntry:
    return DatasetEntry(str(targets), "", resolutions, 1, str(controls))


def test_pairs_by_name_and_every_unpaired_file_is_named(tmp_path):
    targets, controls = write_pairs(tmp_path, names=("a", "b", "c"), extra_controls=("orphan",))
    (controls / "c.jpg").unlink()  # c has no control
    (controls / "b.jpg").write_bytes(b"not an image")  # b's control cannot be read
    scan = data.inspect_datasets([kontext_entry(targets, controls)])
    assert [(im.path.name, im.control.name) for im in scan.images] == [("a.png", "a.jpg")]
    assert [r.control for r in scan.records()] == [controls / "a.jpg"]
    reasons = {p.name: why for p, why in scan.skipped}
    assert "no control image named c.*" in reasons["c.png"]
    assert "control image" in reasons["b.png"] and "cannot be read" in reasons["b.png"]
    assert "no target image named orphan.*" in reasons["orphan.jpg"]
    report = dataset_report.build_report([kontext_entry(targets, controls)])
    assert "3 skipped" in report.summary() and "orphan.jpg" in report.text()


def test_a_control_of_another_aspect_is_fitted_to_the_bucket_and_reported(tmp_path):
    targets, controls = write_pairs(tmp_path, names=("a",), size=(64, 64), control_size=(128, 64))
    report = dataset_report.build_report([kontext_entry(targets, controls)])
    assert any("cropped to its bucket" in line and "a.jpg" in line for _, line in report.findings())
    assert "control a.jpg 128x64" in report.text()


def test_the_latent_budget_counts_the_controls(tmp_path):
    targets, controls = write_pairs(tmp_path, names=("a", "b"))
    alone = dataset_report.build_report([DatasetEntry(str(targets), "", (64,), 1)], latents_per_image=3)
    paired = dataset_report.build_report([kontext_entry(targets, controls)], latents_per_image=3)
    assert paired.latent_cache_bytes() == 2 * alone.latent_cache_bytes() == 2 * 2 * 3 * 16 * 4 * 8 * 8


def test_control_folder_inside_the_dataset_holds_no_targets(tmp_path):
    targets, _ = write_pairs(tmp_path, names=("a",))
    inner = targets / "control"
    inner.mkdir()
    Image.new("RGB", (64, 64), "red").save(inner / "a.png")
    scan = data.inspect_datasets([kontext_entry(targets, inner)])
    assert [(im.path, im.control) for im in scan.images] == [(targets / "a.png", inner / "a.png")]


def test_control_latents_are_cached_with_the_targets_and_flip_with_them(tmp_path):
    targets, controls = write_pairs(tmp_path, names=("a",))
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    records = data.scan_datasets([kontext_entry(targets, controls)])
    text = {c: {"prompt_embeds": torch.zeros(4, 32), "pooled": torch.zeros(32)} for c in ["", records[0].caption]}
    cached = caching.cache_dataset(records, vae, text, flip=True)
    sample, flipped = cached.samples[0], cached.flipped[0]
    control_pixels = data.load_image(dataclasses.replace(records[0], path=controls / "a.jpg"))
    torch.testing.assert_close(sample.control_latents, caching.encode_pixels(vae, control_pixels[None])[0])
    torch.testing.assert_close(flipped.control_latents,
                               caching.encode_pixels(vae, control_pixels.flip(-1)[None])[0])
    assert not torch.equal(sample.control_latents, sample.latents)


def test_each_augmented_copy_of_a_control_takes_its_targets_crop_and_colours(tmp_path):
    """A pair whose control is its target's own picture: every jittered, cropped and flipped copy of the control is
    the target's copy, so the pair still shows the same edit (here: none)."""
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    targets.mkdir()
    controls.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        picture.save(targets / f"{name}.png")
        picture.save(controls / f"{name}.bmp")  # lossless, under another file name than its target's
        (targets / f"{name}.txt").write_text("keep it")
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    records = data.scan_datasets([kontext_entry(targets, controls)])
    text = {c: {"prompt_embeds": torch.zeros(4, 32), "pooled": torch.zeros(32)} for c in ["", "keep it"]}
    variants = augment.variants(1.0, 1.0, 2)
    cached = caching.cache_dataset(records, vae, text, flip=True, variants=variants,
                                   augment_settings=augment.AugmentSettings(7, (0.3, 0.3, 0.3, 0.05), 0.6))
    assert len(cached.augmented) == 2 * len(variants)
    for (flipped, variant), samples in cached.augmented.items():
        plain = cached.flipped if flipped else cached.samples
        for sample, unaugmented in zip(samples, plain):
            torch.testing.assert_close(sample.control_latents, sample.latents, atol=1e-5, rtol=0)
            assert not torch.allclose(sample.latents, unaugmented.latents, atol=1e-3)  # the copy is augmented


def test_config_asks_for_pairs_only_with_kontext(tmp_path):
    paths = dict(transformer_path="t", vae_path="v", clip_path="c", t5_path="t5", dataset_dir=str(tmp_path))
    with pytest.raises(ValueError, match="control_dir: empty; model_type kontext"):
        TrainConfig(**paths, model_type="kontext")
    with pytest.raises(ValueError, match="control_dir: .* is for Kontext pairs"):
        TrainConfig(**paths, control_dir=str(tmp_path))
    with pytest.raises(ValueError, match="model_type: 'sd3'"):
        TrainConfig(**paths, model_type="sd3")
    with pytest.raises(ValueError, match="validation_dir: held-out images have no control images"):
        TrainConfig(**paths, model_type="kontext", control_dir=str(tmp_path), validation_dir=str(tmp_path))
    entries = TrainConfig(**{**paths, "dataset_dir": ""}, model_type="kontext", datasets=(
        {"dataset_dir": "a", "control_dir": "ca"}, {"dataset_dir": "b"}), control_dir="top").dataset_entries()
    assert [e.control_dir for e in entries] == ["ca", "top"]


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def kontext_trainer(tiny_flux, pairs, tmp_path, **changes) -> Trainer:
    targets, controls = pairs
    config = demo_config(tiny_flux, targets, tmp_path / "out", steps=20).replace(
        resolutions=(64,), model_type="kontext", control_dir=str(controls), **changes)
    return Trainer.from_config(config)


def test_training_sees_the_control_tokens(tiny_flux, pairs, tmp_path):
    trainer = kontext_trainer(tiny_flux, pairs, tmp_path)
    sample = trainer.dataset.samples[0]
    assert sample.control_latents is not None and sample.control_latents.shape == sample.latents.shape
    x_t = fm.pack_latents(torch.randn(1, *sample.latents.shape))
    args = (x_t, sample.prompt_embeds[None], sample.pooled[None], torch.tensor([0.7]), sample.latents.shape[-2:])
    with torch.no_grad():
        with_control = trainer.predict(*args, sample.control_latents[None])
        without = trainer.predict(*args)
        other = trainer.predict(*args, torch.randn_like(sample.control_latents)[None])
    assert with_control.shape == without.shape == x_t.shape
    assert not torch.allclose(with_control, other)  # the velocity depends on the control image


@pytest.mark.parametrize("augmentations", [{}, dict(flip_augment=True, color_jitter=0.5, random_crop=0.5,
                                                    augment_variants=2)], ids=["plain", "augmented"])
def test_a_kontext_run_resumes_exactly(tiny_flux, pairs, tmp_path, augmentations):
    trainer = kontext_trainer(tiny_flux, pairs, tmp_path, **augmentations)
    trainer.train(4)
    state = trainer.snapshot()
    trainer.train(3)
    resumed = kontext_trainer(tiny_flux, pairs, tmp_path, **augmentations)
    resumed.restore(state)
    resumed.train(3)
    assert resumed.losses == trainer.losses
    for k, v in lora.lora_state(trainer.transformer).items():
        assert torch.equal(lora.lora_state(resumed.transformer)[k], v), k


# ------------------------------------------------------------------------------------------------ judging
def test_samples_and_the_grid_take_a_control_image_and_a_flux_run_refuses_one(tiny_flux, pairs, tmp_path):
    trainer = kontext_trainer(tiny_flux, pairs, tmp_path)
    trainer.train(2)
    control = Image.new("RGB", (96, 64), (10, 200, 30))  # another size: fitted to the sample's
    kwargs = dict(steps=2, width=64, height=64, seed=3)
    plain = np.asarray(trainer.sample(["put the glyph"], **kwargs)[0])
    edited = np.asarray(trainer.sample(["put the glyph"], control_image=control, **kwargs)[0])
    assert edited.shape == plain.shape and not np.array_equal(edited, plain)
    state = lora.lora_state(trainer.transformer)
    with_control = strength_grid(trainer, [(2, state)], [0.0, 1.0], "put the glyph", control_image=control, **kwargs)
    without = strength_grid(trainer, [(2, state)], [0.0, 1.0], "put the glyph", **kwargs)
    assert with_control.width == without.width + 64 and with_control.height == without.height  # a control column
    flux = Trainer.from_config(demo_config(tiny_flux, pairs[0], tmp_path / "flux", steps=20).replace(resolutions=(64,)))
    with pytest.raises(ValueError, match="control_image: this run trains model_type flux"):
        flux.sample(["x"], control_image=control, **kwargs)


def test_the_nodes_pass_a_comfyui_image_as_the_control(tmp_path):
    image = torch.rand(2, 40, 56, 3)  # a ComfyUI IMAGE batch: the first is used
    kwargs = common.sampling_kwargs(seed=1, steps=2, guidance=2.5, width=64, height=64, base="training base",
                                    control_image=image)
    control = kwargs["control_image"]
    assert control.size == (56, 40) and control.mode == "RGB"
    assert np.abs(np.asarray(control, dtype=np.float32) / 255 - image[0].numpy()).max() <= 0.5 / 255 + 1e-6
    assert common.sampling_kwargs(seed=1, steps=2, guidance=2.5, width=64, height=64,
                                  base="training base")["control_image"] is None
    # the run store keys images by the control's pixels: another picture renders anew, the same one is found again
    first = _settings({"seed": 1, "control_image": control})
    assert first == _settings({"seed": 1, "control_image": control.copy()})
    assert first != _settings({"seed": 1, "control_image": Image.new("RGB", (56, 40))})
    assert _settings({"seed": 1, "control_image": None}) == {"seed": 1}  # keys of earlier images unchanged


def test_the_control_images_are_part_of_the_dataset_identity(tmp_path):
    targets, controls = write_pairs(tmp_path)
    before = dataset_identity([kontext_entry(targets, controls)])
    assert before.key != dataset_identity([DatasetEntry(str(targets), "", (64,), 1)]).key
    moved = shutil.copytree(controls, tmp_path / "moved")  # the same files (and mtimes) elsewhere: the same data
    assert dataset_identity([kontext_entry(targets, moved)]).key == before.key
    Image.new("RGB", (64, 64), "white").save(moved / "a.jpg")
    after = dataset_identity([kontext_entry(targets, moved)])
    assert after.key != before.key and "edited control/a.jpg" in dataset_changes(before.listing, after.listing)


def test_a_cli_plan_edits_the_first_pairs_control_or_the_one_it_names(tiny_flux, pairs, tmp_path):
    trainer = kontext_trainer(tiny_flux, pairs, tmp_path)
    plan = RunPlan(steps=2, save_every=1, save_state=False, prompts=("put the glyph",), strengths=(0.0, 1.0),
                   sample_steps=2, sample_width=64, sample_height=64)
    assert sample_control(plan, trainer.dataset.records).getpixel((0, 0)) == Image.open(pairs[1] / "a.jpg").getpixel((0, 0))
    result = execute(trainer, plan)
    assert len(result.samples) == 2 and Image.open(result.grid).width > 3 * 64  # a control column and two strengths
    named = Image.new("RGB", (64, 64), "blue")
    named.save(tmp_path / "edit_me.png")
    own = sample_control(replace(plan, sample_control=str(tmp_path / "edit_me.png")), trainer.dataset.records)
    assert own.getpixel((5, 5)) == named.getpixel((5, 5))
    (tmp_path / "broken.png").write_bytes(b"no image")
    with pytest.raises(ValueError, match="plan.sample_control: .*broken.png cannot be read as an image"):
        sample_control(replace(plan, sample_control=str(tmp_path / "broken.png")), trainer.dataset.records)
