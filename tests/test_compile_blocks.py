"""compile_blocks: the training step runs torch.compile'd blocks and trains what eager trains (up to float rounding),
resumes exactly, leaves sampling on the eager modules, and is refused at setup where nothing can compile.

Compiling costs seconds: three compiled trainers in all (the second reuses the first's compiled code).
"""
import re

import pytest
import torch
import torch._dynamo
from torch._inductor import cpp_builder
from torch._inductor.exc import InvalidCxxCompiler
from torch.utils import _triton

from numerics import assert_ulps
from test_kontext import write_pairs
from test_run_store import config, dataset, no_active_run  # noqa: F401 (the tiny run's fixtures, shared)
from trainer_core import compiled_blocks
from trainer_core.checkpoints import load_training_state
from trainer_core.demo import demo_config
from trainer_core.preflight import preflight
from trainer_core.trainer import Trainer

PROMPT = ["a glyph"]
SAMPLE = dict(steps=2, width=64, height=64)


def flat_lora(trainer: Trainer) -> torch.Tensor:
    return torch.cat([v.flatten() for _, v in sorted(trainer.snapshot().lora.items())])


@pytest.fixture
def two_buckets(config):
    return config.replace(resolutions=(64, 128), gradient_checkpointing=True, lora_dropout=0.0)


def test_compiled_steps_train_what_eager_trains_resume_exactly_and_sample_eagerly(two_buckets, tmp_path):
    eager = Trainer.from_config(two_buckets)
    eager.train(4)
    compiled = Trainer.from_config(two_buckets.replace(compile_blocks=True))
    compiled.train(2)
    middle = compiled.save_state(tmp_path / "middle.state.safetensors")
    compiled.train(2)
    # fused kernels sum in another order: the same numbers up to rounding, steps through both buckets' shapes
    assert_ulps(torch.tensor(compiled.losses), torch.tensor(eager.losses), 16, "losses")
    assert_ulps(flat_lora(compiled), flat_lora(eager), 256, "LoRA")
    assert not torch.equal(flat_lora(compiled), flat_lora(eager))  # the compiled kernels did run

    # strength 0 is the base exactly: sampling runs the eager blocks, as the eager trainer does
    images = compiled.sample(PROMPT, strength=0.0, **SAMPLE)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in eager.sample(PROMPT, strength=0.0, **SAMPLE)]
    eager.release()

    # a new trainer (as after release / reload) compiles its own blocks and continues the saved state bit for bit
    resumed = Trainer.from_config(two_buckets.replace(compile_blocks=True))
    resumed.restore(load_training_state(middle)[0])
    resumed.train(2)
    assert resumed.losses == compiled.losses
    assert torch.equal(flat_lora(resumed), flat_lora(compiled))
    with pytest.raises(ValueError, match="compile_blocks"):  # a compiled state does not continue eagerly
        Trainer.from_config(two_buckets).restore(load_training_state(middle)[0])


def test_kontext_with_block_swap_and_partial_checkpointing_compiles_three_buckets_within_the_limit(
        tiny_flux, tmp_path):
    targets, controls = write_pairs(tmp_path / "pairs", size=(192, 192), control_size=(192, 192))
    config = demo_config(tiny_flux, targets, tmp_path / "out", steps=20).replace(
        resolutions=(64, 128, 192), model_type="kontext", control_dir=str(controls), rank=4, alpha=4.0,
        gradient_checkpointing=True, checkpoint_blocks=2, blocks_to_swap=1)
    eager = Trainer.from_config(config)
    eager.train(6)  # one epoch: each image at each of the three buckets
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a shape per bucket must not exhaust it
        compiled = Trainer.from_config(config.replace(compile_blocks=True))
        compiled.train(6)
    assert {tuple(s.latents.shape) for s in compiled.dataset.samples} == {(16, 8, 8), (16, 16, 16), (16, 24, 24)}
    assert_ulps(torch.tensor(compiled.losses), torch.tensor(eager.losses), 16, "losses")


def no_cpp_compiler():
    raise InvalidCxxCompiler()


@pytest.mark.parametrize("device, check, broken, advice", [
    ("cpu", (cpp_builder, "get_cpp_compiler"), no_cpp_compiler, "needs a C++ compiler"),
    ("cuda", (_triton, "has_triton"), lambda: False, "pip install triton-windows"),
])
def test_a_device_that_cannot_compile_is_refused_at_setup_naming_the_setting(config, monkeypatch, device, check,
                                                                             broken, advice):
    monkeypatch.setattr(*check, broken)
    with pytest.raises(ValueError, match=f"compile_blocks: .*{re.escape(advice)}.*turn compile_blocks off"):
        compiled_blocks.check_compile_support(torch.device(device))
    if device == "cpu":  # the run's own check, before any weight loads
        with pytest.raises(ValueError, match="compile_blocks"):
            preflight(config.replace(compile_blocks=True))
