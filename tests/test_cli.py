"""The command line as a new user meets it: bad settings, output folders, colliding runs and resumes, each case one
process running `train`.

Each case asserts the exit code, a message naming the field, file or folder (and what to do), no traceback, and that
no file that existed before the case (the config, the dataset, the models, an earlier run's LoRAs and states) changed.
The processes are forked from a server that has already imported the trainer, so a case costs its own work rather
than torch's import; `test_a_bad_setting_fails_without_importing_torch` checks the real entry point stays light.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import pytest

from cli_process import cli_child
from trainer_core import cli, output_guard
from trainer_core.typed_fields import toml_text
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.output_guard import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
RUN = "flux_tiny_demo"  # the output_name of every case's run
PLAN = {"steps": 6, "save_every": 3, "prompts": []}


@pytest.fixture(scope="module")
def processes():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cli_process", "trainer_core.cli", "trainer_core.plan", "trainer_core.trainer"])
    return context


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(processes, folder: Path, *argv: str) -> Result:
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    process = processes.Process(target=cli_child, args=(list(argv), str(folder), str(out), str(err)))
    process.start()
    process.join(300)
    assert process.exitcode is not None, "the command line hung"
    return Result(process.exitcode, out.read_text(), err.read_text())


def write_config(path: Path, values: dict, plan: dict | None) -> Path:
    lines = [f"{k} = {toml_text(v)}" for k, v in values.items()]
    if plan is not None:
        lines += ["[plan]", *(f"{k} = {toml_text(v)}" for k, v in plan.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shared(tiny_flux, tmp_path_factory, processes) -> dict:
    """The cases' base config, and a template output folder holding an earlier run of 6 steps (states at 3 and 6)."""
    folder = tmp_path_factory.mktemp("cli_shared")
    dataset = write_demo_dataset(folder / "data", count=2, size=64)
    config = demo_config(tiny_flux, dataset, folder / "earlier", steps=6).replace(
        resolutions=(64,), max_sequence_length=8, rank=4, alpha=4.0)
    run_toml = write_config(folder / "run.toml", config.to_dict(), PLAN)
    result = run_cli(processes, folder, "train", str(run_toml))
    assert result.code == 0, result.err
    return {"config": config.to_dict(), "folder": folder, "earlier": folder / "earlier"}


def earlier_run(case: Path, shared: dict) -> None:
    shutil.copytree(shared["earlier"], case / "out")


def earlier_loras_only(case: Path, shared: dict) -> None:
    earlier_run(case, shared)
    for p in (case / "out").glob(f"*.state.safetensors"):
        p.unlink()


def newest_state_truncated(case: Path, shared: dict) -> None:
    earlier_run(case, shared)
    newest = case / "out" / f"{RUN}_000006.state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])


def every_state_truncated(case: Path, shared: dict) -> None:
    earlier_run(case, shared)
    for state in (case / "out").glob("*.state.safetensors"):
        state.write_bytes(state.read_bytes()[:-100])


def a_dataset_copy(case: Path, shared: dict) -> None:
    shutil.copytree(shared["folder"] / "data", case / "data")


def dataset_grown(case: Path, shared: dict) -> None:
    earlier_run(case, shared)
    a_dataset_copy(case, shared)
    shutil.copy(case / "data" / "glyph_00.png", case / "data" / "glyph_07.png")


def lock_held(host: str, pid_of: Callable[[], int], process_started: float):
    def setup(case: Path, shared: dict) -> None:
        (case / "out").mkdir()
        pid = pid_of()
        (case / "out" / LOCK_NAME).write_text(
            f'{{"host": "{host}", "pid": {pid}, "process_started": {process_started}, "started": "2026-01-01T10:00:00", '
            f'"command": "flux-lora-train train other.toml"}}')
    return setup


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def output_is_a_file(case: Path, shared: dict) -> None:
    (case / "out").write_text("my notes")


def mounted(options: str):
    """A small tmpfs as the output folder (root only): read-only, or too small for the run's files."""
    def setup(case: Path, shared: dict):
        (case / "out").mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(case / "out")],
                                               capture_output=True).returncode:
            pytest.skip("needs root and mount to make a read-only or full file system")
        return lambda: subprocess.run(["umount", str(case / "out")], check=True)
    return setup


def config_line(line: bytes):
    """A line put at the top of the case's config as written, escapes and all."""
    def setup(case: Path, shared: dict) -> None:
        (case / "run.toml").write_bytes(line + b"\n" + (case / "run.toml").read_bytes())
    return setup


