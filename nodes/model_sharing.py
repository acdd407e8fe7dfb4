"""The trainer's models make way when ComfyUI needs the memory, and a finished training graph leaves none behind.

The models of the active run (`trainer_core.run_handle`) leave the device and the RAM, while its handles and the run
store keep every state, so the next loop or sample that needs them loads them again, as after a restart:
- when ComfyUI's model management frees memory for its own models (its `free_memory`, before it loads one on a card
  without room; "Unload models" / POST /free and an out-of-memory error through `unload_all_models`): the models are
  registered there as one more loaded model it may unload (`TrainerModels`);
- when a prompt holding none of the pack's nodes is queued while no prompt holding them is running or waiting
  (`prompt_queued`): it starts with the memory free;
- when the last of the pack's nodes that a prompt runs has run (`after_node`), unless a node of the same prompt
  still to run may need them. A node that fails or is cancelled keeps them for the queue again that usually follows.
The other way round, InitTrainer unloads ComfyUI's models before the trainer's load (`comfy_bridge.free_comfy_models`).

Each release and reload is logged and shown in the live view (`MEMORY_EVENT`, web/js/memory_notice.js).
"""
from __future__ import annotations

import functools
import logging

from trainer_core import run_handle

from . import comfy_bridge
from .queued_graph import holds_pack_nodes, pack_nodes_to_run

log = logging.getLogger(__name__)

MEMORY_EVENT = "flux_lora_trainer.memory"  # web/js/memory_notice.js shows its text
COMFYUI_NEEDS_IT = "ComfyUI needed the memory"
PROMPT_DONE = "the prompt's last trainer node ran"
OTHER_PROMPT = "a prompt without trainer nodes was queued"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _say(text: str, **numbers) -> None:
    log.info("%s", text)
    comfy_bridge.send_event(MEMORY_EVENT, {"text": text, **numbers})


def release(reason: str) -> int:
    """Release the trainer's models, saying why; -> the bytes they held (0: none were loaded, nothing said)."""
    freed = run_handle.release_models()
    if freed:
        _say(f"trainer models released ({_gb(freed)}): {reason}", released_bytes=freed)
    return freed


class TrainerModels:
    """The trainer's models as ComfyUI's model management sees one of its loaded models (`LoadedModel`'s methods that
    `free_memory` and `unload_all_models` call): unloading releases them whole, whatever amount was asked for."""

    # ComfyUI loads the "currently used" models again after some steps (a ControlNet's VAE encode) through
    # `load_models_gpu`, which takes its own model patchers only
    currently_used = False

    def __init__(self, device):
        self.device = device

    @property
    def model(self) -> "TrainerModels":
        """What ComfyUI names in its log (`model.model`'s class) and compares by identity with its own models."""
        return self

    def model_memory(self) -> int:
        return run_handle.loaded_bytes()

    model_loaded_memory = model_memory

    def model_offloaded_memory(self) -> int:
        return 0  # all of it is where the trainer put it: nothing to unload by parts

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        release(COMFYUI_NEEDS_IT)
        return True  # ComfyUI then takes this entry out of its list

    def is_dead(self) -> bool:
        return False  # never collected behind ComfyUI's back: released only through model_unload or this pack

    def real_model(self):
        """None once the models are gone, so ComfyUI's clean-up (on any thread) drops this entry."""
        return self if run_handle.models_loaded() else None


def trainer_loaded(size: int, seconds: float, again: bool) -> None:
    """`TrainingRun`'s `on_loaded`: offer the models to ComfyUI's model management, and say a reload's cost."""
    comfy_bridge.register_loaded_model(TrainerModels)
    if again:
        _say(f"trainer models reloaded ({_gb(size)}) in {seconds:.1f} s", reload_seconds=seconds)
    else:
        log.info("trainer models loaded (%s) in %.1f s", _gb(size), seconds)


def prompt_queued(graph) -> None:
    """A prompt posted to ComfyUI (its server's thread): one without the pack's nodes, with none holding them
    running or waiting, will find the trainer's models gone. Nothing then runs the trainer: no prompt can."""
    if isinstance(graph, dict) and not holds_pack_nodes(graph) and not any(
            holds_pack_nodes(g) for g in comfy_bridge.queued_graphs()):
        release(OTHER_PROMPT)


_ran: dict[str, set[str]] = {}  # prompt id -> the pack's nodes that ran in it (the running prompt's only)


def after_node(prompt_id: str, node_id: str) -> None:
    """The pack's node `node_id` of the running prompt `prompt_id` ran: release the models if it was the last
    of the pack's nodes that prompt runs."""
    if prompt_id not in _ran:
        _ran.clear()
        _ran[prompt_id] = set()
    done = _ran[prompt_id]
    done.add(node_id)
    running = comfy_bridge.running_graph(prompt_id)
    if running is not None and not pack_nodes_to_run(running[0], running[1], done):
        release(PROMPT_DONE)
        comfy_bridge.unregister_loaded_models(TrainerModels)


def shares_memory(node_class: type) -> type:
    """`node_class` (one of the pack's nodes) with `after_node` called when its function returns inside a prompt."""
    function = getattr(node_class, node_class.FUNCTION)

    @functools.wraps(function)
    def run(*args, **kwargs):
        result = function(*args, **kwargs)
        executing = comfy_bridge.executing_node()
        if executing is not None:
            after_node(*executing)
        return result

    setattr(node_class, node_class.FUNCTION, run)
    return node_class


def install() -> bool:
    """Listen for the prompts posted to ComfyUI; False outside ComfyUI."""
    return comfy_bridge.on_prompt_queued(prompt_queued)
