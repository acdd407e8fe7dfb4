"""Gated (all but the converter's own tests): the tiny example workflow, converted from its UI format and queued
over ComfyUI's HTTP API, trains in a real ComfyUI, and ComfyUI's own cache, re-queues and Cancel behave as the pack
promises.

The scenario is one session of a user, so its steps are module fixtures that build on each other in order:
first run -> the same prompt again (all cached) -> loop 2 changed (loops 2-4 retrain from loop 1's handle) ->
loop 4 made long and cancelled mid-loop, then queued again (it continues). Steps and image sizes are shrunk to
keep the whole module to a few minutes on a loaded 2-core CPU; the graph is the shipped one.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_in_comfyui import PROBE, comfyui_widths
from workflow_api import with_inputs, workflow_to_prompt

from trainer_core.checkpoints import STATE_SUFFIX, load_training_state
from trainer_core.comfy_install import install_tiny
from trainer_core.config import TrainConfig
from trainer_core.lora import kohya_state_dict, lora_state
from trainer_core.models import load_transformer
from trainer_core.trainer import Trainer

PACK_DIR = Path(__file__).resolve().parents[2]
WORKFLOW = "flux_tiny_demo.json"
OUTPUT_NAME = "flux_tiny_api"  # not the shipped one: other modules may train the same workflow on this server
STEPS = 3  # per loop in the first run
STATES = "flux_lora_states"  # models/<STATES>: where SaveCheckpoint puts training states (nodes/comfy_bridge.py)
LOOP2_CHANGED = 5
LONG = 30  # loop 4 when it is cancelled: long enough that the Cancel lands mid-loop
CELL = 64  # sample and grid cell size in pixels
EMA_DECAY = 0.9
VALIDATION_GREEN = (44, 160, 44)  # matplotlib's tab:green, LossPlot's validation line
RUN_TIMEOUT_S = 600  # a loaded 2-core machine can be 5x slower than an idle one
ENDED = ("execution_success", "execution_error", "execution_interrupted")  # websocket events that end a prompt


@dataclass
class Run:
    prompt: dict
    prompt_id: str
    history: dict
    seconds: float
    loras: dict[str, bytes]  # models/loras after the run: file name -> content


def node_ids(prompt: dict, class_type: str) -> list[str]:
    """Ids of the prompt's nodes of `class_type`, in id order (the shipped graph numbers its loops in order)."""
    return sorted((k for k, v in prompt.items() if v["class_type"] == class_type), key=int)


def lora_name(step: int, state: bool = False) -> str:
    return f"{OUTPUT_NAME}_{step:06d}" + (STATE_SUFFIX if state else ".safetensors")


def checkpoint_files(step: int) -> set[str]:
    """What SaveCheckpoint writes at `step` in the shrunk run: the LoRA, its state and its EMA LoRA."""
    return {lora_name(step), lora_name(step, state=True), f"{OUTPUT_NAME}_{step:06d}_ema.safetensors"}


def finish(comfyui, prompt: dict, prompt_id: str, start: float, timeout: float = RUN_TIMEOUT_S) -> Run:
    """Wait for a queued prompt; the Run, with what models/loras (LoRAs) and models/flux_lora_states (the states
    SaveCheckpoint saves) hold afterwards."""
    history = comfyui.wait(prompt_id, timeout=timeout)
    loras = {p.name: p.read_bytes() for folder in ("loras", STATES)
             for p in comfyui.models_dir(folder).glob(f"{OUTPUT_NAME}_*")}
    return Run(prompt, prompt_id, history, time.monotonic() - start, loras)


def run(comfyui, prompt: dict, timeout: float = RUN_TIMEOUT_S) -> Run:
    start = time.monotonic()
    return finish(comfyui, prompt, comfyui.queue(prompt), start, timeout)


def assert_success(run: Run, comfyui) -> None:
    status = run.history["status"]
    assert status["status_str"] == "success" and status["completed"], f"{status}\n{comfyui.log_tail()}"


