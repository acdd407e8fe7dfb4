"""Command line: `python -m trainer_core train CONFIG.toml`, `demo`, `report DATASET` and `caption DATASET`."""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

log = logging.getLogger("trainer_core")


def _train(args) -> None:
    from .checkpoints import latest_state_file, load_training_state
    from .config import TrainConfig, read_toml
    from .distributed import launched_processes
    from .plan import RunPlan, execute
    from .trainer import NonFiniteLossError, Trainer

    path = Path(args.config)
    values = read_toml(path)
    plan = RunPlan.from_dict(values.pop("plan", {}))
    # every setting is validated (and named when wrong) before any model loads
    config = TrainConfig.from_dict(values, source=str(path), base_dir=path.parent)
    if args.resume:
        resume = Path(args.resume)
    else:  # after a crash or a cancel, pick up from the newest complete state instead of starting over
        resume = None if args.fresh else latest_state_file(config.output_dir, config.output_name)
    state = load_training_state(resume)[0] if resume is not None else None  # a wrong file fails before loading
    processes = launched_processes(config.device)
    if not processes.is_main:  # one voice: the main process logs and prints for the run
        logging.getLogger().setLevel(logging.WARNING)
    trainer = Trainer.from_config(config, processes=processes)
    if state is not None:
        trainer.restore(state)
        log.info("resumed from %s at step %d", resume, trainer.step)
    try:
        result = execute(trainer, plan)
    except NonFiniteLossError as e:  # a setting to change, reported like the other settings' errors
        # the weights of the last step done gave the NaN, so a state of that step would only give it again
        good = latest_state_file(config.output_dir, config.output_name, max_step=trainer.step - 1)
        where = f"--resume {good}" if good else "--fresh"
        raise ValueError(f"{e} Lower learning_rate in {path} and run it again with {where}.") from e
    if not processes.is_main:
        return
    for p in result.loras:
        print(f"LoRA: {p}")
    print(f"loss plot: {result.loss_plot}")
    if result.grid:
        print(f"XY grid: {result.grid}")


def _demo(args) -> None:
    from .demo import run_demo
    from .plan import mean_losses

    t0 = time.perf_counter()
    trainer, result = run_demo(args.out, steps=args.steps)
    first, last = mean_losses(trainer.losses)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s, peak memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"mean loss of the first 20 steps {first:.4f}, of the last 20 steps {last:.4f}")
    for p in result.loras:
        print(f"LoRA checkpoint: {p}")
    print(f"training state:  {result.states[-1]}")
    print(f"samples:         {Path(result.samples[0]).parent}")
    print(f"loss plot:       {result.loss_plot}")
    print(f"XY grid:         {result.grid}")


def _install_tiny(args) -> None:
    import dataclasses

    from .comfy_install import install_tiny

    for name, path in dataclasses.asdict(install_tiny(args.base_dir)).items():
        print(f"{name + ':':24s}{path}")
    print("now load example_workflows/flux_tiny_demo.json in ComfyUI and queue it")


def _report(args) -> None:
    from .checkpoints import atomic_write
    from .config import DatasetEntry, TrainConfig, read_toml
    from .dataset_report import build_report, load_t5_tokenizer, report_for_config

    path = Path(args.dataset)
    if path.suffix.lower() == ".toml":
        values = read_toml(path)
        values.pop("plan", None)
        config = TrainConfig.from_dict(values, source=str(path), base_dir=path.parent)
        report = report_for_config(config, thumbnails=bool(args.sheet))
    else:
        entry = DatasetEntry(str(path), args.trigger_word, args.resolutions, args.repeats)
        report = build_report([entry], t5_tokenizer=load_t5_tokenizer(args.t5_tokenizer),
                              token_limit=args.max_sequence_length, thumbnails=bool(args.sheet))
    print(report.text())
    if args.sheet:
        atomic_write(args.sheet, lambda tmp: report.contact_sheet().save(tmp, format="PNG"))
        print(f"contact sheet: {args.sheet}")


def _caption(args) -> None:
    from .captioning import caption_dataset
    from .trainer import resolve_device

    written = caption_dataset(args.dataset, args.model, trigger_word=args.trigger_word, overwrite=args.overwrite,
                              task=args.task, device=resolve_device(args.device))
    print(f"{len(written)} caption file(s) written in {args.dataset}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer_core", description="Flux.1 LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a TOML config (TrainConfig fields at top level, a [plan] table)")
    train.add_argument("config")
    train.add_argument("--resume", help="a *.state.safetensors file to continue from (default: the newest in output_dir)")
    train.add_argument("--fresh", action="store_true", help="ignore saved states and start from step 0")
    train.set_defaults(run=_train)
    demo = sub.add_parser("demo", help="train a tiny random Flux on a generated dataset, end to end, on the CPU")
    demo.add_argument("--out", default="demo_output", help="folder for the model, data and results")
    demo.add_argument("--steps", type=int, default=200)
    demo.set_defaults(run=_demo)
    install = sub.add_parser("install-tiny", help="write the tiny model and demo dataset into a ComfyUI folder, "
                                                  "for example_workflows/flux_tiny_demo.json")
    install.add_argument("base_dir", metavar="COMFYUI_BASE_DIR", help="ComfyUI's folder (holding models/ and input/)")
    install.set_defaults(run=_install_tiny)
    report = sub.add_parser("report", help="the dataset report: images used and skipped, buckets, near-duplicates, "
                                           "caption problems, trigger-word coverage, caption words (no model loads)")
    report.add_argument("dataset", metavar="DATASET_OR_CONFIG", help="a dataset folder, or a training .toml")
    report.add_argument("--trigger-word", default="", help="for a folder: the trigger word training would prepend")
    report.add_argument("--resolutions", default="512", help="for a folder: bucket sizes, e.g. 512,768,1024")
    report.add_argument("--repeats", type=int, default=1, help="for a folder: times each image is seen per epoch")
    report.add_argument("--t5-tokenizer", default="", help="for a folder: a T5 tokenizer folder (tokenizer.json), "
                                                          "to count caption tokens")
    report.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens a caption may use")
    report.add_argument("--sheet", help="also write a contact sheet of the images to this PNG")
    report.set_defaults(run=_report)
    caption = sub.add_parser("caption", help="write a caption for each image without one, with a local Florence-2")
    caption.add_argument("dataset", help="the dataset folder")
    caption.add_argument("--model", required=True, help="a local transformers Florence-2 folder, e.g. "
                                                        "ComfyUI/models/LLM/Florence-2-base (nothing is downloaded)")
    caption.add_argument("--trigger-word", default="", help="put in front of each new caption")
    caption.add_argument("--overwrite", action="store_true", help="rewrite existing captions too")
    caption.add_argument("--task", default="<MORE_DETAILED_CAPTION>",
                         help="<MORE_DETAILED_CAPTION>, <DETAILED_CAPTION> or <CAPTION>")
    caption.add_argument("--device", default="auto", help="auto, cuda or cpu")
    caption.set_defaults(run=_caption)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        # a user's mistake: the message says what and where; a traceback would only hide it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
