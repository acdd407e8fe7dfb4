"""Full-size rehearsal of a run on this CPU: the real code path on files of the real Flux-dev widths.

    nice -n 10 .venv/bin/python bench/rehearsal.py [--dir /tmp/flux-rehearsal] [--size 256] [--seq 16]

Writes random model files once (reused when present): a BFL-layout transformer with float8 block Linears
(~12 GB, as flux1-dev-fp8), a T5-XXL-shaped encoder with float8 Linears, CLIP-L and the VAE in bf16. The second
base that samples are judged on is a hard link to the first: a different path, so the run drops its training base
and reads the "other" one from disk exactly as it would Flux-dev after training on dev2pro. Then it runs preflight,
caching of 2 images (T5, then CLIP, then the VAE), the transformer load, 2 training steps with the 12GB preset's
settings, a checkpoint (LoRA + state), and a 2-step sample on the second base, printing each phase's wall time and
peak RSS. Not part of CI: the weights are random and the figures are this machine's.

The 12GB preset's settings on a CPU: fp8 base, gradient checkpointing, its blocks_to_swap (RAM and "device" are
the same memory here, so only the bookkeeping runs), AdamW instead of bitsandbytes' AdamW8bit (CUDA only), fp32
compute (this CPU has no bf16 matrix units: bf16 is 3x slower here), and a short T5 length (`--seq`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_core import models, tiny  # noqa: E402
from trainer_core.config import TrainConfig  # noqa: E402
from trainer_core.demo import write_demo_dataset  # noqa: E402
from trainer_core.presets import PRESETS  # noqa: E402
from trainer_core.preflight import preflight  # noqa: E402
from trainer_core.trainer import Trainer  # noqa: E402

log = logging.getLogger("bench.rehearsal")
GIB = 2**30
_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16"}


# ----------------------------------------------------------------------------------------- random full-size files
def _random(shape: torch.Size, fp8: bool, name: str) -> torch.Tensor:
    """Small random weights: float8 straight from random bytes (sign, exponent 0-1, any mantissa: |w| < 0.03 and
    never NaN), bf16 otherwise; norm scales are ones, so activations stay finite through every block."""
    if fp8:
        return (torch.randint(0, 256, shape, dtype=torch.uint8) & 0b10001111).view(torch.float8_e4m3fn)
    if len(shape) == 1 and ("norm" in name or "scale" in name or name.endswith("ln_1.weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape) * 0.02).bfloat16()


def write_streaming(path: Path, shapes: dict[str, torch.Size], fp8, metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file of random tensors, written one tensor at a time (a 12 GB file never sits in RAM);
    `fp8(name)` says which are float8. Written under a temporary name and renamed when complete."""
    dtypes = {k: torch.float8_e4m3fn if fp8(k) else torch.bfloat16 for k in shapes}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = dtypes[name].itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": _DTYPES[dtypes[name]], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            f.write(_random(torch.Size(shape), dtypes[name] == torch.float8_e4m3fn, name).view(torch.uint8)
                    .numpy().tobytes())
    os.replace(partial, path)


def meta_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def write_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"transformer": folder / "flux1-dev-fp8-random.safetensors", "vae": folder / "ae-random.safetensors",
             "clip": folder / "clip_l-random.safetensors", "t5": folder / "t5xxl_fp8-random.safetensors",
             "other": folder / "flux1-dev-fp8-random-other.safetensors"}
    tokenizers = tiny.write_tiny_flux(folder / "tiny").tokenizers  # tiny vocabularies fit the real embeddings
    with init_empty_weights():
        flux = FluxTransformer2DModel.from_config(models.shipped_config("flux-dev-transformer.json"))
        vae = AutoencoderKL.from_config(models.shipped_config("flux-vae.json"))
        clip = CLIPTextModel(CLIPTextConfig.from_dict(models.shipped_config("clip-l.json")))
        t5 = T5EncoderModel(T5Config.from_dict(models.shipped_config("t5-xxl-encoder.json")))
    jobs = [
        ("transformer", lambda: models.diffusers_to_bfl(flux.state_dict()),
         lambda k: k.startswith(("double_blocks.", "single_blocks.")) and k.endswith("weight")
         and "norm" not in k, None),
        ("t5", lambda: {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
         lambda k: k.startswith("encoder.block.") and "layer_norm" not in k and "relative_attention_bias" not in k,
         None),
        ("clip", lambda: {f"text_model.{k}": v for k, v in clip.state_dict().items()}, lambda k: False,
         {"num_attention_heads": str(clip.config.num_attention_heads)}),
        ("vae", lambda: tiny.vae_to_bfl(vae.state_dict(), len(vae.config.block_out_channels)), lambda k: False, None),
    ]
    for role, state_dict, fp8, metadata in jobs:
        if not paths[role].exists():
            t0 = time.perf_counter()
            write_streaming(paths[role], {k: v.shape for k, v in state_dict().items()}, fp8, metadata)
            log.info("wrote %s (%.1f GB) in %.0f s", paths[role], paths[role].stat().st_size / 1e9,
                     time.perf_counter() - t0)
    if not paths["other"].exists():
        os.link(paths["transformer"], paths["other"])
    return paths | {"tokenizers": tokenizers}


# ----------------------------------------------------------------------------------------- measuring phases
class PhaseMeter:
    """`phase(name)` times a block and notes the peak of `measure()` in it, sampled every 20 ms by a thread (and
    `reset()` at its start); `table()` lists the phases."""

    def __init__(self, measure: Callable[[], int], reset: Callable[[], None] = lambda: None, unit: str = "RSS"):
        self.measure, self.reset, self.unit = measure, reset, unit
        self.rows: list[tuple[str, float, float]] = []
        self._peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self.measure())

    @contextmanager
    def phase(self, name: str):
        self.reset()
        self._peak = self.measure()
        t0 = time.perf_counter()
        log.info("phase: %s", name)
        yield
        self._peak = max(self._peak, self.measure())
        self.rows.append((name, time.perf_counter() - t0, self._peak / GIB))
        log.info("done: %s in %.1f s, peak %s %.1f GiB", *self.rows[-1][:2], self.unit, self.rows[-1][2])

    def table(self) -> str:
        lines = [f"| phase | wall s | peak {self.unit} GiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {seconds:.1f} | {peak:.1f} |" for name, seconds, peak in self.rows]
        return "\n".join(lines)