def executed_nodes(run: Run) -> set[str]:
    """Ids of the nodes that ran (the rest came from ComfyUI's cache)."""
    (cached,) = [m["nodes"] for kind, m in run.history["status"]["messages"] if kind == "execution_cached"]
    return set(run.prompt) - set(cached)


def our_log(comfyui, shipped: dict) -> str:
    """What the server printed since this module began (other modules share the server)."""
    return comfyui.log()[shipped["log_start"]:]


def images(comfyui, run: Run, node_id: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(comfyui.view(i))) for i in run.history["outputs"][node_id]["images"]]


@pytest.fixture(scope="module")
def shipped(comfyui) -> dict:
    """The shipped workflow as an API prompt, the tiny models installed, and the server log offset at the start."""
    install_tiny(comfyui.base_dir)
    workflow = json.loads((PACK_DIR / "example_workflows" / WORKFLOW).read_text(encoding="utf-8"))
    return {"prompt": workflow_to_prompt(workflow, comfyui.object_info()), "log_start": len(comfyui.log())}


def shrunk(prompt: dict, output_name: str) -> dict:
    """The shipped prompt with STEPS per loop, CELL-sized images and its own output_name, and an EMA kept beside the
    validation loss (the grid shows a raw and an EMA row per checkpoint)."""
    small = {"steps": 2, "width": CELL, "height": CELL}
    changes = {node_ids(prompt, "FluxLoRA_InitTrainer")[0]: {"resolutions": str(CELL), "output_name": output_name,
                                                            "ema_decay": EMA_DECAY}}
    changes |= {i: {"steps": STEPS} for i in node_ids(prompt, "FluxLoRA_TrainLoop")}
    changes |= {i: small for i in node_ids(prompt, "FluxLoRA_ValidationSample")}
    changes |= {i: {**small, "rows": "both"} for i in node_ids(prompt, "FluxLoRA_XYLoraStrengthGrid")}
    return with_inputs(prompt, changes)


@pytest.fixture(scope="module")
def small_prompt(shipped) -> dict:
    """The shrunk workflow with total_steps set, above every plan these tests queue: with auto, changing loop 2
    changes the schedule, so loop 1 rightly trains again (the auto case is `lengthened_with_auto_total_steps`).
    The total is the longest plan queued: loop 2 changed, then loop 4 made LONG."""
    prompt = shrunk(shipped["prompt"], OUTPUT_NAME)
    total = STEPS + LOOP2_CHANGED + STEPS + LONG
    return with_inputs(prompt, {node_ids(prompt, "FluxLoRA_InitTrainer")[0]: {"total_steps": total}})


@pytest.fixture(scope="module")
def first_run(comfyui, small_prompt) -> Run:
    result = run(comfyui, small_prompt)
    assert_success(result, comfyui)
    return result


@pytest.fixture(scope="module")
def requeued(comfyui, first_run) -> Run:
    return run(comfyui, first_run.prompt, timeout=60)


@pytest.fixture(scope="module")
def loop2_changed(comfyui, requeued) -> Run:
    loop2 = node_ids(requeued.prompt, "FluxLoRA_TrainLoop")[1]
    result = run(comfyui, with_inputs(requeued.prompt, {loop2: {"steps": LOOP2_CHANGED}}))
    assert_success(result, comfyui)
    return result


@dataclass
class Cancelled:
    cancelled: Run
    continued: Run
    at_step: int  # the step the Cancel stopped loop 4 at


