"""Training-step time of trainer_core against a plain diffusers + peft loop, measured in the same run.

    .venv/bin/python bench/step.py [--steps 20] [--rounds 3]

Both train the same small-but-not-trivial Flux (2 double + 4 single blocks, width 256, 256 image + 64 text
tokens) with the same LoRA, data, optimizer settings and precision, on this machine's CPU. Rounds alternate
between the loops so drift in machine load hits both alike; the figure is the ratio of median step times
(< 1.0: trainer_core is faster; the target is <= 0.85), with each loop's achieved GFLOP/s (its step's FLOPs as
torch's FlopCounterMode counts them, over its step time) as a share of this CPU's fp32 matmul peak, measured in the
same run. trainer_core trains in its default fused layout (one LoRA per fused qkv / linear1); "split layout" is the
layout of runs made before it, diffusers' Linears one by one, as the reference has them. Also measured:
trainer_core with gradient checkpointing of every block, of half of them (`checkpoint_blocks`, with its step time
as a ratio of full checkpointing), with block swap, and with `compile_blocks` (torch.compile of each block for the
training step; its first step, which compiles, is timed apart and printed). The target line judges the fastest
trainer_core configuration a user can set, and names it. Apart from it: a LoKr (`network` lokr) trained through
`KroneckerLinear`, as the trainer does, against peft's own LoKr forward, which builds each Linear's whole update.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core import lora  # noqa: E402
from trainer_core.caching import CachedDataset, CachedSample  # noqa: E402
from trainer_core.config import TrainConfig  # noqa: E402
from trainer_core.data import ImageRecord  # noqa: E402
from trainer_core.distributed import SINGLE, Processes  # noqa: E402
from trainer_core.flow_matching import image_ids, noisy_input_and_target, pack_latents, sample_sigmas, text_ids  # noqa: E402
from trainer_core.trainer import Trainer  # noqa: E402

RANK, LR, SEED = 16, 1e-4, 0
MODEL = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
             joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
LATENT, TEXT = (16, 32, 32), 64  # a 256 px image: 256 packed tokens
COMPILED = "trainer_core + compile_blocks"
LOKR, LOKR_PEFT = "LoKr (Kronecker forward)", "LoKr, peft's forward (update built)"


def make_dataset(n: int = 4) -> CachedDataset:
    g = torch.Generator().manual_seed(SEED)
    samples = [CachedSample(latents=torch.randn(*LATENT, generator=g), prompt_embeds=torch.randn(TEXT, 256, generator=g),
                            pooled=torch.randn(64, generator=g), caption=f"sample {i}", bucket=(256, 256))
               for i in range(n)]
    records = [ImageRecord(path=Path(f"sample{i}.png"), caption=s.caption, bucket=(256, 256)) for i, s in enumerate(samples)]
    empty = (torch.zeros(TEXT, 256), torch.zeros(64))
    return CachedDataset(records=records, samples=samples, flipped=None, empty_prompt=empty)


class ReferenceLoop:
    """What a user would write with diffusers and peft alone: the baseline."""

    def __init__(self, transformer: FluxTransformer2DModel, dataset: CachedDataset):
        self.model, self.dataset = transformer, dataset
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=lora.target_regex(
            lora.parse_blocks("all", {"double": MODEL["num_layers"], "single": MODEL["num_single_layers"]}), True)))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.g = torch.Generator().manual_seed(SEED)
        self.i = 0

    def step(self) -> float:
        s = self.dataset.samples[self.i % len(self.dataset.samples)]
        self.i += 1
        x0 = pack_latents(s.latents[None])
        noise = torch.randn(x0.shape, generator=self.g)
        sigmas = sample_sigmas(1, "shift", self.g)
        x_t, target = noisy_input_and_target(x0, noise, sigmas)
        pred = self.model(hidden_states=x_t, encoder_hidden_states=s.prompt_embeds[None], pooled_projections=s.pooled[None],
                          timestep=sigmas, img_ids=image_ids(*LATENT[1:]), txt_ids=text_ids(TEXT),
                          guidance=torch.ones(1), return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


def ours(base: FluxTransformer2DModel, dataset: CachedDataset, processes: Processes = SINGLE, **changes) -> Trainer:
    settings = dict(rank=RANK, alpha=RANK, learning_rate=LR, mixed_precision="fp32", device="cpu", seed=SEED,
                    gradient_checkpointing=False)
    config = TrainConfig(transformer_path="bench", vae_path="bench", clip_path="bench", t5_path="bench", dataset_dir="bench",
                         **{**settings, **changes})
    return Trainer(config, copy.deepcopy(base), vae=None, text_encoders=None, dataset=dataset, device="cpu",
                   processes=processes)


def with_peft_lokr_forward(trainer: Trainer) -> Trainer:
    """The LoKr layers back on peft's own forward: the reference for `KroneckerLinear`."""
    for layer in lora._lora_layers(trainer.transformer).values():
        layer.__class__ = lora.lycoris.LoKrLinear
    return trainer


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def step_flops(step) -> int:
    """FLOPs of one training step (forward and backward), as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """This CPU's fp32 matmul throughput in FLOP/s: the best of `repeats` square products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(time_steps(lambda: a @ b, 1) for _ in range(repeats))
    return 2 * size**3 / best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    base = FluxTransformer2DModel(**MODEL)
    dataset = make_dataset()
    loops = {
        "reference (diffusers + peft)": ReferenceLoop(copy.deepcopy(base), dataset).step,
        "trainer_core": (lambda t: lambda: t.train(1))(ours(base, dataset)),
        "trainer_core, split layout": (lambda t: lambda: t.train(1))(ours(base, dataset, lora_layout="split")),
        "trainer_core + checkpointing": (lambda t: lambda: t.train(1))(ours(base, dataset, gradient_checkpointing=True)),
        # what the presets do where the card has room: only the last blocks recompute (here 3 of 6)
        "trainer_core + checkpointing 3 of 6 blocks": (lambda t: lambda: t.train(1))(
            ours(base, dataset, gradient_checkpointing=True, checkpoint_blocks=3)),
        "trainer_core + checkpointing + swap all blocks": (lambda t: lambda: t.train(1))(
            ours(base, dataset, gradient_checkpointing=True, blocks_to_swap=6)),
        COMPILED: (lambda t: lambda: t.train(1))(ours(base, dataset, compile_blocks=True)),
        LOKR: (lambda t: lambda: t.train(1))(ours(base, dataset, network="lokr")),
        LOKR_PEFT: (lambda t: lambda: t.train(1))(with_peft_lokr_forward(ours(base, dataset, network="lokr"))),
    }
    compile_seconds = time_steps(loops[COMPILED], 1)  # the first compiled step compiles the blocks
    for step in loops.values():  # warm up allocators and kernels
        time_steps(step, 3)
    # the compiled step does the eager step's arithmetic; its FLOPs are counted on the eager one
    flops = {name: step_flops(step) for name, step in loops.items() if name != COMPILED}
    flops[COMPILED] = flops["trainer_core"]
    times = {name: [] for name in loops}
    peaks = []
    for _ in range(args.rounds):
        peaks.append(matmul_peak())
        for name, step in loops.items():
            times[name].append(time_steps(step, args.steps))
    peak = statistics.median(peaks)

    reference = statistics.median(times["reference (diffusers + peft)"])
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, "
          f"model {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params, LoRA rank {RANK}")
    print(f"fp32 matmul peak (2048^3, median of rounds): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'loop':50s} {'s/step':>8s} {'ratio':>7s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:50s} {t:8.4f} {t / reference:7.3f} {flops[name] / t / 1e9:8.1f} {flops[name] / t / peak:8.1%}")
    partial = statistics.median(times["trainer_core + checkpointing 3 of 6 blocks"])
    full = statistics.median(times["trainer_core + checkpointing"])
    print(f"partial / full checkpointing step time: {partial / full:.3f}")
    print(f"compile_blocks: first step (compiling both block types) {compile_seconds:.1f} s")
    print(f"LoKr step time, Kronecker forward / peft's: "
          f"{statistics.median(times[LOKR]) / statistics.median(times[LOKR_PEFT]):.3f}")
    best = min((n for n in times if n.startswith("trainer_core")), key=lambda n: statistics.median(times[n]))
    ratio = statistics.median(times[best]) / reference
    print(f"\ntrainer_core / reference step time: {ratio:.3f}, fastest configuration: {best} "
          f"({'OK' if ratio <= 0.85 else 'over the 0.85 target'})")
    return 0 if ratio <= 0.85 else 1


if __name__ == "__main__":
    sys.exit(main())