def init_lora_file(write: Callable[[Path], None], name: str = "start.safetensors"):
    def setup(case: Path, shared: dict) -> None:
        write(case / name)
    return setup


def truncated_lora(shared: dict) -> Callable[[Path], None]:
    return lambda path: path.write_bytes((shared["earlier"] / f"{RUN}_000003.safetensors").read_bytes()[:-500])


def pickled(path: Path) -> None:
    import torch

    torch.save({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)}, path)


def config_text(text: bytes):
    def setup(case: Path, shared: dict) -> None:
        (case / "run.toml").write_bytes(text)
    return setup


@dataclass
class Case:
    id: str
    config: dict = field(default_factory=dict)  # changes to the base config; None deletes a key
    plan: dict | None = field(default_factory=dict)  # changes to PLAN; None: no [plan] table
    args: list[str] = field(default_factory=list)
    setup: Callable | None = None  # (case folder, shared) -> None or a cleanup function
    match: list[str] | str = ""  # regexes that stderr must contain; CASE stands for the case's folder
    code: int = 2
    cwd: str = ""  # a folder of the case's to run from (the config given by its path from there)


CASES = [
    # --- types: each field checked by its declared type, named with the value and the form expected
    Case("rank as text", {"rank": "abc"}, match=r'error: rank: "abc" is not a whole number .*; write e\.g\. rank = 16'),
    Case("rank with a fraction", {"rank": 16.5}, match=r"rank: 16\.5 is not a whole number \(.*fractional part\)"),
    Case("rank as a boolean", {"rank": True}, match=r"rank: true is not a whole number \(true/false is not a number\)"),
    Case("learning rate as a word", {"learning_rate": "fast"},
         match=r'learning_rate: "fast" is not a number .*; write e\.g\. learning_rate = 0\.0001'),
    Case("learning rate as a boolean", {"learning_rate": True}, match=r"learning_rate: true is not a number"),
    Case("flip as maybe", {"flip_augment": "maybe"},
         match=r'flip_augment: "maybe" is not true or false .*; write e\.g\. flip_augment = false'),
    Case("flip as 2", {"flip_augment": 2}, match=r"flip_augment: 2 is not true or false"),
    Case("resolutions with a word", {"resolutions": "512,abc"}, match=r"resolutions: '512,abc' is not a list of whole"),
    Case("resolutions with a fraction", {"resolutions": [512, 768.5]},
         match=r"resolutions: \[512, 768\.5\] \(item 2: 768\.5\) is not a list of whole numbers"),
    Case("resolutions as a table", {"resolutions": {"a": 1}}, match=r"resolutions: .* is not a list of whole numbers"),
    Case("output name as a number", {"output_name": 5}, match=r'output_name: 5 is not text in quotes .*"flux_lora"'),
    Case("transformer path as a number", {"transformer_path": 5}, match=r"transformer_path: 5 is not text in quotes"),
    Case("trigger word as a list", {"trigger_word": ["ohwx"]}, match=r'trigger_word: \["ohwx"\] is not text'),
    Case("repeats as 2x", {"repeats": "2x"}, match=r'repeats: "2x" is not a whole number'),
    Case("batch size 1.5", {"batch_size": 1.5}, match=r"batch_size: 1\.5 is not a whole number"),
    Case("max_grad_norm as none", {"max_grad_norm": "none"}, match=r'max_grad_norm: "none" is not a number'),
    Case("caption dropout as a percentage", {"caption_dropout": "10%"}, match=r'caption_dropout: "10%" is not a number'),
    Case("seed too large", {"seed": 1e30}, match=r"seed: 1e\+30 is not a whole number"),
    Case("device as a number", {"device": 0}, match=r"device: 0 is not text in quotes"),
    Case("two fields wrong", {"rank": "x", "alpha": "y"}, match=[r'rank: "x" is not', r'alpha: "y" is not']),
    Case("prompts as one string", plan={"prompts": "a photo"},
         match=r'plan\.prompts: "a photo" is not a list of texts in quotes'),
    Case("prompts as numbers", plan={"prompts": [1, 2]}, match=r"plan\.prompts: \[1, 2\] \(item 1: 1\) is not a list of"),
    Case("strengths as a string", plan={"strengths": "0,0.5,1"}, match=r'plan\.strengths: "0,0\.5,1" is not a list of '
                                                                       r"numbers .*strengths = \[0\.0, 0\.2"),
    Case("strengths with a word", plan={"strengths": [0, "half"]}, match=r'plan\.strengths: .*\(item 2: "half"\)'),
    Case("save_every with a fraction", plan={"save_every": 7.5}, match=r"plan\.save_every: 7\.5 is not a whole number"),
    Case("steps as many", plan={"steps": "many"}, match=r'plan\.steps: "many" is not a whole number'),
    Case("save_state as 2", plan={"save_state": 2}, match=r"plan\.save_state: 2 is not true or false"),
    Case("plan as a number", {"plan": 5}, plan=None, match=r"run\.toml: plan = 5 is not a table; put the run's steps "
                                                           r"under a \[plan\] heading"),
    # --- ranges and names
    Case("rank 0", {"rank": 0}, match=r"rank: 0; use a rank of 1 or more"),
    Case("learning rate nan", {"learning_rate": float("nan")}, match=r"learning_rate: nan; use a positive number"),
    Case("optimizer unknown", {"optimizer": "adam"}, match=r"optimizer: 'adam'; choose one of adamw, adamw8bit"),
    Case("caption dropout 1", {"caption_dropout": 1.0}, match=r"caption_dropout: 1\.0; use a value in \[0, 1\)"),
    Case("alpha negative", {"alpha": -1}, match=r"alpha: -1\.0; use a positive number"),
    Case("timestep sampling unknown", {"timestep_sampling": "cosmic"}, match=r"timestep_sampling: 'cosmic'; choose one"),
    Case("swap without checkpointing", {"blocks_to_swap": 2, "gradient_checkpointing": False},
         match=r"blocks_to_swap needs gradient_checkpointing on"),
    Case("output name leaves the folder", {"output_name": "../../x"}, match=r"output_name: '\.\./\.\./x' cannot be a file"),
    Case("setting misspelled", {"learning_rat": 1e-4}, match=r"unknown setting\(s\) learning_rat; valid settings are"),
    Case("model path missing", {"vae_path": None}, match=r"run\.toml: missing setting\(s\) vae_path"),
    Case("plan setting misspelled", plan={"save_evry": 5}, match=r"\[plan\]: unknown setting\(s\) save_evry"),
    Case("plan steps 0", plan={"steps": 0}, match=r"plan\.steps: 0; use 1 or more"),
    Case("plan save_every 0", plan={"save_every": 0}, match=r"plan\.save_every: 0; use 1 or more"),
    Case("sample width 500", plan={"sample_width": 500}, match=r"plan\.sample_width: 500 is not a multiple of 16"),
    # --- the config file itself
    Case("config file missing", setup=lambda case, shared: (case / "run.toml").unlink(),
         match=r"config file run\.toml does not exist; give the path of a \.toml file"),
    Case("config not UTF-8", setup=config_text("output_name = 'café'".encode("cp1252")),
         match=r"run\.toml is not UTF-8 text .*save it as UTF-8"),
    Case("config not TOML", setup=config_text(b"rank = 16\nlearning_rate = 1e-4 4"),
         match=r"run\.toml: not valid TOML \(.*line 2"),
    Case("Windows path in double quotes", setup=config_text(b'dataset_dir = "C:\\Users\\me\\data"'),
         match=r"write Windows paths in 'single quotes' or with /"),
    # --- the output folder, checked before anything loads
    Case("output folder is a file", setup=output_is_a_file, match=r"output_dir: .*out is a file, not a folder"),
    Case("output folder inside a file", {"output_dir": "CASE/notes.txt/out"},
         setup=lambda case, shared: (case / "notes.txt").write_text("x"),
         match=r"output_dir: .*notes\.txt/out cannot be made: .*notes\.txt is a file"),
    Case("output folder read-only", setup=mounted("ro,size=1m"), match=r"output_dir: .*out is not writable"),
    Case("output folder too small", setup=mounted("size=64k"),
         match=r"output_dir: .*out has 0\.1 MiB free, but this run's checkpoints and states need about .* MiB"),
    # --- one run per folder
    Case("folder in use by a live run", setup=lock_held(socket.gethostname(), os.getpid,
                                                        psutil.Process().create_time()),
         match=rf"output_dir: .*out is in use by another run \(pid {os.getpid()} on .*started 2026-01-01T10:00:00: "
               r"flux-lora-train train other\.toml\); wait for it to end"),
    Case("folder in use on another host", setup=lock_held("render-box", lambda: 4242, 0.0),
         match=r"in use by another run \(pid 4242 on render-box.*If that run is gone, delete .*\.flux-lora-train\.lock"),
    Case("a dead run's lock is taken over", {"dataset_dir": "CASE/no_such_data"},
         setup=lock_held(socket.gethostname(), dead_pid, 0.0),
         match=[r"taking over .*\.flux-lora-train\.lock from a run that is no longer running",
                r"dataset folder .*no_such_data does not exist"]),
    # another seed: another run (the same config's own files are rewritten identically, never refused)
    Case("--fresh over an earlier run", {"seed": 43}, args=["--fresh"], setup=earlier_run,
         match=rf"output_dir: .*out already holds 5 file\(s\) of output_name '{RUN}' .*--fresh starts at step 0 "
               r"and would overwrite them\. Give another output_name or output_dir, or add --overwrite"),
    Case("no state to resume but LoRAs there", {"seed": 43}, setup=earlier_loras_only,
         match=r"already holds 3 file\(s\) .*there is no training state to resume from, so the run starts at step 0"),
    Case("--resume with --fresh", args=["--fresh", "--resume", "x.state.safetensors"],
         match=r"argument --resume: not allowed with argument --fresh"),
    # --- resuming: the state checked before the models load
    Case("resume from a LoRA file", args=["--resume", "out/flux_tiny_demo_000003.safetensors"], setup=earlier_run,
         match=r"flux_tiny_demo_000003\.safetensors is not a training state of this trainer \(a LoRA file\?\)"),
    Case("resume from a missing file", args=["--resume", "gone.state.safetensors"],
         match=r"error: --resume: training state gone\.state\.safetensors \(relative to the working folder CASE\) "
               r"does not exist; give a \*\.state\.safetensors file this trainer saved"),
    Case("resume from a truncated state", args=["--resume", f"out/{RUN}_000006.state.safetensors"],
         setup=newest_state_truncated, match=rf"{RUN}_000006\.state\.safetensors is damaged or incomplete"),
    Case("resume with another rank", {"rank": 8, "alpha": 8.0}, setup=earlier_run,
         match=r"flux_tiny_demo_000006\.state\.safetensors belongs to a run with other settings: rank 8 \(state: 4\), "
               r"alpha 8\.0 \(state: 4\.0\)\. Set them as the state had them, or start another run with --fresh"),
    Case("resume with a grown dataset", {"dataset_dir": "CASE/data"}, setup=dataset_grown,
         match=r"belongs to a run with other settings: the dataset changed since it was saved \(in .*data: added "),
    Case("resume with a new seed and dataset", {"dataset_dir": "CASE/data", "seed": 1}, setup=dataset_grown,
         match=r"other settings: seed 1 \(state: 7\), the dataset"),
    Case("the newest state truncated", {"batch_size": 2}, setup=newest_state_truncated,
         match=[rf"skipped .*{RUN}_000006\.state\.safetensors: damaged or incomplete .*; the newest complete one, "
                rf"{RUN}_000003\.state\.safetensors, is used",
                rf"{RUN}_000003\.state\.safetensors belongs to a run with other settings: batch_size 2 \(state: 1\)"]),
    Case("the only states truncated", {"seed": 43}, setup=every_state_truncated,
         match=[rf"skipped .*{RUN}_00000[36]\.state\.safetensors: damaged or incomplete .*; there is no complete "
                r"state to use", r"there is no training state to resume from, so the run starts at step 0"]),
    # --- the inputs themselves
    Case("dataset missing", {"dataset_dir": "CASE/no_such_folder"},
         match=r"error: dataset folder CASE/no_such_folder does not exist: check the path$"),
    Case("dataset missing, relative, run from another folder", {"dataset_dir": "no_such_folder"}, cwd="elsewhere",
         match=r"error: \.\./run\.toml: dataset_dir = 'no_such_folder': CASE/no_such_folder does not exist \(a "
               r"relative path is taken from the config file's folder CASE, not the working folder\)"),
    Case("dataset relative, run from another folder", {"dataset_dir": "data"}, cwd="elsewhere", setup=a_dataset_copy,
         code=0),
    Case("[[datasets]] folder missing, relative", {"dataset_dir": None, "datasets": [{"dataset_dir": "gone"}]},
         match=r"run\.toml \[\[datasets\]\] #1: dataset_dir = 'gone': CASE/gone does not exist \(a relative path"),
    Case("Windows path that TOML escapes turned into a newline and a tab", {"transformer_path": None},
         setup=config_line(b'transformer_path = "C:\\new\\top.safetensors"'),
         match=r"transformer_path = 'C:\\new\\top\.safetensors' holds a newline: in \"double quotes\" TOML reads "
               r"\\n as a newline and \\t as a tab; write Windows paths in 'single quotes' or with /"),
    Case("init_lora an empty file", {"init_lora": "CASE/start.safetensors"}, setup=init_lora_file(Path.touch),
         match=r"error: init_lora: CASE/start\.safetensors is truncated or corrupt \(.*\): download it again"),
    Case("init_lora truncated", {"init_lora": "CASE/start.safetensors"},
         setup=lambda case, shared: init_lora_file(truncated_lora(shared))(case, shared),
         match=r"error: init_lora: CASE/start\.safetensors is truncated or corrupt"),
    Case("init_lora a pickle", {"init_lora": "CASE/start.pt"}, setup=init_lora_file(pickled, "start.pt"),
         match=r"error: init_lora: CASE/start\.pt is a pickle checkpoint \(\.pt\)\. Unpickling can run arbitrary code"),
    Case("init_lora a pickle named .safetensors", {"init_lora": "CASE/start.safetensors"},
         setup=init_lora_file(pickled), match=r"error: init_lora: CASE/start\.safetensors is truncated or corrupt"),
    Case("fixed total_steps shorter than the plan", {"total_steps": 4, "lr_schedule": "cosine"},
         match=r"error: run\.toml: \[plan\] steps = 6: training to step 6 runs past total_steps 4, where the cosine "
               r"schedule ends: steps 5-6 would train at learning rate .*\. Set total_steps = 6 \(or 0: the plan's "
               r"steps\), or \[plan\] steps = 4$"),
    Case("dataset empty", {"dataset_dir": "CASE/empty"}, setup=lambda case, shared: (case / "empty").mkdir(),
         match=r"dataset folder .*empty has no images: put the images"),
    Case("transformer missing", {"transformer_path": "CASE/flux1-dev.safetensors"},
         match=r"Flux transformer not found: .*flux1-dev\.safetensors"),
    Case("device cuda without a GPU", {"device": "cuda"}, match=r"device: 'cuda' but no CUDA GPU is available"),
]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under `folders` (but run locks) with its content's hash."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders if folder.is_dir()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_case(case: Case, shared, processes, tiny_flux, tmp_path):
    def place(value):
        return value.replace("CASE/", f"{tmp_path}/") if isinstance(value, str) else value

    values = {k: place(v) for k, v in {**shared["config"], "output_dir": str(tmp_path / "out"), **case.config}.items()
              if v is not None}
    write_config(tmp_path / "run.toml", values, None if case.plan is None else {**PLAN, **case.plan})
    cleanup = case.setup(tmp_path, shared) if case.setup else None
    try:
        watched = (tmp_path, shared["folder"], tiny_flux.clip_l.parent)
        before = snapshot(*watched)
        cwd = tmp_path / case.cwd
        cwd.mkdir(exist_ok=True)
        result = run_cli(processes, cwd, "train", os.path.relpath(tmp_path / "run.toml", cwd), *case.args)
        after = snapshot(*watched)
    finally:
        if callable(cleanup):
            cleanup()
    assert result.code == case.code, result.err
    assert "Traceback" not in result.err, result.err
    for pattern in [case.match] if isinstance(case.match, str) else case.match:
        assert re.search(pattern.replace("CASE", re.escape(str(tmp_path))), result.err, flags=re.M), result.err
    changed = [p for p in before if after.get(p) != before[p] and not p.endswith(("stdout.txt", "stderr.txt"))]
    assert not changed, f"files changed or removed: {changed}"
    assert not (tmp_path / "out" / LOCK_NAME).exists() or case.id.startswith("folder in use"), "the lock was left"


