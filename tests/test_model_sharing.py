"""The trainer's models make way for ComfyUI's, checked without ComfyUI: fake `comfy.model_management`,
`comfy_execution.utils` and `server` modules stand in for it (tests/comfyui/test_memory_in_comfyui.py does the same
against the real one).

The fake model management keeps ComfyUI's list of loaded models and frees memory as its `free_memory` does, through
the methods of the entries in that list; the fake server keeps a queue of (number, prompt id, graph, extra data,
outputs) items and the on-prompt handlers of the pack.
"""
from __future__ import annotations

import importlib
import logging
import sys
import types

import pytest
import torch
from test_nodes import TINY_WIDGETS, assert_lora_equal, base_dir, nodes, pack, straight  # noqa: F401 (fixtures)
from pack import ROOT
from test_queued_graph import chain

from trainer_core import run_handle

model_sharing = importlib.import_module(f"{pack.__name__}.nodes.model_sharing")
queued_graph = importlib.import_module(f"{pack.__name__}.nodes.queued_graph")


class FakeModelManagement(types.ModuleType):
    """comfy.model_management as the pack uses it."""

    def __init__(self):
        super().__init__("comfy.model_management")
        self.current_loaded_models = []
        self.freed_for: list[float] = []

    @staticmethod
    def get_torch_device():
        return torch.device("cpu")

    def free_memory(self, memory_required, device, keep_loaded=()):
        """Unload models of `device` until `memory_required` is free (here: never, so all of them), as ComfyUI's."""
        self.freed_for.append(memory_required)
        for entry in list(self.current_loaded_models):
            if entry.device == device and entry not in keep_loaded and not entry.is_dead():
                if entry.model_unload(memory_required) and entry in self.current_loaded_models:
                    self.current_loaded_models.remove(entry)

    def unload_all_models(self):
        self.free_memory(1e30, self.get_torch_device())

    def soft_empty_cache(self):
        pass

    def throw_exception_if_processing_interrupted(self):
        pass


class FakeServer:
    """PromptServer.instance: events sent, on-prompt handlers, and the queue (`running`, `waiting` items)."""

    def __init__(self):
        self.events, self.handlers, self.running, self.waiting = [], [], [], []
        self.last_prompt_id = None
        self.prompt_queue = self

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def add_on_prompt_handler(self, handler):
        self.handlers.append(handler)

    def get_current_queue_volatile(self):
        return list(self.running), list(self.waiting)

    def post_prompt(self, graph: dict) -> None:
        """What POST /prompt does first: every handler sees the request's JSON."""
        for handler in self.handlers:
            handler({"prompt": graph})


@pytest.fixture
def comfy(monkeypatch):
    """The fakes in sys.modules, where the bridge looks ComfyUI up; `context` is the node ComfyUI runs."""
    mm, server = FakeModelManagement(), FakeServer()
    state = types.SimpleNamespace(mm=mm, server=server, context=None)
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: state.context
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=server)))
    assert model_sharing.install()
    yield state
    run_handle.release_models()


def init(**changes):
    return nodes["InitTrainer"].init(**{**TINY_WIDGETS, **changes})[0]


def loop(handle, steps):
    return nodes["TrainLoop"].train(handle, steps)[0]


def memory_texts(server) -> list[str]:
    return [data["text"] for event, data in server.events if event == model_sharing.MEMORY_EVENT]


def test_comfyui_freeing_memory_releases_the_trainers_models_and_the_next_loop_reloads_them_exactly(
        comfy, base_dir, straight, caplog):
    h3 = loop(init(), 3)
    entries = [m for m in comfy.mm.current_loaded_models if isinstance(m, model_sharing.TrainerModels)]
    assert len(entries) == 1 and entries[0].model_memory() == run_handle.loaded_bytes() > 0
    held = run_handle.loaded_bytes()

    with caplog.at_level(logging.INFO):
        comfy.mm.unload_all_models()  # "Unload models", POST /free
    assert run_handle.loaded_bytes() == 0 and not h3.run.loaded and not comfy.mm.current_loaded_models
    said = f"trainer models released ({held / 1e9:.2f} GB): ComfyUI needed the memory"
    assert memory_texts(comfy.server) == [said] and said in caplog.text

    h5 = loop(h3, 2)  # the handle is still valid: the models come back and training goes on where it was
    assert h5.run.loaded and len(comfy.mm.current_loaded_models) == 1
    assert memory_texts(comfy.server)[-1].startswith("trainer models reloaded (")
    assert_lora_equal(h5.state.lora, straight[5])


