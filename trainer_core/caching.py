"""VAE latents and text embeddings, computed once per distinct image and caption, optionally cached on disk.

Nothing cached refers to the models, so the caller can free the VAE and the text encoders before training
(T5-XXL alone is ~9.5 GB in bf16). Texts are encoded first (`cache_text`: every text not on disk in one call, so
`models.TextEncoderFiles` can run T5 then CLIP, each loaded once and freed), images after, so that a caller that
loads the VAE only then never holds two models on the device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import augment
from .augment import PLAIN, AugmentSettings, Variant
from .checkpoints import save_safetensors
from .content_hash import content_identity
from .data import ImageRecord, load_image, load_mask
from .masks import latent_mask

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # part of every disk-cache key: bump it when what is stored changes

Key = TypeVar("Key", bound=Hashable)
Tensors = dict[str, torch.Tensor]


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt_embeds (B, L, D), pooled (B, D'); called once with every text to encode, which it batches."""
        ...


@dataclass
class CachedSample:
    """One `ImageRecord`, encoded; every tensor on the CPU.

    latents: (C, H/8, W/8) float32, (mode of the VAE posterior - shift_factor) * scaling_factor. The mode, not a
        sample, so that the cache is deterministic and a disk cache stays valid.
    prompt_embeds: (L, D) and pooled: (D',) in the text encoders' dtype.
    mask: (1, H/8, W/8) float32 in [0, 1], each latent's share of its mask's pixels; None without a mask.
    control_latents: Kontext: the control image's latents, like `latents` (the same bucket and flip); else None.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    caption: str
    bucket: tuple[int, int]
    mask: torch.Tensor | None = None
    is_reg: bool = False
    control_latents: torch.Tensor | None = None


def control_batch(samples: Sequence[CachedSample]) -> torch.Tensor | None:
    """Kontext: the samples' control latents stacked (B, C, h, w) (one bucket per batch); None for Flux."""
    return None if samples[0].control_latents is None else torch.stack([s.control_latents for s in samples])


@dataclass
class CachedDataset:
    records: list[ImageRecord]  # what was encoded, for `data.batches`
    samples: list[CachedSample]  # samples[i] encodes records[i]; repeats share their tensors
    flipped: list[CachedSample] | None  # flipped[i]: samples[i] with the image mirrored, same text; None without flip
    empty_prompt: tuple[torch.Tensor, torch.Tensor]  # (L, D), (D',) embeddings of "", swapped in for caption dropout
    # (flip, variant) -> the samples with that augmented copy of their image (`augment.variants`); empty without
    augmented: dict[tuple[bool, Variant], list[CachedSample]] = dataclasses.field(default_factory=dict)
    # caption -> embeddings of each of its shuffled tag orders, itself first (`augment.caption_variants`); empty without
    caption_variants: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=dict)

    def sample(self, index: int, flip: bool, variant: Variant = PLAIN) -> CachedSample:
        """Record `index`'s sample, mirrored or not, in the augmented copy `variant`."""
        if variant == PLAIN:
            return (self.flipped if flip else self.samples)[index]
        return self.augmented[(flip, variant)][index]

    def all_samples(self) -> list[CachedSample]:
        return [*self.samples, *(self.flipped or ()), *(s for v in self.augmented.values() for s in v)]


class _ImageKey(NamedTuple):
    path: Path
    bucket: tuple[int, int]
    flip: bool
    variant: Variant = PLAIN
    target: str = ""  # a Kontext control's: its target's file name, whose crop and colours each variant takes


def cache_text(
    texts: Sequence[str],
    text_encoders: TextEncoder,
    cache_dir: str | Path | None = None,
    encoder_identity: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Tensors]:
    """Each distinct text's {"prompt_embeds": (L, D), "pooled": (D',)}, on the CPU.

    With `cache_dir` (and `encoder_identity`, as `cache_dataset`), each is also a file there, read back by a later
    call. The texts not on disk go to `text_encoders.encode` in one call. `on_progress(done, total)` as they complete.
    """
    _check_identity(cache_dir, encoder_identity)
    texts = list(dict.fromkeys(texts))
    files = None if cache_dir is None else \
        {t: Path(cache_dir) / f"text-{_hash(encoder_identity, t)}.safetensors" for t in texts}

    def encode_text(prompts: list[str]) -> list[Tensors]:
        prompt_embeds, pooled = text_encoders.encode(prompts)
        return [{"prompt_embeds": e, "pooled": p} for e, p in zip(prompt_embeds.cpu(), pooled.cpu())]

    with torch.inference_mode(False), torch.no_grad():
        return _load_or_compute("texts", texts, encode_text, lambda t: None, max(1, len(texts)), files,
                                _Progress(len(texts), on_progress))


