"""What the node modules share: the handle type, the category, sampling widgets and IMAGE conversion."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import comfy_bridge

HANDLE = "FLUX_LORA_TRAINER"
CATEGORY = "Flux LoRA Trainer"
HANDLE_INPUT = (HANDLE, {"tooltip": "The training run at one point, from InitTrainer, TrainLoop or SaveCheckpoint."})
BASES = ("training base", "validation base")

# Sampling widgets shared by ValidationSample and the XY grid, in widget order.
SAMPLING_INPUTS = {
    # no control_after_generate: a seed that changes on every queue would re-render on every queue
    "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1, "control_after_generate": False,
                     "tooltip": "Noise seed; keep it fixed to compare checkpoints fairly."}),
    "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Euler sampling steps."}),
    "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 30.0, "step": 0.1,
                           "tooltip": "Flux-dev's distilled guidance for sampling (3.5 is typical)."}),
    "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16, "tooltip": "Image width, a multiple of 16."}),
    "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16,
                       "tooltip": "Image height, a multiple of 16."}),
    "base": (list(BASES), {"tooltip": "Render on the training base, or on the validation base chosen in InitTrainer "
                                      "(train on Flux-dev2pro, judge on Flux-dev)."}),
    "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What true CFG steers away from; "
                                   "used only when true_cfg_scale is not 1.0."}),
    "true_cfg_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "True "
                                 "classifier-free guidance (two passes per step) for de-distilled bases such as "
                                 "Flux-dev2pro, whose guidance embedding does not work: 3-5 with guidance 1.0. "
                                 "1.0 = off (Flux-dev)."}),
}


# Kontext: the picture to edit, an optional input of ValidationSample and the XY grid
CONTROL_INPUTS = {"control_image": ("IMAGE", {"tooltip": "Kontext runs: the image to edit (e.g. from LoadImage), "
                                              "fitted to width x height; the first of a batch is used."})}


def sampling_kwargs(seed: int, steps: int, guidance: float, width: int, height: int, base: str,
                    negative_prompt: str = "", true_cfg_scale: float = 1.0, control_image=None) -> dict:
    """`TrainingRun.sample` keyword arguments from the shared sampling widgets (and a Kontext control IMAGE)."""
    if base not in BASES:
        raise ValueError(f"base: {base!r}; choose one of {', '.join(BASES)}")
    return dict(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                validation_base=base == "validation base", negative_prompt=negative_prompt.strip(),
                true_cfg_scale=true_cfg_scale, control_image=None if control_image is None else from_image(control_image))


def to_image(images) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE, float (B, H, W, C) in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))


def from_image(image: torch.Tensor) -> Image.Image:
    """A ComfyUI IMAGE (B, H, W, C) in [0, 1] -> its first image as an RGB PIL image."""
    pixels = (image[0, ..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


def image_output(images, **ui) -> dict:
    """A node result with the IMAGE batch and the previews ComfyUI shows on the node; `ui`: more of what the node
    reports (JSON-ready lists, kept in ComfyUI's history of the prompt)."""
    return {"ui": {"images": comfy_bridge.save_previews(images), **ui}, "result": (to_image(images),)}
