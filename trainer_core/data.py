"""The training images: an image folder with captions -> `ImageRecord`s in aspect-ratio buckets, and image decoding.

Buckets follow kohya's rule with a 64 px step, so every image trains near its own aspect ratio instead of being
cropped square, and several base resolutions (512, 768, 1024) can be trained together.
"""
from __future__ import annotations

import codecs
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from . import masks
from .augment import NO_AUGMENT, Augment, jitter
from .config import DatasetEntry

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUCKET_STEP = 64  # bucket sides are multiples of this: Flux needs 16 (8 px per latent, 2x2 patches), trainers use 64
MAX_ASPECT = 4.0  # buckets span aspect ratios 1:4 to 4:1
LOOK_SIZE = 160  # px: the scan decodes a JPEG no smaller than this (for the dataset report's hash and thumbnail)
KOHYA_FOLDER = re.compile(r"(\d+)_(.*)", re.DOTALL)  # kohya's `<repeats>_<name>` subfolder: `10_ohwx woman`


@dataclass(frozen=True)
class ImageRecord:
    """One training example: an image file, its caption (trigger word included) and its bucket (width, height); for
    Kontext, its control image, encoded at the same bucket."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    mask: Path | None = None  # its loss mask's file; the image's own path: its alpha channel
    is_reg: bool = False  # a regularization image: its loss is weighted by prior_loss_weight
    control: Path | None = None


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
    """The records of one dataset folder: `scan_datasets` with one entry."""
    return scan_datasets([DatasetEntry(str(folder), trigger_word, tuple(resolutions), repeats)], caption_extension)


def scan_datasets(entries: Sequence[DatasetEntry], caption_extension: str = ".txt", alpha_mask: bool = False
                  ) -> list[ImageRecord]:
    """The training records of every dataset entry, in entry order (see `inspect_datasets`)."""
    return inspect_datasets(entries, caption_extension, alpha_mask=alpha_mask).records()


@dataclass(frozen=True)
class ScannedImage:
    """One usable image as the scan found it: what the dataset report shows and the records are made of."""

    path: Path
    size: tuple[int, int]  # (width, height) as displayed (EXIF orientation applied)
    caption_file_text: str  # whitespace collapsed; "" when the caption file is missing or empty
    caption_issue: str  # "", "missing", "empty" or "not UTF-8"
    caption: str  # as trained: trigger word included
    trigger_word: str  # the one this image gets: its entry's, or its kohya folder's name
    buckets: tuple[tuple[int, int], ...]  # one per distinct bucket over its entry's resolutions
    repeats: int
    entry: int  # index of its DatasetEntry
    mask: Path | None = None  # as `ImageRecord.mask`
    mask_note: str = ""  # what is odd about its mask but trained through (a size that differs from the image's)
    is_reg: bool = False
    control: Path | None = None  # Kontext: its control image (same stem in the entry's control_dir)
    control_size: tuple[int, int] | None = None  # the control's (width, height)


@dataclass
class DatasetScan:
    images: list[ScannedImage]  # in record order
    skipped: list[tuple[Path, str]]  # files left out, each with the reason

    def records(self) -> list[ImageRecord]:
        """One record per image per bucket, each repeated its image's `repeats` times."""
        return [ImageRecord(im.path, im.caption, bucket, im.mask, im.is_reg, im.control)
                for im in self.images for bucket in im.buckets for _ in range(im.repeats)]


def inspect_datasets(entries: Sequence[DatasetEntry], caption_extension: str = ".txt",
                     look: Callable[[Path, Image.Image], None] | None = None, alpha_mask: bool = False) -> DatasetScan:
    """Find, caption and bucket the images of every entry; each entry's folder is scanned as `_scan_folder` says.

    `look(path, image)` is shown each image as the scan decodes it (a JPEG at reduced scale, at least `LOOK_SIZE`
    on its long side where the file allows; EXIF orientation not yet applied), so the dataset report needs no
    second decode.

    An entry whose folder is missing or has no usable image raises, naming the folder (and its entry when there are
    several); a file that cannot be used is logged, named and left out (`DatasetScan.skipped`)."""
    if not entries:
        raise ValueError("datasets: empty; give dataset_dir, or at least one [[datasets]] table with a dataset_dir")
    if not caption_extension.startswith("."):
        raise ValueError(f"caption_extension: {caption_extension!r} must start with a dot, e.g. '.txt'")
    scan = DatasetScan([], [])
    for i, entry in enumerate(entries):
        where = f"datasets[{i}]: " if len(entries) > 1 else ""
        try:
            part = _scan_folder(entry, i, caption_extension, look, alpha_mask)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(where + str(e)) from e
        scan.images += part.images
        scan.skipped += part.skipped
    return scan