def test_the_table_covers_the_issue(shared):
    assert len(CASES) >= 60


def test_a_bad_setting_fails_without_importing_torch(tmp_path):
    """The failing-early path of the real entry point stays light: a typo is reported in a fraction of torch's import."""
    (tmp_path / "run.toml").write_text('transformer_path = "t"\nvae_path = "v"\nclip_path = "c"\nt5_path = "t5"\n'
                                       'dataset_dir = "d"\nrank = "sixteen"\n')
    code = ("import sys; from trainer_core import cli; code = cli.main(['train', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run.toml")], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: rank: "sixteen" is not a whole number'), result.stderr


def test_help_lists_every_setting_with_its_default_and_meaning(capsys):
    from trainer_core.config import TrainConfig
    from trainer_core.typed_fields import field_docs
    from trainer_core.plan import RunPlan

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cls in (TrainConfig, RunPlan):
        for doc in field_docs(cls):
            default = "(required)" if doc.default is dataclasses.MISSING else f"= {toml_text(doc.default)}"
            assert f"  {doc.name} {default}\n" in text
            assert doc.meaning, f"{cls.__name__}.{doc.name} has no comment to explain it"
            assert f"      {doc.meaning}\n" in text
    assert "  rank = 16\n      LoRA rank" in text and "[plan] the run:\n  steps = 3000" in text


