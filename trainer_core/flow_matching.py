"""Flow-matching math for Flux: latent packing, position ids, timestep sampling, the noisy input and its target.

Kept apart from the model (diffusers' transformer is architecture only) and from the loop, so sampling and
training share one definition of every formula.
"""
from __future__ import annotations

import math

import torch

from .config import TIMESTEP_SAMPLINGS


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens of 2x2 patches, as Flux consumes them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, H/2 * W/2, C*4) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    x = tokens.view(b, latent_height // 2, latent_width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, latent_height, latent_width)


def image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32, index: int = 0) -> torch.Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed image tokens: (index, row, column); `index` 1 marks
    Kontext's control-image tokens, appended after the image's."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def append_control(tokens: torch.Tensor, ids: torch.Tensor, control_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kontext: packed image tokens (B, N, C*4) and their ids (N, 3) with the control image's latents (B or 1, C, h, w)
    packed and appended, their ids at position index 1, as FluxKontextPipeline builds them."""
    control = pack_latents(control_latents.float()).to(tokens.device, tokens.dtype).expand(tokens.shape[0], -1, -1)
    control_ids = image_ids(*control_latents.shape[-2:], device=ids.device, dtype=ids.dtype, index=1)
    return torch.cat([tokens, control], dim=1), torch.cat([ids, control_ids])


def text_ids(sequence_length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(L, 3) position ids of the text tokens: all zero in Flux."""
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def sample_sigmas(
    batch_size: int,
    method: str,
    generator: torch.Generator | None = None,
    shift: float = 3.1582,
) -> torch.Tensor:
    """Training noise levels sigma in (0, 1), one per sample.

    `shift` warps a sigmoid-of-normal draw toward high noise the way kohya's `shift` mode does
    (sigma' = shift * s / (1 + (shift - 1) * s)); `logit_normal` is SD3's; `uniform` is the plain baseline.
    """
    if method == "uniform":
        return torch.rand(batch_size, generator=generator)
    s = torch.sigmoid(torch.randn(batch_size, generator=generator))  # standard logit-normal
    if method in ("sigmoid", "logit_normal"):  # the same draw: kohya's sigmoid at scale 1 is SD3's logit-normal(0, 1)
        return s
    if method == "shift":
        return shift_sigmas(s, shift)
    raise ValueError(f"timestep_sampling: unknown method {method!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """kohya's `shift` warp toward high noise: sigma' = shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1 + (shift - 1) * s)


def noisy_input_and_target(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """Rectified-flow interpolation x_t = (1 - sigma) x0 + sigma noise; the model predicts the velocity noise - x0."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def resolution_shift_mu(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """Flux's resolution-dependent shift: mu grows linearly with the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def sampling_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """num_steps + 1 decreasing noise levels from 1 to 0 for Euler sampling, time-shifted as Flux-dev does."""
    mu = resolution_shift_mu(image_seq_len)
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t[:-1] - 1))
    return torch.cat([shifted, torch.zeros(1)])
