"""Every example workflow loads in ComfyUI as shipped: known node types, links between matching types, widget
values that fit their widgets, and, for the tiny demo, exactly the files `install-tiny` writes."""
import json
import sys
from pathlib import Path

import pytest
import torch

from trainer_core.comfy_install import install_tiny
from pack import ROOT, load_pack

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
# core nodes the workflows use: (socket inputs, widgets, output types)
CORE_NODES = {
    "PreviewImage": ({"images": "IMAGE"}, {}, []),
    "SaveImage": ({"images": "IMAGE"}, {"filename_prefix": ("STRING", {})}, []),
    "Note": ({}, {"text": ("STRING", {})}, []),
    "LoadImage": ({}, {"image": ("STRING", {}), "upload": ("STRING", {})}, ["IMAGE", "MASK"]),
}
# the real model files the Flux-dev2pro workflow names, as a user's folders would list them
REAL_FILES = ("diffusion_models/flux-dev2pro-fp8.safetensors", "diffusion_models/flux1-dev-fp8.safetensors",
              "diffusion_models/flux1-kontext-dev.safetensors",
              "vae/ae.safetensors", "text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors")


pack = load_pack()
bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]


@pytest.fixture(scope="module")
def comfy_base(tmp_path_factory):
    """A ComfyUI folder holding what `install-tiny` writes plus empty stand-ins for the real Flux files."""
    base = tmp_path_factory.mktemp("comfyui")
    installed = install_tiny(base)
    for name in REAL_FILES:
        (base / "models" / name).touch()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bridge.BASE_DIR_ENV, str(base))
        yield base, installed


def node_spec(node_type: str) -> tuple[dict[str, str], dict[str, tuple], list[str]]:
    """(socket inputs name -> type, widgets name -> (type or combo list, options), output types)."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    declared = cls.INPUT_TYPES()
    inputs = {**declared.get("required", {}), **declared.get("optional", {})}
    sockets = {n: t for n, (t, *_) in inputs.items() if isinstance(t, str) and t not in WIDGET_TYPES}
    widgets = {n: (t, (opts or [{}])[0]) for n, (t, *opts) in inputs.items() if n not in sockets}
    return sockets, widgets, list(cls.RETURN_TYPES)


def widget_values_count(widgets: dict) -> int:
    """The frontend adds a control_after_generate value after INT widgets named seed unless told not to."""
    return sum(2 if opts.get("control_after_generate", name in ("seed", "noise_seed")) else 1
               for name, (_, opts) in widgets.items())


def check_widget(node: str, name: str, kind, opts: dict, value) -> None:
    where = f"{node}.{name} = {value!r}"
    if isinstance(kind, list):
        assert value in kind, f"{where} is not among {kind[:8]}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    else:
        assert isinstance(value, int if kind == "INT" else (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", float("-inf")) <= value <= opts.get("max", float("inf")), where


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_the_three_example_workflows():
    assert {p.name for p in WORKFLOWS} >= {"flux_dev2pro_lora_4x750.json", "flux_tiny_demo.json",
                                           "flux_kontext_lora.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_loads_as_shipped(path, comfy_base):
    workflow = load(path)
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])

    for node in nodes.values():
        assert node["type"] in pack.NODE_CLASS_MAPPINGS or node["type"] in CORE_NODES, node["type"]
        sockets, widgets, outputs = node_spec(node["type"])
        label = f"{path.name} node {node['id']} ({node['type']})"
        assert [i["name"] for i in node.get("inputs", [])] == list(sockets), label
        assert [o["type"] for o in node.get("outputs", [])] == outputs, label
        values = node.get("widgets_values", [])
        assert len(values) == widget_values_count(widgets), f"{label}: widget count"
        for (name, (kind, opts)), value in zip(widgets.items(), values):
            check_widget(label, name, kind, opts, value)

    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert out["type"] == kind == inp["type"] == node_spec(nodes[dst]["type"])[0][inp["name"]], f"link {link_id}"
        assert link_id in out["links"] and inp["link"] == link_id, f"link {link_id} is not recorded on both ends"
    for node in nodes.values():  # every required socket input is connected
        required = pack.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"] \
            if node["type"] in pack.NODE_CLASS_MAPPINGS else CORE_NODES[node["type"]][0]
        assert all(i["link"] is not None for i in node.get("inputs", []) if i["name"] in required), \
            f"{path.name} node {node['id']}"


def chain(workflow: dict, node_id: int) -> list[str]:
    """The node types along the handle input, from `node_id` back to InitTrainer."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    types = []
    while True:
        node = nodes[node_id]
        types.append(node["type"].removeprefix("FluxLoRA_"))
        handle = [i for i in node.get("inputs", []) if i["type"] == "FLUX_LORA_TRAINER"]
        if not handle:
            return types[::-1]
        node_id = links[handle[0]["link"]][1]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_trains_four_loops_and_ends_in_the_grid(path):
    workflow = load(path)
    (grid,) = [n for n in workflow["nodes"] if n["type"] == "FluxLoRA_XYLoraStrengthGrid"]
    assert chain(workflow, grid["id"]) == ["InitTrainer"] + ["TrainLoop", "SaveCheckpoint"] * 4 + ["XYLoraStrengthGrid"]
    for node in workflow["nodes"]:
        if node["type"] in ("FluxLoRA_ValidationSample", "FluxLoRA_LossPlot"):
            assert chain(workflow, node["id"])[-2] == "SaveCheckpoint"


