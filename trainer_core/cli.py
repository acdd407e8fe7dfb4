"""Command line: `python -m trainer_core train CONFIG.toml`, `demo`, `report DATASET` and `caption DATASET`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Callable

from . import output_guard

log = logging.getLogger("trainer_core")


def _train(args) -> int:
    from .config import TrainConfig
    from .config_files import check_relative_paths, read_toml

    path = Path(args.config)
    values = read_toml(path)
    plan_values = values.pop("plan", {})
    if not isinstance(plan_values, dict):
        raise ValueError(f"{path}: plan = {plan_values!r} is not a table; put the run's steps under a [plan] heading")
    # every setting is checked (and named when wrong) before anything heavy is imported or loaded
    config = TrainConfig.from_dict(values, source=str(path), base_dir=path.parent)
    check_relative_paths(values, path.parent, str(path))
    out = output_guard.check_output_dir(config.output_dir)

    from .checkpoints import latest_state_file
    from .distributed import launched_processes
    from .optim import PastScheduleError, check_schedule_covers
    from .plan import RunPlan, planned_config

    plan = RunPlan.from_dict(plan_values)
    config = planned_config(config, plan)  # before the run's identity is taken from it
    try:
        check_schedule_covers(plan.steps, config)
    except PastScheduleError as e:
        raise ValueError(f"{path}: [plan] steps = {plan.steps}: {e}. Set total_steps = {plan.steps} (or 0: the plan's "
                         f"steps), or [plan] steps = {e.total}") from e
    processes = launched_processes(config.device)
    if not processes.is_main:  # one voice: the main process logs, prints, locks and moves files for the run
        logging.getLogger().setLevel(logging.WARNING)
    with output_guard.RunLock(out) if processes.is_main else contextlib.nullcontext():
        resume = Path(args.resume) if args.resume else None if args.fresh else \
            latest_state_file(out, config.output_name)  # after a crash or Ctrl-C: the newest complete state
        check_earlier = resume is None and processes.is_main
        return _run(path, config, plan, resume, (args.fresh, args.overwrite) if check_earlier else None, processes,
                    resume_given=bool(args.resume))


def _earlier_run(out: Path, name: str, identity: Callable[[], str], fresh: bool, overwrite: bool) -> list[Path]:
    """The files of an earlier run that a run starting at step 0 would overwrite: refused unless `overwrite`. Files
    this very run wrote (its LoRAs carry the run store's identity, `identity()`: asked only when there are LoRAs, as
    it may hash the model files) are not an earlier run's: the run store rewrites nothing of them."""
    from .run_outputs import lora_run

    files = output_guard.run_files(out, name)
    loras = [p for p in files if p.name.endswith(".safetensors") and not p.name.endswith(".state.safetensors")]
    if loras:
        ours = f"{identity()}/"
        if all((lora_run(p) or "").startswith(ours) for p in loras):
            return []
    if files and not overwrite:
        why = "--fresh starts at step 0" if fresh else "there is no training state to resume from, so the run starts at step 0"
        raise ValueError(f"output_dir: {out} already holds {len(files)} file(s) of output_name {name!r} "
                         f"(e.g. {files[0].name}); {why} and would overwrite them. Give another output_name or "
                         "output_dir, or add --overwrite")
    return files