@pytest.fixture(scope="module")
def cancelled_and_continued(comfyui, shipped, loop2_changed) -> Cancelled:
    """Loop 4 made long; Cancel (POST /interrupt) as soon as ComfyUI reports its first training step, then queue it
    again."""
    loop4 = node_ids(loop2_changed.prompt, "FluxLoRA_TrainLoop")[3]
    prompt = with_inputs(loop2_changed.prompt, {loop4: {"steps": LONG}})
    client_id = uuid.uuid4().hex
    start = time.monotonic()
    with comfyui.events(client_id, timeout=RUN_TIMEOUT_S) as events:
        prompt_id = comfyui.queue(prompt, client_id=client_id)
        while True:
            event = events.next()
            data = event.get("data", {})
            # a step of loop 4's own (max LONG), not the loading before it: the models were released after the
            # last prompt, and reloading and caching report progress on the same node
            if event["type"] == "progress" and data.get("node") == loop4 and data["value"] >= 1 and data["max"] == LONG:
                comfyui.interrupt(prompt_id)
                break
            if event["type"] in ENDED and data.get("prompt_id") == prompt_id:
                pytest.fail(f"the prompt ended before loop 4 reported a step: {event}\n{comfyui.log_tail()}")
    cancelled = finish(comfyui, prompt, prompt_id, start)
    stopped = re.findall(r"loop interrupted at step (\d+)", our_log(comfyui, shipped))
    assert stopped, f"no 'loop interrupted' line in the log:\n{comfyui.log_tail()}"
    continued = run(comfyui, prompt)
    assert_success(continued, comfyui)
    return Cancelled(cancelled, continued, int(stopped[-1]))


# ---------------------------------------------------------------------------------------------- the converter
# (no server needed: these run without COMFYUI_DIR too)
SAMPLER_INFO = {  # shaped like /object_info's KSampler entry, trimmed
    "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0}], "steps": ["INT", {}],
                           "sampler_name": [["euler", "heun"], {}],
                           "noise_seed": ["INT", {"control_after_generate": False}], "denoise": ["FLOAT", {}]}},
    "input_order": {"required": ["model", "seed", "steps", "sampler_name", "noise_seed", "denoise"]},
}
SOURCE_INFO = {"input": {}, "input_order": {}}


def sampler_workflow(widgets_values: list) -> dict:
    """Note (frontend only) + two sources feeding the sampler's model socket and its steps widget."""
    return {
        "nodes": [
            {"id": 1, "type": "Note", "widgets_values": ["a note"]},
            {"id": 2, "type": "Source", "outputs": [{"links": [1]}, {"links": [2]}]},
            {"id": 5, "type": "Sampler", "title": "My sampler", "widgets_values": widgets_values,
             "inputs": [{"name": "model", "link": 1}, {"name": "steps", "widget": {"name": "steps"}, "link": 2}]},
        ],
        "links": [[1, 2, 0, 5, 0, "MODEL"], [2, 2, 1, 5, 1, "INT"]],
    }


def test_converter_maps_widgets_in_order_skipping_seed_controls_and_linked_widgets_take_the_link():
    info = {"Sampler": SAMPLER_INFO, "Source": SOURCE_INFO}
    # seed has a control value after it ("randomize"), noise_seed none (control_after_generate False, as this pack's
    # seeds); steps keeps its slot (20) though a link feeds it
    prompt = workflow_to_prompt(sampler_workflow([42, "randomize", 20, "heun", 7, 0.5]), info)
    assert prompt == {
        "2": {"class_type": "Source", "inputs": {}, "_meta": {"title": "Source"}},
        "5": {"class_type": "Sampler", "_meta": {"title": "My sampler"}, "inputs": {
            "seed": 42, "steps": ["2", 1], "sampler_name": "heun", "noise_seed": 7, "denoise": 0.5, "model": ["2", 0]}},
    }
    assert with_inputs(prompt, {5: {"seed": 1}})["5"]["inputs"]["seed"] == 1 and prompt["5"]["inputs"]["seed"] == 42
    with pytest.raises(KeyError, match="cfg"):
        with_inputs(prompt, {5: {"cfg": 1.0}})


