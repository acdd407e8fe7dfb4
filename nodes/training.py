"""TrainLoop and SaveCheckpoint: move a run forward, and write what it has learnt."""
from __future__ import annotations

import logging
import time

from trainer_core.trainer import StepInfo

from . import comfy_bridge
from .common import CATEGORY, HANDLE, HANDLE_INPUT

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0  # console progress lines; the progress bar itself moves every step


def _progress(first_step: int, steps: int):
    """on_step hook: moves ComfyUI's progress bar (where a Cancel is raised) and logs loss, s/it and ETA."""
    bar = comfy_bridge.progress_bar(steps)
    start = last_log = time.monotonic()
    timed = 0  # steps done in this call (a continued loop starts part way)

    def on_step(info: StepInfo) -> None:
        nonlocal last_log, timed
        timed += 1
        done = info.step - first_step
        bar.update_absolute(done, steps)
        now = time.monotonic()
        if now - last_log >= LOG_EVERY_S or done == steps:
            per_step = (now - start) / timed
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f s/it  ETA %.0f s",
                     done, steps, info.loss, info.lr, per_step, per_step * (steps - done))
            last_log = now

    return on_step


class TrainLoop:
    DESCRIPTION = ("Trains the LoRA for a number of steps from the incoming handle's state. Cancel stops within a "
                   "step and keeps the steps done: queue again to continue.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (HANDLE, "INT", "FLOAT")
    RETURN_NAMES = ("handle", "step", "loss")
    OUTPUT_TOOLTIPS = ("The run after these steps.", "Steps trained in the whole run so far.", "Loss of the last step.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "handle": HANDLE_INPUT,
            "steps": ("INT", {"default": 750, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps in this loop."}),
        }}

    def train(self, handle, steps):
        after = handle.run.train(handle, steps, on_step=_progress(handle.step, steps),
                                 should_stop=comfy_bridge.raise_if_cancelled)
        return (after, after.step, after.state.losses[-1])


class SaveCheckpoint:
    DESCRIPTION = ("Saves the LoRA (kohya layout, loads in stock ComfyUI) to models/loras as "
                   "<output_name>_<step>.safetensors, and records it on the handle for the XY grid.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (HANDLE, "STRING")
    RETURN_NAMES = ("handle", "lora_path")
    OUTPUT_TOOLTIPS = ("The same run, with this checkpoint recorded.", "Path of the LoRA file written.")
    FUNCTION = "save"
    OUTPUT_NODE = True  # it writes files, so it runs even with nothing connected after it

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "handle": HANDLE_INPUT,
            "save_state": ("BOOLEAN", {"default": True, "tooltip": "Also write <name>.state.safetensors (optimizer, "
                                       "RNG, data position) to resume from in InitTrainer."}),
        }}

    def save(self, handle, save_state):
        after = handle.run.save_checkpoint(handle, save_state=save_state)
        return (after, str(after.checkpoints[-1].lora_path))
