"""What validation and the EMA cost at the demo's settings, measured in one run against the loop they watch.

    .venv/bin/python bench/validation.py [--rounds 5] [--steps 10]

Two trainers on the demo's stack and pictures: the demo's run (EMA 0.95, validation at 8 noise levels) and the same
run with neither. Each round trains `--steps` steps on both, alternating, and scores the watched one as a checkpoint
does (raw LoRA and EMA: the 4 pictures at 4 levels, one each), so drift in machine load hits all alike. Printed: the time of one
validation over the time of the loop between two checkpoints (the demo's save_every steps at the median step time;
target <= 5%), and the step time with the EMA over the step time without it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core import validation  # noqa: E402
from trainer_core.demo import EMA_DECAY, VALIDATION_TIMESTEPS, demo_config, write_demo_dataset  # noqa: E402
from trainer_core.demo_stack import demo_stack  # noqa: E402
from trainer_core.trainer import Trainer  # noqa: E402

DEMO_STEPS, DEMO_LOOPS = 200, 4
TARGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round and trainer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_demo_dataset(Path(tmp) / "data")
        plain = demo_config(demo_stack(), dataset, Path(tmp) / "out", DEMO_STEPS).replace(tensorboard=False)
        watched = plain.replace(validation_timesteps=VALIDATION_TIMESTEPS, ema_decay=EMA_DECAY)
        trainers = {"plain": Trainer.from_config(plain), "watched": Trainer.from_config(watched)}
        steps = {name: [] for name in trainers}
        scores = []
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                trainer.train(args.steps, on_step=lambda info, name=name: steps[name].append(info.seconds))
            trainer = trainers["watched"]
            t0 = time.perf_counter()
            validation.validation_record(trainer, trainer.validation_samples, trainer.step, trainer.ema.state())
            scores.append(time.perf_counter() - t0)
    save_every = -(-DEMO_STEPS // DEMO_LOOPS)
    step = statistics.median(steps["watched"])
    loop = save_every * step
    ratio = statistics.median(scores) / loop
    print(f"validation at a checkpoint (raw + EMA, {len(trainers['watched'].validation_samples)} images, "
          f"{VALIDATION_TIMESTEPS} levels): median {statistics.median(scores):.3f} s")
    print(f"loop between checkpoints ({save_every} steps x median {step * 1000:.1f} ms): {loop:.2f} s")
    print(f"validation / loop: {ratio:.3f} ({'within' if ratio <= TARGET else 'OVER'} the {TARGET:.0%} target)")
    print(f"step time with EMA / without: {step / statistics.median(steps['plain']):.3f}")


if __name__ == "__main__":
    main()
