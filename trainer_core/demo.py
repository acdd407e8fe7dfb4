"""The whole workflow on a tiny random Flux, runnable on any CPU in minutes: `python -m trainer_core demo`.

It writes the tiny model in the users' file layouts and a small generated captioned dataset, then runs the same
plan as the example ComfyUI workflow: train in loops, save a checkpoint after each, sample, plot the loss, and
render the LoRA-strength x step grid.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from . import tiny
from .config import TrainConfig
from .plan import RunPlan, RunResult, execute
from .trainer import Trainer

DEMO_TRIGGER = "fltglyph"
_BACKGROUNDS = [("teal", (30, 110, 120)), ("orange", (220, 120, 40)), ("purple", (90, 50, 130)), ("grey", (128, 128, 128))]


def write_demo_dataset(folder: str | Path, count: int = 4, size: int = 128, seed: int = 0) -> Path:
    """`count` images of one made-up subject (a yellow ring crossed by a red bar) on varied backgrounds.

    The subject is what the LoRA should learn under the trigger word; captions describe only the background.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        name, colour = _BACKGROUNDS[i % len(_BACKGROUNDS)]
        img = Image.new("RGB", (size, size), colour)
        draw = ImageDraw.Draw(img)
        c, r = size / 2 + rng.uniform(-size / 10, size / 10), size * 0.3
        draw.ellipse([c - r, c - r, c + r, c + r], outline=(250, 220, 40), width=max(2, size // 12))
        draw.rectangle([c - r * 0.15, c - r * 0.9, c + r * 0.15, c + r * 0.9], fill=(210, 30, 40))
        img.save(folder / f"glyph_{i:02d}.png")
        (folder / f"glyph_{i:02d}.txt").write_text(f"a glyph on a {name} background", encoding="utf-8")
    return folder


def demo_config(models: "tiny.TinyFluxPaths", dataset: Path, output_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        transformer_path=str(models.transformer_bf16), vae_path=str(models.vae), clip_path=str(models.clip_l),
        t5_path=str(models.t5), tokenizer_dir=str(models.tokenizers), dataset_dir=str(dataset),
        trigger_word=DEMO_TRIGGER, resolutions=(128,), max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, rank=8, alpha=8.0,
        learning_rate=2e-3, lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, total_steps=steps,
        mixed_precision="fp32", gradient_checkpointing=False, device="cpu", seed=7,
        output_dir=str(output_dir), output_name="flux_tiny_demo",
    )


def run_demo(out_dir: str | Path = "demo_output", steps: int = 200, loops: int = 4) -> tuple[Trainer, RunResult]:
    out = Path(out_dir)
    models = tiny.write_tiny_flux(out / "models")
    dataset = write_demo_dataset(out / "dataset")
    trainer = Trainer.from_config(demo_config(models, dataset, out / "loras", steps))
    plan = RunPlan(steps=steps, save_every=-(-steps // loops), prompts=(f"{DEMO_TRIGGER}, a glyph on a teal background",),
                   sample_steps=12, sample_width=128, sample_height=128, sample_seed=1)
    return trainer, execute(trainer, plan)