def rss() -> int:
    """This process's resident set, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_config(paths: dict[str, Path], dataset: Path, out: Path, size: int, seq: int, **settings) -> TrainConfig:
    """A config on the rehearsal files: the second base as the validation base, images of `size` (whatever
    resolution the preset's `settings` train at: the sample is drawn at it too)."""
    return TrainConfig(
        transformer_path=str(paths["transformer"]), vae_path=str(paths["vae"]), clip_path=str(paths["clip"]),
        t5_path=str(paths["t5"]), dataset_dir=str(dataset), tokenizer_dir=str(paths["tokenizers"]),
        validation_transformer_path=str(paths["other"]), max_sequence_length=seq, output_dir=str(out),
        output_name="rehearsal", trigger_word="fltglyph", **{**settings, "resolutions": (size,)},
    )


def run_phases(config: TrainConfig, meter: PhaseMeter, steps: int, sample_steps: int = 2) -> Trainer:
    """The real path, each phase measured: preflight, caching (T5, CLIP, VAE), the base load, (with compile_blocks,
    the first step, which compiles), `steps` training steps, a checkpoint, and a `sample_steps` sample on the validation base."""
    prompt = "fltglyph, a glyph on a teal background"
    with meter.phase("preflight (headers, dataset)"):
        records = preflight(config)
    stages = iter(["cache: T5 then CLIP (text), each freed", "cache: VAE (2 latents)", "load the transformer"])
    current = [meter.phase(next(stages))]

    def on_progress(stage, done, total):  # from_config's stages end as their last item is done
        if done == total:
            current[0].__exit__(None, None, None)
            current[0] = meter.phase(next(stages))
            current[0].__enter__()

    current[0].__enter__()
    trainer = Trainer.from_config(config, on_progress=on_progress, records=records, prompts=[prompt])
    current[0].__exit__(None, None, None)
    if config.compile_blocks:  # timed apart, so that the training phase's s/it is the compiled steps'
        with meter.phase("compile_blocks: the first step compiles the blocks"):
            trainer.train(1)
    with meter.phase(f"train {steps} steps"):
        trainer.train(steps)
    with meter.phase("SaveCheckpoint (LoRA + state)"):
        out = Path(config.output_dir)
        trainer.save_lora(out / f"{config.output_name}.safetensors")
        trainer.save_state(out / f"{config.output_name}.state.safetensors")
    size = config.resolutions[0]
    with meter.phase(f"sample {sample_steps} steps on the second base"):
        trainer.sample([prompt], base_path=config.validation_transformer_path, steps=sample_steps, width=size,
                       height=size)
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flux-rehearsal"), help="where the files go")
    parser.add_argument("--size", type=int, default=256, help="image size, pixels")
    parser.add_argument("--seq", type=int, default=16, help="T5 tokens per caption")
    parser.add_argument("--steps", type=int, default=2, help="training steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    meter = PhaseMeter(rss)
    with meter.phase("write the random files (once)"):
        paths = write_files(args.dir)
    dataset = write_demo_dataset(args.dir / "data", count=2, size=args.size)
    settings = {**PRESETS["12GB"].train_settings(), "optimizer": "adamw", "mixed_precision": "fp32", "device": "cpu"}
    config = run_config(paths, dataset, args.dir / "out", args.size, args.seq, **settings)
    log.info("settings: %s", {k: getattr(config, k) for k in settings})
    trainer = run_phases(config, meter, args.steps)

    print(f"full-size rehearsal: {args.size}² images, T5 length {args.seq}, losses "
          f"{', '.join(f'{x:.4f}' for x in trainer.losses)}")
    print(meter.table())
    worst = max(peak for _, _, peak in meter.rows)
    print(f"peak RSS {worst:.1f} GiB (limit 20)")
    return 0 if worst <= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
