"""What the queued workflow holds downstream of an InitTrainer, read from ComfyUI's API-format prompt.

InitTrainer gets the whole queued graph through the hidden `PROMPT` input (`{node_id: {"class_type": ...,
"inputs": {name: value or [source_id, output_index]}}}`), so it can plan for what the graph will ask of the run
before any TrainLoop runs: how many steps the loops add up to (the LR schedule's length) and which prompts the
samples and the XY grid will render (encoded while the text encoders are loaded anyway). The memory shared with
ComfyUI asks which prompts hold the pack's nodes at all, and which of them a running prompt has still to run.

Only plain widget values count: a value fed by another node's output is unknown until that node runs.
"""
from __future__ import annotations

from collections.abc import Mapping

PREFIX = "FluxLoRA_"  # node ids of this pack (nodes/__init__.py)
TRAIN_LOOP = PREFIX + "TrainLoop"
INIT_TRAINER = PREFIX + "InitTrainer"
PLAN_INPUT = "flux_lora_planned_steps"  # see `plan_on_prompt`
PROMPT_INPUTS = {PREFIX + "ValidationSample": "prompts", PREFIX + "XYLoraStrengthGrid": "prompt"}


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _handle_sources(node: Mapping) -> list[str]:
    """Ids of the nodes whose outputs feed `node` (any input fed by a link)."""
    return [str(v[0]) for v in node.get("inputs", {}).values() if _is_link(v)]


def _downstream(prompt: Mapping, start: str) -> list[str]:
    """Ids of the nodes fed, directly or not, by node `start`, in the prompt's order."""
    children: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        for source in _handle_sources(node):
            children.setdefault(source, []).append(str(node_id))
    seen, stack = set(), [str(start)]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return [str(n) for n in prompt if str(n) in seen]


def loop_chains(prompt: Mapping | None, init_id: str | None) -> dict[str, tuple[int, ...]] | None:
    """Each TrainLoop after InitTrainer `init_id` -> the steps of the loops from the run's start to it, itself last
    (the run store's chain); None when unknown (no graph, or a loop whose steps come from another node)."""
    if not prompt or init_id is None:
        return None
    loops = [n for n in _downstream(prompt, init_id) if prompt[n].get("class_type") == TRAIN_LOOP]
    chains: dict[str, tuple[int, ...] | None] = {}

    def chain(node_id: str) -> tuple[int, ...] | None:
        if node_id not in chains:
            steps = prompt[node_id]["inputs"].get("steps")
            before = [chain(s) for s in _upstream_loops(prompt, node_id)]
            known = isinstance(steps, int) and not isinstance(steps, bool) and None not in before
            chains[node_id] = max(before, key=sum, default=()) + (steps,) if known else None
        return chains[node_id]

    found = {n: chain(n) for n in loops}
    return None if any(c is None for c in found.values()) else found


def planned_train_steps(prompt: Mapping | None, init_id: str | None) -> int | None:
    """The most steps any chain of TrainLoops after InitTrainer `init_id` adds up to; None when unknown (no graph,
    no loop, or a loop whose steps come from another node)."""
    chains = loop_chains(prompt, init_id)
    return max(map(sum, chains.values())) if chains else None


def _upstream_loops(prompt: Mapping, node_id: str) -> list[str]:
    """The nearest TrainLoops on the paths that feed `node_id`."""
    found, stack, seen = [], _handle_sources(prompt[node_id]), set()
    while stack:
        source = stack.pop()
        if source in seen or source not in prompt:
            continue
        seen.add(source)
        if prompt[source].get("class_type") == TRAIN_LOOP:
            found.append(source)
        else:
            stack.extend(_handle_sources(prompt[source]))
    return found


def validation_prompts(prompt: Mapping | None, init_id: str | None) -> list[str]:
    """The prompts the ValidationSample (one per line) and XY grid nodes after InitTrainer `init_id` will render,
    each once, in graph order."""
    if not prompt or init_id is None:
        return []
    found: dict[str, None] = {}
    for node_id in _downstream(prompt, init_id):
        node = prompt[node_id]
        name = PROMPT_INPUTS.get(node.get("class_type"))
        text = node.get("inputs", {}).get(name) if name else None
        if isinstance(text, str):
            lines = text.splitlines() if name == "prompts" else [text]
            found.update(dict.fromkeys(p.strip() for p in lines if p.strip()))
    return list(found)


def _is_pack_node(node) -> bool:
    return isinstance(node, Mapping) and str(node.get("class_type", "")).startswith(PREFIX)


def holds_pack_nodes(prompt: Mapping) -> bool:
    return any(_is_pack_node(node) for node in prompt.values())


def _upstream(prompt: Mapping, ids) -> set[str]:
    """`ids` and every node that feeds them, directly or not."""
    found, stack = set(), [str(i) for i in ids]
    while stack:
        node_id = stack.pop()
        if node_id not in found and node_id in prompt:
            found.add(node_id)
            stack.extend(_handle_sources(prompt[node_id]))
    return found


def pack_nodes_to_run(prompt: Mapping, outputs, done) -> list[str]:
    """The pack's nodes ComfyUI will still run in a prompt after the nodes `done` ran: those not in `done` that the
    output nodes it executes (`outputs`) need and that a node in `done` feeds, directly or not. (ComfyUI ran the
    nodes whose inputs changed and all nodes after them; a node that nothing which ran feeds came from its cache.)"""
    needed = _upstream(prompt, outputs)
    after = {n for d in done for n in _downstream(prompt, d)}
    return [n for n in prompt if n in needed and n in after and n not in done and _is_pack_node(prompt[n])]


def plan_on_prompt(json_data: dict) -> dict:
    """ComfyUI's hook on every POSTed prompt: each InitTrainer with total_steps 0 (auto) gets the steps its queued
    loops add up to as an extra input, `PLAN_INPUT`. ComfyUI keys a node's cached output on every input the prompt
    gives it (declared or not, and only declared ones reach the node), so lengthening a loop runs InitTrainer again:
    its schedule follows the queued graph instead of ending before the loop does."""
    prompt = json_data.get("prompt")
    if isinstance(prompt, dict):
        for node_id, node in prompt.items():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            if isinstance(inputs, dict) and node.get("class_type") == INIT_TRAINER and inputs.get("total_steps") == 0:
                inputs[PLAN_INPUT] = planned_train_steps(prompt, str(node_id))
    return json_data