def _run(path: Path, config, plan, resume: Path | None, start_over: tuple[bool, bool] | None, processes,
         resume_given: bool = False) -> int:
    """`start_over`: (--fresh, --overwrite) when the run starts at step 0 over whatever `output_dir` holds: an earlier
    run's files there are refused, or with --overwrite moved aside once every check passed (so that a later resume
    never picks up the earlier run's newer states). `resume_given`: `resume` came from --resume (its errors say so)."""
    from . import lora, models
    from .checkpoints import latest_state_file, load_training_state
    from .identity import check_resume, dataset_identity, run_identity
    from .plan import execute, validation_lines
    from .run_store import RunStore
    from .trainer import NonFiniteLossError, Trainer, preflight

    state = None
    dataset = dataset_identity(config.dataset_entries())
    if resume is not None:  # a wrong file fails here, before anything loads
        try:
            state, saved_config = load_training_state(resume)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--resume: {e}" if resume_given else str(e)) from e
        check_resume(state, config, dataset, str(resume), "start another run with --fresh and another output_name")
    records = preflight(config)
    earlier = [] if start_over is None else _earlier_run(
        Path(config.output_dir), config.output_name,
        lambda: run_identity(config, dataset, RunStore.of(config).hashes), *start_over)
    if state is not None:
        changed = [f"{k} {v} (state: {saved_config[k]})" for k, v in config.to_dict().items()
                   if k in saved_config and json.dumps(v) != json.dumps(saved_config[k])]
        if changed:
            log.info("settings changed since %s: %s", resume.name, ", ".join(changed))
        log.info("resuming from %s at step %d", resume, state.step)
    start = state.step if state is not None else 0
    lora_params = lora.check_lora_settings(models.transformer_config(config.transformer_path),
                                           **lora.adapter_settings(config))
    saves = -(-max(plan.steps - start, 0) // plan.save_every)
    output_guard.check_free_space(config.output_dir, output_guard.planned_bytes(
        lora_params, config.optimizer, saves, plan.save_state, len(plan.prompts) + len(plan.strengths),
        plan.sample_width * plan.sample_height, plan.steps, ema=config.ema_decay > 0))

    if earlier:
        aside = output_guard.set_aside(earlier, Path(config.output_dir),
                                       f"{config.output_name}_replaced_{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("--overwrite: moved the %d files of the earlier run to %s", len(earlier), aside)
    trainer = Trainer.from_config(config, records=records, prompts=plan.prompts, processes=processes)
    if state is not None:
        trainer.restore(state)
    try:
        with output_guard.CtrlC() as ctrl_c:
            result = execute(trainer, plan, should_stop=ctrl_c)
    except NonFiniteLossError as e:  # a setting to change, reported like the other settings' errors
        # the weights of the last step done gave the NaN, so a state of that step would only give it again
        good = latest_state_file(config.output_dir, config.output_name, max_step=trainer.step - 1)
        where = f"--resume {good}" if good else "--fresh"
        raise ValueError(f"{e} Lower learning_rate in {path} and run it again with {where}.") from e
    except OSError as e:  # a save failed mid-run: the run in memory is still whole, keep it elsewhere
        rescued = _rescue(trainer)
        print(f"error: {e}", file=sys.stderr)
        if rescued is None:
            print(f"error: the state at step {trainer.step} could not be saved anywhere either", file=sys.stderr)
        else:
            print(f"the run's state at step {trainer.step} was saved to {rescued}; fix {config.output_dir} and "
                  f"continue with: {_prog()} train {path} --resume {rescued}", file=sys.stderr)
        return 1
    if not processes.is_main:
        return 130 if result.interrupted else 0
    for p in result.loras:
        print(f"LoRA: {p}")
    for p in result.ema_loras:
        print(f"EMA LoRA: {p}")
    if result.interrupted:
        print(f"stopped at step {trainer.step} (Ctrl-C): saved {result.loras[-1]} and {result.states[-1]}; continue "
              f"with: {_prog()} train {path}", file=sys.stderr)
        return 130
    print(f"loss plot: {result.loss_plot}")
    if result.grid:
        print(f"XY grid: {result.grid}")
    print("\n".join(validation_lines(result)))
    return 0


def _rescue(trainer) -> Path | None:
    from .checkpoints import STATE_SUFFIX, checkpoint_stem

    name = f"{checkpoint_stem(trainer.config.output_name, trainer.step)}{STATE_SUFFIX}"
    for folder in output_guard.rescue_folders():
        try:
            return trainer.save_state(folder / name)
        except OSError as e:
            log.warning("could not save the state to %s either: %s", folder, e)
    return None


def _prog() -> str:
    """How this command was started, for the command lines it prints."""
    return "flux-lora-train" if Path(sys.argv[0]).name == "flux-lora-train" else "python -m trainer_core"


def _demo(args) -> None:
    from .demo import run_demo
    from .plan import mean_losses, validation_lines

    t0 = time.perf_counter()
    trainer, result, summary = run_demo(args.out, steps=args.steps)
    first, last = mean_losses(trainer.losses)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s, peak memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"mean loss of the first 20 steps {first:.4f}, of the last 20 steps {last:.4f}")
    for p in result.loras:
        print(f"LoRA checkpoint: {p}")
    for p in result.ema_loras:
        print(f"EMA LoRA:        {p}")
    print(f"training state:  {result.states[-1]}")
    print(f"samples:         {Path(result.samples[0]).parent}")
    print(f"loss plot:       {result.loss_plot}")
    print(f"XY grid:         {result.grid}")
    print(f"summary:         {Path(args.out) / 'summary.json'}")
    scores = summary["dataset_scores"]
    print(f"\nsubject score (fraction of pixels in the subject's yellow and red); training pictures: "
          f"{sum(scores) / len(scores):.3f}")
    strengths = sorted({c["strength"] for c in summary["cells"]})
    print("step        " + "".join(f"{s:>8g}" for s in strengths))
    for step, kind in dict.fromkeys((c["step"], c["lora"]) for c in summary["cells"]):
        row = {c["strength"]: c["score"] for c in summary["cells"] if (c["step"], c["lora"]) == (step, kind)}
        print(f"{step:<8d}{kind:<4s}" + "".join(f"{row[s]:8.3f}" for s in strengths))
    print()
    print("\n".join(validation_lines(result)))


def _install_tiny(args) -> None:
    import dataclasses

    from .comfy_install import install_tiny

    for name, path in dataclasses.asdict(install_tiny(args.base_dir)).items():
        print(f"{name + ':':24s}{path}")
    print("now load example_workflows/flux_tiny_demo.json in ComfyUI and queue it")


def _report(args) -> None:
    from .checkpoints import atomic_write
    from .config import DatasetEntry, TrainConfig
    from .config_files import read_toml
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
                              token_limit=args.max_sequence_length, thumbnails=bool(args.sheet),
                              alpha_mask=args.alpha_mask)
    print(report.text())
    if args.sheet:
        atomic_write(args.sheet, lambda tmp: report.contact_sheet().save(tmp, format="PNG"))
        print(f"contact sheet: {args.sheet}")


