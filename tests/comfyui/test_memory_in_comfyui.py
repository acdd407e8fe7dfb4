"""Gated: the trainer's models make way for ComfyUI's in a real ComfyUI (on the CPU, where the card is the RAM, so
what leaves shows in the server's resident memory, measured and printed).

One user's evening, on a server of its own: the tiny workflow trains (its last pack node releases the models) -> a
graph stopped by an error keeps them -> a graph that loads a model through ComfyUI's model management (a test-only
node in the server's custom_nodes, loading as stock loaders do) finds them gone -> the training graph queued again
trains nothing -> a stopped graph again, then "Unload models" (POST /free) releases them.

The tiny workflow runs on a wider random base (60 M parameters, 0.24 GB in float32) than the demo's 2 MB one, whose
release would drown in the server's own memory noise. A second test drives ComfyUI's model management directly, so a
ComfyUI that renamed or changed what the pack relies on fails here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import _base_directory, start_comfyui, stop_comfyui
from diffusers import FluxTransformer2DModel
from test_run_store_in_comfyui import MODEL_LOADED, TRAINED_STEP
from test_workflow_in_comfyui import PACK_DIR, WORKFLOW, node_ids, shrunk
from workflow_api import with_inputs, workflow_to_prompt

from trainer_core.comfy_install import install_tiny
from trainer_core.models.files import shipped_config
from trainer_core.models.transformer import rope_axes
from trainer_core.tiny import write_transformer_files

OUTPUT_NAME = "flux_memory"
WIDE_BASE = "flux-wide-bf16.safetensors"
PROBE_MB = 32  # the model the test-only node loads
RELEASED = re.compile(r"trainer models released \(([\d.]+) GB\): (.+)")
PROBE_NODE = f'''"""Test-only: load a {PROBE_MB} MiB model the way ComfyUI's loaders do (ModelPatcher + load_models_gpu)."""
import torch
import comfy.model_management as mm
import comfy.model_patcher

_kept = []  # as ComfyUI's cache keeps a loader's MODEL output


class MemoryTestLoadModel:
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"megabytes": ("INT", {{"default": {PROBE_MB}, "min": 1, "max": 4096}})}}}}

    def load(self, megabytes):
        model = torch.nn.Linear(1024, 256 * megabytes, bias=False)  # 1 MiB of float32 per 256 rows
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        mm.load_models_gpu([patcher])
        _kept[:] = [patcher]
        return {{}}


