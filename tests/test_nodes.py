"""The nodes called directly (no ComfyUI) on the tiny model, in the orders and repetitions ComfyUI can produce.

ComfyUI caches outputs and runs siblings in any order, so a handle must be a value: whatever ran last, a node
given the handle of loop k sees loop k's state. Every result is compared with a plain `Trainer` trained straight.
"""
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer_core import lora, models, plots
from trainer_core.demo import write_demo_dataset
from trainer_core.presets import PRESETS
from trainer_core.tiny import write_gguf_transformer
from trainer_core.run_handle import TrainingInterrupted
from trainer_core.trainer import Trainer
from pack import ROOT, load_pack



pack = load_pack()
nodes = {name.removeprefix("FluxLoRA_"): cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
init_trainer = sys.modules[f"{pack.__name__}.nodes.init_trainer"]

TINY_WIDGETS = dict(
    transformer="flux-tiny-bf16.safetensors", validation_transformer="flux-tiny-fp8.safetensors",
    vae="ae.safetensors", clip_l="tiny/clip_l.safetensors", t5="tiny/t5xxl_tiny.safetensors",
    dataset_dir="data", trigger_word="fltglyph", resolutions="64", repeats=1, rank=4, alpha=4.0, blocks="all",
    optimizer="adamw", learning_rate=1e-3, lr_schedule="constant", total_steps=20, timestep_sampling="shift",
    guidance=1.0, seed=3, max_sequence_length=8, mixed_precision="fp32", memory_preset="custom", fp8_base=False,
    gradient_checkpointing=False, blocks_to_swap=0, output_name="nodes_test", resume_state="none",
)
SAMPLE = dict(seed=0, steps=2, guidance=3.5, width=64, height=64, base="training base")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_flux):
    """A ComfyUI-like folder with the tiny stack and a 2-image dataset, found by the bridge through its env var."""
    base = tmp_path_factory.mktemp("comfy_base")
    models_dir = base / "models"
    folders = {tiny_flux.transformer_bf16: "diffusion_models", tiny_flux.transformer_fp8: "diffusion_models",
               tiny_flux.vae: "vae", tiny_flux.clip_l: "text_encoders/tiny", tiny_flux.t5: "text_encoders/tiny"}
    for source, dest in folders.items():
        (models_dir / dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, models_dir / dest)
    shutil.copytree(tiny_flux.tokenizers, models_dir / "text_encoders/tiny/tokenizers")
    write_demo_dataset(base / "input" / "data", count=2, size=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bridge.BASE_DIR_ENV, str(base))
        yield base


@pytest.fixture(autouse=True)
def empty_run_store(request):
    """Each test trains what it trains: the run store (tested in test_run_store and below) starts empty."""
    if "base_dir" in request.fixturenames:
        shutil.rmtree(request.getfixturevalue("base_dir") / "models" / bridge.STATES / "runs", ignore_errors=True)


@pytest.fixture(autouse=True)
def comfyui_inference_mode():
    """ComfyUI runs every node under torch.inference_mode(); so do these tests."""
    with torch.inference_mode():
        yield


def init(**changes):
    return nodes["InitTrainer"].init(**{**TINY_WIDGETS, **changes})[0]


def loop(handle, steps):
    return nodes["TrainLoop"].train(handle, steps)[0]


def save(handle, save_state=False):
    return nodes["SaveCheckpoint"].save(handle, save_state)


_started = {}


@pytest.fixture
def h0(base_dir):
    """The module's run at step 0, started again only if a test replaced it."""
    if "h0" not in _started or _started["h0"].run.released:
        _started["h0"] = init()
    return _started["h0"]


@pytest.fixture(scope="module")
def straight(base_dir):
    """{step: LoRA state} of one Trainer trained straight through, as the graphs below must reproduce."""
    config, _ = init_trainer.build_config(**TINY_WIDGETS)
    trainer = Trainer.from_config(config)
    states = {}
    for step in (3, 5, 7, 9):
        trainer.train(step - trainer.step)
        states[step] = trainer.snapshot().lora
    trainer.release()
    return states