def test_the_example_config_and_each_setting_commented_in_it_are_valid():
    from trainer_core.config import TrainConfig
    from trainer_core.config_files import read_toml
    from trainer_core.plan import RunPlan

    path = ROOT / "examples" / "train.toml"
    values = read_toml(path)
    TrainConfig.from_dict({k: v for k, v in values.items() if k != "plan"}, source=str(path), base_dir=path.parent)
    RunPlan.from_dict(values["plan"])
    commented = 0
    for line in path.read_text().splitlines():
        setting = re.fullmatch(r"# (\w+ = .*?)(\s+#.*)?", line)
        if setting:  # uncommented, it must still be a valid config
            changed = tomllib.loads(path.read_text().replace(line, setting[1]))
            TrainConfig.from_dict({k: v for k, v in changed.items() if k != "plan"}, base_dir=path.parent)
            RunPlan.from_dict(changed["plan"])
            commented += 1
    assert commented >= 25


def test_overwrite_moves_the_earlier_run_aside_and_starts_over(shared, processes, tmp_path):
    earlier_run(tmp_path, shared)
    # TensorBoard logs and run store entries stay: each run writes its own, so the earlier run's are never overwritten
    before = {p: h for p, h in snapshot(tmp_path / "out").items() if not {"tensorboard", "run_store"} & set(Path(p).parts)}
    write_config(tmp_path / "run.toml", {**shared["config"], "seed": 43, "output_dir": str(tmp_path / "out")},
                 {**PLAN, "steps": 3})
    result = run_cli(processes, tmp_path, "train", "run.toml", "--fresh", "--overwrite")
    assert result.code == 0, result.err
    aside = re.search(r"--overwrite: moved the 5 files of the earlier run to (\S+)", result.err)[1]
    moved = snapshot(Path(aside))
    assert sorted(moved.values()) == sorted(before.values())  # every earlier file kept, byte for byte
    assert [p.name for p in sorted((tmp_path / "out").glob("*.safetensors"))] == [
        f"{RUN}_000003.safetensors", f"{RUN}_000003.state.safetensors"]  # no state of the earlier run left to resume


