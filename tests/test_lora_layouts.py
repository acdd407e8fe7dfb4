"""The two LoRA layouts in a run: a split-layout state made before the fused layout continues exactly, and a LoRA in
sd-scripts' own Flux key layout is a valid init_lora that starts from exactly its weights."""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from trainer_core import lora
from trainer_core.checkpoints import load_training_state, save_training_state
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.identity import RESUME_FIELDS, SETTINGS_ADDED
from trainer_core.models import diffusers_to_bfl
from trainer_core.trainer import Trainer

RANK = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=2, size=64)


def make_trainer(tiny_flux, dataset, tmp_path, **changes):
    config = demo_config(tiny_flux, dataset, tmp_path / "out", steps=20).replace(resolutions=(64,), rank=RANK,
                                                                                 alpha=float(RANK), **changes)
    return Trainer.from_config(config)


def test_a_split_state_saved_before_the_layout_setting_continues_bit_identically(tiny_flux, dataset, tmp_path):
    straight = make_trainer(tiny_flux, dataset, tmp_path, lora_layout="split")
    straight.train(4)

    first = make_trainer(tiny_flux, dataset, tmp_path, lora_layout="split")
    first.train(2)
    state = first.snapshot()
    # as the code before lora_layout saved it: neither its fingerprint nor its config name the layout
    state = dataclasses.replace(state, fingerprint={k: v for k, v in state.fingerprint.items() if k != "lora_layout"})
    config = {k: v for k, v in first.config.to_dict().items() if k != "lora_layout"}
    path = save_training_state(tmp_path / "old.state.safetensors", state, config)
    saved, saved_config = load_training_state(path)
    assert "lora_layout" not in saved_config and SETTINGS_ADDED["lora_layout"] == "split"

    fused = make_trainer(tiny_flux, dataset, tmp_path)  # the default layout: refused, naming the setting
    with pytest.raises(ValueError, match=r"lora_layout fused \(state: split\)"):
        fused.restore(saved)

    resumed = make_trainer(tiny_flux, dataset, tmp_path, lora_layout="split")
    resumed.restore(saved)
    resumed.train(2)
    assert resumed.losses == straight.losses
    want = lora.lora_state(straight.transformer)
    assert all(torch.equal(v, want[k]) for k, v in lora.lora_state(resumed.transformer).items())
    assert "lora_layout" in RESUME_FIELDS and first.snapshot().fingerprint["lora_layout"] == "split"  # named now


def sd_scripts_lora(transformer, path, alpha: float, seed: int = 3) -> dict[str, torch.Tensor]:
    """A LoRA as sd-scripts' networks/lora_flux.py saves one: `lora_unet_<BFL module, dots as underscores>` with
    lora_down (rank, in), lora_up (out, rank) and a scalar alpha for every Linear of every block, fused qkv and linear1
    at rank r like the rest; bf16. The shapes are the BFL modules' of this model."""
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    bfl = diffusers_to_bfl({k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items()
                            if "lora_" not in k and k.startswith(blocks)})
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, weight in bfl.items():
        if not key.endswith(".weight") or weight.ndim != 2:
            continue
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        out_features, in_features = weight.shape
        state[f"{name}.lora_down.weight"] = (torch.randn(RANK, in_features, generator=g) * 0.1).to(torch.bfloat16)
        state[f"{name}.lora_up.weight"] = (torch.randn(out_features, RANK, generator=g) * 0.01).to(torch.bfloat16)
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in state
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in state
    save_file(state, path, metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(alpha),
                                     "ss_network_module": "networks.lora_flux"})
    return state


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_an_sd_scripts_lora_is_an_init_lora_that_starts_from_exactly_its_weights(tiny_flux, dataset, tmp_path, layout):
    """Fused: each file module is one adapter LoRA, copied as is. Split: each part of a fused module takes the shared
    down as its A and its rows of up as its B, also exact copies (the parts' products are computed apart, so the
    outputs equal the fused ones up to the GEMMs' summation order)."""
    probe = make_trainer(tiny_flux, dataset, tmp_path, lora_layout=layout)
    path = tmp_path / "sd_scripts.safetensors"
    file = sd_scripts_lora(probe.transformer, path, alpha=float(RANK))
    trainer = make_trainer(tiny_flux, dataset, tmp_path, lora_layout=layout, init_lora=str(path))
    params = lora.lora_parameters_by_name(trainer.transformer)
    groups = dict(lora._kohya_groups(trainer.transformer))
    assert groups.keys() == {k.split(".")[0] for k in file}
    for key, parts in groups.items():
        down, up = file[f"{key}.lora_down.weight"].float(), file[f"{key}.lora_up.weight"].float()
        rows = up.split([trainer.transformer.get_submodule(p).out_features for p in parts])
        for part, b in zip(parts, rows):
            assert torch.equal(params[f"{part}.lora_A.weight"], down), part
            assert torch.equal(params[f"{part}.lora_B.weight"], b), part
    if layout == "fused":
        assert len(groups["lora_unet_single_blocks_0_linear1"]) == 1
    trainer.train(1)
    assert trainer.step == 1
