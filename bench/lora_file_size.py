"""File size of a rank-16 Flux.1-dev LoRA in each `lora_layout` and `lora_format`, written for real from a
meta-device transformer.

The base stays on the meta device (no memory); only the LoRA tensors are materialised on the CPU (random values:
the size does not depend on them), then each format is saved with `trainer_core.lora.save_lora_file` into a
temporary folder and its size on disk read back.

Run: .venv/bin/python bench/lora_file_size.py [--rank 16]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_core import lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| lora_layout | lora_format | tensors | parameters stored | file size (bf16) | ratio to split kohya |")
    print("| --- | --- | --- | --- | --- | --- |")
    sizes = {}
    for layout in ("split", "fused"):
        with torch.device("meta"):
            model = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are Flux.1-dev's widths
        lora.add_lora(model, args.rank, float(args.rank), layout=layout)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for part in (layer.lora_A, layer.lora_B):
                    part.to_empty(device="cpu")
                    for param in part.parameters():
                        torch.nn.init.normal_(param, std=0.01)
        params = sum(p.numel() for p in lora.lora_parameters(model))
        print(f"| {layout} | ({params / 1e6:.1f} M trained parameters at rank {args.rank}) | | | | |")
        with tempfile.TemporaryDirectory() as folder:
            for lora_format in lora.LORA_FORMATS:
                path = Path(folder) / f"{lora_format}.safetensors"
                lora.save_lora_file(path, model, {}, lora_format)
                sizes[layout, lora_format] = path.stat().st_size
                with safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
                    stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
                path.unlink()
                print(f"| {layout} | {lora_format} | {len(keys)} | {stored / 1e6:.1f} M | "
                      f"{sizes[layout, lora_format] / 2**20:.1f} MiB | "
                      f"{sizes[layout, lora_format] / sizes['split', 'kohya']:.3f} |")
    kohya = sizes["fused", "kohya"] / 2**20
    print(f"\nfused kohya file: {kohya:.1f} MiB ({'OK' if kohya <= 170 else 'over'} the 170 MiB target)")

if __name__ == "__main__":
    main()
