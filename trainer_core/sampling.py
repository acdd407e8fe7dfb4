"""Euler flow-matching sampling of Flux from precomputed text embeddings, as diffusers' FluxPipeline does it.

Training calls this mid-run, so sampling leaves the models in the train/eval mode it found them in, and draws its
noise from its own seeded CPU generator: the same seed gives the same image on any device and never advances the
training RNG.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import nn

from . import flow_matching as fm
from .lora import set_lora_strength
from .models import VAE_SCALE_FACTOR

logger = logging.getLogger(__name__)

SIZE_MULTIPLE = 2 * VAE_SCALE_FACTOR  # 8x VAE downsampling, then 2x2 patches into tokens


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode inside (no dropout, LoRA dropout included); each module's own mode restored after."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_request(prompt_embeds: torch.Tensor, pooled: torch.Tensor, width: int, height: int, steps: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            nearest = max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            raise ValueError(f"{name}: {value} is not a positive multiple of {SIZE_MULTIPLE}; use e.g. {nearest}")
    if steps < 1:
        raise ValueError(f"steps: {steps}; sampling needs at least 1 step")
    if prompt_embeds.dim() != 3 or pooled.dim() != 2 or prompt_embeds.shape[0] != pooled.shape[0]:
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and pooled {tuple(pooled.shape)} must be "
                         "(B, L, D) and (B, D) with the same B; encode the prompts with TextEncoders.encode")


def initial_noise(batch_size: int, channels: int, width: int, height: int, seed: int) -> torch.Tensor:
    """(B, C, H/8, W/8) float32 standard normal noise on the CPU, the same for a seed on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch_size, channels, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_latents(
    transformer: FluxTransformer2DModel,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    width: int,
    height: int,
    steps: int = 20,
    guidance: float = 3.5,
    seed: int = 0,
    callback: Callable[[int, int], None] | None = None,
    negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    true_cfg_scale: float = 1.0,
    control_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise seeded noise into latents with `steps` Euler steps of the flow x_{i+1} = x_i + (σ_{i+1} − σ_i)·v.

    prompt_embeds: (B, L, D) T5 states; pooled: (B, D') CLIP pooled output. `guidance` feeds Flux-dev's guidance
    embedding and is ignored by bases without one (schnell-like). `callback(step, steps)` runs after each step,
    step counting from 1. Returns (B, 16, H/8, W/8) float32 latents in the VAE's scaled and shifted space.

    True classifier-free guidance (for de-distilled bases such as Flux-dev2pro, whose guidance embedding does not
    work): when `true_cfg_scale` is not 1, `negative` = (embeds, pooled) of the negative prompt, shaped like the
    prompts', and each step takes v = v_neg + true_cfg_scale (v − v_neg), a second forward pass, as FluxPipeline does.

    Kontext: `control_latents` (B or 1, 16, h', w'), the control image encoded like `caching.encode_pixels`, are packed
    and appended to the image tokens with position index 1 at every step, as FluxKontextPipeline does.
    """
    _check_request(prompt_embeds, pooled, width, height, steps)
    cfg = true_cfg_scale != 1.0
    if cfg:
        if negative is None:
            raise ValueError("true_cfg_scale: not 1.0, so a negative prompt is needed (an empty one is fine)")
        _check_request(negative[0], negative[1], width, height, steps)
    device, dtype = transformer.device, transformer.dtype
    b = prompt_embeds.shape[0]
    noise = initial_noise(b, transformer.config.in_channels // 4, width, height, seed)
    lat_h, lat_w = noise.shape[-2:]
    x = fm.pack_latents(noise).to(device)  # (B, N, 64), kept in float32 between steps like the scheduler's update
    sigmas = fm.sampling_sigmas(steps, x.shape[1]).tolist()
    img_ids = fm.image_ids(lat_h, lat_w, device=device, dtype=dtype)
    txt_ids = fm.text_ids(prompt_embeds.shape[1], device=device, dtype=dtype)
    prompt_embeds, pooled = prompt_embeds.to(device, dtype), pooled.to(device, dtype)
    guidance_vec = (torch.full((b,), guidance, device=device, dtype=torch.float32)
                    if transformer.config.guidance_embeds else None)
    if cfg:
        neg_embeds, neg_pooled = negative[0].to(device, dtype), negative[1].to(device, dtype)
        neg_txt_ids = fm.text_ids(neg_embeds.shape[1], device=device, dtype=dtype)

    def velocity(sigma: float, embeds: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        tokens, positions = x.to(dtype), img_ids
        if control_latents is not None:
            tokens, positions = fm.append_control(tokens, img_ids, control_latents)
        return transformer(
            hidden_states=tokens,
            timestep=torch.full((b,), sigma, device=device, dtype=dtype),  # the model scales it by 1000 itself
            guidance=guidance_vec,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=ids,
            img_ids=positions,
            return_dict=False,
        )[0][:, :x.shape[1]]

    with _eval_mode(transformer):
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            v = velocity(sigma, prompt_embeds, pooled, txt_ids)
            if cfg:
                v_neg = velocity(sigma, neg_embeds, neg_pooled, neg_txt_ids)
                v = v_neg + true_cfg_scale * (v - v_neg)
            x = x + (sigma_next - sigma) * v.float()
            if callback is not None:
                callback(i + 1, steps)
    return fm.unpack_latents(x, lat_h, lat_w)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> list[Image.Image]:
    """(B, 16, h, w) scaled and shifted latents -> B RGB images of (8w, 8h) pixels."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    with _eval_mode(vae):
        pixels = vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    return VaeImageProcessor().postprocess(pixels.float(), output_type="pil")


def sample_images(
    transformer: FluxTransformer2DModel,
    vae: AutoencoderKL,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    width: int,
    height: int,
    steps: int = 20,
    guidance: float = 3.5,
    seed: int = 0,
    strength: float | None = None,
    callback: Callable[[int, int], None] | None = None,
    negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    true_cfg_scale: float = 1.0,
    control_latents: torch.Tensor | None = None,
) -> list[Image.Image]:
    """One image per prompt: `sample_latents` (true CFG with `negative` when `true_cfg_scale` is not 1), then the VAE.

    `strength` (if given) sets the LoRA adapter's strength first and leaves it set: 0 is the base model exactly,
    1 the LoRA as trained; the caller puts back the strength training needs.
    """
    if strength is not None:
        set_lora_strength(transformer, strength)
    latents = sample_latents(transformer, prompt_embeds, pooled, width=width, height=height, steps=steps,
                             guidance=guidance, seed=seed, callback=callback, negative=negative,
                             true_cfg_scale=true_cfg_scale, control_latents=control_latents)
    logger.debug("sampled %d image(s) of %dx%d in %d steps", latents.shape[0], width, height, steps)
    return decode_latents(vae, latents)
