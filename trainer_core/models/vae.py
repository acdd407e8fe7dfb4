"""The Flux VAE from BFL `ae.safetensors` (or an all-in-one checkpoint) or a diffusers folder."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from torch import Tensor

from .files import assign_weights, check_model_file, count_blocks, key_prefix, model_folder, read_state_dict, \
    shipped_config, weight_files

VAE_SCALE_FACTOR = 8  # pixels per latent: every Flux VAE (tiny included) has 4 blocks, 3 of them downsampling


def infer_vae_config(state_dict: dict[str, Tensor]) -> dict:
    """AutoencoderKL config for a BFL/LDM-named VAE state dict: the real Flux VAE config, widths from the tensors.

    GroupNorm's group count is not stored in the weights: it is 32 (the real value) when every width allows it.
    """
    sd = state_dict
    num_blocks = count_blocks(sd, "encoder.down")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(num_blocks)]
    config = shipped_config("flux-vae.json")
    config.update(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2,
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * num_blocks,
        up_block_types=["UpDecoderBlock2D"] * num_blocks,
        layers_per_block=count_blocks(sd, "encoder.down.0.block"),
        norm_num_groups=math.gcd(32, *widths),
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )
    return config


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> AutoencoderKL:
    """Flux VAE from BFL `ae.safetensors` (or an all-in-one checkpoint) or a diffusers folder. Frozen, eval mode."""
    path = check_model_file(path, "vae")
    if path.is_dir():
        folder = model_folder(path, "vae")
        weight_files(folder)  # our messages for a pickle-only or incomplete folder
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
        if vae.config.latent_channels != 16:
            raise ValueError(f"{path} is a VAE with {vae.config.latent_channels} latent channels; Flux's has 16.")
        return vae.to(device).eval().requires_grad_(False)
    state_dict = read_state_dict(path, key_prefix(path, "encoder.conv_in.weight", "VAE"), dtype, device)
    config = infer_vae_config(state_dict)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    assign_weights(vae, convert_ldm_vae_checkpoint(state_dict, config), path)
    return vae
