"""The dataset report: what a run will train on, and what in it is likely to spoil the LoRA, before any model loads.

Per image: its size, bucket and any upscaling; across images: near-duplicates (perceptual hash), images trained
below the asked resolution, missing / empty / over-long captions, trigger-word coverage and caption word counts.
Serious findings are the ones worth fixing before hours of training; `preflight` logs them as warnings.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import augment, data
from .config import DatasetEntry

logger = logging.getLogger(__name__)

HASH_SIZE = 8  # the perceptual hash keeps the 8x8 lowest frequencies of a 32x32 grey image: 64 bits
NEAR_DUPLICATE_BITS = 10  # hashes at most this many bits apart (of 64) are near-duplicates; unrelated photos differ by ~32
NEAR_DUPLICATE_COLOUR = 24  # ... if their mean colours also differ by at most this much per channel (of 255): the
#                             same scene in another colour (a subject on a teal, then an orange background) is not one
UNDERSIZED_AREA = 0.75  # an image of under this share of R² pixels (R: its entry's largest resolution) trains small
THUMB = 128  # contact-sheet tile side, px
MAX_SHEET_IMAGES = 400  # the contact sheet shows at most this many images (the text report lists all)
TOP_WORDS = 30
_DCT = np.cos(np.pi / 64 * np.outer(np.arange(HASH_SIZE), 2 * np.arange(32) + 1))  # (8, 32): DCT-II rows 0..7


@dataclass
class DatasetReport:
    entries: tuple[DatasetEntry, ...]
    scan: data.DatasetScan
    near_duplicates: list[tuple[Path, Path, int]]  # (image, image, hash bits apart), closest first
    dropped_tokens: dict[Path, int] | None  # over-long captions -> T5 tokens cut off; None when not checked
    token_limit: int | None  # T5 tokens a caption may have (max_sequence_length)
    thumbnails: dict[Path, Image.Image] = field(default_factory=dict, repr=False)
    latents_per_image: int = 1  # encoded copies of each image in each bucket: flipped and augmented ones included

    def masked(self) -> list[data.ScannedImage]:
        return [im for im in self.scan.images if im.mask is not None]

    def latent_cache_bytes(self) -> int:
        """About what the images' latents (and masks, and Kontext controls) take in RAM, and on disk with a
        cache_dir: float32, 16 channels (1 more for a mask, 16 more for a control) per 8x8 pixels, for every bucket
        and copy."""
        per_pixel = {im.path: (16 + (im.mask is not None) + 16 * (im.control is not None)) * 4 / 64
                     for im in self.scan.images}
        return int(sum(per_pixel[im.path] * w * h for im in self.scan.images for w, h in im.buckets)
                   * self.latents_per_image)

    def records(self) -> list[data.ImageRecord]:
        return self.scan.records()

    def undersized(self) -> list[data.ScannedImage]:
        """Images too small for their entry's largest resolution: they train in a smaller bucket."""
        return [im for im in self.scan.images
                if math.prod(im.size) < UNDERSIZED_AREA * max(self.entries[im.entry].resolutions) ** 2]

    def cropped_controls(self) -> list[data.ScannedImage]:
        """Kontext: images whose control image has another aspect ratio (over 2% apart), so fitting it to the image's
        bucket crops it."""
        return [im for im in self.scan.images if im.control_size is not None
                and abs(math.log(im.size[0] * im.control_size[1] / (im.size[1] * im.control_size[0]))) > 0.02]

    def caption_issues(self) -> dict[str, list[Path]]:
        """"missing", "empty", "not UTF-8" -> the images whose caption file has that issue."""
        issues: dict[str, list[Path]] = {}
        for im in self.scan.images:
            if im.caption_issue:
                issues.setdefault(im.caption_issue, []).append(im.path)
        return issues

    def findings(self) -> list[tuple[bool, str]]:
        """(serious, one line) for each problem found; serious ones are worth fixing before training."""
        out = []
        if self.scan.skipped:
            out.append((True, f"{len(self.scan.skipped)} file(s) skipped: {_names(p for p, _ in self.scan.skipped)}"))
        if self.near_duplicates:
            pairs = ", ".join(f"{a.name} ~ {b.name}" for a, b, _ in self.near_duplicates[:5])
            out.append((True, f"{len(self.near_duplicates)} near-duplicate pair(s) (perceptual hash within "
                              f"{NEAR_DUPLICATE_BITS}/64 bits, mean colour within {NEAR_DUPLICATE_COLOUR}/255): {pairs}"
                              f"{' ...' if len(self.near_duplicates) > 5 else ''}"))
        small = self.undersized()
        if small:
            out.append((True, f"{len(small)} of {len(self.scan.images)} image(s) smaller than their resolution train "
                              f"in a smaller bucket: {_names(im.path for im in small)}"))
        cropped = self.cropped_controls()
        if cropped:
            out.append((True, f"{len(cropped)} control image(s) of another aspect ratio than their image are cropped to "
                              f"its bucket: {_names(im.control for im in cropped)}"))
        notes = [im for im in self.scan.images if im.mask_note]
        if notes:
            out.append((True, f"{len(notes)} mask(s) to check: " + "; ".join(f"{im.path.name}: {im.mask_note}"
                                                                           for im in notes[:5])
                        + (" ..." if len(notes) > 5 else "")))
        for issue, paths in self.caption_issues().items():
            serious = issue != "not UTF-8"
            out.append((serious, f"{len(paths)} caption file(s) {issue}: {_names(paths)}"))
        if self.dropped_tokens:
            worst = sorted(self.dropped_tokens.items(), key=lambda kv: -kv[1])
            out.append((True, f"{len(worst)} caption(s) longer than T5's {self.token_limit} tokens lose their end: "
                              + ", ".join(f"{p.name} ({n} tokens dropped)" for p, n in worst[:5])))
        for i, entry in enumerate(self.entries):
            if not any(im.trigger_word for im in self.scan.images if im.entry == i):
                out.append((False, f"{entry.dataset_dir}: no trigger word; the LoRA will have no word of its own"))
        return out

    def summary(self) -> str:
        images, records = self.scan.images, self.records()
        buckets = Counter(r.bucket for r in records)
        serious = sum(s for s, _ in self.findings())
        reg = sum(im.is_reg for im in images)
        reg_records = sum(r.is_reg for r in records)
        return (f"dataset: {len(images)} image(s) used, {len(self.scan.skipped)} skipped, {len(records)} records per "
                f"epoch in {len(buckets)} bucket(s) over {len(self.entries)} folder(s)"
                + (f"; {reg} of them regularization images ({reg_records} records)" if reg else "")
                + (f"; {len(self.masked())} with a mask, {len(images) - len(self.masked())} without"
                   if self.masked() else "") + f"; {serious} serious finding(s)")

    def text(self) -> str:
        """The whole report, plain text."""
        lines = [self.summary(), ""]
        findings = self.findings()
        lines += ["Findings:"] + [f"  {'!!' if s else '--'} {t}" for s, t in findings] if findings else ["No findings."]
        for i, entry in enumerate(self.entries):
            images = [im for im in self.scan.images if im.entry == i]
            lines += ["", f"Folder {entry.dataset_dir}{' (regularization)' if entry.is_reg else ''}: resolutions "
                          f"{','.join(map(str, entry.resolutions))}, {len(images)} image(s), "
                          f"{sum(im.mask is not None for im in images)} with a mask"]
            for trigger, group in _groups(images, lambda im: im.trigger_word):
                have = sum(_has_word(im.caption_file_text, trigger) for im in group) if trigger else 0
                lines.append(f"  trigger {trigger!r}: already in {have} of {len(group)} caption(s), prepended to the "
                             f"rest" if trigger else f"  no trigger word for {len(group)} image(s)")
            for im in images:
                control = f"  control {im.control.name} {im.control_size[0]}x{im.control_size[1]}" if im.control else ""
                lines.append(f"  {_rel(im.path, entry)}  {im.size[0]}x{im.size[1]} -> {_buckets(im)}  "
                             f"x{im.repeats}{'  caption ' + im.caption_issue if im.caption_issue else ''}"
                             f"{'  mask ' + _mask_name(im, entry) if im.mask is not None else ''}"
                             f"{'  (' + im.mask_note + ')' if im.mask_note else ''}{control}")
        if self.scan.skipped:
            lines += ["", "Skipped:"] + [f"  {p}: {why}" for p, why in self.scan.skipped]
        lines += ["", "Caption lengths: " + ("not checked (no T5 tokenizer given)" if self.dropped_tokens is None else
                                             f"all within T5's {self.token_limit} tokens" if not self.dropped_tokens else
                                             f"{len(self.dropped_tokens)} over T5's {self.token_limit} tokens")]
        lines += ["", f"Latents: {self.latents_per_image} encoded cop{'y' if self.latents_per_image == 1 else 'ies'} "
                      f"of each image per bucket (flips and augment_variants), about "
                      f"{self.latent_cache_bytes() / 2**20:.1f} MiB in RAM and, with a cache_dir, on disk"]
        words = word_frequency(im.caption for im in self.scan.images)
        lines += ["", f"Caption words (captions holding each, top {TOP_WORDS}):",
                  "  " + ", ".join(f"{w} {n}" for w, n in words.most_common(TOP_WORDS))]
        return "\n".join(lines)

    def contact_sheet(self) -> Image.Image:
        """Thumbnails labelled with name, size and bucket; images with a serious finding framed in red."""
        flagged = {p for a, b, _ in self.near_duplicates for p in (a, b)} | {im.path for im in self.undersized()}
        flagged |= {p for issue, ps in self.caption_issues().items() if issue != "not UTF-8" for p in ps}
        flagged |= set(self.dropped_tokens or ()) | {im.path for im in self.cropped_controls()}
        shown = [im for im in self.scan.images if im.path in self.thumbnails][:MAX_SHEET_IMAGES]
        cols = max(1, min(10, len(shown)))
        font = ImageFont.load_default(size=11)
        tile_w, tile_h = THUMB + 8, THUMB + 36
        sheet = Image.new("RGB", (cols * tile_w, max(1, math.ceil(len(shown) / cols)) * tile_h), "white")
        draw = ImageDraw.Draw(sheet)
        for k, im in enumerate(shown):
            x, y = k % cols * tile_w, k // cols * tile_h
            thumb = self.thumbnails[im.path]
            sheet.paste(thumb, (x + 4 + (THUMB - thumb.width) // 2, y + 4 + (THUMB - thumb.height) // 2))
            if im.path in flagged:
                draw.rectangle((x + 1, y + 1, x + tile_w - 2, y + THUMB + 6), outline="red", width=3)
            name = im.path.name if len(im.path.name) <= 22 else im.path.name[:20] + "…"
            draw.text((x + 4, y + THUMB + 8), name, font=font, fill="black")
            draw.text((x + 4, y + THUMB + 21), f"{im.size[0]}x{im.size[1]} > {_buckets(im)}", font=font,
                      fill="red" if im.path in flagged else "dimgray")
        return sheet


def build_report(entries: Sequence[DatasetEntry], caption_extension: str = ".txt", t5_tokenizer=None,
                 token_limit: int | None = None, thumbnails: bool = True, alpha_mask: bool = False,
                 latents_per_image: int = 1) -> DatasetReport:
    """Scan the entries (`data.inspect_datasets`), hash every image as the scan decodes it, and count caption tokens
    when a T5 tokenizer and its limit are given. No model is loaded and no image is decoded twice."""
    hashes, thumbs = {}, {}

    def look(path: Path, image: Image.Image) -> None:  # each image as the scan decodes it
        small = ImageOps.exif_transpose(image)
        small.thumbnail((2 * THUMB, 2 * THUMB))
        small = data.to_rgb(small)
        hashes[path] = (perceptual_hash(small), np.asarray(small, dtype=np.float32).mean(axis=(0, 1)))
        if thumbnails and len(thumbs) < MAX_SHEET_IMAGES:
            thumbs[path] = ImageOps.contain(small, (THUMB, THUMB))

    scan = data.inspect_datasets(entries, caption_extension, look, alpha_mask)
    used = {im.path for im in scan.images}  # an image can fail its checks after it was looked at
    hashes = {p: h for p, h in hashes.items() if p in used}
    dropped = None
    if t5_tokenizer is not None and token_limit:
        dropped = caption_overflow({im.path: im.caption for im in scan.images}, t5_tokenizer, token_limit)
    return DatasetReport(tuple(entries), scan, near_duplicates(hashes), dropped, token_limit, thumbs, latents_per_image)


def report_for_config(config, thumbnails: bool = False) -> DatasetReport:
    """The report of a `TrainConfig`'s datasets, caption lengths counted with its T5 tokenizer files (no model)."""
    folder = config.t5_tokenizer_dir or (str(Path(config.tokenizer_dir) / "t5") if config.tokenizer_dir else "")
    copies = (1 + config.flip_augment) * (1 + len(augment.variants(config.color_jitter, config.random_crop,
                                                                   config.augment_variants)))
    return build_report(config.dataset_entries(), t5_tokenizer=load_t5_tokenizer(folder),
                        token_limit=config.max_sequence_length, thumbnails=thumbnails, alpha_mask=config.alpha_mask,
                        latents_per_image=copies)


def load_t5_tokenizer(folder: str | Path):
    """The T5 tokenizer from its files alone (tokenizer.json), or None (and a note) when there are none."""
    if not folder:
        return None
    if not (Path(folder) / "tokenizer.json").is_file():
        logger.info("no T5 tokenizer.json in %s: caption lengths are not checked", folder)
        return None
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)


def caption_overflow(captions: dict[Path, str], tokenizer, limit: int) -> dict[Path, int]:
    """The captions longer than `limit` tokens (end-of-text included, as the encoder sees them) -> tokens dropped."""
    unique = list(dict.fromkeys(captions.values()))
    lengths = dict(zip(unique, (len(ids) for ids in tokenizer(unique).input_ids))) if unique else {}
    return {p: lengths[c] - limit for p, c in captions.items() if lengths[c] > limit}


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: the signs, against their median, of the 8x8 lowest DCT frequencies of a 32x32 grey copy.

    Survives resizing, re-encoding and small colour changes; differs in about half the bits between unrelated
    images."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T).ravel()  # (64,)
    bits = low > np.median(low[1:])  # the DC term (overall brightness) is left out of the median
    return int("".join("1" if b else "0" for b in bits), 2)


def near_duplicates(hashes: dict[Path, tuple[int, np.ndarray]]) -> list[tuple[Path, Path, int]]:
    """Pairs of images, each given as (perceptual hash, mean RGB), whose hashes differ in at most
    NEAR_DUPLICATE_BITS bits and whose mean colours are within NEAR_DUPLICATE_COLOUR; closest first."""
    items = list(hashes.items())
    pairs = [(a, b, (ha ^ hb).bit_count()) for i, (a, (ha, ca)) in enumerate(items) for b, (hb, cb) in items[i + 1:]
             if np.abs(ca - cb).max() <= NEAR_DUPLICATE_COLOUR]
    return sorted((p for p in pairs if p[2] <= NEAR_DUPLICATE_BITS), key=lambda p: (p[2], p[0], p[1]))


def word_frequency(captions) -> Counter:
    """Words (lower case) -> how many captions hold them."""
    return Counter(w for c in captions for w in set(re.findall(r"[\w'-]+", c.lower())))


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _groups(images, key):
    groups: dict = {}
    for im in images:
        groups.setdefault(key(im), []).append(im)
    return groups.items()


def _buckets(im: data.ScannedImage) -> str:
    """Its buckets, with the upscaling of the most enlarged side where an image is stretched to fill one."""
    parts = []
    for bw, bh in im.buckets:
        scale = max(bw / im.size[0], bh / im.size[1])
        parts.append(f"{bw}x{bh}" + (f" (upscaled x{scale:.2f})" if scale > 1.005 else ""))
    return ", ".join(parts)


def _mask_name(im: data.ScannedImage, entry: DatasetEntry) -> str:
    return "alpha" if im.mask == im.path else _rel(im.mask, entry)


def _rel(path: Path, entry: DatasetEntry) -> str:
    try:
        return path.relative_to(Path(entry.dataset_dir).expanduser()).as_posix()
    except ValueError:
        return str(path)


def _names(paths, limit: int = 8) -> str:
    paths = list(paths)
    return ", ".join(p.name for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