@pytest.mark.parametrize("values", [[42, 20, "heun", 7, 0.5], [42, "fixed", 20, "heun", 7, 0.5, 1]])
def test_converter_rejects_a_widget_count_that_does_not_fit(values):
    with pytest.raises(ValueError, match="node 5"):
        workflow_to_prompt(sampler_workflow(values), {"Sampler": SAMPLER_INFO, "Source": SOURCE_INFO})


# ---------------------------------------------------------------------------------------------- the shipped files
def test_the_template_browser_lists_and_serves_the_example_workflows(comfyui):
    templates = comfyui.get("/workflow_templates")
    shipped = sorted(p.stem for p in (PACK_DIR / "example_workflows").glob("*.json"))
    assert sorted(templates.get(comfyui.pack_name, [])) == shipped
    served = comfyui.get(f"/api/workflow_templates/{comfyui.pack_name}/{WORKFLOW}")
    assert served == json.loads((PACK_DIR / "example_workflows" / WORKFLOW).read_text(encoding="utf-8"))


def test_the_converted_prompt_has_the_graphs_shape_and_widget_values(shipped):
    prompt = shipped["prompt"]
    workflow = json.loads((PACK_DIR / "example_workflows" / WORKFLOW).read_text(encoding="utf-8"))
    real = [n for n in workflow["nodes"] if n["type"] != "Note"]
    assert sorted(prompt, key=int) == [str(n["id"]) for n in real]
    init = prompt[node_ids(prompt, "FluxLoRA_InitTrainer")[0]]["inputs"]
    # first, middle and last widget: a value shifted by one slot would show in one of them
    assert (init["transformer"], init["seed"], init["resume_state"]) == ("flux-tiny-bf16.safetensors", 7, "none")
    (grid,) = node_ids(prompt, "FluxLoRA_XYLoraStrengthGrid")
    assert prompt[grid]["inputs"]["strengths"] == "0,0.2,0.4,0.6,0.8,1.0" and prompt[grid]["inputs"]["seed"] == 1
    loops = node_ids(prompt, "FluxLoRA_TrainLoop")
    saves = node_ids(prompt, "FluxLoRA_SaveCheckpoint")
    assert [prompt[i]["inputs"]["steps"] for i in loops] == [50] * 4
    assert [prompt[i]["inputs"]["handle"] for i in loops[1:]] == [[s, 0] for s in saves[:-1]]


# ---------------------------------------------------------------------------------------------- the first run
def test_first_run_writes_a_kohya_lora_with_metadata_per_checkpoint(first_run, comfyui):
    steps = [STEPS * k for k in (1, 2, 3, 4)]
    assert set(first_run.loras) == set().union(*(checkpoint_files(s) for s in steps))
    init = first_run.prompt[node_ids(first_run.prompt, "FluxLoRA_InitTrainer")[0]]["inputs"]
    for step in steps:
        path = comfyui.models_dir("loras") / lora_name(step)
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert keys and all(k.startswith("lora_unet_") for k in keys)
        assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # kohya's fused qkv
        assert meta["ss_network_dim"] == str(init["rank"]) and meta["ss_network_alpha"] == str(init["alpha"])
        assert meta["ss_steps"] == str(step)
        assert meta["trigger_word"] == init["trigger_word"]
        assert float(meta["training_guidance"]) == float(meta["ss_guidance_scale"]) == init["guidance"]