NODE_CLASS_MAPPINGS = {{"MemoryTestLoadModel": MemoryTestLoadModel}}
'''
LOADER = {"1": {"class_type": "MemoryTestLoadModel", "inputs": {"megabytes": PROBE_MB}}}


def write_wide_base(path: Path) -> None:
    """A random Flux as wide as a small real one (6 heads of 128), with the demo stack's text and latent widths."""
    config = shipped_config("flux-dev-transformer.json")
    config.update(num_layers=2, num_single_layers=2, num_attention_heads=6, attention_head_dim=128,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=list(rope_axes(128)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FluxTransformer2DModel.from_config(config)
    write_transformer_files(model, path, path.with_name("flux-wide-fp8.safetensors"))


def rss(client) -> int:
    """The server's resident memory in bytes."""
    status = Path(f"/proc/{client.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


@pytest.fixture(scope="module")
def server(comfyui_dir, comfyui_python, tmp_path_factory):
    base = _base_directory(tmp_path_factory.mktemp("memory_base"))
    install_tiny(base)
    write_wide_base(base / "models" / "diffusion_models" / WIDE_BASE)
    (base / "custom_nodes" / "memory_test_nodes.py").write_text(PROBE_NODE)
    client = start_comfyui(comfyui_dir, comfyui_python, base)
    yield client
    stop_comfyui(client)


def queue(client, prompt: dict) -> tuple[dict, str]:
    """Run `prompt`; its history status and what the server printed meanwhile."""
    start = len(client.log())
    status = client.wait(client.queue(prompt), timeout=900)["status"]
    return status, client.log()[start:]


def released(log: str) -> list[tuple[float, str]]:
    return [(float(gb), why) for gb, why in RELEASED.findall(log)]


@pytest.fixture(scope="module")
def evening(server) -> dict:
    """The session in order; each step's status, log and the server's RSS after it."""
    workflow = json.loads((PACK_DIR / "example_workflows" / WORKFLOW).read_text(encoding="utf-8"))
    training = shrunk(workflow_to_prompt(workflow, server.object_info()), OUTPUT_NAME)
    init = node_ids(training, "FluxLoRA_InitTrainer")[0]
    training = with_inputs(training, {init: {"transformer": WIDE_BASE, "validation_transformer": "same as training"}})
    grid = training[node_ids(training, "FluxLoRA_XYLoraStrengthGrid")[0]]

    def stopped(steps: int) -> dict:
        """InitTrainer -> a loop that must train -> the XY grid with no checkpoint before it, which fails."""
        return {init: training[init],
                "900": {"class_type": "FluxLoRA_TrainLoop", "inputs": {"handle": [init, 0], "steps": steps}},
                "901": {"class_type": grid["class_type"], "inputs": {**grid["inputs"], "handle": ["900", 0]}}}

    steps = {"start": ({}, "", rss(server))}
    for name, prompt in (("trained", training), ("stopped", stopped(1)), ("loader", LOADER),
                         ("again", training), ("stopped again", stopped(2))):
        status, log = queue(server, prompt)
        steps[name] = (status, log, rss(server))
    start, deadline = len(server.log()), time.monotonic() + 60
    while not released(server.log()[start:]) and time.monotonic() < deadline:
        # ComfyUI's worker acts on the flag when it next wakes; a flag set between its last look and its wait does
        # not wake it (a lost notify, its wait then lasts 1000 s), so the button is pressed again, as a user would
        server.post("/free", {"unload_models": True})
        time.sleep(5)
    steps["freed"] = ({}, server.log()[start:], rss(server))
    print("server RSS (MB): " + ", ".join(f"{name} {rss_ / 2**20:.0f}" for name, (_, _, rss_) in steps.items()))
    return steps


def test_a_finished_training_graph_leaves_the_memory_as_it_found_it(evening):
    status, log, after = evening["trained"]
    assert status["status_str"] == "success", log[-6000:]
    ((gb, why),) = released(log)
    assert why == "the prompt's last trainer node ran" and gb >= 0.2
    # the graph stopped by an error loads the same models and keeps them: that much more RSS than after training
    status, log, held = evening["stopped"]
    assert status["status_str"] == "error" and "no checkpoint was saved" in log and not released(log)
    print(f"released {gb:.2f} GB; RSS with the models {held / 2**20:.0f} MB, after training {after / 2**20:.0f} MB")
    assert held - after >= 0.5 * gb * 1e9


def test_a_graph_loading_comfyuis_model_finds_the_trainers_gone(evening):
    status, log, after = evening["loader"]
    assert status["status_str"] == "success", log[-6000:]
    ((gb, why),) = released(log)
    assert why == "a prompt without trainer nodes was queued"
    held = evening["stopped"][2]
    print(f"released {gb:.2f} GB; RSS with the trainer's models {held / 2**20:.0f} MB, after the loader "
          f"{after / 2**20:.0f} MB (its model: {PROBE_MB} MiB)")
    assert held - (after - PROBE_MB * 2**20) >= 0.5 * gb * 1e9


def test_the_training_graph_again_trains_nothing_and_renders_from_the_store(evening):
    status, log, _ = evening["again"]
    assert status["status_str"] == "success", log[-6000:]
    assert not TRAINED_STEP.findall(log) and log.count("loaded from the run store") == 4
    assert MODEL_LOADED not in log  # samples and the grid came from the store too: nothing needed the models


def test_unload_models_releases_the_trainers(evening):
    status, log, held = evening["stopped again"]
    assert status["status_str"] == "error" and not released(log)
    _, log, after = evening["freed"]
    ((gb, why),) = released(log)
    assert why == "ComfyUI needed the memory"
    print(f"released {gb:.2f} GB; RSS before POST /free {held / 2**20:.0f} MB, after {after / 2**20:.0f} MB")
    assert held - after >= 0.5 * gb * 1e9


HOOK_SCRIPT = '''
import dataclasses, json, logging, pathlib, sys
logging.basicConfig(level=logging.INFO)
from comfy.cli_args import args
args.cpu = True  # read when comfy.model_management is first imported
import torch
import comfy.model_management as mm
import comfy.model_patcher
from nodes import comfy_bridge, model_sharing  # the pack's
from trainer_core import run_handle
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.demo_stack import demo_stack
from trainer_core.run_handle import TrainingRun

tmp = pathlib.Path(sys.argv[1])
config = dataclasses.replace(demo_config(demo_stack(), write_demo_dataset(tmp / "data", count=2, size=64),
                                         tmp / "out", 4), resolutions=(64,))
start = TrainingRun.start(config, before_load=comfy_bridge.free_comfy_models, on_loaded=model_sharing.trainer_loaded)
entries = lambda: [type(m).__name__ for m in mm.current_loaded_models]
report = {}
h1 = start.run.train(start, 1)
report["loaded"] = [entries(), run_handle.loaded_bytes()]
device = mm.get_torch_device()
mm.free_memory(mm.get_free_memory(device) + 1, device)  # what load_models_gpu does on a card without room
report["comfyui needed memory"] = [entries(), run_handle.loaded_bytes()]
h2 = start.run.train(h1, 1)  # the handle is still valid: the models come back
patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(8, 8), load_device=device,
                                           offload_device=mm.unet_offload_device())
mm.load_models_gpu([patcher])  # ComfyUI loads its own model beside the trainer's entry
report["reloaded, with comfyui's"] = [entries(), run_handle.loaded_bytes()]
mm.unload_all_models()
report["unload models"] = [entries(), run_handle.loaded_bytes()]
print(json.dumps(report))
'''


def test_comfyuis_model_management_unloads_the_trainers_models(comfyui_dir, comfyui_python, tmp_path):
    """Fails when ComfyUI stops calling the pack's entry in its list of loaded models (renamed or changed)."""
    done = subprocess.run([str(comfyui_python), "-c", HOOK_SCRIPT, str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=os.environ | {"PYTHONPATH": f"{PACK_DIR}:{comfyui_dir}"})
    assert done.returncode == 0, done.stderr[-6000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["loaded"][0] == ["TrainerModels"] and report["loaded"][1] > 0
    assert report["comfyui needed memory"] == [[], 0]
    assert report["reloaded, with comfyui's"][0] == ["LoadedModel", "TrainerModels"]
    assert report["reloaded, with comfyui's"][1] > 0
    assert report["unload models"] == [[], 0]
    assert "trainer models released" in done.stderr and "trainer models reloaded" in done.stderr
