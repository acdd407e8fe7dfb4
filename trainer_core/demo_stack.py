"""The demo's stack: a small VAE that keeps the demo's colours and a small Flux base that draws the demo's world
(coloured backgrounds with simple shapes, from captions) but never the demo's subject.

The files ship in `demo_weights/` in the layouts users have (BFL transformer bf16 and fp8, BFL `ae.safetensors`,
ComfyUI CLIP-L and T5 files, tokenizers) and load through `models` like real ones. They were made by
`python -m trainer_core.demo_stack` (single-threaded and seeded, so the same torch gives the same files):

1. the tiny random CLIP-L / T5 / tokenizers of `tiny.write_tiny_flux` (seed 0), kept frozen: their embeddings
   still differ per word, which is all the base needs to tell captions apart;
2. the VAE (`demo_vae`), written by hand rather than trained: 8x8 pixel blocks to 16 latent channels and back,
   exact in colour;
3. the transformer, trained with flow matching on cached latents of captioned world pictures.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw

from . import flow_matching as fm
from . import models, tiny

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).with_name("demo_weights")
SIZE = 256  # pixels of the demo's pictures: 32x32 latents, enough for the subject to keep its shape
MAX_SEQUENCE_LENGTH = tiny.MAX_SEQUENCE_LENGTH
# the world's colours; the subject's yellow and red are kept out of it, so a pixel of theirs is the LoRA's doing
COLOURS = {
    "teal": (30, 110, 120), "orange": (220, 120, 40), "purple": (90, 50, 130), "grey": (128, 128, 128),
    "blue": (40, 70, 180), "green": (50, 140, 60), "pink": (230, 140, 180), "white": (235, 235, 235),
    "black": (25, 25, 25), "brown": (120, 80, 40),
}  # fmt: skip
SUBJECT_COLOURS = {"yellow": (250, 220, 40), "red": (210, 30, 40)}
SHAPES = ("circle", "square", "triangle", "ring", "bar")


@dataclass(frozen=True)
class DemoStackPaths:
    transformer_bf16: Path  # BFL keys, bf16, `model.diffusion_model.` prefix (the training base)
    transformer_fp8: Path  # BFL keys, float8_e4m3fn matrices (the validation base of the tiny ComfyUI workflow)
    vae: Path  # BFL ae.safetensors layout
    clip_l: Path  # ComfyUI clip_l layout
    t5: Path  # ComfyUI t5xxl layout
    tokenizers: Path  # clip/ and t5/


def stack_paths(folder: str | Path = WEIGHTS) -> DemoStackPaths:
    folder = Path(folder)
    return DemoStackPaths(
        transformer_bf16=folder / "flux-demo-bf16.safetensors", transformer_fp8=folder / "flux-demo-fp8.safetensors",
        vae=folder / "ae.safetensors", clip_l=folder / "clip_l.safetensors", t5=folder / "t5xxl_tiny.safetensors",
        tokenizers=folder / "tokenizers",
    )  # fmt: skip


def demo_stack(folder: str | Path = WEIGHTS) -> DemoStackPaths:
    """The shipped (or rebuilt) demo stack's files; raises if one is missing."""
    paths = stack_paths(folder)
    missing = [p for p in astuple(paths) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"demo stack: {', '.join(map(str, missing))} missing; restore {folder} from git or "
                                f"rebuild it with `python -m trainer_core.demo_stack --out {folder}`")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# pictures


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float):
    """One of `SHAPES` of radius `r` centred on (cx, cy)."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.9, cy + r * 0.7), (cx - r * 0.9, cy + r * 0.7)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(r / 3.6)))
    elif shape == "bar":
        draw.rectangle([cx - r * 0.15, cy - r * 0.9, cx + r * 0.15, cy + r * 0.9], fill=colour)
    else:
        raise ValueError(f"shape: {shape!r}; choose one of {', '.join(SHAPES)}")


def world_picture(rng: random.Random, size: int = SIZE) -> tuple[Image.Image, str]:
    """A captioned picture of the base's world: a background, mostly with one shape of another colour in its centre."""
    background = rng.choice(sorted(COLOURS))
    img = Image.new("RGB", (size, size), COLOURS[background])
    if rng.random() < 0.15:
        return img, f"a plain {background} background"
    colour = rng.choice(sorted(set(COLOURS) - {background}))
    shape = rng.choice(SHAPES)
    # one place and size: a caption then names one picture, which a base this small learns cleanly in minutes
    draw_shape(ImageDraw.Draw(img), shape, COLOURS[colour], size / 2, size / 2, size / 4)
    return img, f"{article(colour)} {colour} {shape} on {article(background)} {background} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------------------
# the models