def test_first_run_renders_samples_loss_plots_and_the_grid(first_run, comfyui):
    prompt = first_run.prompt
    for node in node_ids(prompt, "FluxLoRA_ValidationSample"):
        saved = [k for k, v in prompt.items() if v["inputs"].get("images") == [node, 0]]
        assert [im.size for im in images(comfyui, first_run, saved[0])] == [(CELL, CELL)] * 2
    plot_nodes = node_ids(prompt, "FluxLoRA_LossPlot")
    plots = [images(comfyui, first_run, n) for n in plot_nodes]
    assert all(len(p) == 1 and min(p[0].size) >= 200 for p in plots)
    # each loop's end is scored (raw and EMA); LossPlot draws them as a second line, in green
    scored = first_run.history["outputs"][plot_nodes[-1]]["validation"]
    assert [r["step"] for r in scored] == [STEPS * k for k in (1, 2, 3, 4)]
    assert all(r["raw"] > 0 and r["ema"] > 0 and r["raw"] != r["ema"] for r in scored)
    pixels = np.asarray(plots[-1][0].convert("RGB"), dtype=np.int16)
    assert (np.abs(pixels - VALIDATION_GREEN).max(axis=-1) < 30).sum() > 50

    (grid_node,) = node_ids(prompt, "FluxLoRA_XYLoraStrengthGrid")
    (save,) = [k for k, v in prompt.items() if v["inputs"].get("images") == [grid_node, 0]]
    (grid,) = images(comfyui, first_run, save)
    # a raw and an EMA row per checkpoint, each with its validation loss; the lowest of them marked best
    labels = first_run.history["outputs"][grid_node]["rows"]
    best = min((r[kind], r["step"], kind) for r in scored for kind in ("raw", "ema"))
    expected = [f"step {r['step']}{' EMA' if kind == 'ema' else ''}  val {r[kind]:.4f}"
                + ("  * best" if (r[kind], r["step"], kind) == best else "") for r in scored for kind in ("raw", "ema")]
    assert labels == expected
    rows, cols = 8, len(prompt[grid_node]["inputs"]["strengths"].split(","))  # checkpoints x (raw, EMA) x strengths
    left, top = grid.width - cols * CELL, grid.height - rows * CELL  # the label margins
    assert left > 0 and top > 0

    def cell(r: int, c: int) -> bytes:
        return grid.crop((left + c * CELL, top + r * CELL, left + (c + 1) * CELL, top + (r + 1) * CELL)).tobytes()

    # strength 0 is the base model whatever the checkpoint; at 1.0 each row shows its own checkpoint
    assert len({cell(r, 0) for r in range(rows)}) == 1
    assert len({cell(r, cols - 1) for r in range(rows)}) == rows


def test_server_log_has_no_traceback(first_run, comfyui, shipped):
    log = our_log(comfyui, shipped)
    assert not comfyui.pack_tracebacks(log), log[-6000:]
    assert re.search(rf"saved LoRA at step {4 * STEPS} ", log)


# ---------------------------------------------------------------------------------------------- ComfyUI's cache
def test_the_unchanged_prompt_again_comes_from_the_cache(requeued, first_run, comfyui):
    assert_success(requeued, comfyui)
    assert executed_nodes(requeued) == set()
    assert requeued.loras == first_run.loras  # nothing retrained, no file rewritten
    assert requeued.seconds < 10, f"{requeued.seconds:.1f} s for a cached prompt"


def test_changing_loop_2_retrains_from_loop_1_and_keeps_its_files(loop2_changed, first_run, comfyui):
    prompt = loop2_changed.prompt
    loops = node_ids(prompt, "FluxLoRA_TrainLoop")
    assert executed_nodes(loop2_changed) >= set(loops[1:]) and loops[0] not in executed_nodes(loop2_changed)
    assert node_ids(prompt, "FluxLoRA_InitTrainer")[0] not in executed_nodes(loop2_changed)
    new_steps = [STEPS + LOOP2_CHANGED + STEPS * k for k in (0, 1, 2)]
    new_files = set().union(*(checkpoint_files(s) for s in new_steps))
    assert set(loop2_changed.loras) == set(first_run.loras) | new_files
    for name, content in first_run.loras.items():  # loop 1's file among them, byte for byte
        assert loop2_changed.loras[name] == content, f"{name} was rewritten"