def _caption(args) -> None:
    from .captioning import caption_dataset
    from .distributed import resolve_device

    written = caption_dataset(args.dataset, args.model, trigger_word=args.trigger_word, overwrite=args.overwrite,
                              task=args.task, device=resolve_device(args.device))
    print(f"{len(written)} caption file(s) written in {args.dataset}")
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is shown (the settings list needs the
    heavy plan module, which a failing run should not wait for)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def settings_help() -> str:
    """Every setting with its default and meaning, read from the config classes (their fields' comments)."""
    from .config import TrainConfig
    from .typed_fields import field_docs, toml_text
    from .plan import RunPlan

    lines = ["settings (TOML keys; TrainConfig at the top level, RunPlan under [plan]):"]
    for cls, table in ((TrainConfig, ""), (RunPlan, "[plan] ")):
        section = None
        for doc in field_docs(cls):
            if (table, doc.section) != section:
                section = (table, doc.section)
                lines.append(f"\n{table}{doc.section or 'the run'}:")
            default = " (required)" if doc.default is dataclasses.MISSING else f" = {toml_text(doc.default)}"
            lines.append(f"  {doc.name}{default}")
            if doc.meaning:
                lines.append(f"      {doc.meaning}")
    lines.append("\nexample: examples/train.toml")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=_prog(), description="Flux.1 LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a TOML config (TrainConfig fields at top level, a [plan] table)",
                           epilog=settings_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", help="a *.state.safetensors file to continue from (default: the newest in output_dir)")
    start.add_argument("--fresh", action="store_true", help="ignore saved states and start from step 0")
    train.add_argument("--overwrite", action="store_true",
                       help="let a run that starts at step 0 replace an earlier run of the same output_name (its "
                            "files are moved into a <output_name>_replaced_<time> folder); refused without it")
    train.set_defaults(run=_train)
    demo = sub.add_parser("demo", help="train a LoRA on the demo's small Flux and pictures, end to end, on the CPU")
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
    report.add_argument("--alpha-mask", action="store_true", help="for a folder: each image's alpha channel is its "
                        "loss mask, as alpha_mask = true")
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
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as e:
        # a user's mistake: the message says what and where; a traceback would only hide it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: files on disk are whole (atomic writes)
        print("stopped by Ctrl-C; the steps since the last saved state were not kept", file=sys.stderr)
        return 130
