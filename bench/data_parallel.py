"""Step time of one process against N data-parallel processes (torchrun, gloo on CPUs), same total batch.

    .venv/bin/python bench/data_parallel.py [--processes 2] [--batch 4] [--steps 5] [--rounds 3]

Each round runs the one-process and the N-process trainer on bench/step.py's model and data, alternately so that
drift in machine load hits all alike, and prints median seconds per optimizer step and their ratio to one process
with N threads (< 1.0: faster). The N processes run one thread each; one process runs with N threads and with one,
since on a loaded machine OpenMP's N threads can be far slower than N single-threaded processes. On CPUs the
processes share the machine's cores and memory bandwidth, so the figure says what the gradient exchange costs more
than what GPUs would gain.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def worker(batch: int, steps: int) -> None:
    """One process of a timed run: a warm-up step, then `steps` timed steps; the main process prints s/step."""
    import time

    import torch
    from diffusers import FluxTransformer2DModel

    from step import MODEL, SEED, make_dataset, ours  # noqa: E402 (bench/step.py)
    from trainer_core.distributed import launched_processes

    processes = launched_processes("cpu")
    torch.manual_seed(SEED)
    trainer = ours(FluxTransformer2DModel(**MODEL), make_dataset(8), processes, batch_size=batch)
    trainer.train(1)
    t0 = time.perf_counter()
    trainer.train(steps)
    if processes.is_main:
        print(json.dumps({"seconds_per_step": (time.perf_counter() - t0) / steps}))


def timed(command: list[str], threads: int, args) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([*command, str(Path(__file__)), "--worker", "--batch", str(args.batch), "--steps",
                          str(args.steps)], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds_per_step"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="the run's batch, shared out among the processes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.batch, args.steps)
        return 0

    n = args.processes
    runs = {f"1 process x {n} threads": ([sys.executable], n), "1 process x 1 thread": ([sys.executable], 1),
            f"{n} processes x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)], 1)}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (command, threads) in runs.items():
            times[name].append(timed(command, threads, args))
    single = statistics.median(next(iter(times.values())))
    print(f"batch {args.batch} in all, {args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:26s} {t:8.3f} s/step  ratio {t / single:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