def init_widgets(workflow: dict) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == "FluxLoRA_InitTrainer"]
    return dict(zip(pack.NODE_CLASS_MAPPINGS["FluxLoRA_InitTrainer"].INPUT_TYPES()["required"], node["widgets_values"]))


def test_dev2pro_workflow_trains_at_guidance_1_and_judges_on_flux_dev():
    workflow = load(ROOT / "example_workflows" / "flux_dev2pro_lora_4x750.json")
    widgets = init_widgets(workflow)
    assert widgets["transformer"] == "flux-dev2pro-fp8.safetensors" and widgets["guidance"] == 1.0
    assert widgets["validation_transformer"] == "flux1-dev-fp8.safetensors"
    loops = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "FluxLoRA_TrainLoop"]
    assert loops == [750] * 4
    sampler_types = ("FluxLoRA_ValidationSample", "FluxLoRA_XYLoraStrengthGrid")
    samplers = [sampler_widgets(n) for n in workflow["nodes"] if n["type"] in sampler_types]
    on_dev = [w for w in samplers if w["base"] == "validation base"]
    on_dev2pro = [w for w in samplers if w["base"] == "training base"]
    # Flux-dev with its guidance embedding; dev2pro, whose embedding does not work, with true CFG
    assert len(on_dev) == 5 and all(w["guidance"] == 3.5 and w["true_cfg_scale"] == 1.0 for w in on_dev)
    assert on_dev2pro and all(w["guidance"] == 1.0 and w["true_cfg_scale"] > 1 and w["negative_prompt"]
                              for w in on_dev2pro)


def test_kontext_workflow_trains_on_pairs_and_judges_the_edit_of_a_loaded_image(comfy_base):
    workflow = load(ROOT / "example_workflows" / "flux_kontext_lora.json")
    widgets = init_widgets(workflow)
    assert widgets["model_type"] == "kontext" and widgets["control_dir"] and widgets["guidance"] == 1.0
    assert widgets["transformer"] == "flux1-kontext-dev.safetensors"
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    samplers = [n for n in workflow["nodes"] if n["type"] in ("FluxLoRA_ValidationSample", "FluxLoRA_XYLoraStrengthGrid")]
    assert len(samplers) == 5
    for node in samplers:  # each renders the edit of the stock LoadImage's picture, on Kontext at its guidance
        (control,) = [i for i in node["inputs"] if i["name"] == "control_image"]
        assert nodes[links[control["link"]][1]]["type"] == "LoadImage"
        assert sampler_widgets(node)["guidance"] == 2.5 and sampler_widgets(node)["base"] == "training base"
    # with the model files as empty stand-ins, InitTrainer names the transformer widget and its file
    base, _ = comfy_base
    for folder in ("target", "control"):
        (base / "input" / "my_kontext_dataset" / folder).mkdir(parents=True, exist_ok=True)
    init_trainer = sys.modules[f"{pack.__name__}.nodes.init_trainer"]
    with pytest.raises(ValueError, match=r"flux1-kontext-dev.safetensors is truncated or corrupt .*: download it again"):
        init_trainer.build_config(**widgets)


def sampler_widgets(node: dict) -> dict:
    return dict(zip(node_spec(node["type"])[1], node["widgets_values"]))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_size_the_schedule_automatically(path):
    assert init_widgets(load(path))["total_steps"] == 0


