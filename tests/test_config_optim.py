"""TrainConfig validation and the learning-rate schedules."""
import dataclasses
import math

import pytest

from trainer_core.config import TrainConfig
from trainer_core.config_files import read_toml
from trainer_core.optim import learning_rate

PATHS = dict(transformer_path="t.safetensors", vae_path="ae.safetensors", clip_path="clip_l.safetensors",
             t5_path="t5.safetensors", dataset_dir="data")


def config(**kw):
    return TrainConfig(**{**PATHS, **kw})


@pytest.mark.parametrize("field,value,message", [
    ("rank", 0, "rank: 0"),
    ("learning_rate", 0.0, "learning_rate: 0.0"),
    ("learning_rate", float("nan"), "learning_rate: nan"),
    ("total_steps", -1, "total_steps: -1"),
    ("resolutions", "512,700", "resolutions: 700 is not a positive multiple of 64"),
    ("resolutions", "512,abc", "resolutions: '512,abc' is not a list of whole numbers"),
    ("optimizer", "sgd", "optimizer: 'sgd'; choose one of"),
    ("timestep_sampling", "cosmic", "timestep_sampling: 'cosmic'"),
    ("output_name", "../escape", "output_name: '../escape' cannot be a file name"),
    ("output_name", "a/b", "output_name: 'a/b' cannot be a file name"),
    ("output_name", "bad:name", "output_name: 'bad:name' cannot be a file name"),
    ("dataset_dir", "", "dataset_dir: empty"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=None) as e:
        config(**{field: value})
    assert message in str(e.value)


def test_values_are_converted_to_each_fields_type():
    cfg = config(rank="8", flip_augment="false", gradient_checkpointing="true", learning_rate="1e-3", alpha=4)
    assert (cfg.rank, cfg.flip_augment, cfg.gradient_checkpointing, cfg.learning_rate) == (8, False, True, 1e-3)
    assert type(cfg.alpha) is float and cfg.alpha == 4.0

    from trainer_core.plan import RunPlan

    plan = RunPlan(prompts=["a photo"], strengths=[0, 1])
    assert plan.prompts == ("a photo",) and plan.strengths == (0.0, 1.0) and type(plan.strengths[0]) is float


@pytest.mark.parametrize("changes,message", [
    ({"rank": "abc"}, 'rank: "abc" is not a whole number (Input should be a valid integer, unable to parse string as '
                      'an integer); write e.g. rank = 16'),
    ({"flip_augment": "maybe"}, 'flip_augment: "maybe" is not true or false'),
    ({"learning_rate": True}, "learning_rate: true is not a number (true/false is not a number)"),
    ({"resolutions": [512, 640.5]}, "resolutions: [512, 640.5] (item 2: 640.5) is not a list of whole numbers"),
    ({"output_name": None}, "output_name: None is not text in quotes"),
])
def test_a_value_of_the_wrong_type_names_the_field_the_value_and_the_form(changes, message):
    with pytest.raises(ValueError) as e:
        config(**changes)
    assert message in str(e.value)


def test_a_list_where_the_plan_wants_one_is_required():
    from trainer_core.plan import RunPlan

    with pytest.raises(ValueError, match=r'plan\.prompts: "a photo" is not a list of texts'):
        RunPlan(prompts="a photo")  # once split into one prompt per letter


def test_each_settings_comment_is_read_back_as_its_meaning():
    from trainer_core.typed_fields import field_docs

    docs = {d.name: d for d in field_docs(TrainConfig)}
    assert list(docs) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert docs["alpha"].meaning == "scale is alpha / rank" and docs["alpha"].default == 16.0
    assert docs["alpha"].section == "LoRA" and docs["transformer_path"].default is dataclasses.MISSING


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown setting.*learning_rat\\b"):
        TrainConfig.from_dict({**PATHS, "learning_rat": 1e-4})


def test_resolutions_parse_from_text():
    assert config(resolutions="512, 768,1024").resolutions == (512, 768, 1024)
    assert config(resolutions=1024).resolutions == (1024,)


def test_toml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "run.toml").write_text('\n'.join(f'{k} = "{v}"' for k, v in PATHS.items()) + '\nrank = 4\n')
    cfg = TrainConfig.from_dict(read_toml(tmp_path / "run.toml"), base_dir=tmp_path)
    assert cfg.rank == 4 and cfg.dataset_dir == str(tmp_path / "data")


def test_warmup_then_constant():
    cfg = config(learning_rate=1e-3, warmup_steps=4)
    lrs = [learning_rate(s, cfg) for s in range(8)]
    assert lrs[:4] == sorted(lrs[:4]) and lrs[0] < lrs[3] < 1e-3
    assert lrs[4:] == [1e-3] * 4


def test_cosine_reaches_its_floor_and_holds_it():
    cfg = config(learning_rate=1.0, lr_schedule="cosine", total_steps=100, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(150)]
    assert lrs[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[100] == pytest.approx(0.1) and lrs[149] == pytest.approx(0.1)


def test_cosine_restarts_and_cyclic_go_back_up():
    for schedule in ("cosine_restarts", "cyclic"):
        cfg = config(learning_rate=1.0, lr_schedule=schedule, total_steps=90, lr_cycles=3)
        lrs = [learning_rate(s, cfg) for s in range(90)]
        rises = sum(1 for a, b in zip(lrs, lrs[1:]) if b > a + 1e-6)
        assert rises >= 2, schedule
        assert min(lrs) < 0.05 and max(lrs) == pytest.approx(1.0)
        assert all(math.isfinite(x) for x in lrs)


def test_timestep_samplings_stay_inside_zero_one_and_shift_favours_noise():
    import torch

    from trainer_core.flow_matching import TIMESTEP_SAMPLINGS, sample_sigmas

    means = {}
    for method in TIMESTEP_SAMPLINGS:
        s = sample_sigmas(20_000, method, torch.Generator().manual_seed(0))
        assert ((s > 0) & (s < 1)).all(), method
        means[method] = s.mean().item()
    assert means["shift"] > means["sigmoid"] + 0.15  # shift 3.16 moves training toward high noise, as kohya's does
    assert abs(means["sigmoid"] - 0.5) < 0.02 and abs(means["uniform"] - 0.5) < 0.02