# The VAE is written by hand, not trained, so that it keeps every colour exactly. Its 9 channels per layer are
# (+r, +g, +b, -r, -g, -b, +C, -C, 0): one GroupNorm group over channels in +/- pairs has mean 0 and, with C large,
# a standard deviation of C * sqrt(2 / 9) whatever the picture, so a norm scaled by that is the identity; and
# SiLU(x) - SiLU(-x) = x undoes the activation exactly. Residual branches are zero, so each block passes its input.
_VAE_WIDTH, _VAE_CONSTANT = 9, 1000.0


def demo_vae() -> AutoencoderKL:
    """Flux's VAE layout (16 latent channels, 8 pixels per latent) that encodes each 8x8 block's mean colour, mixed
    into the 16 channels by a fixed orthogonal 16x3 matrix (so the transformer sees Flux-like latents near unit
    scale), and decodes by inverting the mix and upsampling bilinearly. Deterministic and exact: flat colours come
    back as they went in, edges blurred over a latent's 8 pixels."""
    config = models.shipped_config("flux-vae.json")
    width, big = _VAE_WIDTH, _VAE_CONSTANT
    config.update(block_out_channels=[width] * 4, layers_per_block=1, norm_num_groups=1, mid_block_add_attention=False)
    vae = AutoencoderKL.from_config(config)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    mix = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))[0] * math.sqrt(16 / 3)
    unmix = mix.T * (3 / 16)  # its pseudo-inverse
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        for name, param in vae.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name and name.endswith("weight") else 0)

        def centre(conv, rows, cols, values):  # a 3x3 conv's centre tap: a 1x1 linear map
            conv.weight[rows, cols, 1, 1] = values

        def per_channel(conv, kernels):  # a 3x3 kernel for each channel, no mixing
            for ch, kernel in enumerate(kernels):
                conv.weight[ch, ch] = kernel

        # in: rgb (encoder) or the unmixed latents (decoder) as +/- pairs, and the two constants
        for conv, weights, bias in ((enc.conv_in, torch.eye(3), torch.zeros(3)),
                                    (dec.conv_in, unmix * scale, -(unmix * shift * scale).sum(1))):
            centre(conv, slice(0, 3), slice(None), weights)
            centre(conv, slice(3, 6), slice(None), -weights)
            conv.bias[:3], conv.bias[3:6], conv.bias[6], conv.bias[7] = bias, -bias, big, -big
        box = torch.zeros(3, 3)
        box[:2, :2] = 0.25  # Downsample2D pads right and bottom, then strides 2: these taps average a 2x2 block
        for block in enc.down_blocks[:-1]:
            per_channel(block.downsamplers[0].conv, [box] * width)
        tent = torch.tensor([0.25, 0.5, 0.25])
        bilinear, keep = tent[:, None] * tent, torch.zeros(3, 3)
        keep[1, 1] = 1  # the constants are not blurred into the zero padding: the norm's statistics stay fixed
        for block in dec.up_blocks[:-1]:  # after Upsample2D's nearest-neighbour doubling: bilinear
            per_channel(block.upsamplers[0].conv, [bilinear] * 6 + [keep] * (width - 6))
        for norm in (enc.conv_norm_out, dec.conv_norm_out):
            norm.weight.zero_()
            norm.weight[:6] = big * math.sqrt(2 / width)
        # out: latents with (z - shift) * scale = mix @ rgb and no sampling noise; pixels = SiLU(+x) - SiLU(-x)
        centre(enc.conv_out, slice(0, 16), slice(0, 3), mix / scale)
        centre(enc.conv_out, slice(0, 16), slice(3, 6), -mix / scale)
        enc.conv_out.bias[:16], enc.conv_out.bias[16:] = shift, -30.0
        centre(dec.conv_out, slice(None), slice(0, 3), torch.eye(3))
        centre(dec.conv_out, slice(None), slice(3, 6), -torch.eye(3))
    return vae.eval().requires_grad_(False)


def transformer_config() -> dict:
    """The tiny config, 96 wide (the 64 values of a packed latent token and 32 more for `identity_start`), in heads
    of 32 so that the rotary embedding gives rows and columns 7 frequencies each: where a shape goes is known only
    through it."""
    config = tiny.tiny_transformer_config()
    config.update(num_layers=2, num_single_layers=2, num_attention_heads=3, attention_head_dim=32,
                  axes_dims_rope=list(models.rope_axes(32)))  # fmt: skip
    return config