def test_a_prompt_without_the_packs_nodes_frees_them_unless_one_with_them_runs_or_waits(comfy, base_dir):
    h1 = loop(init(), 1)
    other = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "PreviewImage",
                                                                     "inputs": {"images": ["1", 0]}}}
    comfy.server.running = [(0, "p-train", chain(1, 1), {}, ["20"])]
    comfy.server.post_prompt(other)
    assert h1.run.loaded  # the training prompt still runs: its next loop needs them
    comfy.server.running, comfy.server.waiting = [], [(1, "p-train", chain(1), {}, ["20"])]
    comfy.server.post_prompt(other)
    assert h1.run.loaded  # a training prompt comes first
    comfy.server.waiting = []
    comfy.server.post_prompt(chain(1))
    assert h1.run.loaded  # a prompt with the pack's nodes
    comfy.server.post_prompt(other)
    assert not h1.run.loaded
    assert memory_texts(comfy.server)[-1].endswith(f"): {model_sharing.OTHER_PROMPT}")


def test_the_last_pack_node_a_prompt_runs_releases_them_and_a_failing_one_keeps_them(comfy, base_dir):
    graph = chain(1, 1)  # 1 -> loop 10 -> save 20 -> sample 30, save 20 -> loop 11 -> save 21 -> sample 31, grid 40
    comfy.server.running = [(0, "p1", graph, {}, ["20", "21", "30", "31", "40"])]

    def run(node_id: str, call):
        comfy.context = types.SimpleNamespace(prompt_id="p1", node_id=node_id)
        try:
            return call()
        finally:
            comfy.context = None

    h = run("1", lambda: init())
    h10 = run("10", lambda: loop(h, 1))
    save = nodes["SaveCheckpoint"]
    h20 = run("20", lambda: save.save(h10, False))[0]
    h11 = run("11", lambda: loop(h20, 1))
    h21 = run("21", lambda: save.save(h11, False))[0]
    assert h21.run.loaded  # samples and the grid are still to run
    sampling = dict(seed=0, steps=1, guidance=3.5, width=64, height=64, base="training base")
    run("30", lambda: nodes["ValidationSample"].sample(h20, prompts="fltglyph", strength=1.0, **sampling))
    run("31", lambda: nodes["ValidationSample"].sample(h21, prompts="fltglyph", strength=1.0, **sampling))
    assert h21.run.loaded
    grid = nodes["XYLoraStrengthGrid"].grid
    with pytest.raises(ValueError, match="no checkpoint was saved"):  # a failing node: the prompt stops there
        run("40", lambda: grid(h, strengths="0,1", prompt="fltglyph", **sampling))
    assert h21.run.loaded  # kept for the queue again that usually follows a fix
    run("40", lambda: grid(h21, strengths="0,1", prompt="fltglyph", **sampling))
    assert not h21.run.loaded and not comfy.mm.current_loaded_models
    assert memory_texts(comfy.server)[-1].endswith(f"): {model_sharing.PROMPT_DONE}")


def test_pack_nodes_still_to_run_are_those_the_outputs_need_after_the_nodes_that_ran():
    graph = chain(1, 1)
    outputs = ["20", "21", "30", "31", "40"]
    assert queued_graph.pack_nodes_to_run(graph, outputs, {"1"}) == ["10", "20", "30", "11", "21", "31", "40"]
    # loop 2 changed: ComfyUI ran it first and serves init, loop 1 and what follows loop 1 from its cache
    assert queued_graph.pack_nodes_to_run(graph, outputs, {"11"}) == ["21", "31", "40"]
    assert queued_graph.pack_nodes_to_run(graph, outputs, {"11", "21", "31", "40"}) == []
    # "queue selected output nodes": only what sample 30 needs runs
    assert queued_graph.pack_nodes_to_run(graph, ["30"], {"1", "10", "20"}) == ["30"]
    assert queued_graph.pack_nodes_to_run(graph, ["30"], {"1", "10", "20", "30"}) == []
    assert queued_graph.holds_pack_nodes(graph) and not queued_graph.holds_pack_nodes(
        {"1": {"class_type": "EmptyImage", "inputs": {}}})


def test_the_live_view_shows_the_memory_messages():
    text = (ROOT / pack.WEB_DIRECTORY / "js" / "memory_notice.js").read_text(encoding="utf-8")
    assert f'"{model_sharing.MEMORY_EVENT}"' in text and "detail.text" in text
