"""Reading the queued workflow (ComfyUI's API-format prompt) from InitTrainer: planned steps and prompts."""
from __future__ import annotations

import importlib

from pack import load_pack

queued_graph = importlib.import_module(f"{load_pack().__name__}.nodes.queued_graph")
planned_train_steps, validation_prompts = queued_graph.planned_train_steps, queued_graph.validation_prompts


def node(class_type: str, **inputs) -> dict:
    return {"class_type": f"FluxLoRA_{class_type}", "inputs": inputs}


def chain(*loops: int) -> dict:
    """InitTrainer "1" -> TrainLoop -> SaveCheckpoint -> TrainLoop ..., a ValidationSample after each save."""
    prompt = {"1": node("InitTrainer", seed=1)}
    last = "1"
    for i, steps in enumerate(loops):
        loop, save, sample = f"{10 + i}", f"{20 + i}", f"{30 + i}"
        prompt[loop] = node("TrainLoop", handle=[last, 0], steps=steps)
        prompt[save] = node("SaveCheckpoint", handle=[loop, 0], save_state=True)
        prompt[sample] = node("ValidationSample", handle=[save, 0], prompts=f"ohwx at loop {i}\n\n  a cat  ")
        last = save
    prompt["40"] = node("XYLoraStrengthGrid", handle=[last, 0], prompt=" ohwx, a grid ", strengths="0,1")
    return prompt


def test_planned_steps_add_up_along_the_chain():
    assert planned_train_steps(chain(750, 750, 750, 750), "1") == 3000
    assert planned_train_steps(chain(25, 30), "1") == 55


def test_branches_take_the_longest_chain_and_other_inits_do_not_count():
    prompt = chain(100, 200)
    prompt["50"] = node("TrainLoop", handle=["10", 0], steps=500)  # a second branch after loop 1
    prompt["2"] = node("InitTrainer", seed=2)
    prompt["60"] = node("TrainLoop", handle=["2", 0], steps=10_000)  # another run in the same graph
    assert planned_train_steps(prompt, "1") == 600
    assert planned_train_steps(prompt, "2") == 10_000


def test_unknown_when_a_loop_takes_its_steps_from_another_node_or_there_is_no_graph():
    prompt = chain(100, 200)
    prompt["11"]["inputs"]["steps"] = ["99", 0]
    assert planned_train_steps(prompt, "1") is None
    assert planned_train_steps({"1": node("InitTrainer")}, "1") is None
    assert planned_train_steps(None, "1") is None
    assert planned_train_steps(chain(5), None) is None


def test_validation_prompts_are_each_prompt_once_in_graph_order():
    assert validation_prompts(chain(10, 10), "1") == ["ohwx at loop 0", "a cat", "ohwx at loop 1", "ohwx, a grid"]
    prompt = chain(10)
    prompt["30"]["inputs"]["prompts"] = ["77", 0]  # fed by a text node: not known before it runs
    assert validation_prompts(prompt, "1") == ["ohwx, a grid"]
    assert validation_prompts(None, "1") == []


def test_loop_chains_are_each_loops_run_store_key():
    prompt = chain(100, 200)
    prompt["50"] = node("TrainLoop", handle=["10", 0], steps=500)
    assert queued_graph.loop_chains(prompt, "1") == {"10": (100,), "11": (100, 200), "50": (100, 500)}
    prompt["11"]["inputs"]["steps"] = ["99", 0]
    assert queued_graph.loop_chains(prompt, "1") is None


def test_a_queued_prompt_tells_an_auto_scheduled_init_trainer_its_loops_plan():
    """ComfyUI keys InitTrainer's cached output on this extra input: a lengthened loop runs InitTrainer again."""
    prompt = chain(50, 50)
    prompt["1"]["inputs"]["total_steps"] = 0
    prompt["2"] = node("InitTrainer", total_steps=300)  # a fixed schedule: its cache is left alone
    prompt["60"] = node("TrainLoop", handle=["2", 0], steps=10)
    body = queued_graph.plan_on_prompt({"prompt": prompt, "client_id": "x"})
    assert body["prompt"]["1"]["inputs"][queued_graph.PLAN_INPUT] == 100
    assert queued_graph.PLAN_INPUT not in body["prompt"]["2"]["inputs"]
    prompt["11"]["inputs"]["steps"] = 80
    assert queued_graph.plan_on_prompt({"prompt": prompt})["prompt"]["1"]["inputs"][queued_graph.PLAN_INPUT] == 130
    assert queued_graph.plan_on_prompt({"prompt": "not a graph"}) == {"prompt": "not a graph"}