def test_loop_2_after_the_change_equals_training_straight_through(loop2_changed, comfyui):
    """What ComfyUI saved after loop 2 (restored to loop 1's state, then trained) is exactly what a Trainer gets by
    training loop1 + loop2 steps in one go, in this process, from the config the run saved with its state.

    Exact, not close: same CPU, same seed, and restoring a state is exact (both Pythons' torch agree bit for bit
    on this machine; a different torch build could differ in the last bits and would show here first)."""
    step = STEPS + LOOP2_CHANGED
    state, config = load_training_state(comfyui.models_dir(STATES) / lora_name(step, state=True))
    trainer = Trainer.from_config(TrainConfig.from_dict(config))
    trainer.train(step)
    pairs = [(state.lora, lora_state(trainer.transformer)),  # float32, as trained
             (load_file(comfyui.models_dir("loras") / lora_name(step)), kohya_state_dict(trainer.transformer))]
    for saved, expected in pairs:
        assert saved.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------- ComfyUI's loader
def test_the_saved_lora_loads_fully_through_comfyuis_lora_loader(first_run, comfyui, comfyui_dir, comfyui_python,
                                                                  tmp_path):
    transformer_file = comfyui.models_dir("diffusion_models") / "flux-tiny-bf16.safetensors"
    lora_file = comfyui.models_dir("loras") / lora_name(4 * STEPS)
    widths = comfyui_widths(load_transformer(transformer_file, dtype=torch.float32))
    command = [str(comfyui_python), str(PROBE), str(comfyui_dir), str(transformer_file), str(lora_file),
               str(tmp_path), "--widths", json.dumps(widths), "--strengths", "1.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model_class"] == "Flux" and report["lora_modules"]
    assert report["unmapped_modules"] == []
    assert not [w for w in report["warnings"] if "lora key not loaded" in w or "NOT LOADED" in w], report["warnings"]
    assert len(report["patched_keys"]["1.0"]) == len(report["lora_modules"])  # one merged weight per LoRA module


# ---------------------------------------------------------------------------------------------- Cancel
def test_cancel_mid_loop_then_queue_again_continues_the_loop(cancelled_and_continued, loop2_changed, comfyui,
                                                            shipped):
    c = cancelled_and_continued
    status = c.cancelled.history["status"]
    loop4 = node_ids(c.cancelled.prompt, "FluxLoRA_TrainLoop")[3]
    interrupted = [m for kind, m in status["messages"] if kind == "execution_interrupted"]
    assert status["status_str"] == "error" and interrupted and interrupted[0]["node_id"] == loop4
    start = STEPS + LOOP2_CHANGED + STEPS  # the step of loop 4's input handle
    assert start < c.at_step < start + LONG, "the Cancel did not land mid-loop"
    assert c.cancelled.loras == loop2_changed.loras  # cancelled before its SaveCheckpoint: nothing written
    assert lora_name(start + LONG) in c.continued.loras

    log = our_log(comfyui, shipped)
    assert f"continuing the interrupted loop from step {c.at_step}" in log, log[-6000:]
    assert not comfyui.pack_tracebacks(log), log[-6000:]
    assert executed_nodes(c.continued) & set(node_ids(c.continued.prompt, "FluxLoRA_TrainLoop")) == {loop4}
    state, _ = load_training_state(comfyui.models_dir(STATES) / lora_name(start + LONG, state=True))
    assert state.step == len(state.losses) == start + LONG  # no step lost or done twice


