"""Time of the dataset report on a folder of photo-sized images, against the bare scan, measured in the same run.

    .venv/bin/python bench/dataset_report.py [--images 100] [--rounds 3]

The folder holds `--images` captioned pictures of 1024x768 to 1536x1024 (two thirds JPEG, one third PNG, as users'
folders mostly are), written once into a temporary folder. Measured, alternating so machine load hits each alike:
the bare scan (`data.inspect_datasets`: every image decoded once to prove it readable, captions read, buckets)
which training always did, and the whole report (scan + perceptual hashes + thumbnails + caption tokens counted
with the tiny T5 tokenizer). The figures: the report's median seconds (the target is under 10 s for 100 images)
and its ratio to the bare scan.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core import tiny  # noqa: E402
from trainer_core.config import DatasetEntry  # noqa: E402
from trainer_core.data import inspect_datasets  # noqa: E402
from trainer_core.dataset_report import build_report, load_t5_tokenizer  # noqa: E402

SIZES = [(1024, 768), (768, 1024), (1536, 1024), (1024, 1024)]


def write_folder(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        detail = rng.normal(0, 12, (SIZES[i % 4][1], SIZES[i % 4][0], 3))
        image = np.asarray(Image.fromarray(coarse).resize(SIZES[i % 4], Image.Resampling.BICUBIC), dtype=np.float32)
        picture = Image.fromarray((image + detail).clip(0, 255).astype(np.uint8))
        picture.save(folder / (f"img{i:03d}.png" if i % 3 == 2 else f"img{i:03d}.jpg"), quality=92)
        (folder / f"img{i:03d}.txt").write_text(f"sks, a photo number {i}, with a tree and a house", "utf-8")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, models = Path(tmp) / "data", tiny.write_tiny_flux(Path(tmp) / "tiny")
        folder.mkdir()
        write_folder(folder, args.images)
        entry = DatasetEntry(str(folder), "sks", (512, 1024), 1)
        tokenizer = load_t5_tokenizer(models.tokenizers / "t5")
        times: dict[str, list[float]] = {"scan": [], "report": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            inspect_datasets([entry])
            times["scan"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = build_report([entry], t5_tokenizer=tokenizer, token_limit=512)
            report.contact_sheet()
            times["report"].append(time.perf_counter() - t0)
    scan, full = statistics.median(times["scan"]), statistics.median(times["report"])
    print(report.summary())
    print(f"{args.images} images, {args.rounds} rounds, median seconds:")
    print(f"  bare scan (what training always did)      {scan:6.2f} s")
    print(f"  report (scan, hashes, sheet, tokens)      {full:6.2f} s   ratio {full / scan:.2f}")
    print(f"report on {args.images} images: {full:.2f} s ({'OK' if full < 10 else 'over'} the 10 s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