def test_tiny_workflow_settings_pass_init_trainer_checks_on_an_installed_comfyui(comfy_base):
    """The tiny workflow names exactly what install-tiny writes, and its settings build a valid config."""
    base, installed = comfy_base
    widgets = init_widgets(load(ROOT / "example_workflows" / "flux_tiny_demo.json"))
    init_trainer = sys.modules[f"{pack.__name__}.nodes.init_trainer"]
    workflow = load(ROOT / "example_workflows" / "flux_tiny_demo.json")
    with pytest.raises(ValueError, match=r"^total_steps: 0 \(auto\) needs"):
        init_trainer.build_config(**widgets)  # no queued graph to count the loops of
    config, resume = init_trainer.build_config(**widgets, prompt=api_prompt(workflow, {}), unique_id="2")
    assert config.total_steps == 4 * 50
    assert Path(config.transformer_path) == installed.transformer
    assert Path(config.validation_transformer_path) == installed.validation_transformer
    assert Path(config.vae_path) == installed.vae
    assert (Path(config.clip_path), Path(config.t5_path)) == (installed.clip_l, installed.t5)
    assert Path(config.tokenizer_dir) == installed.clip_l.parent / "tokenizers"
    assert Path(config.dataset_dir) == installed.dataset
    assert resume is None and config.device == "auto"


def api_prompt(workflow: dict, changes: dict[str, dict]) -> dict[str, dict]:
    """The API-format prompt ComfyUI would queue for the workflow's nodes of this pack, with `changes` applied."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in pack.NODE_CLASS_MAPPINGS:
            inputs = dict(zip(node_spec(node["type"])[1], node["widgets_values"])) | changes.get(node["type"], {})
            inputs |= {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]] for i in node["inputs"]
                       if i["link"] is not None}
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def execute(workflow: dict, changes: dict[str, dict]) -> dict[int, tuple]:
    """Run the workflow's nodes of this pack in dependency order as ComfyUI would, under inference mode, with
    `changes` {node type: {widget: value}} applied and the hidden PROMPT / UNIQUE_ID inputs given: -> {node id:
    outputs}."""
    prompt = api_prompt(workflow, changes)
    outputs = {}

    def run(node_id: int) -> tuple:
        if node_id not in outputs:
            cls = pack.NODE_CLASS_MAPPINGS[prompt[str(node_id)]["class_type"]]
            kwargs = {}
            for name, value in prompt[str(node_id)]["inputs"].items():
                kwargs[name] = run(int(value[0]))[value[1]] if isinstance(value, list) else value
            hidden = {"PROMPT": prompt, "UNIQUE_ID": str(node_id)}
            kwargs |= {name: hidden[kind] for name, kind in cls.INPUT_TYPES().get("hidden", {}).items()}
            with torch.inference_mode():
                result = getattr(cls(), cls.FUNCTION)(**kwargs)
            outputs[node_id] = result["result"] if isinstance(result, dict) else result
        return outputs[node_id]

    for node_id in prompt:
        run(int(node_id))
    return outputs


def test_tiny_workflow_runs_end_to_end_through_the_nodes(comfy_base):
    """The shipped tiny graph, shrunk (2 steps a loop, tiny images) to keep CI fast."""
    base, _ = comfy_base
    workflow = load(ROOT / "example_workflows" / "flux_tiny_demo.json")
    small = dict(steps=2, width=64, height=64)
    outputs = execute(workflow, {"FluxLoRA_InitTrainer": dict(resolutions="64", max_sequence_length=8),
                                 "FluxLoRA_TrainLoop": dict(steps=2), "FluxLoRA_ValidationSample": small,
                                 "FluxLoRA_XYLoraStrengthGrid": dict(small, strengths="0,1")})
    loras = sorted(p.name for p in (base / "models" / "loras").glob("flux_tiny_demo_*.safetensors"))
    assert loras == [f"flux_tiny_demo_{s:06d}.safetensors" for s in (2, 4, 6, 8)]
    states = sorted(p.name for p in (base / "models" / "flux_lora_states").glob("flux_tiny_demo_*.safetensors"))
    assert states == [f"flux_tiny_demo_{s:06d}.state.safetensors" for s in (2, 4, 6, 8)]  # not among the LoRAs
    by_type = {}
    for node in workflow["nodes"]:
        if node["id"] in outputs:
            by_type.setdefault(node["type"], []).append(outputs[node["id"]])
    assert [r[1] for r in by_type["FluxLoRA_TrainLoop"]] == [2, 4, 6, 8]
    (init,) = by_type["FluxLoRA_InitTrainer"]
    assert init[0].run.trainer.config.total_steps == 8  # auto: the loops as queued, shrunk to 2 steps each
    assert all(r[0].shape == (2, 64, 64, 3) for r in by_type["FluxLoRA_ValidationSample"])
    (grid,) = by_type["FluxLoRA_XYLoraStrengthGrid"]
    assert grid[0].shape[0] == 1 and grid[0].shape[1] > 4 * 64 and grid[0].shape[2] > 2 * 64  # 4 rows x 2 columns