# ---------------------------------------------------------------------------------------------- the schedule's end
def files_of(comfyui, output_name: str) -> dict[str, bytes]:
    """Every file the runs of `output_name` wrote: LoRAs, saved states and the run store's entries."""
    roots = [comfyui.models_dir("loras"), comfyui.models_dir(STATES)]
    return {str(p): p.read_bytes() for root in roots for p in root.rglob("*")
            if p.is_file() and (output_name in p.name or "runs" in p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def lengthened_past_a_fixed_schedule(comfyui, shipped) -> tuple[Run, Run, dict, dict]:
    """The shrunk workflow with a fixed total_steps of its four loops, run; then loop 4 made 2 steps longer."""
    prompt = shrunk(shipped["prompt"], "flux_tiny_fixed")
    init, loop4 = node_ids(prompt, "FluxLoRA_InitTrainer")[0], node_ids(prompt, "FluxLoRA_TrainLoop")[3]
    prompt = with_inputs(prompt, {init: {"total_steps": 4 * STEPS, "lr_schedule": "cosine"}})
    first = run(comfyui, prompt)
    assert_success(first, comfyui)
    before = files_of(comfyui, "flux_tiny_fixed")
    longer = run(comfyui, with_inputs(prompt, {loop4: {"steps": STEPS + 2}}))
    return first, longer, before, files_of(comfyui, "flux_tiny_fixed")


def test_a_loop_lengthened_past_a_fixed_total_steps_stops_before_training_and_writes_nothing(
        lengthened_past_a_fixed_schedule, comfyui):
    first, longer, before, after = lengthened_past_a_fixed_schedule
    status = longer.history["status"]
    errors = [m for kind, m in status["messages"] if kind == "execution_error"]
    loop4 = node_ids(longer.prompt, "FluxLoRA_TrainLoop")[3]
    assert status["status_str"] == "error" and errors and errors[0]["node_id"] == loop4
    end = 4 * STEPS + 2
    assert errors[0]["exception_message"].rstrip("\n") == (
        f"steps: training to step {end} runs past total_steps {4 * STEPS}, where the cosine schedule ends: steps "
        f"{4 * STEPS + 1}-{end} would train at learning rate 0. Set InitTrainer's total_steps to {end} or more (0: "
        f"auto, the queued loops' steps), or this loop's steps to {STEPS} at most")
    assert after == before  # nothing trained, nothing written


@pytest.fixture(scope="module")
def lengthened_with_auto_total_steps(comfyui, shipped) -> tuple[Run, Run, str]:
    """The shrunk workflow (total_steps 0: auto), run; then loop 4 made 2 steps longer; and the log of the second."""
    prompt = shrunk(shipped["prompt"], "flux_tiny_auto")
    prompt = with_inputs(prompt, {node_ids(prompt, "FluxLoRA_InitTrainer")[0]: {"lr_schedule": "cosine"}})
    first = run(comfyui, prompt)
    assert_success(first, comfyui)
    start = len(comfyui.log())
    loop4 = node_ids(prompt, "FluxLoRA_TrainLoop")[3]
    longer = run(comfyui, with_inputs(prompt, {loop4: {"steps": STEPS + 2}}))
    return first, longer, comfyui.log()[start:]


def test_a_lengthened_loop_re_plans_an_auto_schedule_and_the_log_says_which_loops_train_again(
        lengthened_with_auto_total_steps, comfyui):
    first, longer, log = lengthened_with_auto_total_steps
    assert_success(longer, comfyui)
    init = node_ids(longer.prompt, "FluxLoRA_InitTrainer")[0]
    assert init in executed_nodes(longer)  # InitTrainer ran again: its schedule follows the queued graph
    loops = node_ids(longer.prompt, "FluxLoRA_TrainLoop")
    total = 4 * STEPS + 2
    ranges = [(1, 3), (4, 6), (7, 9), (10, total)]
    expected = ", ".join(f"TrainLoop {n} (steps {a}-{b})" for n, (a, b) in zip(loops, ranges))
    said = f"the queued loops add up to {total} steps, not {4 * STEPS}"
    assert said in log and expected in log, log[-4000:]
    assert log.index(said) < log.index(f"step {STEPS}/{STEPS}"), "the loops trained before the log said why"
    state, _ = load_training_state(comfyui.models_dir(STATES) / f"flux_tiny_auto_{total:06d}{STATE_SUFFIX}")
    assert state.lrs[-1] > 0 and len(state.lrs) == total  # the lengthened loop's last step still learns (cosine)
    assert "past total_steps" not in log