def assert_lora_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def kohya_file_of(state: dict, config) -> dict:
    """The kohya tensors a LoRA state should be saved as."""
    model = models.load_transformer(config.transformer_path, dtype=torch.float32)
    lora.add_lora(model, config.rank, config.alpha, blocks=config.blocks)
    lora.load_lora_state(model, state)
    return lora.kohya_state_dict(model)


# ---------------------------------------------------------------------------------------------------------------
# The pack as ComfyUI loads it


def _fresh_interpreter(script: str, tmp_path: Path) -> str:
    """Run `script` in a new Python whose path holds fake `comfy`, `folder_paths` and `server` modules: any import
    of them, even a guarded one, would succeed and show up in sys.modules."""
    for name in ("comfy", "folder_paths", "server"):
        (tmp_path / f"{name}.py").write_text("")
    env = {"PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


COMFY_MODULES = 'sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "server"))'


def test_trainer_core_and_the_pack_import_without_comfyui(tmp_path):
    out = _fresh_interpreter(f"""
        import importlib, importlib.util, pkgutil, sys
        sys.path.append({str(ROOT)!r})
        import trainer_core
        for m in pkgutil.walk_packages(trainer_core.__path__, "trainer_core."):
            if m.name != "trainer_core.__main__":  # it runs the CLI
                importlib.import_module(m.name)
        print({COMFY_MODULES})

        sys.path.remove({str(ROOT)!r})  # now load the pack folder as ComfyUI does
        spec = importlib.util.spec_from_file_location("flux_pack", {str(ROOT / "__init__.py")!r})
        pack = importlib.util.module_from_spec(spec)
        sys.modules["flux_pack"] = pack
        spec.loader.exec_module(pack)
        print(len(pack.NODE_CLASS_MAPPINGS), sys.path[-1] == {str(ROOT)!r}, {COMFY_MODULES})
    """, tmp_path)
    # the pack folder is appended to sys.path, never first, so its nodes/ cannot shadow ComfyUI's `nodes` module
    assert out.splitlines() == ["[]", "8 True []"]


def test_node_declarations():
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS) == {
        f"FluxLoRA_{n}" for n in ("InitTrainer", "TrainLoop", "SaveCheckpoint", "LossPlot", "ValidationSample",
                                  "XYLoraStrengthGrid", "DatasetReport", "AutoCaption")}
    assert (ROOT / pack.WEB_DIRECTORY).is_dir()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(Flux LoRA)")
        assert cls.CATEGORY == "Flux LoRA Trainer" and cls.DESCRIPTION
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        # an IS_CHANGED that changes on every queue would defeat ComfyUI's cache; InitTrainer's follows the dataset
        assert not hasattr(cls, "IS_CHANGED") or node_id == "FluxLoRA_InitTrainer"
        for name, (kind, options) in cls.INPUT_TYPES()["required"].items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if name == "seed":  # a randomising seed would change the inputs, hence re-run, on every queue
                assert options["control_after_generate"] is False


