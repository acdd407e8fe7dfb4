"""TrainLoop and SaveCheckpoint: move a run forward, and write what it has learnt."""
from __future__ import annotations

import logging
import time

from trainer_core import validation
from trainer_core.checkpoints import TrainingState
from trainer_core.optim import PastScheduleError
from trainer_core.progress import ProgressTracker
from trainer_core.trainer import NonFiniteLossError, StepInfo

from . import comfy_bridge, live_view
from .common import CATEGORY, HANDLE, HANDLE_INPUT

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0  # console progress lines; the progress bar itself moves every step


class _LoopView:
    """A TrainLoop's hooks: `on_step` moves ComfyUI's progress bar (where a Cancel is raised), feeds the node's live
    view (throttled) and logs loss, s/it and ETA; `on_known` charts the steps of the loop done before (continued,
    or loaded from the run store, which the view then says). A loop that ends early is shown stopped."""

    def __init__(self, first_step: int, steps: int, node_id: str | None):
        self.bar = comfy_bridge.progress_bar(steps)
        self.tracker = ProgressTracker(steps, first_step)
        self.node_id, self.steps = node_id, steps
        self.last_log = time.monotonic()
        self.loaded = False  # the whole loop came from the run store

    def on_step(self, info: StepInfo) -> None:
        tracker = self.tracker
        tracker.update(info)
        now = time.monotonic()
        if tracker.due(now):
            live_view.send_progress(self.node_id, tracker.snapshot())
        self.bar.update_absolute(tracker.done, self.steps)
        if now - self.last_log >= LOG_EVERY_S or tracker.done == self.steps:
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f s/it  ETA %.0f s", tracker.done, self.steps, info.loss,
                     info.lr, tracker.seconds_per_step, tracker.eta_seconds)
            self.last_log = now

    def on_known(self, state: TrainingState) -> None:
        self.tracker.replay(state.losses[self.tracker.first_step:])
        self.loaded = not self.tracker.running
        live_view.send_progress(self.node_id, {**self.tracker.snapshot(), "loaded": self.loaded})
        self.bar.update_absolute(self.tracker.done, self.steps)

    def close(self) -> None:
        if self.tracker.running:
            self.tracker.stop()
            live_view.send_progress(self.node_id, self.tracker.snapshot())

    def scored(self, state: TrainingState) -> None:
        """The loop's validation loss (raw and EMA) and the best point of the run so far, added to its last message."""
        if state.validation:
            live_view.send_progress(self.node_id, {**self.tracker.snapshot(), "loaded": self.loaded,
                                                   "validation": validation.live_view(state.validation)})


class TrainLoop:
    DESCRIPTION = ("Trains the LoRA for a number of steps from the incoming handle's state, or loads the result from "
                   "the run store if these steps were trained before. Cancel stops within a step and keeps the steps "
                   "done: queue again to continue.")
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
        view = _LoopView(handle.step, steps, unique_id)
        try:
            after = handle.run.train(handle, steps, on_step=view.on_step, should_stop=comfy_bridge.raise_if_cancelled,
                                     on_known=view.on_known)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e} {nan_advice(e)}", e.step) from e
        except PastScheduleError as e:  # refused before its first step: nothing trained, nothing written
            shorter = f", or this loop's steps to {e.total - handle.step} at most" if e.total > handle.step else ""
            raise ValueError(f"steps: {e}. Set InitTrainer's total_steps to {e.end} or more (0: auto, the queued "
                             f"loops' steps){shorter}") from e
        finally:
            view.close()
        view.scored(after.state)
        return (after, after.step, after.state.losses[-1])


def nan_advice(e: NonFiniteLossError) -> str:
    """What a graph's user does after a NaN loss in a TrainLoop, in the nodes' terms."""
    if e.saved is not None:
        return (f"This loop's input (step {e.start}) is unchanged and saved as {e.saved}: lower learning_rate in "
                "InitTrainer, set its resume_state to latest and queue again.")
    if e.start is not None and e.start >= e.step - 1:  # the input's own weights gave the NaN
        return (f"This loop's input (step {e.start}) gave the NaN itself: lower learning_rate in InitTrainer and "
                f"resume from a state saved before step {e.start} (resume_state).")
    return (f"This loop's input (step {e.start}) is unchanged; connect a SaveCheckpoint to it to keep it, lower "
            "learning_rate in InitTrainer and queue again.")


class SaveCheckpoint:
    DESCRIPTION = ("Saves the LoRA (kohya layout, loads in stock ComfyUI) to models/loras as "
                   "<output_name>_<step>.safetensors (a name another run's file holds gets a counter, "
                   "<name>_<step>_00001_), and records it on the handle for the XY grid.")
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
                                       f"RNG, data position) to models/{comfy_bridge.STATES}, to resume from in "
                                       "InitTrainer."}),
        }}

    def save(self, handle, save_state):
        after = handle.run.save_checkpoint(handle, save_state=save_state)
        return (after, str(after.checkpoints[-1].lora_path))