def test_a_run_with_validation_and_ema_ends_with_the_table_and_the_best_checkpoint(shared, processes, tmp_path):
    write_config(tmp_path / "run.toml", {**shared["config"], "output_dir": str(tmp_path / "out"),
                                         "validation_timesteps": 2, "ema_decay": 0.9}, PLAN)
    result = run_cli(processes, tmp_path, "train", "run.toml")
    assert result.code == 0, result.err
    assert [p.name for p in sorted((tmp_path / "out").glob(f"{RUN}_*_ema.safetensors"))] == [
        f"{RUN}_000003_ema.safetensors", f"{RUN}_000006_ema.safetensors"]
    rows = re.findall(r"^(\d+) +(\d\.\d{4}) +(\d\.\d{4})$", result.out, re.M)
    assert [int(step) for step, _, _ in rows] == [3, 6]
    loss, step, kind = min((float(v), int(s), k) for s, raw, ema in rows for v, k in ((raw, "raw"), (ema, "ema")))
    assert f"best: step {step} {kind} (validation loss {loss:.4f})" in result.out
    assert re.search(rf"checkpoint step 6: validation loss .*; best so far: step \d+ (raw|ema)", result.err)


def test_the_free_space_check_counts_the_ema_files_and_state():
    params, saves = 1_000_000, 4
    plain, ema = (output_guard.planned_bytes(params, "adamw", saves, True, 0, 0, 100, ema=e) for e in (False, True))
    assert ema - plain >= saves * (2 + 4) * params  # a bf16 EMA LoRA and the fp32 EMA in each state