def _scan_folder(entry: DatasetEntry, index: int, caption_extension: str, look=None, alpha_mask: bool = False
                 ) -> DatasetScan:
    """Find the images in an entry's folder and in its direct subfolders (not deeper), caption them and bucket them.

    Each image's caption is the same-stem `caption_extension` file beside it, whitespace collapsed; UTF-8 (a BOM
    is fine) or UTF-16 with its BOM (Notepad's "Unicode"), falling back to Windows-1252 with a warning, the encoding
    Windows editors most often leave. A missing or empty caption becomes the trigger word, with a warning. The
    trigger word is prepended ("trigger, caption") unless the caption already contains it as a word, in any case.

    A kohya-style subfolder `N_name` (`10_ohwx woman`) repeats its images N times instead of the entry's `repeats`,
    and when the entry has no trigger word, `name` is its images' trigger word (`0_name` is left out, as kohya does).

    Every image is decoded once here (JPEG cheaply, at 1/8 scale; an animation's first frame, which is the one
    trained on): an unreadable, truncated or empty file, one under 64 px on a side or over PIL's
    decompression-bomb limit is skipped with a warning naming it. A file reached twice (through a link to a folder)
    is used once; a link that loops or points nowhere is named and skipped. Files whose extension is not an
    image's (`IMAGE_EXTENSIONS`) and hidden files and folders are ignored.

    Images come sorted by path; each gets one bucket per distinct bucket over the entry's resolutions (an image
    smaller than several resolutions gets the bucket they share once).

    Masks (`masks.find_mask`, or the alpha channel with `alpha_mask`) are not images: each is checked
    (`masks.check_mask`); an image whose mask would train nothing or cannot be read is skipped, a mask with no image
    is named in `skipped`.

    Kontext (the entry has a `control_dir`): each image pairs with the control image of the same relative path and
    stem there (`photo_01.png` with `photo_01.jpg`); an image without one, or whose control cannot be read, and a
    control without an image are named in `skipped`. A control of another size is fitted to its image's bucket.
    """
    folder = Path(entry.dataset_dir).expanduser()
    resolutions, repeats, trigger_word = entry.resolutions, entry.repeats, entry.trigger_word.strip()
    if not resolutions or any(r <= 0 or r % BUCKET_STEP for r in resolutions):
        raise ValueError(f"resolutions: {list(resolutions)} must be positive multiples of 64, e.g. [512, 768, 1024]")
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} must be at least 1")
    if not folder.exists():
        tried = folder if folder.is_absolute() else f"{folder} (relative to the working folder {Path.cwd()})"
        raise FileNotFoundError(f"dataset folder {tried} does not exist: check the path")
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} is a file, not a folder: give the folder that holds the images")

    files, skipped = list_files(folder)
    control_folder = Path(entry.control_dir).expanduser().resolve() if entry.control_dir else None
    pictures = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS  # a control subfolder holds no targets
                and (control_folder is None or control_folder not in p.resolve().parents)]
    candidates = [p for p in pictures if not masks.is_mask_file(p, folder)]
    if not candidates:
        n_captions = sum(p.suffix.lower() == caption_extension.lower() for p in files)
        found = f"only {n_captions} caption ({caption_extension}) files" if n_captions else "no images"
        raise ValueError(
            f"dataset folder {folder} has {found}: put the images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its"
            f" direct subfolders, each beside its same-named caption file"
        )

    controls = _control_images(entry, skipped)
    images = []
    for path in candidates:
        sub = path.relative_to(folder).parts[0] if path.parent != folder else ""
        kohya = KOHYA_FOLDER.fullmatch(sub)
        if kohya and int(kohya[1]) == 0:
            skipped.append((path, f"its folder {sub} asks for 0 repeats"))
            continue
        try:
            width, height = _probe_image(path, look)
        except Exception as e:  # a broken file in a user's folder must never stop the scan; PIL raises many kinds
            logger.warning("skipping image %s: %s", path, str(e) or type(e).__name__)
            skipped.append((path, str(e) or type(e).__name__))
            continue
        mask = path if alpha_mask and masks.has_alpha(path) else masks.find_mask(path, folder, IMAGE_EXTENSIONS)
        problem, note = masks.check_mask(mask, path, (width, height)) if mask is not None else ("", "")
        if alpha_mask and mask is None:
            note = "no alpha channel: trained unmasked"
        if problem:
            logger.warning("skipping image %s: %s", path, problem)
            skipped.append((path, problem))
            continue
        control = control_size = None
        if controls is not None:
            control, problem = controls.pop(path.relative_to(folder).with_suffix(""), None), ""
            if control is None:
                problem = f"no control image named {path.stem}.* in {entry.control_dir}"
            else:
                try:
                    control_size = _probe_image(control)
                except Exception as e:  # as for the images: named and left out, never a traceback
                    problem = f"its control image {control} cannot be read: {str(e) or type(e).__name__}"
            if problem:
                logger.warning("skipping image %s: %s", path, problem)
                skipped.append((path, problem))
                continue
        trigger = trigger_word or (kohya[2].strip() if kohya else "")
        text, issue = _read_caption(path.with_suffix(caption_extension))
        buckets = tuple(dict.fromkeys(choose_bucket(width, height, r) for r in sorted(resolutions)))
        images.append(ScannedImage(path, (width, height), text, issue, with_trigger(text, trigger), trigger,
                                   buckets, int(kohya[1]) if kohya else repeats, index, mask, note, entry.is_reg,
                                   control, control_size))
    skipped += _orphan_masks(folder, pictures, candidates)
    for stem, control in sorted((controls or {}).items()):
        skipped.append((control, f"a control image with no target image named {stem.name}.* in {folder}"))
    if not images:
        raise ValueError(
            f"none of the {len(candidates)} images in dataset folder {folder} could be read (see the warnings"
            " above): re-export them as PNG or JPEG, at least 64 px on each side"
        )
    logger.info("dataset %s: %d of %d images usable, %d records", folder, len(images), len(candidates),
                sum(len(im.buckets) * im.repeats for im in images))
    return DatasetScan(images, skipped)


