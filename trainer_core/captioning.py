"""Local auto-captions: Florence-2, through transformers' own Florence-2 classes, writes the captions a dataset lacks.

The model comes from a local folder only (ComfyUI's `models/LLM/<name>`, or any path holding a transformers
Florence-2 checkpoint such as florence-community/Florence-2-base or -large); nothing is ever downloaded.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps

from . import data
from .checkpoints import atomic_write
from .config import DatasetEntry

logger = logging.getLogger(__name__)

TASKS = ("<MORE_DETAILED_CAPTION>", "<DETAILED_CAPTION>", "<CAPTION>")  # Florence-2's caption prompts, longest first


def load_florence2(folder: str | Path, device: str | torch.device = "cpu"):
    """-> (model, processor) from a local transformers Florence-2 folder; raises naming the folder when it is not one.

    bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow)."""
    folder = Path(folder).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"caption model: no Florence-2 model in {folder} (no config.json); put a transformers Florence-2 checkpoint "
            "(e.g. florence-community/Florence-2-base, all its files) in that folder, such as ComfyUI's models/LLM/"
            "Florence-2-base: nothing is downloaded")
    model_type = json.loads(config.read_text("utf-8")).get("model_type")
    if model_type != "florence2":
        raise ValueError(f"caption model: {folder} holds a {model_type!r} model, not Florence-2; give a Florence-2 folder")
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = Florence2ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:  # what transformers raises for missing or foreign files
        raise ValueError(f"caption model: {folder} could not be loaded as transformers' Florence-2 ({e}); the original "
                         "microsoft/Florence-2-* folders need remote code: use florence-community/Florence-2-*") from e
    return model.to(device).eval(), processor


def caption_dataset(
    folder: str | Path,
    model_dir: str | Path,
    trigger_word: str = "",
    overwrite: bool = False,
    task: str = TASKS[0],
    max_new_tokens: int = 256,
    caption_extension: str = ".txt",
    device: str | torch.device = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Path]:
    """Write a caption file for each image of a dataset folder that has none (or an empty one); all when `overwrite`.

    The images are those training would use (`data.inspect_datasets`: the folder and its direct subfolders), in
    order. Each caption starts with the trigger word (or a kohya `N_name` folder's name when `trigger_word` is "").
    `on_progress(done, total)` follows each image; `should_stop()` is asked before each, and a stop keeps what was
    written. Each file is written whole or not at all. Returns the caption files written."""
    if task not in TASKS:
        raise ValueError(f"task: {task!r}; choose one of {', '.join(TASKS)}")
    scan = data.inspect_datasets([DatasetEntry(str(folder), trigger_word, (512,), 1)], caption_extension)  # buckets unused
    todo = [im for im in scan.images if overwrite or im.caption_issue in ("missing", "empty")]
    logger.info("captioning %d of %d images in %s (%s)", len(todo), len(scan.images), folder,
                "all, overwriting" if overwrite else "those without a caption")
    if not todo:
        return []
    model, processor = load_florence2(model_dir, device)
    written = []
    for done, im in enumerate(todo):
        if should_stop is not None and should_stop():
            logger.info("captioning stopped after %d of %d images", done, len(todo))
            break
        text = caption_image(model, processor, im.path, task, max_new_tokens)
        path = im.path.with_suffix(caption_extension)
        caption = data.with_trigger(text, im.trigger_word)
        written.append(atomic_write(path, lambda tmp: tmp.write_text(caption + "\n", "utf-8")))
        logger.info("%s: %s", path, caption)
        if on_progress is not None:
            on_progress(done + 1, len(todo))
    return written


@torch.no_grad()
def caption_image(model, processor, path: Path, task: str = TASKS[0], max_new_tokens: int = 256) -> str:
    """One image's Florence-2 caption, greedy (so the same image always gets the same caption), whitespace collapsed."""
    with Image.open(path) as im:
        image = data.to_rgb(ImageOps.exif_transpose(im))
    inputs = processor(images=[image], text=[task], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())
