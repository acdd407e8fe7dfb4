"""The ComfyUI nodes: thin adapters over `trainer_core` (which never imports ComfyUI).

Node ids carry the pack's prefix so they never collide with core's or other packs' training nodes.
"""
from . import comfy_bridge, live_view, model_sharing
from .dataset import AutoCaption, DatasetReport
from .images import LossPlot, ValidationSample, XYLoraStrengthGrid
from .init_trainer import InitTrainer
from .queued_graph import plan_on_prompt
from .training import SaveCheckpoint, TrainLoop

_NODES = {
    "InitTrainer": (InitTrainer, "Init Trainer"),
    "TrainLoop": (TrainLoop, "Train Loop"),
    "SaveCheckpoint": (SaveCheckpoint, "Save Checkpoint"),
    "LossPlot": (LossPlot, "Loss Plot"),
    "ValidationSample": (ValidationSample, "Validation Sample"),
    "XYLoraStrengthGrid": (XYLoraStrengthGrid, "XY LoRA Strength Grid"),
    "DatasetReport": (DatasetReport, "Dataset Report"),
    "AutoCaption": (AutoCaption, "Auto Caption (Florence-2)"),
}
NODE_CLASS_MAPPINGS = {f"FluxLoRA_{name}": model_sharing.shares_memory(cls) for name, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {f"FluxLoRA_{name}": f"{title} (Flux LoRA)" for name, (_, title) in _NODES.items()}

# nothing outside ComfyUI: the live view's prompts and catch-up route, and the queued loops' plan (total_steps auto)
live_view.register()
comfy_bridge.add_prompt_handler(plan_on_prompt)
model_sharing.install()  # a prompt without the pack's nodes frees the trainer's models; nothing outside ComfyUI
