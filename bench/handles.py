"""Host RAM each training handle adds: Flux-dev's real width, LoRA rank 16 on every block Linear, AdamW.

A handle keeps its LoRA in RAM (samples and the XY grid need it); the optimizer moments (twice the LoRA) go to the
run store on disk. This drives the real `TrainingRun` (store writes, light handles) over a stand-in trainer that
holds real-size LoRA and AdamW tensors but no base model (a 24 GB Flux-dev does not fit this machine's RAM): each
"loop" changes every LoRA and moment value, as training would, and snapshots them as `Trainer.snapshot` does.

Reported: the process's RSS added per loop (after the first, once allocator pools are warm) against the LoRA's
size; the target is a ratio of at most 1.10. Writes ~1 GB of states per loop to a temporary folder.

Run: .venv/bin/python bench/handles.py [--loops 3]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory import flux_dev_config  # noqa: E402
from trainer_core import lora, tiny  # noqa: E402
from trainer_core.checkpoints import TrainingState  # noqa: E402
from trainer_core.config import TrainConfig  # noqa: E402
from trainer_core.data import scan_dataset  # noqa: E402
from trainer_core.demo import write_demo_dataset  # noqa: E402
from trainer_core.run_handle import TrainingRun  # noqa: E402

RANK = 16


def rss_bytes() -> int:
    """Resident set size now (not the peak), after returning freed heap pages to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass  # not glibc: the figure may then include freed pages
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def lora_shapes() -> dict[str, torch.Size]:
    """Name -> shape of every LoRA tensor of rank 16 on Flux-dev's block Linears (an empty model: no memory)."""
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(flux_dev_config())
    lora.add_lora(model, RANK, float(RANK))
    return {k: p.shape for k, p in lora.lora_parameters_by_name(model).items()}


class RealWidthTrainer:
    """The state surface of `Trainer` (step, train, snapshot, restore) at real width, without a model."""

    def __init__(self, config: TrainConfig, records, shapes: dict[str, torch.Size]):
        self.config, self.dataset = config, SimpleNamespace(records=records)
        self.step, self.restored = 0, None
        self.lora = {k: torch.randn(s) for k, s in shapes.items()}
        self.moments = {i: {"exp_avg": torch.zeros(s), "exp_avg_sq": torch.zeros(s)} for i, s in enumerate(shapes.values())}

    def train(self, num_steps: int, on_step=None, should_stop=None) -> int:
        for t in (*self.lora.values(), *(m for ms in self.moments.values() for m in ms.values())):
            t.add_(1e-3)
        self.step += num_steps
        return num_steps

    def snapshot(self) -> TrainingState:
        optimizer = {"state": {i: {"step": torch.tensor(float(self.step)), **{k: v.clone() for k, v in m.items()}}
                               for i, m in self.moments.items()},
                     "param_groups": [{"lr": 1e-4, "params": list(self.moments)}]}
        return TrainingState(step=self.step, epoch=0, cursor=0, lora={k: v.clone() for k, v in self.lora.items()},
                             optimizer=optimizer, rng={"generator": torch.Generator().get_state()},
                             losses=[0.1] * self.step, lrs=[1e-4] * self.step, fingerprint={})

    def restore(self, state: TrainingState) -> None:
        for k, v in state.lora.items():
            self.lora[k].copy_(v)
        for i, m in state.optimizer["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                self.moments[int(i)][k].copy_(m[k])
        self.step = state.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = tiny.write_tiny_flux(Path(tmp) / "models")  # only fingerprinted: the run's identity
        data = write_demo_dataset(Path(tmp) / "data", count=1, size=64)
        config = TrainConfig(transformer_path=str(files.transformer_bf16), vae_path=str(files.vae),
                             clip_path=str(files.clip_l), t5_path=str(files.t5), dataset_dir=str(data),
                             rank=RANK, alpha=float(RANK), output_dir=str(Path(tmp) / "out"))
        shapes = lora_shapes()
        lora_size = sum(s.numel() * 4 for s in shapes.values())
        trainer = RealWidthTrainer(config, scan_dataset(data, "", (512,)), shapes)
        handle = TrainingRun.around(trainer)
        handles, rss = [handle], [rss_bytes()]
        for _ in range(args.loops):
            handles.append(handle := handle.run.train(handle, 10))
            rss.append(rss_bytes())
        added = [b - a for a, b in zip(rss[1:], rss[2:])]  # the first loop also warms the allocator's pools
        per_loop = sum(added) / len(added)
        print(f"LoRA rank {RANK} on Flux-dev's block Linears: {lora_size / 2**20:.0f} MiB (float32); "
              f"AdamW moments {2 * lora_size / 2**20:.0f} MiB, in the run store")
        print(f"host RSS per loop after the first: {', '.join(f'{a / 2**20:.0f} MiB' for a in added)}")
        print(f"host RSS added per loop / LoRA size: {per_loop / lora_size:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
