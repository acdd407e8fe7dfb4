"""The VRAM projection checked on a real CUDA GPU: every preset on its emulated card, each phase's peak and s/it.

    .venv/bin/python bench/gpu_check.py [--dir /tmp/flux-rehearsal] [--steps 3] [--resolutions 512,1024]
    .venv/bin/python bench/gpu_check.py --dry-run     # no GPU: the plan and every config, checked

Writes the full-size random files of `bench/rehearsal.py` on the GPU machine (once), then for each memory preset
(24, 16, 12, 8 GB) and resolution caps this process at the preset's card size with
`torch.cuda.set_per_process_memory_fraction` (a larger card stands in for a smaller one: allocations past the cap
raise out-of-memory as they would there), runs the rehearsal's phases (caching, base load, `--steps` training
steps, checkpoint, 2-step sample on a second base), and prints peak allocated and reserved VRAM per phase and the
training s/it. A preset that runs out of memory is reported, and the next one runs. Compare with `bench/memory.py`.
Then the 24 GB preset and the 16 GB one (block swap) again with `compile_blocks`: their first step, which compiles,
is a phase of its own, so their s/it are the compiled steps'. Last, one table: s/step and peak VRAM per preset and
resolution, beside other trainers' published figures.
Made to finish in under ten minutes on a recent data-centre GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rehearsal import PhaseMeter, run_config, run_phases, write_files  # noqa: E402
from trainer_core.demo import write_demo_dataset  # noqa: E402
from trainer_core.presets import PRESETS, MemoryPreset  # noqa: E402

log = logging.getLogger("bench.gpu_check")
GIB = 2**30
CARDS = ("24GB", "16GB", "12GB", "8GB")
COMPILED_CARDS = ("24GB", "16GB")  # compile_blocks alone, and with block swap
# other trainers' published step times on an RTX 4090 (s/step by resolution), printed beside ours
ANCHORS = {512: "SimpleTuner NF4 1.4", 768: "FluxTrainer 2.42", 1024: "SimpleTuner NF4 3.5"}


def summary(rows: list[tuple[str, int, float | None, float, float]]) -> str:
    """(preset, resolution, s/step or None when out of memory, peak reserved GiB, card GiB) rows as a table, with
    the anchors (a 4090 is a 24 GB card; FluxTrainer's 768 px figure sits between our 512 and 1024 rows)."""
    lines = ["| preset | resolution | s/step | peak VRAM reserved | card | anchors (4090, s/step) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for preset, resolution, seconds, peak, card in rows:
        anchors = "; ".join(f"{a} at {r} px" for r, a in ANCHORS.items() if abs(r - resolution) <= 256)
        step = "out of memory" if seconds is None else f"{seconds:.2f}"
        lines.append(f"| {preset} | {resolution}² | {step} | {peak:.1f} GiB | {card:g} GB | {anchors} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Run:
    preset: MemoryPreset
    resolution: int
    compile_blocks: bool = False

    @property
    def name(self) -> str:
        return self.preset.name + (" + compile_blocks" if self.compile_blocks else "")

    def memory_fraction(self, total_bytes: int) -> float:
        """The share of a `total_bytes` GPU that is the preset's card."""
        return min(1.0, self.preset.card_gib * GIB / total_bytes)

    def settings(self) -> dict:
        return {**self.preset.train_settings(), "resolutions": (self.resolution,), "device": "cuda",
                "compile_blocks": self.compile_blocks}


def plan(resolutions: tuple[int, ...]) -> list[Run]:
    return [*(Run(PRESETS[name], r) for name in CARDS for r in resolutions),
            *(Run(PRESETS[name], r, compile_blocks=True) for name in COMPILED_CARDS for r in resolutions)]


def cuda_meter() -> PhaseMeter:
    return PhaseMeter(torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats, unit="allocated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flux-rehearsal"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolutions", default="512,1024")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: print the plan and check every config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs = plan(tuple(int(r) for r in args.resolutions.split(",")))

    if args.dry_run:
        for run in runs:
            config = run_config({k: Path(k) for k in ("transformer", "vae", "clip", "t5", "other", "tokenizers")},
                                Path("data"), args.dir / "out", run.resolution, 512, **run.settings())
            print(f"{run.name} at {run.resolution}²: {run.memory_fraction(141 * GIB):.3f} of a 141 GiB GPU, "
                  f"checkpoint_blocks {config.checkpoint_blocks}, blocks_to_swap {config.blocks_to_swap}, "
                  f"lora_layout {config.lora_layout}, compile_blocks {config.compile_blocks}")
        return 0
    if not torch.cuda.is_available():
        log.error("no CUDA GPU: run with --dry-run, or on a machine with one")
        return 2

    paths = write_files(args.dir)
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"GPU: {torch.cuda.get_device_name(0)}, {total / GIB:.0f} GiB")
    failed, rows = [], []
    for run in runs:
        name = f"{run.name} at {run.resolution}²"
        torch.cuda.set_per_process_memory_fraction(run.memory_fraction(total))
        dataset = write_demo_dataset(args.dir / f"data{run.resolution}", count=2, size=run.resolution)
        meter = cuda_meter()
        try:
            trainer = run_phases(run_config(paths, dataset, args.dir / "out", run.resolution, 512, **run.settings()),
                                 meter, args.steps)
            seconds = next(t for phase, t, _ in meter.rows if phase.startswith("train"))
            peak = torch.cuda.max_memory_reserved() / GIB
            print(f"\n{name}: {seconds / args.steps:.2f} s/it, peak reserved {peak:.1f} GiB of {run.preset.card_gib:g}")
            rows.append((run.name, run.resolution, seconds / args.steps, peak, run.preset.card_gib))
            trainer.release()
            del trainer
        except torch.cuda.OutOfMemoryError:
            failed.append(name)
            rows.append((run.name, run.resolution, None, torch.cuda.max_memory_reserved() / GIB,
                         run.preset.card_gib))
            print(f"\n{name}: OUT OF MEMORY in phase {len(meter.rows) + 1}\n{traceback.format_exc(limit=2)}")
        print(meter.table())
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{summary(rows)}\n\nout of memory: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
