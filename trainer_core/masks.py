"""Loss masks: which file masks an image, what is wrong with it, its pixels, and the loss weight per latent value.

A mask is found as kohya and the other trainers keep it: `<stem>_mask.<ext>` beside the image, or the same relative
path under a `masks/` folder at the top of the dataset folder, or (with `alpha_mask`) the image's own alpha channel.
White trains, black does not; grey is a weight between. Any PIL mode is read (RGB, grey, 16-bit grey).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .flow_matching import pack_latents

MASK_SUFFIX = "_mask"
MASK_FOLDER = "masks"
LATENT_SCALE = 8  # pixels per latent side


def is_mask_file(path: Path, folder: Path) -> bool:
    """A file that is a mask, not a training image: `*_mask.*` or anything under `<folder>/masks/`."""
    rel = path.relative_to(folder).parts
    return path.stem.lower().endswith(MASK_SUFFIX) or (len(rel) > 1 and rel[0] == MASK_FOLDER)


def mask_candidates(image: Path, folder: Path, extensions) -> list[Path]:
    """Where the mask of `image` may be: beside it as `<stem>_mask.<ext>`, then under `<folder>/masks/`."""
    rel = image.relative_to(folder).with_suffix("")
    beside = [image.with_name(image.stem + MASK_SUFFIX + ext) for ext in extensions]
    return beside + [folder / MASK_FOLDER / rel.with_suffix(ext) for ext in extensions]


def find_mask(image: Path, folder: Path, extensions) -> Path | None:
    return next((p for p in mask_candidates(image, folder, extensions) if p.is_file()), None)


def eight_bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit integer grey -> 8-bit grey, scaled down (PIL's convert clips at 255); other modes as they are.
    32-bit "I" is taken as 16-bit data too."""
    if im.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return im
    values = np.asarray(im).astype(np.float32) / 257
    return Image.fromarray(values.round().clip(0, 255).astype(np.uint8))


def grey(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grey ("L"); a mask's own transparency is not its value."""
    im = eight_bit(im)
    if im.has_transparency_data:
        im = im.convert("RGBA").convert("RGB")
    return im.convert("L")


def open_mask(mask: Path, image: Path) -> Image.Image:
    """The mask as 8-bit grey, EXIF orientation applied; `mask == image` reads the image's alpha channel."""
    with Image.open(mask) as im:
        im = ImageOps.exif_transpose(im)
        if mask == image:
            return im.convert("RGBA").getchannel("A")
        return grey(im)


def check_mask(mask: Path, image: Path, image_size: tuple[int, int]) -> tuple[str, str]:
    """(problem, note) of a mask: a problem leaves its image out of training (a mask that would train nothing, an
    unreadable one), a note is reported and trained through (a size that differs: the mask is stretched to fit)."""
    alpha = mask == image
    try:
        im = open_mask(mask, image)
    except Exception as e:  # a user's file: any PIL failure is a line in the report, never a traceback
        return f"its mask {mask.name} cannot be read ({str(e) or type(e).__name__}); re-save it as a grey PNG", ""
    if im.getextrema()[1] == 0:
        what = "its alpha channel is all zero (fully transparent)" if alpha else f"its mask {mask.name} is all black"
        return f"{what}: nothing of it would train; fix the mask or remove it", ""
    if im.size != image_size:
        return "", (f"mask {mask.name} is {im.size[0]}x{im.size[1]} for a {image_size[0]}x{image_size[1]} image: "
                    "stretched to fit")
    return "", ""


def has_alpha(path: Path) -> bool:
    with Image.open(path) as im:
        return im.has_transparency_data


def latent_mask(mask: torch.Tensor) -> torch.Tensor:
    """(1, H, W) pixel mask in [0, 1] -> (1, H/8, W/8): each latent's share of its 8x8 pixels, averaged."""
    return F.avg_pool2d(mask[None], LATENT_SCALE)[0]


def loss_weights(masks: torch.Tensor, channels: int, floor: float) -> torch.Tensor:
    """(B, 1, h, w) latent masks -> (B, h/2 * w/2, channels * 4) weights packed as the latents are: the mask's value
    lifted so that 0 becomes `floor` (1 stays 1)."""
    weights = floor + (1 - floor) * masks.expand(-1, channels, -1, -1)
    return pack_latents(weights.contiguous())


def batch_weights(samples, channels: int, config) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (B, tokens, C*4) loss weights of a batch of cached samples (one bucket), for the training step and the
    validation loss alike: (toward the target, toward the base model's own prediction).

    Toward the target: each sample's mask lifted to `mask_floor`, times `prior_loss_weight` for regularization images;
    None when every weight is 1. Toward the base: `masked_prior_weight` outside each mask (masked prior preservation:
    where the mask does not teach, the LoRA is held to what the base draws there), times the same regularization
    weight; None when it is off or no sample has a mask."""
    reg = torch.tensor([config.prior_loss_weight if s.is_reg else 1.0 for s in samples]).view(-1, 1, 1)
    masked = any(s.mask is not None for s in samples)
    if not masked and bool((reg == 1).all()):
        return None, None
    shape = samples[0].latents.shape[-2:]
    mask = torch.stack([s.mask if s.mask is not None else torch.ones(1, *shape) for s in samples])
    toward_target = loss_weights(mask, channels, config.mask_floor) * reg
    if not (masked and config.masked_prior_weight):
        return toward_target, None
    return toward_target, loss_weights(1 - mask, channels, 0.0) * (config.masked_prior_weight * reg)
