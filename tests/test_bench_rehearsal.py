"""The full-size rehearsal and the GPU check (bench/rehearsal.py, bench/gpu_check.py) run their real path: proven here
on the tiny stack and without a GPU (the full-size runs are not CI: see the README)."""
import json
import struct

import torch
from safetensors.torch import load_file

from bench import gpu_check, rehearsal
from trainer_core.demo import write_demo_dataset
from trainer_core.presets import PRESETS


def test_the_rehearsal_phases_run_on_the_tiny_stack_and_are_measured(tiny_flux, tmp_path):
    paths = {"transformer": tiny_flux.transformer_bf16, "other": tiny_flux.transformer_fp8, "vae": tiny_flux.vae,
             "clip": tiny_flux.clip_l, "t5": tiny_flux.t5, "tokenizers": tiny_flux.tokenizers}
    dataset = write_demo_dataset(tmp_path / "data", count=2, size=64)
    settings = {**PRESETS["12GB"].train_settings(), "optimizer": "adamw", "mixed_precision": "fp32", "device": "cpu",
                "blocks_to_swap": 2, "checkpoint_blocks": 2}
    config = rehearsal.run_config(paths, dataset, tmp_path / "out", 64, 8, **settings)
    assert config.resolutions == (64,)  # not the preset's 1024: the sample on the second base is drawn at it
    meter = rehearsal.PhaseMeter(rehearsal.rss)

    trainer = rehearsal.run_phases(config, meter, steps=2, sample_steps=1)

    assert [name.split(" ")[0] for name, _, _ in meter.rows] == ["preflight", "cache:", "cache:", "load", "train",
                                                                  "SaveCheckpoint", "sample"]
    assert all(seconds > 0 and peak > 0.1 for _, seconds, peak in meter.rows)
    assert trainer.step == 2 and (tmp_path / "out" / "rehearsal.state.safetensors").exists()
    assert meter.table().count("\n") == len(meter.rows) + 1


def test_random_files_are_written_tensor_by_tensor_as_valid_safetensors(tmp_path):
    shapes = {"blocks.0.weight": torch.Size([8, 4]), "blocks.0.norm.scale": torch.Size([4]), "bias": torch.Size([3])}
    rehearsal.write_streaming(tmp_path / "m.safetensors", shapes, lambda k: k.endswith(".weight"), {"a": "b"})
    tensors = load_file(tmp_path / "m.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == shapes
    weight = tensors["blocks.0.weight"]
    assert weight.dtype == torch.float8_e4m3fn and torch.isfinite(weight.float()).all()
    assert weight.float().abs().max() < 0.03  # small weights: activations stay finite
    assert torch.equal(tensors["blocks.0.norm.scale"], torch.ones(4, dtype=torch.bfloat16))
    header = (tmp_path / "m.safetensors").read_bytes()
    assert json.loads(header[8 : 8 + struct.unpack("<Q", header[:8])[0]])["__metadata__"] == {"a": "b"}


def test_the_gpu_check_plans_every_card_and_resolution_without_a_gpu(capsys):
    runs = gpu_check.plan((512, 1024))
    assert [(r.name, r.resolution) for r in runs] == [(n, r) for n in ("24GB", "16GB", "12GB", "8GB", "24GB + "
                                                      "compile_blocks", "16GB + compile_blocks") for r in (512, 1024)]
    assert [r.settings()["compile_blocks"] for r in runs] == [False] * 8 + [True] * 4
    assert runs[0].memory_fraction(96 * gpu_check.GIB) == 0.25 and runs[0].memory_fraction(8 * gpu_check.GIB) == 1.0
    assert gpu_check.main(["--dry-run"]) == 0
    assert capsys.readouterr().out.count("\n") == len(runs)  # every config built and checked


def test_the_gpu_check_table_sets_the_anchors_beside_each_row():
    lines = gpu_check.summary([("24GB", 512, 1.234, 20.51, 24), ("8GB", 1024, None, 7.9, 8)]).splitlines()
    assert lines[2] == "| 24GB | 512² | 1.23 | 20.5 GiB | 24 GB | SimpleTuner NF4 1.4 at 512 px; FluxTrainer 2.42 at 768 px |"
    assert lines[3].startswith("| 8GB | 1024² | out of memory |") and lines[3].endswith("SimpleTuner NF4 3.5 at 1024 px |")