def cache_dataset(
    records: Sequence[ImageRecord],
    vae: AutoencoderKL,
    text_encoders: TextEncoder | dict[str, Tensors],
    cache_dir: str | Path | None = None,
    flip: bool = False,
    batch_size: int = 1,
    encoder_identity: str = "",
    on_progress: Callable[[int, int], None] | None = None,
    variants: Sequence[Variant] = (),
    augment_settings: AugmentSettings | None = None,
    caption_variants: dict[str, list[str]] | None = None,
) -> CachedDataset:
    """Encode every distinct (image, bucket, flip) with the VAE and every distinct caption, plus "", once.

    `text_encoders` may instead be `cache_text`'s result for those captions (and ""), encoded beforehand.
    With `cache_dir`, each result is also a safetensors file there, named by a hash of `encoder_identity` and
    either the image file's bytes, bucket and flip (latents) or the caption (text). A later call with the same
    data and identity reads them back without calling the models; a damaged file is recomputed with a warning.
    `encoder_identity` must identify the models (e.g. fingerprints of their files and the dtype) so that another
    model's cache is never used.

    `batch_size` images of one bucket go through the VAE together. `on_progress(done, total)` is called as items
    complete. Tensors come back as ordinary tensors even under `torch.inference_mode`.

    A record's mask (`data.load_mask`, downsampled to the latent grid) is cached with its latents and keyed on the
    mask file's bytes too. `variants` (with `augment_settings`): augmented copies of every image, encoded as well.
    `caption_variants`: each caption's shuffled tag orders, whose embeddings are looked up in the text cache.
    A Kontext record's control image is encoded as an image too, at the record's bucket, flip and augmented variants
    (its target's crop and colours: `control_latents`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1")
    _check_identity(cache_dir, encoder_identity)
    flips = (False, True) if flip else (False,)
    record_of = {_ImageKey(r.path, r.bucket, f, v): r for r in records for f in flips for v in (PLAIN, *variants)}
    # Kontext: controls encode as images do, at their target's bucket, flip and augmentation (the pair stays a pair)
    record_of |= {_ImageKey(r.control, r.bucket, f, v, r.path.name):
                  dataclasses.replace(r, path=r.control, control=None, mask=None)
                  for r in records if r.control is not None for f in flips for v in (PLAIN, *variants)}
    captions = list(dict.fromkeys(["", *(r.caption for r in records),
                                   *(c for r in records for c in (caption_variants or {}).get(r.caption, ()))]))
    total = len(record_of) + (0 if isinstance(text_encoders, dict) else len(captions))
    advance = _Progress(total, on_progress)
    if isinstance(text_encoders, dict):
        text = text_encoders
    else:
        def text_progress(done: int, _total: int) -> None:
            advance(done - advance.done)  # texts come first: the count so far is theirs

        text = cache_text(captions, text_encoders, cache_dir, encoder_identity, text_progress)

    latent_files = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        files = {r.path for r in record_of.values()} | {r.mask for r in record_of.values() if r.mask is not None}
        digests = {path: content_identity(path) for path in files}

        def name(k: _ImageKey) -> str:  # an unmasked, unaugmented image keeps the key it had before either existed
            mask = record_of[k].mask
            extra = () if mask is None else (("mask", "alpha" if mask == k.path else digests[mask]),)
            extra += () if k.variant == PLAIN else (tuple(params(k)),)
            return _hash(encoder_identity, digests[k.path], k.bucket, k.flip, *extra)

        latent_files = {k: cache_dir / f"latents-{name(k)}.safetensors" for k in record_of}

    def params(k: _ImageKey) -> augment.Augment:
        return augment.params(k.variant, k.target or k.path.name, k.bucket, augment_settings) if k.variant != PLAIN \
            else augment.NO_AUGMENT

    def encode_images(keys: list[_ImageKey]) -> list[Tensors]:
        pixels = torch.stack([load_image(record_of[k], k.flip, params(k)) for k in keys])  # (B, 3, H, W)
        out = [{"latents": x} for x in encode_pixels(vae, pixels)]
        for k, tensors in zip(keys, out):
            mask = load_mask(record_of[k], k.flip, params(k))
            if mask is not None:
                tensors["mask"] = latent_mask(mask)
        return out

    # ComfyUI runs nodes under inference_mode, whose tensors the training step could not save for backward
    with torch.inference_mode(False), torch.no_grad():
        latents = _load_or_compute(
            "latents", list(record_of), encode_images, lambda k: k.bucket, batch_size, latent_files, advance
        )

    def sample(record: ImageRecord, flipped: bool, variant: Variant = PLAIN) -> CachedSample:
        encoded = latents[_ImageKey(record.path, record.bucket, flipped, variant)]
        t = text[record.caption]
        control = None if record.control is None else \
            latents[_ImageKey(record.control, record.bucket, flipped, variant, record.path.name)]
        return CachedSample(encoded["latents"], t["prompt_embeds"], t["pooled"], record.caption, record.bucket,
                            encoded.get("mask"), record.is_reg, None if control is None else control["latents"])

    return CachedDataset(
        records=list(records),
        samples=[sample(r, False) for r in records],
        flipped=[sample(r, True) for r in records] if flip else None,
        empty_prompt=(text[""]["prompt_embeds"], text[""]["pooled"]),
        augmented={(f, v): [sample(r, f, v) for r in records] for f in ((False, True) if flip else (False,))
                   for v in variants},
        caption_variants={c: [(text[o]["prompt_embeds"], text[o]["pooled"]) for o in orders]
                          for c, orders in (caption_variants or {}).items()},
    )


def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/8, W/8) float32 latents on the CPU: the mode of the VAE's
    posterior, shifted and scaled as Flux takes them."""
    with torch.inference_mode(False), torch.no_grad():
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
    return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).cpu()


