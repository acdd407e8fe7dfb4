"""How the demo's base draws around an object it has never seen: the floor under masked prior preservation.

Masked prior preservation (`masked_prior_weight`) teaches a LoRA to draw outside each mask what the base draws there,
given the same picture. So a LoRA trained that way can keep the background no closer to the base's plain picture than
the base itself keeps it with the subject in place. This measures that: the base samples the demo's prompt while the
subject's disc is held fixed inside its mask (inpainting, the known region re-noised to each step's level), and the
background's mean colour is compared with the base's own sample of the same prompt and seed (RGB distance, of 441).

Two subjects of the same shape: the demo's (yellow and red, colours kept out of the base's world so that the subject
score counts only a LoRA's pixels) and one in the world's blue and green.

    .venv/bin/python bench/base_reaction.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core import flow_matching as fm  # noqa: E402
from trainer_core import models  # noqa: E402
from trainer_core.caching import encode_pixels  # noqa: E402
from trainer_core.demo import PROMPT, background  # noqa: E402  the masked learning tests' measure
from trainer_core.demo_stack import COLOURS, MAX_SEQUENCE_LENGTH, SIZE, SUBJECT_COLOURS, demo_stack, draw_shape  # noqa: E402
from trainer_core.masks import latent_mask  # noqa: E402
from trainer_core.sampling import decode_latents, initial_noise  # noqa: E402

STEPS = 12  # as the demo's grid samples
SEEDS = (1, 2, 3)


def picture(disc, bar, radius: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject's pixels (1, 3, H, W) in [-1, 1] on the prompt's teal, and its disc as a (1, h, w) latent mask."""
    image, mask = Image.new("RGB", (SIZE, SIZE), COLOURS["teal"]), Image.new("L", (SIZE, SIZE), 0)
    draw_shape(ImageDraw.Draw(image), "circle", disc, SIZE / 2, SIZE / 2, SIZE * radius)
    draw_shape(ImageDraw.Draw(image), "bar", bar, SIZE / 2, SIZE / 2, SIZE * radius)
    draw_shape(ImageDraw.Draw(mask), "circle", 255, SIZE / 2, SIZE / 2, SIZE * radius)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    inside = latent_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None]) > 0.5
    return pixels, inside.float()


@torch.no_grad()
def sample(transformer, embeds, pooled, seed: int, known: torch.Tensor | None = None, inside: torch.Tensor | None = None):
    """The demo's Euler sampler; with `known` latents, the region `inside` is replaced at each step by `known`
    noised to that step's level with the sample's own noise."""
    noise = initial_noise(1, transformer.config.in_channels // 4, SIZE, SIZE, seed)
    h, w = noise.shape[-2:]
    x = noise.clone()
    sigmas = fm.sampling_sigmas(STEPS, (h // 2) * (w // 2)).tolist()
    ids, txt = fm.image_ids(h, w), fm.text_ids(embeds.shape[1])
    guidance = torch.ones(1) if transformer.config.guidance_embeds else None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if known is not None:
            x = inside * ((1 - sigma) * known + sigma * noise) + (1 - inside) * x
        v = transformer(hidden_states=fm.pack_latents(x), timestep=torch.tensor([sigma]), guidance=guidance,
                        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt, img_ids=ids,
                        return_dict=False)[0]
        x = fm.unpack_latents(fm.pack_latents(x) + (sigma_next - sigma) * v.float(), h, w)
    return x


def main() -> None:
    torch.set_num_threads(1)
    stack = demo_stack()
    transformer = models.load_transformer(stack.transformer_bf16, dtype=torch.float32)
    vae = models.load_vae(stack.vae, dtype=torch.float32)
    encoders = models.load_text_encoders(stack.clip_l, stack.t5, stack.tokenizers, dtype=torch.float32,
                                         max_sequence_length=MAX_SEQUENCE_LENGTH)
    embeds, pooled = encoders.encode([PROMPT])
    subjects = {"the demo's subject (yellow, red)": (SUBJECT_COLOURS["yellow"], SUBJECT_COLOURS["red"]),
                "the same shape in the world's blue, green": (COLOURS["blue"], COLOURS["green"])}
    print(f"prompt {PROMPT!r}, {STEPS} steps; background shift of the base's inpainting from its plain sample, of 441")
    for name, colours in subjects.items():
        pixels, inside = picture(*colours)
        known = encode_pixels(vae, pixels)
        shifts = []
        for seed in SEEDS:
            plain = decode_latents(vae, sample(transformer, embeds, pooled, seed))[0]
            around = decode_latents(vae, sample(transformer, embeds, pooled, seed, known, inside))[0]
            shifts.append(float(np.linalg.norm(background(around) - background(plain))))
        print(f"{name:44s} seeds {SEEDS}: {', '.join(f'{s:.1f}' for s in shifts)}")


if __name__ == "__main__":
    main()
