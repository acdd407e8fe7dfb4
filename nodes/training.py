"""TrainLoop and SaveCheckpoint: move a run forward, and write what it has learnt."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from trainer_core.progress import ProgressTracker
from trainer_core.trainer import StepInfo

from . import comfy_bridge
from .common import CATEGORY, HANDLE, HANDLE_INPUT

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0  # console progress lines; the progress bar itself moves every step


@contextlib.contextmanager
def _progress(first_step: int, steps: int, node_id: str | None) -> Iterator[Callable[[StepInfo], None]]:
    """The on_step hook: moves ComfyUI's progress bar (where a Cancel is raised), feeds the node's live view
    (throttled) and logs loss, s/it and ETA. A loop that ends early is shown stopped, not counting down."""
    bar = comfy_bridge.progress_bar(steps)
    tracker = ProgressTracker(steps, first_step)
    last_log = time.monotonic()

    def on_step(info: StepInfo) -> None:
        nonlocal last_log
        tracker.update(info)
        now = time.monotonic()
        if tracker.due(now):
            comfy_bridge.send_progress(node_id, tracker.snapshot())
        bar.update_absolute(tracker.done, steps)
        if now - last_log >= LOG_EVERY_S or tracker.done == steps:
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f s/it  ETA %.0f s", tracker.done, steps, info.loss,
                     info.lr, tracker.seconds_per_step, tracker.eta_seconds)
            last_log = now

    try:
        yield on_step
    finally:
        if tracker.running:
            tracker.stop()
            comfy_bridge.send_progress(node_id, tracker.snapshot())


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
        }, "hidden": {"unique_id": "UNIQUE_ID"}}  # the node the live view draws on

    def train(self, handle, steps, unique_id=None):
        with _progress(handle.step, steps, unique_id) as on_step:
            after = handle.run.train(handle, steps, on_step=on_step, should_stop=comfy_bridge.raise_if_cancelled)
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
