"""Gated: the tiny example workflow, queued unchanged in a real ComfyUI, shows the LoRA learn in its XY grid as the CLI
demo does: the subject is absent at strength 0 and appears with strength and steps (scored from the grid's pixels).
The grid is saved under the pytest temporary folder (its path is printed).

Unlike the CLI demo, the workflow judges the LoRA on its validation base, the fp8 copy of the training base (as a
real run trains on Flux-dev2pro and judges on Flux-dev): on a base this small fp8 rounding costs some of the
subject, so its bound is 40% of the training pictures' score where the CLI demo's is 50%."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from test_workflow_in_comfyui import PACK_DIR, WORKFLOW, assert_success, images, node_ids, run
from workflow_api import with_inputs, workflow_to_prompt

from trainer_core.comfy_install import install_tiny
from trainer_core.demo import subject_score


def test_the_shipped_tiny_workflow_grid_shows_the_subject_appear(comfyui, tmp_path):
    installed = install_tiny(comfyui.base_dir)
    workflow = json.loads((PACK_DIR / "example_workflows" / WORKFLOW).read_text(encoding="utf-8"))
    prompt = workflow_to_prompt(workflow, comfyui.object_info())
    (init,) = node_ids(prompt, "FluxLoRA_InitTrainer")
    result = run(comfyui, with_inputs(prompt, {init: {"output_name": "flux_tiny_grid"}}), timeout=1800)
    assert_success(result, comfyui)

    (grid_node,) = node_ids(prompt, "FluxLoRA_XYLoraStrengthGrid")
    inputs = prompt[grid_node]["inputs"]
    (save,) = [k for k, v in prompt.items() if v["inputs"].get("images") == [grid_node, 0]]
    (grid,) = images(comfyui, result, save)
    grid.save(tmp_path / "flux_tiny_demo_xy_grid.png")
    print(f"grid: {tmp_path / 'flux_tiny_demo_xy_grid.png'}")
    strengths = [float(s) for s in inputs["strengths"].split(",")]
    rows, cols, w, h = len(node_ids(prompt, "FluxLoRA_TrainLoop")), len(strengths), inputs["width"], inputs["height"]
    left, top = grid.width - cols * w, grid.height - rows * h  # the label margins; the cells fill the rest

    def score(r: int, c: int) -> float:
        return subject_score(grid.crop((left + c * w, top + r * h, left + (c + 1) * w, top + (r + 1) * h)))

    table = np.array([[score(r, c) for c in range(cols)] for r in range(rows)])
    print("subject scores, rows = checkpoints, columns = strengths", strengths, "\n", table.round(3))
    target = np.mean([subject_score(Image.open(p)) for p in sorted(Path(installed.dataset).glob("*.png"))])
    assert table[:, 0].max() < 0.05 * target, table  # strength 0: the base never draws it
    last = list(table[-1])
    assert last == sorted(last) and last[0] < last[-2] < last[-1], table  # it comes in with the strength
    assert table[0, -1] < table[-1, -1], table
    assert table[-1, -1] >= 0.4 * target, (table, target)