def test_init_trainer_widgets_are_config_fields():
    from trainer_core.config import TrainConfig

    widgets = set(nodes["InitTrainer"].INPUT_TYPES()["required"])
    not_fields = set(init_trainer.MODEL_WIDGETS) | {"memory_preset", "resume_state"}
    assert widgets - not_fields <= set(TrainConfig.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------------------------
# InitTrainer: everything checked before any model loads


@pytest.fixture
def no_model_loads(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for name in ("load_transformer", "load_vae", "load_text_encoders"):
        monkeypatch.setattr(models, name, loaded)
    monkeypatch.setattr(Trainer, "from_config", loaded)


@pytest.mark.parametrize("changes, error, match", [
    (dict(transformer="flux-missing.safetensors"), FileNotFoundError, "transformer: 'flux-missing.safetensors' is no"),
    (dict(vae="tiny/clip_l.safetensors"), FileNotFoundError, "vae: .* is not in ComfyUI's vae folder"),
    (dict(transformer="../vae/ae.safetensors"), FileNotFoundError, "transformer: "),  # `..` never leaves the folder
    (dict(validation_transformer="ae.safetensors"), FileNotFoundError, "validation_transformer:"),
    (dict(dataset_dir="nope"), FileNotFoundError, "dataset_dir: .*nope is not a folder.*input folder"),
    (dict(dataset_dir="../../etc"), ValueError, "dataset_dir: .* outside ComfyUI's input folder"),
    (dict(dataset_dir=" "), ValueError, "dataset_dir: empty"),
    (dict(rank=0), ValueError, "rank: 0"),
    (dict(learning_rate=0.0), ValueError, "learning_rate: 0"),
    (dict(resolutions="500"), ValueError, "resolutions: 500 is not a positive multiple of 64"),
    (dict(output_name="../escape"), ValueError, "output_name:"),
    (dict(memory_preset="4GB"), ValueError, "memory_preset: '4GB'; choose one of custom"),
    (dict(resume_state="gone.state.safetensors"), FileNotFoundError, "resume_state: 'gone.state.safetensors'"),
])
def test_init_trainer_rejects_bad_settings_before_loading(base_dir, no_model_loads, changes, error, match):
    with pytest.raises(error, match=match):
        init(**changes)


def test_init_trainer_names_a_model_file_of_the_wrong_kind(base_dir, no_model_loads):
    models_dir = base_dir / "models"
    shutil.copy(models_dir / "text_encoders/tiny/clip_l.safetensors", models_dir / "vae/not_a_vae.safetensors")
    with pytest.raises(ValueError, match="vae: not_a_vae.safetensors appears to be a CLIP text encoder"):
        init(vae="not_a_vae.safetensors")


def test_a_failed_init_leaves_the_current_run_alive(h0, no_model_loads):
    with pytest.raises(ValueError):
        init(rank=0)
    assert not h0.run.released


def test_tokenizers_beside_the_clip_file_else_comfyuis_own(base_dir, tmp_path, monkeypatch):
    beside = base_dir / "models/text_encoders/tiny"
    found = init_trainer.tokenizer_settings(beside / "clip_l.safetensors")
    assert found == {"tokenizer_dir": str(beside / "tokenizers")}
    with pytest.raises(FileNotFoundError, match="clip_l: no tokenizer files"):
        init_trainer.tokenizer_settings(tmp_path / "clip_l.safetensors")
    comfy_dirs = (tmp_path / "sd1_tokenizer", tmp_path / "t5_tokenizer")
    for d in comfy_dirs:
        d.mkdir()
    monkeypatch.setattr(bridge, "tokenizer_dirs", lambda: comfy_dirs)
    assert init_trainer.tokenizer_settings(tmp_path / "clip_l.safetensors") == {
        "clip_tokenizer_dir": str(comfy_dirs[0]), "t5_tokenizer_dir": str(comfy_dirs[1])}


def test_init_trainer_reruns_when_the_dataset_changes_and_only_then(base_dir, no_model_loads):
    changed = nodes["InitTrainer"].IS_CHANGED
    before = changed(**TINY_WIDGETS)
    assert changed(**TINY_WIDGETS) == before and changed(**{**TINY_WIDGETS, "rank": 8}) == before
    caption = base_dir / "input" / "data" / "glyph_00.txt"
    text = caption.read_text()
    try:
        caption.write_text(text + ", at night")
        assert changed(**TINY_WIDGETS) != before
    finally:
        caption.write_text(text)
    extra = base_dir / "input" / "data" / "glyph_09.png"
    shutil.copy(base_dir / "input" / "data" / "glyph_00.png", extra)
    try:
        assert changed(**TINY_WIDGETS) != before
    finally:
        extra.unlink()
    assert "dataset_dir" in changed(**{**TINY_WIDGETS, "dataset_dir": "nope"})  # init then names the widget
    held = base_dir / "input" / "held"
    shutil.copytree(base_dir / "input" / "data", held)
    try:
        scored = {**TINY_WIDGETS, "validation_dir": "held"}
        with_held = changed(**scored)
        assert with_held != before and changed(**scored) == with_held
        (held / "glyph_00.txt").write_text("another caption")
        assert changed(**scored) != with_held
    finally:
        shutil.rmtree(held)


def test_memory_preset_sets_the_memory_options_and_custom_keeps_the_widgets(tiny_flux):
    explicit = dict(fp8_base=False, gradient_checkpointing=False, blocks_to_swap=3)
    assert init_trainer.memory_settings("custom", explicit, tiny_flux.transformer_bf16) == explicit
    preset = PRESETS["12GB"]
    assert init_trainer.memory_settings("12GB", explicit, tiny_flux.transformer_bf16) == dict(
        fp8_base=preset.fp8_base, gradient_checkpointing=preset.gradient_checkpointing,
        blocks_to_swap=preset.blocks_to_swap, checkpoint_blocks=preset.checkpoint_blocks, t5_on_cpu=False)
    assert init_trainer.memory_settings("8GB", explicit, tiny_flux.transformer_bf16)["t5_on_cpu"]  # T5 fp8 is 5.5 GB
    # peft's LoHa keeps every Linear's whole update for backward: every block is recomputed; a LoKr keeps the preset's
    loha = init_trainer.memory_settings("12GB", {**explicit, "network": "loha"}, tiny_flux.transformer_bf16)
    assert loha["checkpoint_blocks"] == -1 and loha["gradient_checkpointing"]
    lokr = init_trainer.memory_settings("12GB", {**explicit, "network": "lokr"}, tiny_flux.transformer_bf16)
    assert lokr["checkpoint_blocks"] == preset.checkpoint_blocks


# ---------------------------------------------------------------------------------------------------------------
# Handle semantics under ComfyUI's ordering and caching


def test_siblings_of_loop_1_see_loop_1_even_after_loop_2_ran(h0, straight):
    h1 = loop(h0, 3)
    before = nodes["ValidationSample"].sample(h1, "fltglyph", 1.0, **SAMPLE)["result"][0]
    h2 = loop(h1, 2)  # siblings after loop 2 run first
    assert (h1.step, h2.step) == (3, 5)
    assert_lora_equal(h2.state.lora, straight[5])

    after = nodes["ValidationSample"].sample(h1, "fltglyph", 1.0, **SAMPLE)["result"][0]  # then loop 1's siblings
    assert torch.equal(before, after)
    assert not torch.equal(after, nodes["ValidationSample"].sample(h2, "fltglyph", 1.0, **SAMPLE)["result"][0])
    saved, lora_path1 = save(h1)
    assert Path(lora_path1).name == "nodes_test_000003.safetensors"
    assert_lora_equal(load_file(lora_path1), kohya_file_of(straight[3], h0.run.trainer.config))
    assert_lora_equal(h1.state.lora, straight[3])


def test_rerunning_loop_2_with_other_steps_starts_from_loop_1(h0, straight):
    h1 = loop(h0, 3)
    h2 = loop(h1, 2)
    assert h0.run.trainer.step == 5
    changed = loop(h1, 4)  # the user changed loop 2's steps; its input is still loop 1's cached handle
    assert changed.step == 7
    assert_lora_equal(changed.state.lora, straight[7])
    again = loop(h1, 2)  # unchanged loop re-run from the same input: the same result
    assert again.state.losses == pytest.approx(h2.state.losses, rel=1e-6)
    assert_lora_equal(again.state.lora, h2.state.lora)


def test_handles_are_values(h0):
    h1 = loop(h0, 1)
    saved, _ = save(h1)
    assert h0.step == 0 and h1.checkpoints == () and [c.step for c in saved.checkpoints] == [1]
    h2 = loop(saved, 1)
    assert [c.step for c in h2.checkpoints] == [1]  # checkpoints travel down the graph, never up


class Cancel(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def test_cancel_keeps_the_steps_done_and_a_rerun_continues(h0, straight, monkeypatch):
    h1 = loop(h0, 3)
    h2 = loop(h1, 2)
    real_bar = bridge.progress_bar

    updates = []

    class CancellingBar:  # ComfyUI raises the interrupt from the progress bar's update
        def __init__(self, total):
            assert total == 4

        def update_absolute(self, value, total=None, preview=None):
            updates.append(value)
            if value == 2:
                raise Cancel

    monkeypatch.setattr(bridge, "progress_bar", CancellingBar)
    with pytest.raises(Cancel):
        loop(h2, 4)
    assert updates == [1, 2] and h0.run.trainer.step == 7  # moved every step; the two steps done were kept

    monkeypatch.setattr(bridge, "progress_bar", real_bar)
    saved, path = save(h1)  # nodes on earlier handles still work after the cancel
    assert_lora_equal(load_file(path), kohya_file_of(straight[3], h0.run.trainer.config))

    steps_run = []
    monkeypatch.setattr(bridge, "progress_bar", lambda total: type("Bar", (), {
        "update_absolute": lambda self, value, total=None: steps_run.append(value)})())
    h3 = loop(h2, 4)  # queued again: continues from step 7 instead of starting the loop over
    assert steps_run == [2, 3, 4] and h3.step == 9  # the bar starts at the 2 steps kept, then moves per new step
    assert_lora_equal(h3.state.lora, straight[9])


def test_should_stop_returning_true_keeps_the_steps_and_raises(h0, straight):
    h1 = loop(h0, 3)
    calls = []
    with pytest.raises(TrainingInterrupted, match="stopped at step 4 of 5"):
        h0.run.train(h1, 2, should_stop=lambda: len(calls) > 0 or calls.append(1))
    steps_run = []
    h2 = h0.run.train(h1, 2, on_step=lambda info: steps_run.append(info.step))
    assert steps_run == [5] and h2.step == 5 and len(h2.state.losses) == 5  # continued, not started over
    assert_lora_equal(h2.state.lora, straight[5])


def test_saved_state_resumes_through_init_trainer(h0, straight, base_dir):
    saved, path = save(loop(h0, 3), save_state=True)
    state_file = saved.checkpoints[-1].state_path
    assert state_file.is_file() and state_file.parent == base_dir / "models" / bridge.STATES
    assert state_file.name in dict(nodes["InitTrainer"].INPUT_TYPES()["required"])["resume_state"][0]
    with pytest.raises(ValueError, match="resume_state: .* rank 8 \\(state: 4\\)"):
        init(resume_state=state_file.name, rank=8)
    resumed = init(resume_state=state_file.name)
    assert resumed.step == 3
    assert_lora_equal(loop(resumed, 2).state.lora, straight[5])


def test_a_graph_queued_again_after_the_cache_forgot_it_loads_its_loops_from_the_store(h0, monkeypatch):
    saved, path = save(loop(loop(h0, 2), 1))
    before = Path(path).read_bytes()
    old = h0.run
    monkeypatch.setattr(Trainer, "train", None)  # no step may run
    again = init()  # ComfyUI ran InitTrainer again: a new run of the same config takes the loaded models over
    assert old.released and again.run.loaded
    saved_again, path_again = save(loop(loop(again, 2), 1))
    assert path_again == path and Path(path).read_bytes() == before
    assert_lora_equal(saved_again.state.lora, saved.state.lora)


def test_a_new_init_releases_the_old_run(h0):
    h1 = loop(h0, 1)
    old_run = h1.run
    fresh = init(seed=4)
    assert old_run.trainer is None and fresh.run.trainer is not None
    with pytest.raises(ValueError, match="re-run InitTrainer"):
        loop(h1, 1)
    with pytest.raises(ValueError, match="re-run InitTrainer"):
        save(h1)


# ---------------------------------------------------------------------------------------------------------------
# Images


def test_loss_plot_is_a_comfyui_image_with_a_preview(h0, base_dir):
    out = nodes["LossPlot"].plot(save(loop(h0, 2))[0])
    image = out["result"][0]
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    (preview,) = out["ui"]["images"]
    assert preview["type"] == "temp" and (base_dir / "temp" / preview["filename"]).is_file()


def test_validation_sample_one_image_per_prompt_line(h0):
    out = nodes["ValidationSample"].sample(loop(h0, 1), "a\n\n b \n", 1.0, **{**SAMPLE, "width": 96})
    assert out["result"][0].shape == (2, 64, 96, 3) and len(out["ui"]["images"]) == 2
    with pytest.raises(ValueError, match="prompts: empty"):
        nodes["ValidationSample"].sample(h0, " \n", 1.0, **SAMPLE)


def test_validation_base_differs_from_training_base(h0):
    h1 = loop(h0, 2)
    on_training = nodes["ValidationSample"].sample(h1, "fltglyph", 1.0, **SAMPLE)["result"][0]
    on_validation = nodes["ValidationSample"].sample(h1, "fltglyph", 1.0, **{**SAMPLE, "base": "validation base"})
    assert not torch.equal(on_training, on_validation["result"][0])  # fp8-rounded weights: a different base


def test_xy_grid_rows_are_checkpoints_columns_strengths_without_reading_files(h0, monkeypatch):
    s1, path1 = save(loop(h0, 2))
    s2, path2 = save(loop(s1, 2))
    Path(path1).unlink(), Path(path2).unlink()  # strengths scale the in-memory LoRA; no file is read back
    captured = {}
    real_grid = plots.xy_grid

    def spy(images, row_labels, col_labels, title=None, **kw):
        captured.update(images=images, rows=row_labels, cols=col_labels)
        return real_grid(images, row_labels, col_labels, title, **kw)

    monkeypatch.setattr(plots, "xy_grid", spy)
    out = nodes["XYLoraStrengthGrid"].grid(s2, "0, 0.5,1", "fltglyph", **SAMPLE)
    assert out["result"][0].shape[0] == 1 and len(out["ui"]["images"]) == 1
    assert captured["rows"] == ["step 2", "step 4"] and captured["cols"] == ["0", "0.5", "1"]
    cells = [[torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in row] for row in captured["images"]]
    assert torch.equal(cells[0][0], cells[1][0])  # strength 0 is the base model whatever the checkpoint
    assert not torch.equal(cells[0][2], cells[1][2])  # at strength 1 the checkpoints differ
    with pytest.raises(ValueError, match="no checkpoint was saved"):
        nodes["XYLoraStrengthGrid"].grid(loop(h0, 1), "0,1", "fltglyph", **SAMPLE)


def test_a_loop_past_a_fixed_total_steps_stops_before_its_first_step_saying_what_to_set(base_dir):
    start = init(lr_schedule="cosine", total_steps=4, output_name="past_schedule")
    after = loop(start, 3)
    store = base_dir / "models" / bridge.STATES
    before = sorted(p for p in store.rglob("*") if p.is_file())
    bar = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bridge, "progress_bar", lambda total: type("Bar", (), {
            "update_absolute": lambda self, value, total=None: bar.append(value)})())
        with pytest.raises(ValueError, match=r"^steps: training to step 6 runs past total_steps 4, where the cosine "
                                             r"schedule ends: steps 5-6 would train at learning rate 0\. Set "
                                             r"InitTrainer's total_steps to 6 or more \(0: auto, the queued loops' "
                                             r"steps\), or this loop's steps to 1 at most$"):
            loop(after, 3)
    assert bar == [] and after.run.trainer.step == 3  # not one step
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before  # nothing written
    assert loop(after, 1).step == 4  # the loop that fits the schedule trains


def test_gguf_bases_are_listed_apart_from_stock_loaders_lists_and_train(base_dir, tiny_flux):
    (base_dir / "models" / "unet").mkdir(exist_ok=True)  # ComfyUI's legacy name of diffusion_models, searched too
    gguf = write_gguf_transformer(tiny_flux.transformer_bf16, base_dir / "models" / "unet" / "flux-tiny-Q8_0.gguf")
    listed = nodes["InitTrainer"].INPUT_TYPES()["required"]["transformer"][0]
    assert "flux-tiny-Q8_0.gguf" in listed and "flux-tiny-bf16.safetensors" in listed
    assert "flux-tiny-Q8_0.gguf" not in bridge.filename_list("diffusion_models")  # what ComfyUI's UNETLoader lists
    # a memory preset swaps the blocks tuned for the file's quantization
    assert init_trainer.memory_settings("8GB", {}, gguf)["blocks_to_swap"] == dict(PRESETS["8GB"].swap_for_base)["Q8_0"]
    bf16 = base_dir / "models" / "diffusion_models" / "flux-tiny-bf16.safetensors"
    assert init_trainer.memory_settings("8GB", {}, bf16)["blocks_to_swap"] == PRESETS["8GB"].blocks_to_swap
    handle = loop(init(transformer="flux-tiny-Q8_0.gguf", output_name="gguf_node"), 2)
    assert handle.state.step == 2 and all(map(math.isfinite, handle.state.losses))
