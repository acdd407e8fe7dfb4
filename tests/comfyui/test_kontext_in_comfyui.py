"""Gated: the Kontext example workflow in a real ComfyUI. As shipped (no Kontext model files) ComfyUI refuses it,
naming the missing file; with the demo's small stack in their place it trains on pairs, and each sample and the
XY grid edit the picture of a stock LoadImage."""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

from PIL import Image
from test_workflow_in_comfyui import CELL, assert_success, images, node_ids, run
from workflow_api import with_inputs, workflow_to_prompt

from trainer_core.comfy_install import install_tiny

PACK_DIR = Path(__file__).resolve().parents[2]
WORKFLOW = PACK_DIR / "example_workflows" / "flux_kontext_lora.json"
OUTPUT_NAME = "flux_kontext_api"


def shipped_prompt(comfyui) -> dict:
    return workflow_to_prompt(json.loads(WORKFLOW.read_text(encoding="utf-8")), comfyui.object_info())


def test_every_node_of_the_workflow_is_known_and_without_the_model_files_comfyui_names_them(comfyui):
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    known = comfyui.object_info()
    assert {n["type"] for n in workflow["nodes"]} - set(known) == {"Note"}  # the frontend's own
    try:
        comfyui.post("/prompt", {"prompt": shipped_prompt(comfyui)})
        raise AssertionError("ComfyUI queued the Kontext workflow without its model files")
    except urllib.error.HTTPError as e:
        errors = e.read().decode(errors="replace")
    assert "flux1-kontext-dev.safetensors" in errors and "transformer" in errors, errors


def test_on_the_small_stack_it_trains_on_pairs_and_the_grid_edits_the_loaded_picture(comfyui):
    tiny = install_tiny(comfyui.base_dir)
    pairs = Path(comfyui.base_dir) / "input" / "kontext_pairs"
    for folder in ("target", "control"):
        (pairs / folder).mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("teal", "orange")):
        Image.new("RGB", (CELL, CELL), colour).save(pairs / "control" / f"p{i}.png")
        Image.new("RGB", (CELL, CELL), "yellow").save(pairs / "target" / f"p{i}.png")
        (pairs / "target" / f"p{i}.txt").write_text("make it yellow")
    Image.new("RGB", (CELL, CELL), "blue").save(Path(comfyui.base_dir) / "input" / "kontext_input.png")

    prompt = shipped_prompt(comfyui)
    (init,) = node_ids(prompt, "FluxLoRA_InitTrainer")
    small = {"steps": 2, "width": CELL, "height": CELL}
    changes = {init: {"transformer": tiny.transformer.name, "vae": tiny.vae.name,
                      "clip_l": f"flux-tiny/{tiny.clip_l.name}", "t5": f"flux-tiny/{tiny.t5.name}",
                      "dataset_dir": "kontext_pairs/target", "control_dir": "kontext_pairs/control",
                      "resolutions": str(CELL), "output_name": OUTPUT_NAME, "memory_preset": "custom",
                      "max_sequence_length": 32, "mixed_precision": "fp32", "gradient_checkpointing": False,
                      "total_steps": 4}}
    changes |= {i: {"steps": 1} for i in node_ids(prompt, "FluxLoRA_TrainLoop")}
    changes |= {i: small for i in node_ids(prompt, "FluxLoRA_ValidationSample")}
    changes |= {i: {**small, "rows": "raw"} for i in node_ids(prompt, "FluxLoRA_XYLoraStrengthGrid")}
    result = run(comfyui, with_inputs(prompt, changes))
    assert_success(result, comfyui)

    (grid_node,) = node_ids(prompt, "FluxLoRA_XYLoraStrengthGrid")
    (grid,) = images(comfyui, result, grid_node)
    strengths = len(prompt[grid_node]["inputs"]["strengths"].split(","))
    assert grid.width > (strengths + 1) * CELL  # the loaded picture's column, then one per strength
    loras = {p.name for p in comfyui.models_dir("loras").glob(f"{OUTPUT_NAME}_0*.safetensors")}
    assert {f"{OUTPUT_NAME}_{step:06d}.safetensors" for step in (1, 2, 3, 4)} <= loras  # and the EMA's beside them
