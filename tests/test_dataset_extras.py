"""Masks, regularization images, shuffled caption tags and augmentations: found, checked, reported, cached, weighted
into the loss, and replayed exactly on resume."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from test_data import FakeTextEncoders, tiny_vae
from trainer_core import augment, lora, masks, output_guard
from trainer_core.augment import Augment, AugmentSettings, Variant
from trainer_core.caching import cache_dataset
from trainer_core.config import DatasetEntry, TrainConfig
from trainer_core.data import ImageRecord, load_image, load_mask, scan_datasets
from trainer_core.dataset_report import build_report, report_for_config
from trainer_core.demo import demo_config
from trainer_core.flow_matching import noisy_input_and_target, pack_latents, unpack_latents
from trainer_core.identity import dataset_identity
from trainer_core.preflight import check_cache_space
from trainer_core.trainer import Trainer
from trainer_core.training_step import weighted_mse
from trainer_core.validation import validation_loss

RED, BLUE, WHITE, BLACK = (220, 30, 40), (40, 70, 180), 255, 0


def picture(path: Path, size=(64, 64), mode="RGB", left=RED, right=BLUE) -> Path:
    """Left half `left`, right half `right`."""
    im = Image.new(mode, size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def left_mask(path: Path, size=(64, 64), mode="L", white=WHITE) -> Path:
    """White on the left half, black on the right."""
    return picture(path, size, mode, white, 0)


def entry(folder: Path, **kwargs) -> DatasetEntry:
    return DatasetEntry(str(folder), "sks", (64,), 1, **kwargs)


# --- finding and checking masks ----------------------------------------------------------------------------------


def test_masks_are_found_beside_under_masks_and_in_alpha_and_are_not_images(tmp_path):
    picture(tmp_path / "a.png")
    left_mask(tmp_path / "a_mask.png")
    picture(tmp_path / "b.png")
    left_mask(tmp_path / "masks" / "b.png")
    picture(tmp_path / "10_sub" / "c.png")
    left_mask(tmp_path / "masks" / "10_sub" / "c.jpg")
    picture(tmp_path / "d.png")  # no mask
    records = {r.path.name: r for r in scan_datasets([entry(tmp_path)])}
    assert sorted(records) == ["a.png", "b.png", "c.png", "d.png"]  # masks are not training images
    assert records["a.png"].mask == tmp_path / "a_mask.png"
    assert records["b.png"].mask == tmp_path / "masks" / "b.png"
    assert records["c.png"].mask == tmp_path / "masks" / "10_sub" / "c.jpg"
    assert records["d.png"].mask is None

    alpha = tmp_path / "alpha"
    rgba = Image.new("RGBA", (64, 64), (*RED, 0))
    rgba.paste((*RED, 255), (0, 0, 32, 64))
    alpha.mkdir()
    rgba.save(alpha / "e.png")
    picture(alpha / "f.png")  # no alpha: trained unmasked, and said so
    found = {r.path.name: r for r in scan_datasets([entry(alpha)], alpha_mask=True)}
    assert found["e.png"].mask == alpha / "e.png" and found["f.png"].mask is None
    assert scan_datasets([entry(alpha)])[0].mask is None  # alpha_mask off: no mask
    mask = load_mask(found["e.png"])
    assert mask.shape == (1, 64, 64) and mask[0, :, :31].min() == 1 and mask[0, :, 33:].max() == 0
    lines = build_report([entry(alpha)], alpha_mask=True).text().splitlines()
    assert any(line.startswith("  f.png") and line.endswith("(no alpha channel: trained unmasked)") for line in lines)
    assert any(line.startswith("  e.png") and line.endswith("mask alpha") for line in lines)


def test_hidden_input_cases_are_lines_in_the_report_never_a_traceback(tmp_path):
    picture(tmp_path / "wrong_size.png")
    left_mask(tmp_path / "wrong_size_mask.png", size=(32, 48))
    picture(tmp_path / "grey16.png")
    Image.fromarray((np.tile(np.r_[np.full(32, 65535), np.zeros(32)], (64, 1))).astype(np.uint16)).save(
        tmp_path / "grey16_mask.png")
    picture(tmp_path / "rgb.png")
    left_mask(tmp_path / "rgb_mask.png", mode="RGB", white=(255, 255, 255))
    left_mask(tmp_path / "orphan_mask.png")
    left_mask(tmp_path / "masks" / "nobody.png")
    picture(tmp_path / "black.png")
    left_mask(tmp_path / "black_mask.png", white=BLACK)
    picture(tmp_path / "broken.png")
    (tmp_path / "broken_mask.png").write_bytes(b"not a png")
    rgba = Image.new("RGBA", (64, 64), (*RED, 0))
    rgba.save(tmp_path / "transparent.png")

    report = build_report([entry(tmp_path)], alpha_mask=False)
    text = report.text()
    used = {im.path.name: im for im in report.scan.images}
    assert sorted(used) == ["grey16.png", "rgb.png", "transparent.png", "wrong_size.png"]
    assert "mask wrong_size_mask.png is 32x48 for a 64x64 image: stretched to fit" in text
    assert "1 mask(s) to check" in text
    skipped = {p.name: why for p, why in report.scan.skipped}
    assert skipped["orphan_mask.png"].startswith("a mask with no image") and "nobody.png" in skipped
    assert "is all black: nothing of it would train" in skipped["black.png"]
    assert "cannot be read" in skipped["broken.png"]
    assert "3 with a mask, 1 without" in report.summary()
    for name in ("grey16.png", "rgb.png", "wrong_size.png"):  # 16-bit, RGB and stretched masks all read 1 | 0
        mask = load_mask(next(r for r in report.records() if r.path.name == name))
        assert mask.shape == (1, 64, 64) and mask[0, :, :30].min() == 1 and mask[0, :, 34:].max() == 0, name

    with_alpha = build_report([entry(tmp_path)], alpha_mask=True)
    assert "its alpha channel is all zero (fully transparent): nothing of it would train" in with_alpha.text()


def test_masks_are_in_the_dataset_identity_and_so_is_regularization(tmp_path):
    picture(tmp_path / "10_sub" / "c.png")
    before = dataset_identity([entry(tmp_path)]).key
    left_mask(tmp_path / "masks" / "10_sub" / "c.png")  # two folders deep: listed as well
    with_mask = dataset_identity([entry(tmp_path)]).key
    assert with_mask != before
    assert dataset_identity([entry(tmp_path, is_reg=True)]).key != with_mask
    assert dataset_identity([entry(tmp_path, is_reg=False)]).key == with_mask


# --- masks follow the image --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("crop", [None, (8, 16, 40, 48)])
def test_flips_and_crops_move_the_mask_with_the_image(tmp_path, flip, crop):
    record = ImageRecord(picture(tmp_path / "a.png", (96, 64)), "", (64, 64), left_mask(tmp_path / "a_mask.png",
                                                                                       (96, 64)))
    aug = Augment(crop=crop)
    pixels, mask = load_image(record, flip, aug), load_mask(record, flip, aug)
    red = (pixels[0] > 0) & (pixels[2] < 0)  # (H, W): where the image is red
    assert mask.shape == (1, 64, 64)
    assert red.float().mean() > 0.2
    assert torch.equal(mask[0] > 0.5, red)
    assert red[:, -1].all() == flip and red[:, 0].all() != flip


def test_a_mask_is_cached_with_the_latents_and_in_their_key(tmp_path):
    image = picture(tmp_path / "a.png")
    mask = left_mask(tmp_path / "a_mask.png")
    record = ImageRecord(image, "sks", (64, 64), mask)
    vae, cache = tiny_vae(), tmp_path / "cache"
    first = cache_dataset([record], vae, FakeTextEncoders(), cache_dir=cache, flip=True, encoder_identity="x")
    sample, flipped = first.samples[0], first.flipped[0]
    assert sample.mask.shape == (1, 8, 8) and torch.equal(sample.mask[0, :, :4], torch.ones(8, 4))
    assert torch.equal(flipped.mask, sample.mask.flip(-1))
    plain = cache_dataset([ImageRecord(image, "sks", (64, 64))], vae, FakeTextEncoders(), cache_dir=cache,
                          encoder_identity="x")
    assert plain.samples[0].mask is None  # its own file: the masked one is not reused for it
    left_mask(mask, white=128)  # the mask edited: its latents file is another
    again = cache_dataset([record], vae, FakeTextEncoders(), cache_dir=cache, encoder_identity="x")
    assert again.samples[0].mask.max() == pytest.approx(128 / 255)


# --- the loss ----------------------------------------------------------------------------------------------------


def test_weights_are_packed_as_the_latents_and_floor_lifts_the_outside():
    mask = torch.zeros(2, 1, 4, 6)
    mask[0, :, 1, 3] = 1.0
    mask[1, :, :, :3] = 0.5
    w = masks.loss_weights(mask, 16, 0.1)
    assert w.shape == pack_latents(torch.zeros(2, 16, 4, 6)).shape
    assert torch.equal(unpack_latents(w, 4, 6), 0.1 + 0.9 * mask.expand(-1, 16, -1, -1))


def test_mask_floor_0_gives_exactly_zero_gradient_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    weights = masks.loss_weights(mask, 16, 0.0)
    pred = torch.randn(weights.shape, generator=g, requires_grad=True)
    weighted_mse(pred, torch.randn(weights.shape, generator=g), weights).backward()
    grad = unpack_latents(pred.grad, 8, 8)
    outside = mask.expand(-1, 16, -1, -1) == 0
    assert torch.all(grad[outside] == 0) and torch.all(grad[~outside] != 0)


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory) -> Path:
    """Two subjects on backgrounds, masks on the subject, captions of comma-separated tags; and a regularization
    folder of two plain pictures."""
    root = tmp_path_factory.mktemp("masked")
    (root / "train").mkdir()
    for i, colour in enumerate(((30, 110, 120), (220, 120, 40))):
        im = Image.new("RGB", (64, 64), colour)
        ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=RED)
        im.save(root / "train" / f"s{i}.png")
        m = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(m).ellipse((16, 16, 48, 48), fill=255)
        m.save(root / "train" / f"s{i}_mask.png")
        (root / "train" / f"s{i}.txt").write_text("red disc, round, centred, flat colour, on a background")
        picture(root / "reg" / f"r{i}.png", left=(128, 128, 128), right=colour)
        (root / "reg" / f"r{i}.txt").write_text("a disc, plain")
    return root


def extras_config(tiny_flux, root: Path, out: Path, **changes) -> TrainConfig:
    base = demo_config(tiny_flux, root / "train", out, steps=100)
    return base.replace(dataset_dir="", datasets=(DatasetEntry(str(root / "train")),
                                                  DatasetEntry(str(root / "reg"), "", is_reg=True)),
                        resolutions=(64,), rank=4, alpha=4.0, **changes)


def test_prior_loss_weight_scales_the_loss_of_regularization_images(tiny_flux, masked_data, tmp_path):
    def first_loss(weight: float, datasets) -> float:
        config = extras_config(tiny_flux, masked_data, tmp_path, prior_loss_weight=weight).replace(datasets=datasets)
        trainer = Trainer.from_config(config)
        trainer.train(1)
        loss = trainer.losses[0]
        trainer.release()
        return loss

    reg_only = (DatasetEntry(str(masked_data / "reg"), "", is_reg=True),)
    plain = first_loss(1.0, reg_only)
    assert first_loss(0.5, reg_only) == pytest.approx(0.5 * plain, rel=1e-5)
    assert first_loss(0.0, reg_only) == 0.0
    # in a mixed batch each sample's loss is weighted: (1 * training + w * regularization) / 2
    config = extras_config(tiny_flux, masked_data, tmp_path, prior_loss_weight=0.25, batch_size=4)
    trainer = Trainer.from_config(config)
    samples = trainer.dataset.samples
    weights, toward_base = masks.batch_weights(samples, 16, config)
    assert toward_base is None  # masked_prior_weight 0: no pull toward the base
    assert [s.is_reg for s in samples] == [False, False, True, True]
    for s, w in zip(samples, weights):
        inside = masks.loss_weights(s.mask[None], 16, 0.0)[0] if s.mask is not None else torch.ones_like(w)
        assert torch.equal(w, inside * (0.25 if s.is_reg else 1.0))
    trainer.release()


def test_the_masked_loss_gives_the_model_no_gradient_outside_the_mask(tiny_flux, masked_data, tmp_path, monkeypatch):
    config = extras_config(tiny_flux, masked_data, tmp_path).replace(datasets=(DatasetEntry(str(masked_data / "train")),))
    trainer = Trainer.from_config(config)
    seen = []
    predict = trainer.predict

    def keep(*args, **kwargs):
        pred = predict(*args, **kwargs)
        pred.retain_grad()
        seen.append(pred)
        return pred

    monkeypatch.setattr(trainer, "predict", keep)
    trainer._loss(trainer._next_batch()).backward()
    grad = unpack_latents(seen[0].grad, 8, 8)[0]  # (C, h, w)
    mask = trainer.dataset.samples[0].mask[0]
    assert torch.all(grad[:, mask == 0] == 0) and torch.all(grad[:, mask > 0].abs().sum(0) > 0)
    trainer.release()


def test_masked_prior_preservation_holds_the_outside_of_the_mask_to_the_base(tiny_flux, masked_data, tmp_path):
    """With masks and mask_floor 0 nothing teaches the LoRA outside the masks; masked_prior_weight pulls its
    prediction there toward the base model's own (the demo's learning test shows the subject is still learned)."""
    def outside_drift(prior: float) -> float:
        """The LoRA's mean squared distance from the base's prediction outside the mask, after 30 steps."""
        config = extras_config(tiny_flux, masked_data, tmp_path, masked_prior_weight=prior, learning_rate=2e-2,
                               lr_schedule="constant", warmup_steps=0).replace(
            datasets=(DatasetEntry(str(masked_data / "train")),))
        trainer = Trainer.from_config(config)
        trainer.train(30)
        sample = trainer.dataset.samples[0]
        x0 = pack_latents(sample.latents[None]).expand(3, -1, -1)
        sigmas = torch.tensor([0.9, 0.5, 0.2])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        x_t, _ = noisy_input_and_target(x0, noise, sigmas)
        args = (x_t, sample.prompt_embeds[None].expand(3, -1, -1), sample.pooled[None].expand(3, -1), sigmas,
                sample.latents.shape[-2:])
        with torch.no_grad():
            pred = trainer.predict(*args)
            with lora.adapter_off(trainer.transformer):
                base = trainer.predict(*args)
        trainer.release()
        outside = 1 - masks.loss_weights(sample.mask[None], 16, 0.0)
        return float(((pred - base).square() * outside).sum() / (3 * outside.sum()))

    assert outside_drift(1.0) < 0.2 * outside_drift(0.0)  # measured: 0.016 against 0.39


def test_the_validation_loss_weighs_masks_and_regularization_images_as_training_does(tiny_flux, masked_data, tmp_path):
    config = extras_config(tiny_flux, masked_data, tmp_path, validation_timesteps=2, prior_loss_weight=0.0)
    trainer = Trainer.from_config(config)
    images, regularization = trainer.dataset.samples[:2], trainer.dataset.samples[2:]
    assert all(s.mask is not None for s in images) and all(s.is_reg for s in regularization)
    assert validation_loss(trainer, regularization) == 0.0  # prior_loss_weight 0: not scored, as not trained
    inside = validation_loss(trainer, images)  # mask_floor 0: the error inside the masks only
    trainer.config = config.replace(mask_floor=1.0)  # every value weighs 1: the plain mean of the unmasked images
    assert validation_loss(trainer, images) == validation_loss(trainer, [replace(s, mask=None) for s in images])
    assert validation_loss(trainer, images) != inside
    trainer.release()


# --- caption tags and augmentations -------------------------------------------------------------------------------


def test_caption_variants_keep_the_first_tags_and_are_bounded_and_seeded():
    caption = "sks, red, round, centred, flat"
    variants = augment.caption_variants(caption, 1, 5, seed=3)
    assert variants[0] == caption and len(variants) == len(set(variants)) == 5
    assert all(v.startswith("sks, ") and sorted(v.split(", ")) == sorted(caption.split(", ")) for v in variants)
    assert variants == augment.caption_variants(caption, 1, 5, seed=3) != augment.caption_variants(caption, 1, 5, 4)
    assert all(v.startswith("sks, red, ") for v in augment.caption_variants(caption, 2, 5, seed=3))
    assert augment.caption_variants("sks, red", 1, 8, seed=3) == ["sks, red"]  # one order only


def test_augment_variants_are_seeded_per_image_and_stay_in_the_bucket():
    settings = AugmentSettings(seed=1, jitter_strength=(0.2, 0.2, 0.2, 0.05), crop_scale=0.5)
    a = augment.params(Variant(0, 0), "x.png", (128, 64), settings)
    assert a == augment.params(Variant(0, 0), "x.png", (128, 64), settings)
    assert a != augment.params(Variant(1, 1), "x.png", (128, 64), settings)
    assert a != augment.params(Variant(0, 0), "y.png", (128, 64), settings)
    left, top, right, bottom = a.crop
    assert 0 <= left < right <= 128 and 0 <= top < bottom <= 64 and (right - left) >= 64 - 1
    assert all(abs(f - 1) <= 0.2 for f in a.jitter[:3]) and abs(a.jitter[3]) <= 0.05
    assert augment.variants(0.5, 0.5, 2) == [Variant(0, -1), Variant(1, -1), Variant(-1, 0), Variant(-1, 1),
                                             Variant(0, 0), Variant(1, 1)]
    assert augment.variants(0.0, 0.0, 4) == [] and len(augment.variants(0.3, 0.0, 4)) == 4


def test_jitter_changes_colours_and_keeps_the_image(tmp_path):
    image = Image.new("RGB", (8, 8), RED)
    same = augment.jitter(image, (1.0, 1.0, 1.0, 0.0))
    assert np.array_equal(np.asarray(same), np.asarray(image))
    turned = np.asarray(augment.jitter(image, (1.2, 0.9, 1.1, 0.3)), dtype=np.float32)
    assert np.abs(turned - np.asarray(image, dtype=np.float32)).max() > 40


def test_augmented_copies_are_cached_bounded_and_named_in_the_report(tmp_path, masked_data):
    records = scan_datasets([DatasetEntry(str(masked_data / "train"), "sks", (64,), 1)])
    variants = augment.variants(0.5, 0.5, 2)
    settings = AugmentSettings(1, (0.2, 0.2, 0.2, 0.05), 0.6)
    cached = cache_dataset(records, tiny_vae(), FakeTextEncoders(), flip=True, variants=variants,
                           augment_settings=settings)
    assert set(cached.augmented) == {(f, v) for f in (False, True) for v in variants}
    cropped = cached.sample(0, False, Variant(-1, 0))
    assert not torch.equal(cropped.mask, cached.samples[0].mask)  # the crop moved the mask with the image
    assert not torch.equal(cached.sample(0, False, Variant(0, -1)).latents, cached.samples[0].latents)
    config = TrainConfig(transformer_path="t", vae_path="v", clip_path="c", t5_path="t5",
                         dataset_dir=str(masked_data / "train"), resolutions=(64,), flip_augment=True,
                         color_jitter=0.5, random_crop=0.5, augment_variants=2)
    report = report_for_config(config)
    assert report.latents_per_image == 2 * 7
    assert "Latents: 14 encoded copies of each image per bucket" in report.text()
    assert report.latent_cache_bytes() == 2 * 14 * (16 + 1) * 4 * 8 * 8


def test_the_cache_dir_must_have_room_for_every_augmented_copy(tmp_path, masked_data, monkeypatch):
    config = TrainConfig(transformer_path="t", vae_path="v", clip_path="c", t5_path="t5",
                         dataset_dir=str(masked_data / "train"), resolutions=(64,), flip_augment=True,
                         color_jitter=0.5, augment_variants=3, cache_dir=str(tmp_path / "cache"))
    report = report_for_config(config)
    needed = report.latent_cache_bytes()
    monkeypatch.setattr(output_guard, "free_bytes", lambda folder: needed - 1)
    with pytest.raises(ValueError, match=r"cache_dir: .* the latents of 8 copies of each image .* augment_variants"):
        check_cache_space(config.cache_dir, report)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "latents-earlier.safetensors").write_bytes(bytes(1))  # what is cached is not needed again
    check_cache_space(config.cache_dir, report)


def test_resume_is_exact_with_regularization_shuffled_captions_augmentations_and_masks(tiny_flux, masked_data,
                                                                                       tmp_path):
    config = extras_config(tiny_flux, masked_data, tmp_path, prior_loss_weight=0.5, shuffle_caption=True,
                           caption_variants=3, color_jitter=0.5, random_crop=0.5, augment_variants=2,
                           flip_augment=True, mask_floor=0.1, masked_prior_weight=0.5, batch_size=2,
                           caption_dropout=0.2)

    def trainer() -> Trainer:
        return Trainer.from_config(config)

    straight = trainer()
    straight.train(6)
    split = trainer()
    split.train(3)
    state = split.snapshot()
    split.train(2)  # wander off, then come back
    split.restore(state)
    split.train(3)
    assert all(math.isfinite(x) for x in straight.losses)
    assert split.losses == straight.losses
    assert len(straight.dataset.caption_variants) == 2
    assert all(len(v) == 3 for c, v in straight.dataset.caption_variants.items() if c.count(",") > 2)


# --- settings ----------------------------------------------------------------------------------------------------


def test_the_toml_and_the_node_mark_regularization_folders_and_settings_are_checked(tmp_path, monkeypatch):
    paths = {"transformer_path": "t", "vae_path": "v", "clip_path": "c", "t5_path": "t5"}
    config = TrainConfig.from_dict({**paths, "trigger_word": "sks", "datasets": [
        {"dataset_dir": "a"}, {"dataset_dir": "b", "trigger_word": "", "is_reg": True}],
        "color_jitter_strength": "0.2, 0.1, 0.1, 0.05"})
    assert [(e.trigger_word, e.is_reg) for e in config.dataset_entries()] == [("sks", False), ("", True)]
    assert config.color_jitter_strength == (0.2, 0.1, 0.1, 0.05)
    for values, match in ((dict(mask_floor=1.5), "mask_floor: 1.5"), (dict(prior_loss_weight=-1.0), "prior_loss_w"),
                          (dict(masked_prior_weight=float("nan")), "masked_prior_weight: nan"),
                          (dict(color_jitter=2.0), "color_jitter: 2.0"), (dict(caption_variants=0), "caption_vari"),
                          (dict(color_jitter_strength=[0.1, 0.1]), "color_jitter_strength: \\[0.1, 0.1\\]"),
                          (dict(random_crop_scale=0.0), "random_crop_scale"), (dict(augment_variants=0), "augment_v"),
                          (dict(datasets=[{"dataset_dir": "a", "is_reg": "maybe"}]), "datasets\\[0\\].is_reg")):
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict({**paths, "dataset_dir": "" if "datasets" in values else "a", **values})

    from nodes.init_trainer import parse_datasets

    monkeypatch.setenv("FLUX_LORA_TRAINER_BASE_DIR", str(tmp_path))
    (tmp_path / "input" / "cats").mkdir(parents=True)
    entries = parse_datasets("cats\ncats | | | | reg", "sks", "512", 1)
    assert [e.is_reg for e in entries] == [False, True]
    with pytest.raises(ValueError, match="line 1: .* has 5 parts"):
        parse_datasets("cats|a|512|1|extra\ncats", "", "512", 1)