def _control_images(entry: DatasetEntry, skipped: list) -> dict[Path, Path] | None:
    """Kontext: the entry's control images by path relative to `control_dir` without extension (the name they pair
    on), or None without a control_dir. A second file of the same stem is named in `skipped`."""
    if not entry.control_dir:
        return None
    folder = Path(entry.control_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"control_dir {folder} is not a folder: give the folder of control images, each named "
                                "as its target image")
    files, links = list_files(folder)
    skipped += links
    controls = {}
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        stem = p.relative_to(folder).with_suffix("")
        if stem in controls:
            skipped.append((p, f"a second control image named {stem.name} (using {controls[stem].name})"))
            continue
        controls[stem] = p
    return controls


def _orphan_masks(folder: Path, pictures: list[Path], images: list[Path]) -> list[tuple[Path, str]]:
    """The mask files in `folder` (and all of its masks/ folder) that belong to no image, each with the reason."""
    found = {p for p in pictures if masks.is_mask_file(p, folder)}
    mask_folder = folder / masks.MASK_FOLDER
    if mask_folder.is_dir():
        found |= {p for p in mask_folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    claimed = {m for p in images for m in masks.mask_candidates(p, folder, IMAGE_EXTENSIONS)}
    return [(p, "a mask with no image (expected its image beside it, named without _mask, or at the same path "
                "outside masks/)") for p in sorted(found - claimed)]


def list_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The visible files in `folder` and its direct subfolders, sorted, each real file once; and the links skipped.

    Links are followed (a folder of links is a dataset), but one that loops or dangles is named and skipped, and a
    file reached again through a link (a link to `.`) is used only under its first path."""
    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(folder).parts)

    top = sorted(p for p in folder.iterdir() if visible(p))
    entries = sorted([*top, *(q for d in top if d.is_dir() for q in d.iterdir() if visible(q))])
    files, skipped, first = [], [], {}
    for p in entries:
        if broken := _broken_link(p):
            logger.warning("skipping %s: %s", p, broken)
            skipped.append((p, broken))
            continue
        if not p.is_file():
            continue
        real = p.resolve()
        if real in first:
            skipped.append((p, f"the same file as {first[real]} (reached through a link)"))
            logger.info("skipping %s: the same file as %s", p, first[real])
            continue
        first[real] = p
        files.append(p)
    return files, skipped


def _broken_link(path: Path) -> str:
    """Why the link `path` leads nowhere, or "" for a working link or a plain file."""
    if not path.is_symlink():
        return ""
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return f"a link to {os.readlink(path)}, which does not exist"
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, later ones OSError
        return "a link that loops back to itself"
    return ""


def _probe_image(path: Path, look=None) -> tuple[int, int]:
    """Decode an image as cheaply as its format allows, to prove it readable; -> (width, height) as displayed."""
    if path.stat().st_size == 0:  # PIL would only say it "cannot identify" the file
        raise ValueError("the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns between 1x and 2x its limit
        with Image.open(path) as im:
            width, height = im.size
            if min(width, height) < BUCKET_STEP:
                raise ValueError(f"{width}x{height} px is under {BUCKET_STEP} px on a side")
            scale = max(1 / 8, min(1.0, LOOK_SIZE / max(width, height)))
            im.draft(None, (int(width * scale), int(height * scale)))  # JPEG decodes at down to 1/8; others in full
            im.load()  # finds truncated data (verify() would not for JPEG, and would forbid reading EXIF for PNG)
            if look is not None:
                look(path, im)
            turned = _turned(im)  # read after load(): a PNG's EXIF may follow its pixels
    return (height, width) if turned else (width, height)


def _read_caption(path: Path) -> tuple[str, str]:
    """The caption file's text with whitespace collapsed, and its issue: "" or "missing", "empty", "not UTF-8".

    A missing or empty caption gives "" and a warning."""
    if not path.is_file():
        logger.warning("no caption file %s: using the trigger word alone as its caption", path)
        return "", "missing"
    raw = path.read_bytes()
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    issue = ""
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        logger.warning("caption file %s is not UTF-8: read as Windows-1252; save it as UTF-8 to be sure", path)
        text, issue = raw.decode("cp1252", errors="replace"), "not UTF-8"
    text = " ".join(text.split())
    if not text:
        logger.warning("caption file %s is empty: using the trigger word alone as its caption", path)
        issue = "empty"
    return text, issue


def with_trigger(caption: str, trigger_word: str) -> str:
    """Prepend the trigger word unless the caption already holds it as a whole word (any case)."""
    if not trigger_word or re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption, re.IGNORECASE):
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def load_image(record: ImageRecord, flip: bool = False, augment: Augment = NO_AUGMENT) -> torch.Tensor:
    """Decode `record.path` for training: (3, H, W) float32 in [-1, 1], (W, H) = `record.bucket`.

    EXIF orientation is applied, every PIL mode becomes RGB (transparency composited on white, 16-bit scaled
    down rather than clipped), colour-jittered if `augment` says so, then resized with Lanczos to cover the bucket
    and centre-cropped (`_place`).
    """
    with Image.open(record.path) as im:
        rgb = to_rgb(ImageOps.exif_transpose(im))
    if augment.jitter is not None:
        rgb = jitter(rgb, augment.jitter)
    return fit_pixels(rgb, record.bucket, flip, augment)


def fit_pixels(rgb: Image.Image, size: tuple[int, int], flip: bool = False, augment: Augment = NO_AUGMENT) -> torch.Tensor:
    """An RGB image placed in `size` (W, H) as training places it (`_place`, with Lanczos): (3, H, W) float32 in
    [-1, 1]."""
    rgb = _place(rgb, size, flip, augment, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32))  # (H, W, 3) in [0, 255]
    return pixels.permute(2, 0, 1) / 127.5 - 1


def load_mask(record: ImageRecord, flip: bool = False, augment: Augment = NO_AUGMENT) -> torch.Tensor | None:
    """`record`'s mask as `load_image` places its image: (1, H, W) float32 in [0, 1]; None without a mask.
    A mask of another size than its image is stretched to the image's size first."""
    if record.mask is None:
        return None
    mask = masks.open_mask(record.mask, record.path)
    with Image.open(record.path) as im:
        im.load()
        size = (im.height, im.width) if _turned(im) else im.size
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    mask = _place(mask, record.bucket, flip, augment, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None]


def _place(im: Image.Image, bucket: tuple[int, int], flip: bool, augment: Augment, method) -> Image.Image:
    """Resize to cover the bucket and centre-crop; then `augment`'s crop scaled back to the bucket; then the flip.
    An image and its mask go through the same steps, so the mask stays on its subject."""
    im = ImageOps.fit(im, bucket, method=method)
    if augment.crop is not None:
        im = im.resize(bucket, method, box=augment.crop)
    return ImageOps.mirror(im) if flip else im


def _turned(im: Image.Image) -> bool:
    """Whether the image is displayed turned by 90° (its EXIF orientation)."""
    return im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    im = masks.eight_bit(im)
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


def tag_frequency(records: Sequence[ImageRecord]) -> dict[str, dict[str, int]]:
    """Caption tag counts as kohya writes `ss_tag_frequency`: per image folder name (`10_ohwx woman`), how many
    images' captions hold each comma-separated tag. Each image counts once, whatever its repeats and buckets."""
    counts: dict[str, dict[str, int]] = {}
    for r in {r.path: r for r in records}.values():
        folder = counts.setdefault(r.path.parent.name, {})
        for tag in dict.fromkeys(t.strip() for t in r.caption.split(",")):
            if tag:
                folder[tag] = folder.get(tag, 0) + 1
    return counts
