"""File size of a rank-16 Flux.1-dev LoRA in each `lora_layout` and `lora_format`, and of a LoRA, LoKr and LoHa of
that rank (fused kohya files, the `network` setting), written for real from a meta-device transformer.

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
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_core import lora  # noqa: E402


def adapted(rank: int, **settings) -> FluxTransformer2DModel:
    """Flux.1-dev on the meta device with the adapter's tensors materialised on the CPU (random: the size does not
    depend on the values)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are Flux.1-dev's widths
    lora.add_lora(model, rank, float(rank), **settings)
    for layer in lora._lora_layers(model).values():
        for name in layer.adapter_layer_names:  # only these: the base would take its full size in RAM
            getattr(layer, name).to_empty(device="cpu")
    for param in lora.lora_parameters(model):
        torch.nn.init.normal_(param, std=0.01)
    return model


def saved(model: FluxTransformer2DModel, folder: str, lora_format: str = "kohya") -> tuple[int, int, int]:
    """(bytes on disk, tensors, values stored) of the model's adapter saved as `lora_format`."""
    path = Path(folder) / f"{lora_format}.safetensors"
    lora.save_lora_file(path, model, {}, lora_format)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
    size = path.stat().st_size
    path.unlink()
    return size, len(keys), stored


def networks(rank: int) -> None:
    """The `network` table: fused kohya files of each network at `rank` (LoKr also at lokr_factor 16)."""
    print(f"\n| network (rank {rank}) | tensors | parameters stored | file size (bf16) | ratio to LoRA |")
    print("| --- | --- | --- | --- | --- |")
    lora_size = None
    for label, settings in (("lora", {}), ("lokr", dict(network="lokr")), ("loha", dict(network="loha")),
                            ("lokr, lokr_factor 16", dict(network="lokr", lokr_factor=16))):
        with tempfile.TemporaryDirectory() as folder:
            size, keys, stored = saved(adapted(rank, **settings), folder)
        lora_size = lora_size or size
        print(f"| {label} | {keys} | {stored / 1e6:.2f} M | {size / 2**20:.1f} MiB | {size / lora_size:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| lora_layout | lora_format | tensors | parameters stored | file size (bf16) | ratio to split kohya |")
    print("| --- | --- | --- | --- | --- | --- |")
    sizes = {}
    for layout in ("split", "fused"):
        model = adapted(args.rank, layout=layout)
        params = sum(p.numel() for p in lora.lora_parameters(model))
        print(f"| {layout} | ({params / 1e6:.1f} M trained parameters at rank {args.rank}) | | | | |")
        with tempfile.TemporaryDirectory() as folder:
            for lora_format in lora.LORA_FORMATS:
                sizes[layout, lora_format], keys, stored = saved(model, folder, lora_format)
                print(f"| {layout} | {lora_format} | {keys} | {stored / 1e6:.1f} M | "
                      f"{sizes[layout, lora_format] / 2**20:.1f} MiB | "
                      f"{sizes[layout, lora_format] / sizes['split', 'kohya']:.3f} |")
    kohya = sizes["fused", "kohya"] / 2**20
    print(f"\nfused kohya file: {kohya:.1f} MiB ({'OK' if kohya <= 170 else 'over'} the 170 MiB target)")
    networks(args.rank)

if __name__ == "__main__":
    main()