def identity_start(model: FluxTransformer2DModel, big: float = 10.0) -> FluxTransformer2DModel:
    """Set a new transformer to predict v = x_t, with every block gated off (DiT's adaLN-zero start).

    A velocity v = (x_t - x0) / sigma is mostly its input at high noise, and a net this small learns to copy its
    input only slowly through the final LayerNorm: an untrained copy leaves the noise of the first sampling steps in
    the picture as a mosaic. Here the copy is exact from the start, so training spends itself on x0 and 1 / sigma.
    The input fills the first 64 hidden dimensions; the other 32 hold +big and -big, which cancel in LayerNorm's
    mean and fix its deviation, so the norm is linear; `proj_out` maps back, adding the mean the norm took off.
    """
    tokens, width = model.config.in_channels, model.inner_dim
    spare = width - tokens
    sd = (big**2 * spare / width) ** 0.5  # LayerNorm's deviation, the input's share of it left out
    with torch.no_grad():
        model.x_embedder.weight.zero_()
        model.x_embedder.weight[:tokens] = torch.eye(tokens)
        model.x_embedder.bias.zero_()
        model.x_embedder.bias[tokens:] = torch.tensor([big, -big]).repeat(spare // 2)
        model.proj_out.weight.zero_()
        model.proj_out.weight[:, :tokens] = sd * torch.eye(tokens)
        model.proj_out.weight[:, tokens:] = -sd / spare
        model.proj_out.bias.zero_()
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) or name == "norm_out.linear":
                module.weight.zero_()
                module.bias.zero_()
    return model


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    return VaeImageProcessor().preprocess(images)  # (B, 3, H, W) in [-1, 1]


def train_transformer(paths: DemoStackPaths, steps: int, count: int = 1024, batch: int = 16, seed: int = 0):
    """Flow matching on `count` world pictures, encoded once by the written VAE and text encoders (as the demo loads
    them). Guidance is drawn at random, so the base ignores it like a de-distilled Flux."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = models.load_vae(paths.vae, dtype=torch.float32)
    encoders = models.load_text_encoders(paths.clip_l, paths.t5, paths.tokenizers, dtype=torch.float32,
                                         max_sequence_length=MAX_SEQUENCE_LENGTH)
    pictures = [world_picture(rng) for _ in range(count)]
    captions = sorted({c for _, c in pictures})
    with torch.no_grad():
        embeds, pooled = encoders.encode(captions)
        index = {c: i for i, c in enumerate(captions)}
        caption_ids = torch.tensor([index[c] for _, c in pictures])
        latents = torch.cat([
            (vae.encode(_pixels([p for p, _ in pictures[i : i + 64]])).latent_dist.mode()
             - vae.config.shift_factor) * vae.config.scaling_factor
            for i in range(0, count, 64)
        ])  # fmt: skip
    log.info("latents: mean %.3f std %.3f; %d captions", latents.mean(), latents.std(), len(captions))
    x0_all = fm.pack_latents(latents)  # (N, tokens, 64)
    h, w = latents.shape[-2:]
    img_ids, txt_ids = fm.image_ids(h, w), fm.text_ids(MAX_SEQUENCE_LENGTH)

    model = identity_start(FluxTransformer2DModel.from_config(transformer_config()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(count, (batch,), generator=g)
        x0 = x0_all[idx]
        sigmas = torch.where(torch.rand(batch, generator=g) < 0.5, torch.rand(batch, generator=g),
                             fm.sample_sigmas(batch, "logit_normal", g))
        x_t, target = fm.noisy_input_and_target(x0, torch.randn(x0.shape, generator=g), sigmas)
        pred = model(hidden_states=x_t, encoder_hidden_states=embeds[caption_ids[idx]],
                     pooled_projections=pooled[caption_ids[idx]], timestep=sigmas,
                     guidance=1 + 4 * torch.rand(batch, generator=g), img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("transformer step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - t0)
    return model.eval().requires_grad_(False)


def build(folder: str | Path, transformer_steps: int) -> DemoStackPaths:
    """Write the whole stack into `folder`."""
    torch.set_num_threads(1)  # reductions in one order: the same files on any machine with this torch
    paths = stack_paths(folder)
    paths.tokenizers.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        random_stack = tiny.write_tiny_flux(tmp, seed=0)
        shutil.copyfile(random_stack.clip_l, paths.clip_l)
        shutil.copyfile(random_stack.t5, paths.t5)
        shutil.copytree(random_stack.tokenizers, paths.tokenizers, dirs_exist_ok=True)
    tiny.write_vae_file(demo_vae(), paths.vae)
    model = train_transformer(paths, transformer_steps)
    tiny.write_transformer_files(model, paths.transformer_bf16, paths.transformer_fp8)
    return demo_stack(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer_core.demo_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS), help="folder to write the stack into")
    parser.add_argument("--transformer-steps", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build(args.out, args.transformer_steps)


if __name__ == "__main__":
    main()