def _check_identity(cache_dir, encoder_identity: str) -> None:
    if cache_dir is not None and not encoder_identity:
        raise ValueError(
            "cache_dir is set but encoder_identity is empty: pass a string that identifies the VAE and text"
            " encoders (e.g. fingerprints of their files and the dtype) so that another model's cache is never reused"
        )


class _Progress:
    """`advance(n)`: n more items done of `total`, reported to `on_progress(done, total)`."""

    def __init__(self, total: int, on_progress: Callable[[int, int], None] | None):
        self.done, self.total, self.on_progress = 0, total, on_progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)


def _load_or_compute(
    what: str,
    keys: list[Key],
    compute: Callable[[list[Key]], list[Tensors]],
    group: Callable[[Key], Hashable],
    batch_size: int,
    files: dict[Key, Path] | None,
    advance: Callable[[int], None],
) -> dict[Key, Tensors]:
    """Each key's tensors: read from its file in `files` when that is valid, else computed `batch_size` keys of one
    `group` at a time (keys whose inputs stack together) and written to its file. `what` names them in the log."""
    results: dict[Key, Tensors] = {}
    if files is not None:
        for key in keys:
            if (tensors := _read_cache(files[key])) is not None:
                results[key] = tensors
                advance(1)
    pending: dict[Hashable, list[Key]] = {}
    for key in keys:
        if key not in results:
            pending.setdefault(group(key), []).append(key)
    for members in pending.values():
        for i in range(0, len(members), batch_size):
            chunk = members[i : i + batch_size]
            for key, tensors in zip(chunk, compute(chunk), strict=True):
                results[key] = tensors
                if files is not None:
                    save_safetensors(files[key], tensors)
            advance(len(chunk))
    n_read = len(keys) - sum(map(len, pending.values()))
    logger.info("%s: %d encoded, %d read from the cache", what, len(keys) - n_read, n_read)
    return results


def _read_cache(path: Path) -> Tensors | None:
    """The tensors in a cache file; None when it is missing or damaged (with a warning: it gets recomputed)."""
    if not path.exists():
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        logger.warning("cache file %s is damaged (%s): recomputing it", path, e)
        return None


def _hash(*parts: object) -> str:
    return hashlib.sha256(repr((CACHE_VERSION, *parts)).encode()).hexdigest()[:32]
