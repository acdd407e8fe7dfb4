"""Augmentations: colour jitter, random crops and shuffled caption tags, as a bounded number of variants per image.

A step cannot encode anything (the VAE and the text encoders are freed before training), so each image gets
`augment_variants` jittered and cropped copies and each caption `caption_variants` tag orders, drawn once from the
run's seed and encoded with the rest of the cache. At each step the run's generator picks whether a sample is
jittered, cropped or shuffled, and which variant it gets: a resumed run replays the same picks.
"""
from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance

log = logging.getLogger(__name__)


class Variant(NamedTuple):
    """Which augmented copy of an image: the index of its colour jitter and of its crop, -1 for none."""

    jitter: int = -1
    crop: int = -1


PLAIN = Variant()


class Augment(NamedTuple):
    """A variant's parameters: jitter (brightness, contrast, saturation factors, hue shift in turns) and crop box
    (left, top, right, bottom in bucket pixels), each None when not applied."""

    jitter: tuple[float, float, float, float] | None = None
    crop: tuple[int, int, int, int] | None = None


NO_AUGMENT = Augment()


class AugmentSettings(NamedTuple):
    seed: int
    jitter_strength: tuple[float, ...]  # brightness, contrast, saturation, hue
    crop_scale: float  # smallest crop side as a share of the bucket's

    @classmethod
    def of(cls, config) -> "AugmentSettings":
        return cls(config.seed, tuple(config.color_jitter_strength), config.random_crop_scale)


def variants(color_jitter: float, random_crop: float, count: int) -> list[Variant]:
    """The augmented variants a run caches per image: jittered, cropped, and both (each only where it is on)."""
    ks = range(count)
    out = [Variant(k, -1) for k in ks] if color_jitter else []
    out += [Variant(-1, k) for k in ks] if random_crop else []
    return out + ([Variant(k, k) for k in ks] if color_jitter and random_crop else [])


def draw_variants(n: int, config, generator: torch.Generator) -> list[Variant]:
    """The step's variant for each of `n` samples, from the run's generator; no draw when augmentation is off, so a
    run without it draws exactly what it drew before augmentations existed."""
    if not (config.color_jitter or config.random_crop):
        return [PLAIN] * n
    jitter = torch.rand(n, generator=generator) < config.color_jitter
    crop = torch.rand(n, generator=generator) < config.random_crop
    which = (torch.rand(n, generator=generator) * config.augment_variants).long().clamp(max=config.augment_variants - 1)
    return [Variant(k if j else -1, k if c else -1) for j, c, k in zip(jitter.tolist(), crop.tolist(), which.tolist())]


def _rng(settings_seed: int, name: str, k: int, what: str) -> np.random.Generator:
    """The generator of one variant of one image: seeded by the run's seed, the image's file name and the index."""
    tag = int(hashlib.sha256(f"{what}\0{name}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng([settings_seed, k, tag])


def params(variant: Variant, name: str, bucket: tuple[int, int], settings: AugmentSettings) -> Augment:
    """The parameters of `variant` of the image file `name` in `bucket`: the same in every run of the same seed."""
    jitter = crop = None
    if variant.jitter >= 0:
        rng = _rng(settings.seed, name, variant.jitter, "jitter")
        b, c, s, h = settings.jitter_strength
        jitter = (1 + rng.uniform(-b, b), 1 + rng.uniform(-c, c), 1 + rng.uniform(-s, s), rng.uniform(-h, h))
    if variant.crop >= 0:
        rng = _rng(settings.seed, name, variant.crop, "crop")
        scale = rng.uniform(settings.crop_scale, 1.0)
        w, h = max(1, round(bucket[0] * scale)), max(1, round(bucket[1] * scale))
        x, y = int(rng.integers(0, bucket[0] - w + 1)), int(rng.integers(0, bucket[1] - h + 1))
        crop = (x, y, x + w, y + h)
    return Augment(jitter, crop)


def jitter(rgb: Image.Image, factors: tuple[float, float, float, float]) -> Image.Image:
    """Brightness, contrast and saturation scaled by their factors (PIL's ImageEnhance), then the hue turned."""
    brightness, contrast, saturation, hue = factors
    rgb = ImageEnhance.Brightness(rgb).enhance(brightness)
    rgb = ImageEnhance.Contrast(rgb).enhance(contrast)
    rgb = ImageEnhance.Color(rgb).enhance(saturation)
    if hue:
        h, s, v = rgb.convert("HSV").split()
        turned = ((np.asarray(h, dtype=np.int32) + round(hue * 256)) % 256).astype(np.uint8)
        rgb = Image.merge("HSV", (Image.fromarray(turned), s, v)).convert("RGB")
    return rgb


def caption_variants(caption: str, keep_tokens: int, count: int, seed: int) -> list[str]:
    """Up to `count` distinct orders of the caption's comma-separated tags, the caption itself first; the first
    `keep_tokens` tags stay in place (the trigger word is put first, so 1 keeps it there)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng = _rng(seed, caption, 0, "tags")
    out = [caption]
    for _ in range(4 * count):  # a few tags have fewer orders than asked: stop trying after a while
        if len(out) >= count:
            break
        order = ", ".join(kept + [rest[i] for i in rng.permutation(len(rest))])
        if order not in out:
            out.append(order)
    return out


def draw_captions(n: int, config, generator: torch.Generator) -> torch.Tensor | None:
    """Each sample's pick among its caption's variants, as a number in [0, 1); None when shuffling is off."""
    return torch.rand(n, generator=generator) if config.shuffle_caption else None


def shuffled_captions(records, config) -> dict[str, list[str]]:
    """With shuffle_caption, each distinct caption's tag orders (`caption_variants`), the cost logged."""
    if not config.shuffle_caption:
        return {}
    captions = list(dict.fromkeys(r.caption for r in records))
    orders = {c: caption_variants(c, config.keep_tokens, config.caption_variants, config.seed)
              for c in captions}
    total = sum(map(len, orders.values()))
    log.info("shuffle_caption: %d caption(s) -> %d tag orders to encode once (%.1fx the text encoding and its RAM; "
             "caption_variants %d)", len(captions), total, total / max(1, len(captions)), config.caption_variants)
    return orders
