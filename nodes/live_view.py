"""The live view's server side: which run a TrainLoop's numbers belong to, and what a (re)loaded view is given.

Two workflows can hold the same node ids, so a message names its node, its prompt and the workflow that prompt was
queued from (the frontend's graph id, in the prompt's `extra_pnginfo`, noted when the prompt is POSTed): a graph
shows only its own runs. Per workflow, the latest message of each TrainLoop is kept across its prompts, because a
loop that ComfyUI serves from its cache sends nothing: its last known state is what the view shows, marked cached
(from ComfyUI's history of the prompt, once it has run; the tab that queued it is told at once, by ComfyUI).
Numbers only: no path or name leaves through the route.
"""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from . import comfy_bridge

EVENT = "flux_lora_trainer.progress"  # web/js/live_progress.js listens for it
ROUTE = "/flux_lora_trainer/progress"  # ?workflow=<graph id>; ComfyUI serves it under /api too
MAX_PROMPTS = 256  # prompt id -> workflow entries kept (a few bytes each)
MAX_WORKFLOWS = 16  # workflows whose loops' last messages are kept (a few KB each)

_lock = threading.Lock()  # written by ComfyUI's execution thread and its server's event loop
_workflow_of: OrderedDict[str, str | None] = OrderedDict()  # prompt id -> the workflow it was queued from
_loops: OrderedDict[str, dict[str, dict]] = OrderedDict()  # workflow id -> TrainLoop node id -> latest message


def _keep(table: OrderedDict, key, value, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def on_prompt(json_data: dict) -> dict:
    """ComfyUI's hook on every POSTed prompt, before it is queued: gives the prompt its id (unless the client did)
    and notes the workflow it came from."""
    prompt = json_data.get("prompt")
    if not isinstance(prompt, dict):
        return json_data  # ComfyUI answers it with its own error
    prompt_id = json_data.setdefault("prompt_id", str(uuid.uuid4()))
    workflow = ((json_data.get("extra_data") or {}).get("extra_pnginfo") or {}).get("workflow") or {}
    with _lock:
        _keep(_workflow_of, str(prompt_id), workflow.get("id") if isinstance(workflow, dict) else None, MAX_PROMPTS)
    return json_data


def send_progress(node_id: str | None, snapshot: dict) -> None:
    """A TrainLoop's progress (`ProgressTracker.snapshot()`) to every open tab, and kept for `view_state`.

    `node_id` is ComfyUI's UNIQUE_ID of the node; None (a call from outside a ComfyUI prompt) sends nothing."""
    if node_id is None:
        return
    prompt_id = comfy_bridge.running_prompt_id()
    with _lock:
        workflow = _workflow_of.get(prompt_id)
        message = {"node": str(node_id), "prompt_id": prompt_id, "workflow": workflow, **snapshot}
        if workflow is not None:
            _keep(_loops, workflow, {**_loops.get(workflow, {}), message["node"]: message}, MAX_WORKFLOWS)
    comfy_bridge.send_event(EVENT, message)


def view_state(workflow: str | None) -> dict:
    """What a view of `workflow` is given: {"prompts": the ids of the prompts queued from it, oldest first,
    "loops": the latest message of each of its TrainLoops, each with "cached": whether the last of those prompts
    that has run took the loop from ComfyUI's cache (ran nothing for it) after this message}."""
    with _lock:
        prompts = [p for p, w in _workflow_of.items() if w is not None and w == workflow]
        loops = list(_loops.get(workflow, {}).values()) if workflow is not None else []
    order = {p: i for i, p in enumerate(prompts)}
    last, cached = next(((i, nodes) for i, p in reversed(list(enumerate(prompts)))
                         if (nodes := comfy_bridge.cached_nodes(p)) is not None), (-1, set()))
    return {"prompts": prompts, "loops": [
        {**m, "cached": m["node"] in cached and order.get(m["prompt_id"], -1) < last} for m in loops]}


def register() -> None:
    """Hook the live view into ComfyUI's server (nothing outside ComfyUI)."""
    comfy_bridge.add_prompt_handler(on_prompt)
    comfy_bridge.register_route(ROUTE, lambda query: view_state(query.get("workflow")))
