"""Put the demo stack (`demo_stack`: a small trained Flux) and the demo dataset where a ComfyUI installation looks for
them, under the names the tiny example workflow (`example_workflows/flux_tiny_demo.json`) uses:
`python -m trainer_core install-tiny BASE_DIR`."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .demo import write_demo_dataset
from .demo_stack import demo_stack

log = logging.getLogger(__name__)

DEMO_DATASET = "flux_lora_demo"  # folder inside ComfyUI's input folder


@dataclass(frozen=True)
class TinyInstall:
    transformer: Path  # models/diffusion_models/flux-tiny-bf16.safetensors (the training base)
    validation_transformer: Path  # models/diffusion_models/flux-tiny-fp8.safetensors
    vae: Path  # models/vae/flux-tiny-ae.safetensors
    clip_l: Path  # models/text_encoders/flux-tiny/clip_l.safetensors, with tokenizers/ beside it
    t5: Path  # models/text_encoders/flux-tiny/t5xxl_tiny.safetensors
    dataset: Path  # input/flux_lora_demo


def install_tiny(base_dir: str | Path) -> TinyInstall:
    """Copy the demo stack into `<base_dir>/models/...` and the demo dataset into `<base_dir>/input/`.

    `base_dir` is ComfyUI's folder (or its `--base-directory`); existing files of the same names are replaced.
    """
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"COMFYUI_BASE_DIR: {base} is not a folder; give ComfyUI's folder (holding models/)")
    models = base / "models"
    encoders = models / "text_encoders" / "flux-tiny"
    target = TinyInstall(
        transformer=models / "diffusion_models" / "flux-tiny-bf16.safetensors",
        validation_transformer=models / "diffusion_models" / "flux-tiny-fp8.safetensors",
        vae=models / "vae" / "flux-tiny-ae.safetensors",
        clip_l=encoders / "clip_l.safetensors",
        t5=encoders / "t5xxl_tiny.safetensors",
        dataset=base / "input" / DEMO_DATASET,
    )
    stack = demo_stack()
    copies = {stack.transformer_bf16: target.transformer, stack.transformer_fp8: target.validation_transformer,
              stack.vae: target.vae, stack.clip_l: target.clip_l, stack.t5: target.t5}
    for source, dest in copies.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    shutil.copytree(stack.tokenizers, encoders / "tokenizers", dirs_exist_ok=True)
    write_demo_dataset(target.dataset)
    log.info("demo Flux stack written under %s, demo dataset in %s", models, target.dataset)
    return target
