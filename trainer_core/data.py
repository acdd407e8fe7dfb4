"""The training images: an image folder with captions -> `ImageRecord`s in aspect-ratio buckets, and image decoding.

Buckets follow kohya's rule with a 64 px step, so every image trains near its own aspect ratio instead of being
cropped square, and several base resolutions (512, 768, 1024) can be trained together.
"""
from __future__ import annotations

import codecs
import hashlib
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUCKET_STEP = 64  # bucket sides are multiples of this: Flux needs 16 (8 px per latent, 2x2 patches), trainers use 64
MAX_ASPECT = 4.0  # buckets span aspect ratios 1:4 to 4:1


@dataclass(frozen=True)
class ImageRecord:
    """One training example: an image file, its caption (trigger word included) and its bucket (width, height)."""

    path: Path
    caption: str
    bucket: tuple[int, int]


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """All (width, height) buckets for a base resolution, sorted.

    Both sides are multiples of 64, the area is at most resolution², the aspect ratio lies within 1:4..4:1, and
    for each width the height is the largest that fits the area (kohya's rule), so the longest side is 2R.
    """
    sizes = set()
    for width in range(BUCKET_STEP, int(resolution * MAX_ASPECT) + 1, BUCKET_STEP):
        height = resolution * resolution // width // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def choose_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket of a width x height image at base `resolution`.

    The image is trained at the smaller of `resolution` and its own size (sqrt of its area, floored to 64 px),
    in the bucket of that size whose aspect ratio is closest to the image's (compared in log space). So an
    image is never enlarged in area; only where its aspect ratio falls between two buckets' is one side
    stretched before the centre crop, by at most 10% for images 256 px or more on a side (32% below that).
    """
    effective = max(BUCKET_STEP, min(resolution, math.isqrt(width * height) // BUCKET_STEP * BUCKET_STEP))
    aspect = math.log(width / height)
    return min(bucket_sizes(effective), key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), b))


def scan_dataset(
    folder: str | Path,
    trigger_word: str,
    resolutions: Sequence[int] = (512,),
    repeats: int = 1,
    caption_extension: str = ".txt",
) -> list[ImageRecord]:
    """Find the images in `folder` and in its direct subfolders (not deeper), caption them and bucket them.

    Each image's caption is the same-stem `caption_extension` file beside it, whitespace collapsed; UTF-8 (a BOM
    is fine) or UTF-16 with its BOM (Notepad's "Unicode"), falling back to Windows-1252 with a warning, the encoding
    Windows editors most often leave. A missing or empty caption becomes the trigger word, with a warning. The
    trigger word is prepended ("trigger, caption") unless the caption already contains it as a word, in any case.

    Every image is decoded once here (JPEG cheaply, at 1/8 scale; an animation's first frame, which is the one
    trained on): an unreadable, truncated or empty file, one under 64 px on a side or over PIL's
    decompression-bomb limit is skipped with a warning naming it. Files whose extension is not an image's
    (`IMAGE_EXTENSIONS`) and hidden files and folders are ignored.

    Returns one record per image per distinct bucket over `resolutions` (an image smaller than several
    resolutions gets the bucket they share once), each repeated `repeats` times, sorted by path then resolution.
    """
    folder = Path(folder).expanduser()
    if not resolutions or any(r <= 0 or r % BUCKET_STEP for r in resolutions):
        raise ValueError(f"resolutions: {list(resolutions)} must be positive multiples of 64, e.g. [512, 768, 1024]")
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} must be at least 1")
    if not caption_extension.startswith("."):
        raise ValueError(f"caption_extension: {caption_extension!r} must start with a dot, e.g. '.txt'")
    if not folder.exists():
        raise FileNotFoundError(
            f"dataset folder {folder} does not exist: check the path (absolute, or relative to {Path.cwd()})"
        )
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} is a file, not a folder: give the folder that holds the images")

    files = sorted(
        p for p in [*folder.iterdir(), *folder.glob("*/*")]
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    candidates = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not candidates:
        n_captions = sum(p.suffix.lower() == caption_extension.lower() for p in files)
        found = f"only {n_captions} caption ({caption_extension}) files" if n_captions else "no images"
        raise ValueError(
            f"dataset folder {folder} has {found}: put the images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its"
            f" direct subfolders, each beside its same-named caption file"
        )

    records = []
    for path in candidates:
        try:
            width, height = _probe_image(path)
        except Exception as e:  # a broken file in a user's folder must never stop the scan; PIL raises many kinds
            logger.warning("skipping image %s: %s", path, str(e) or type(e).__name__)
            continue
        caption = _with_trigger(_read_caption(path.with_suffix(caption_extension)), trigger_word.strip())
        buckets = dict.fromkeys(choose_bucket(width, height, r) for r in sorted(resolutions))
        records += [ImageRecord(path, caption, bucket) for bucket in buckets]
    if not records:
        raise ValueError(
            f"none of the {len(candidates)} images in dataset folder {folder} could be read (see the warnings"
            " above): re-export them as PNG or JPEG, at least 64 px on each side"
        )
    logger.info("dataset %s: %d of %d images usable, %d records", folder, len({r.path for r in records}),
                len(candidates), len(records) * repeats)
    return [r for r in records for _ in range(repeats)]


def dataset_fingerprint(records: Sequence[ImageRecord]) -> str:
    """What decides a run's data, hashed: each record's file name, size, mtime, caption and bucket, in order.

    An edited, added, removed or re-captioned image changes it; reading nothing does. The folder's own path is left
    out: a dataset moved elsewhere (with its mtimes) keeps its identity."""
    h = hashlib.sha256()
    root = Path(os.path.commonpath([r.path.parent for r in records])) if records else Path()
    for r in records:
        st = r.path.stat()
        h.update(f"{r.path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0{r.caption}\0"
                 f"{r.bucket[0]}x{r.bucket[1]}\n".encode())
    return h.hexdigest()[:16]


def _probe_image(path: Path) -> tuple[int, int]:
    """Decode an image as cheaply as its format allows, to prove it readable; -> (width, height) as displayed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns between 1x and 2x its limit
        with Image.open(path) as im:
            width, height = im.size
            if min(width, height) < BUCKET_STEP:
                raise ValueError(f"{width}x{height} px is under {BUCKET_STEP} px on a side")
            im.draft(None, (width // 8, height // 8))  # JPEG decodes at 1/8 scale; other formats in full
            im.load()  # finds truncated data (verify() would not for JPEG, and would forbid reading EXIF for PNG)
            turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # displayed turned by 90°
    return (height, width) if turned else (width, height)


def _read_caption(path: Path) -> str:
    """The caption file's text with whitespace collapsed; "" (and a warning) when it is missing or empty."""
    if not path.is_file():
        logger.warning("no caption file %s: using the trigger word alone as its caption", path)
        return ""
    raw = path.read_bytes()
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        logger.warning("caption file %s is not UTF-8: read as Windows-1252; save it as UTF-8 to be sure", path)
        text = raw.decode("cp1252", errors="replace")
    text = " ".join(text.split())
    if not text:
        logger.warning("caption file %s is empty: using the trigger word alone as its caption", path)
    return text


def _with_trigger(caption: str, trigger_word: str) -> str:
    """Prepend the trigger word unless the caption already holds it as a whole word (any case)."""
    if not trigger_word or re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption, re.IGNORECASE):
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def load_image(record: ImageRecord, flip: bool = False) -> torch.Tensor:
    """Decode `record.path` for training: (3, H, W) float32 in [-1, 1], (W, H) = `record.bucket`.

    EXIF orientation is applied, every PIL mode becomes RGB (transparency composited on white, 16-bit scaled
    down rather than clipped), then the image is resized with Lanczos to cover the bucket and centre-cropped.
    """
    with Image.open(record.path) as im:
        rgb = _to_rgb(ImageOps.exif_transpose(im))
    rgb = ImageOps.fit(rgb, record.bucket, method=Image.Resampling.LANCZOS)
    if flip:
        rgb = ImageOps.mirror(rgb)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32))  # (H, W, 3) in [0, 255]
    return pixels.permute(2, 0, 1) / 127.5 - 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # PIL's convert clips 16-bit grey at 255 instead of scaling it; 32-bit "I" is taken as 16-bit data too
        grey = np.asarray(im).astype(np.float32) / 257
        im = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return im.convert("RGB")


def batches(records: Sequence[ImageRecord], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of indices into `records`: a pure function of (seed, epoch), so resuming is exact.

    Only `.bucket` is read, so the `CachedSample`s made from the records serve as well.

    Indices are shuffled, grouped by bucket (a batch stacks into one tensor), cut into batches of at most
    `batch_size` (a bucket's last batch may be smaller), and the batches are shuffled again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1")
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in rng.permutation(len(records)).tolist():
        by_bucket.setdefault(records[i].bucket, []).append(i)
    groups = [idx[k : k + batch_size] for idx in by_bucket.values() for k in range(0, len(idx), batch_size)]
    return [groups[i] for i in rng.permutation(len(groups)).tolist()]
