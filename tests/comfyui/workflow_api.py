"""UI-format workflow (what `example_workflows/*.json` and the browser's Save hold) -> API-format prompt (what
`/prompt` takes), done as ComfyUI's frontend does it in `graphToPrompt`, from the server's `/object_info`.

A node's `widgets_values` lists its widget inputs in declaration order, plus one "control after generate" value
(fixed / randomize ...) after each widget that has that control and one upload button value after a combo that has
an upload button (LoadImage's image); a widget input fed by a link keeps its slot in
`widgets_values` but takes the link. Links become `[source node id as str, output slot]`.
"""
from __future__ import annotations

import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec: list) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def _has_control(name: str, spec: list) -> bool:
    """The frontend adds a control widget to INT inputs named seed / noise_seed (unless told not to) and to any
    INT or COMBO whose options set control_after_generate."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if kind == "INT":
        return bool(options.get("control_after_generate", name in ("seed", "noise_seed")))
    return (isinstance(kind, list) or kind == "COMBO") and bool(options.get("control_after_generate", False))


def _has_upload(spec: list) -> bool:
    """The frontend adds an upload button widget after a combo that asks for one (LoadImage's image)."""
    options = spec[1] if len(spec) > 1 else {}
    return any(options.get(k) for k in ("image_upload", "video_upload", "audio_upload"))


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node class's widget inputs in declaration order, from its `/object_info` entry."""
    order = info.get("input_order", {})
    return [
        (name, info["input"][section][name])
        for section in ("required", "optional")
        for name in order.get(section, [])
        if _is_widget(info["input"][section][name])
    ]


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt of a UI-format workflow: {node id: {"class_type", "inputs", "_meta"}}.

    Frontend-only nodes (Note, ...) that `object_info` does not know are left out, as the frontend does; muted or
    bypassed nodes are not supported (the shipped workflows have none) and raise.
    """
    links = {link[0]: link for link in workflow["links"]}  # [id, from node, from slot, to node, to slot, type]
    prompt = {}
    for node in workflow["nodes"]:
        label = f"node {node['id']} ({node['type']})"
        info = object_info.get(node["type"])
        if info is None:
            if any(o.get("links") for o in node.get("outputs", [])) or any(
                    i.get("link") is not None for i in node.get("inputs", [])):
                raise ValueError(f"{label}: the server has no such node class, yet it is linked")
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"{label}: mode {node['mode']} (muted or bypassed) is not supported")

        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec in widget_inputs(info):
            if not values:
                raise ValueError(f"{label}: widgets_values has no value for {name}")
            inputs[name] = values.pop(0)
            if _has_control(name, spec):
                values.pop(0)  # "fixed" / "randomize": for the frontend only
            if _has_upload(spec):
                values.pop(0)  # the upload button's own value ("image"): for the frontend only
        if values:
            raise ValueError(f"{label}: {len(values)} widgets_values left over after the widgets {list(inputs)}")

        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def with_inputs(prompt: dict[str, dict], changes: dict[int | str, dict]) -> dict[str, dict]:
    """A copy of `prompt` with {node id: {input: value}} set; an unknown node or input raises KeyError."""
    changed = copy.deepcopy(prompt)
    for node_id, values in changes.items():
        inputs = changed[str(node_id)]["inputs"]
        for name, value in values.items():
            if name not in inputs:
                raise KeyError(f"node {node_id} has no input {name!r}; it has {sorted(inputs)}")
            inputs[name] = value
    return changed
