"""LoRA on a tiny Flux transformer: targeting, strength, state round trips, and the kohya file as ComfyUI applies it."""
import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from trainer_core import lora
from trainer_core.flow_matching import image_ids, text_ids
from trainer_core.models import Fp8Linear, diffusers_to_bfl, fuse_projections, unfuse_state_dict
from tests.numerics import assert_ulps

CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
RANK, ALPHA = 4, 6.0
LAYOUTS = pytest.mark.parametrize("layout", ["fused", "split"])


def tiny_transformer(dtype=torch.float32) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CONFIG).to(dtype).eval()


def randomise_lora_b(transformer, std=0.05, seed=1) -> None:
    """peft inits B to zero; a random B makes the LoRA do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in transformer.modules():
            if isinstance(m, LoraLayer):
                w = m.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)


def lora_transformer(blocks="all", include_modulation=True, seed=0, std=0.05, layout="fused") -> FluxTransformer2DModel:
    model = tiny_transformer()
    torch.manual_seed(seed)
    lora.add_lora(model, RANK, ALPHA, blocks=blocks, include_modulation=include_modulation, layout=layout)
    randomise_lora_b(model, std=std)
    return model


@pytest.fixture(scope="module")
def inputs() -> dict:
    g = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),  # 8x8 latent -> 16 packed tokens
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.6]),
        guidance=torch.tensor([3.5]),
        img_ids=image_ids(8, 8),
        txt_ids=text_ids(5),
    )


def forward(model, inputs, dtype=torch.float32) -> torch.Tensor:
    """(1, 16, 64) float32 prediction, computed in `dtype`."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return model(**cast, return_dict=False)[0].float()


def run(model, inputs, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return forward(model, inputs, dtype)


def block_linear_names(model, layout="split") -> set[str]:
    if layout == "fused":
        model = copy.deepcopy(model)
        fuse_projections(model)
    return {n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}


def lora_layer_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# --------------------------------------------------------------------------------------------- targeting, validation
@LAYOUTS
def test_targets_every_block_linear_and_nothing_else(layout):
    model = tiny_transformer()
    expected = block_linear_names(model, layout)
    lora.add_lora(model, RANK, ALPHA, layout=layout)
    assert lora_layer_names(model) == expected
    assert {"proj_out", "norm_out.linear", "x_embedder", "context_embedder"}.isdisjoint(lora_layer_names(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora.lora_parameters(model)}
    assert len(trainable) == 2 * len(expected)


def test_block_selection_and_modulation_switch():
    model = tiny_transformer()
    fused = copy.deepcopy(model)
    lora.add_lora(model, RANK, ALPHA, blocks="double:1,single:0", include_modulation=False, layout="split")
    lora.add_lora(fused, RANK, ALPHA, blocks="double:1,single:0", include_modulation=False)
    names, fused_names = lora_layer_names(model), lora_layer_names(fused)
    assert {".".join(n.split(".")[:2]) for n in names} == {"transformer_blocks.1", "single_transformer_blocks.0"}
    assert {".".join(n.split(".")[:2]) for n in fused_names} == {"transformer_blocks.1", "single_transformer_blocks.0"}
    assert "transformer_blocks.1.attn.to_q" in names and "single_transformer_blocks.0.proj_mlp" in names
    assert {"transformer_blocks.1.attn.to_qkv", "transformer_blocks.1.attn.to_added_qkv",
            "single_transformer_blocks.0.linear1"} <= fused_names and len(fused_names) == len(names) - 7
    assert not any(n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) for n in names | fused_names)


@pytest.mark.parametrize("blocks, expected", [
    ("all", {"double": [0, 1, 2], "single": [0, 1, 2, 3]}),
    ("double", {"double": [0, 1, 2], "single": []}),
    ("double:1-2, single:3", {"double": [1, 2], "single": [3]}),
    (["single:0-1", "single:3"], {"double": [], "single": [0, 1, 3]}),
])
def test_parse_blocks(blocks, expected):
    assert lora.parse_blocks(blocks, {"double": 3, "single": 4}) == expected


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(rank=33), "rank"), (dict(rank=2.5), "rank"),
    (dict(alpha=0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(blocks="double:2"), "blocks"), (dict(blocks="double:1-0"), "blocks"), (dict(blocks="triple"), "blocks"),
    (dict(blocks="all:1"), "blocks"), (dict(blocks=""), "blocks"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    model = tiny_transformer()
    # rank 32 is the narrowest targeted width (32 hidden), so 33 is the first rank too big
    with pytest.raises(ValueError, match=rf"^{field}:"):
        lora.add_lora(model, **{"rank": RANK, "alpha": ALPHA, **kwargs})
    assert not lora_layer_names(model)
    lora.add_lora(model, rank=32, alpha=1.0)  # the widest valid rank is accepted


def test_init_is_seeded_peft_default_in_float32_whatever_the_base_dtype():
    states = []
    for dtype, seed in [(torch.float32, 3), (torch.bfloat16, 3), (torch.float32, 4)]:
        model = tiny_transformer(dtype)
        torch.manual_seed(seed)
        lora.add_lora(model, RANK, ALPHA)
        states.append(lora.lora_state(model))
    same, bf16, other = states
    assert all(v.dtype == torch.float32 for v in same.values())
    assert all(torch.equal(same[k], bf16[k]) for k in same)
    assert all(not v.any() for k, v in same.items() if ".lora_B." in k)
    assert any(not torch.equal(same[k], other[k]) for k in same if ".lora_A." in k)


# --------------------------------------------------------------------------------------------- strength
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strength_zero_is_the_base_model_exactly(inputs, dtype, layout):
    """Exactly the base in the adapter's layout; the fused base is the split one up to the GEMMs' summation order."""
    model = tiny_transformer(dtype)
    split_base = run(model, inputs, dtype)
    if layout == "fused":
        fuse_projections(model)
    base = run(model, inputs, dtype)
    assert_ulps(base, split_base, ulps=64, what="fused base")
    lora.add_lora(model, RANK, ALPHA, layout=layout)
    randomise_lora_b(model)
    lora.set_lora_strength(model, 0.0)
    assert torch.equal(run(model, inputs, dtype), base)
    lora.set_lora_strength(model, 1.0)
    assert not torch.equal(run(model, inputs, dtype), base)


@pytest.mark.parametrize("autocast", [False, True])
def test_folded_lora_linear_equals_peft_forward_and_backward(inputs, autocast):
    """The adapter's Linears add the LoRA inside one addmm with the scale on B; the numbers and gradients are peft's
    own up to summation order, with and without bf16 autocast (mixed precision)."""
    model = lora_transformer()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m, lora.FoldedLoraLinear) for m in layers)

    def prediction_and_grads(peft_forward: bool):
        model.zero_grad()
        for m in layers:  # peft's forward for the reference pass, ours for the other
            m.forward = super(lora.FoldedLoraLinear, m).forward if peft_forward else m.__class__.forward.__get__(m)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(model, inputs)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in lora.lora_parameters(model)]

    ours, ours_grads = prediction_and_grads(False)
    peft, peft_grads = prediction_and_grads(True)
    # compared at the precision the products were rounded to, over 4 blocks of differently ordered sums
    dtype, ulps = (torch.bfloat16, 8) if autocast else (torch.float32, 64)
    assert_ulps(ours.to(dtype), peft.to(dtype), ulps=ulps, what="prediction")
    for got, want in zip(ours_grads, peft_grads):
        assert_ulps(got.to(dtype), want.to(dtype), ulps=ulps, what="gradient")


def test_strength_scales_the_effect_linearly_and_leaves_weights(inputs):
    model = tiny_transformer()
    base = run(model, inputs)
    lora.add_lora(model, RANK, ALPHA)
    randomise_lora_b(model, std=0.002)  # small LoRA: the network is close to linear in it
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    full = run(model, inputs)
    lora.set_lora_strength(model, 0.5)
    half = run(model, inputs)
    assert (half - base).norm() < (full - base).norm()
    assert (half - base - 0.5 * (full - base)).norm() < 0.05 * (full - base).norm()
    lora.set_lora_strength(model, 1.0)
    assert torch.equal(run(model, inputs), full)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------- peft-named state
@LAYOUTS
def test_lora_state_round_trip_and_strictness(inputs, layout):
    model = lora_transformer(layout=layout)
    state = lora.lora_state(model)
    assert f"transformer_blocks.0.attn.to_{'qkv' if layout == 'fused' else 'q'}.lora_A.weight" in state
    assert lora.state_layout(state) == layout
    assert all(v.device.type == "cpu" for v in state.values())
    fresh = lora_transformer(seed=9, std=0.0, layout=layout)
    lora.load_lora_state(fresh, state)
    assert torch.equal(run(fresh, inputs), run(model, inputs))

    missing = {k: v for k, v in state.items() if not k.startswith("single_transformer_blocks.1.proj_out.")}
    with pytest.raises(ValueError, match=r"missing: single_transformer_blocks\.1\.proj_out\.lora_A\.weight"):
        lora.load_lora_state(fresh, missing)
    with pytest.raises(ValueError, match=r"unexpected: proj_out\.lora_A\.weight"):
        lora.load_lora_state(fresh, {**state, "proj_out.lora_A.weight": torch.zeros(RANK, 32)})
    other_rank = tiny_transformer()
    lora.add_lora(other_rank, RANK * 2, ALPHA, layout=layout)
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora_state(other_rank, state)
    with pytest.raises(ValueError, match="lora_layout"):
        lora.load_lora_state(lora_transformer(layout="split" if layout == "fused" else "fused"), state)


# --------------------------------------------------------------------------------------------- kohya file
def diffusers_weights(model, merged: bool) -> dict[str, torch.Tensor]:
    """The model's diffusers-named weights, with peft's LoRA merged in (on a copy, as merge_and_unload does) or not."""
    if merged:
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.merge()
    return {k.replace(".base_layer", ""): v.float() for k, v in model.state_dict().items() if "lora_" not in k}


def comfyui_apply(bfl: dict, kohya: dict, strength: float) -> tuple[dict, set]:
    """ComfyUI's LoraLoader on BFL weights: `lora_unet_` + BFL name minus `.weight`, dots to underscores;
    W += strength * (alpha / down.shape[0]) * up @ down, alpha defaulting to the rank. Returns the keys it skipped."""
    out, skipped = dict(bfl), set(kohya)
    for key in bfl:
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if f"{name}.lora_up.weight" not in kohya:
            continue
        up, down = kohya[f"{name}.lora_up.weight"].float(), kohya[f"{name}.lora_down.weight"].float()
        alpha = kohya[f"{name}.alpha"].item() if f"{name}.alpha" in kohya else down.shape[0]
        out[key] = out[key] + strength * (alpha / down.shape[0]) * (up @ down)
        skipped -= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
    return out, skipped


def assert_comfyui_matches_peft(model, kohya: dict, strength: float) -> None:
    base = diffusers_to_bfl(diffusers_weights(model, merged=False))
    merged = diffusers_to_bfl(diffusers_weights(model, merged=True))
    applied, skipped = comfyui_apply(base, kohya, strength)
    assert skipped == set(), "keys ComfyUI would skip with 'lora key not loaded'"
    for key in base:
        torch.testing.assert_close(applied[key], merged[key], rtol=1e-5, atol=1e-6, msg=key)


@LAYOUTS
@pytest.mark.parametrize("blocks, include_modulation", [("all", True), ("double:1,single:0", False)])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_kohya_file_applied_by_comfyui_rule_equals_peft_merge(blocks, include_modulation, strength, layout):
    model = lora_transformer(blocks, include_modulation, layout=layout)
    lora.set_lora_strength(model, strength)
    kohya = lora.kohya_state_dict(model, dtype=torch.float32)  # the file holds strength 1; ComfyUI applies its own
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight" in kohya
    parts = {"fused": (1, 1), "split": (4, 3)}[layout]  # fused: the trained rank; split: block-diagonal parts
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (parts[0] * RANK, 32)
    assert kohya["lora_unet_double_blocks_1_txt_attn_qkv.alpha"].item() == parts[1] * ALPHA
    assert kohya["lora_unet_single_blocks_0_linear2.alpha"].item() == ALPHA
    assert ("lora_unet_double_blocks_1_img_mod_lin.alpha" in kohya) == include_modulation
    assert_comfyui_matches_peft(model, kohya, strength)
    # a file module exactly for each BFL Linear the LoRA changes
    merged = diffusers_to_bfl(diffusers_weights(model, merged=True))
    base = diffusers_to_bfl(diffusers_weights(model, merged=False))
    changed = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
               for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {k.split(".")[0] for k in kohya}


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kohya_file_round_trip(tmp_path, inputs, dtype, layout):
    model = lora_transformer(layout=layout)
    path = tmp_path / "loras" / "x.safetensors"
    lora.save_kohya_lora(path, model, {"trigger_word": "sks", "ss_steps": "750"}, dtype=dtype)
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temp file left behind
    assert all(v.dtype == dtype for k, v in load_file(path).items() if not k.endswith(".alpha"))

    fresh = lora_transformer(seed=7, std=0.0, layout=layout)
    lora.set_lora_strength(fresh, 0.3)  # loading must not depend on the strength in use
    metadata = lora.load_kohya_lora(path, fresh)
    lora.set_lora_strength(fresh, 1.0)
    assert metadata["trigger_word"] == "sks" and metadata["ss_steps"] == "750"
    assert metadata["ss_network_dim"] == str(RANK) and float(metadata["ss_network_alpha"]) == ALPHA
    base, want, got = run(tiny_transformer(), inputs), run(model, inputs), run(fresh, inputs)
    if dtype == torch.float32:
        assert all(torch.equal(v, lora.lora_state(model)[k]) for k, v in lora.lora_state(fresh).items())
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 0.01 * (want - base).abs().max()


def test_group_members_without_lora_get_zero_blocks(tmp_path, inputs):
    def partial_adapter(seed):
        model = tiny_transformer()
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=r"transformer_blocks\.0\.attn\.to_[qv]"))
        randomise_lora_b(model, seed=seed)
        return model

    model = partial_adapter(1)
    kohya = lora.kohya_state_dict(model, dtype=torch.float32)
    assert {k.split(".")[0] for k in kohya} == {"lora_unet_double_blocks_0_img_attn_qkv"}
    up = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (96, 3 * RANK) and not up[32:64].any()
    assert_comfyui_matches_peft(model, kohya, 1.0)

    save_file(kohya, tmp_path / "partial.safetensors")
    fresh = partial_adapter(2)
    lora.load_kohya_lora(tmp_path / "partial.safetensors", fresh)
    assert torch.equal(run(fresh, inputs), run(model, inputs))


@LAYOUTS
def test_loads_other_tools_dense_fused_lora(tmp_path, layout):
    """sd-scripts trains one LoRA on the fused qkv / linear1 (dense up); it loads exactly: as is in the fused layout,
    each part sharing down (and taking its rows of up) in the split one."""
    g = torch.Generator().manual_seed(5)
    kohya = lora.kohya_state_dict(lora_transformer(layout=layout), dtype=torch.float32)
    for name, out in [("lora_unet_double_blocks_0_img_attn_qkv", 96), ("lora_unet_single_blocks_1_linear1", 224)]:
        kohya[f"{name}.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
        kohya[f"{name}.lora_up.weight"] = torch.randn(out, RANK, generator=g) * 0.05
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    del kohya["lora_unet_double_blocks_1_img_mlp_0.alpha"]  # no alpha: scale 1, as in ComfyUI
    kohya = {k: v for k, v in kohya.items() if "single_blocks_0_" not in k}  # adapter Linears the file lacks
    save_file(kohya, tmp_path / "dense.safetensors")

    model = lora_transformer(seed=3, layout=layout)
    lora.load_kohya_lora(tmp_path / "dense.safetensors", model)
    assert_comfyui_matches_peft(model, kohya, 1.0)
    if layout == "fused":
        params = lora.lora_parameters_by_name(model)
        assert torch.equal(params["transformer_blocks.0.attn.to_qkv.lora_A.weight"],
                           kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    assert not any(m.lora_B["default"].weight.any() for n, m in model.named_modules()
                   if isinstance(m, LoraLayer) and n.startswith("single_transformer_blocks.0."))


def test_load_kohya_errors_name_file_and_keys(tmp_path):
    model = lora_transformer(layout="split")
    kohya = lora.kohya_state_dict(model, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        lora.load_kohya_lora(tmp_path / "nope.safetensors", model)

    extra = {**kohya, "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
             "lora_unet_final_layer_linear.lora_down.weight": torch.zeros(RANK, 32),
             "lora_unet_double_blocks_5_img_mlp_0.alpha": torch.tensor(1.0)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"extra\.safetensors: 3 keys .*lora_te1_text.*double_blocks_5.*final_layer"):
        lora.load_kohya_lora(tmp_path / "extra.safetensors", model)

    key = "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"
    dense = {**kohya, key: kohya[key] + 0.01}
    save_file(dense, tmp_path / "dense.safetensors")
    before = lora.lora_state(model)
    with pytest.raises(ValueError, match=rf"dense\.safetensors: {key} is not block-diagonal"):
        lora.load_kohya_lora(tmp_path / "dense.safetensors", model)
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state(model).items())  # nothing half-loaded

    other_rank = tiny_transformer()
    lora.add_lora(other_rank, RANK + 1, ALPHA, layout="split")
    save_file(kohya, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="has rank"):
        lora.load_kohya_lora(tmp_path / "ok.safetensors", other_rank)
    with pytest.raises(ValueError, match="block-diagonal at 3 or 4 x the rank: set lora_layout to 'split'"):
        lora.load_kohya_lora(tmp_path / "ok.safetensors", lora_transformer())  # a split-layout file, fused adapter

    no_modulation = tiny_transformer()
    lora.add_lora(no_modulation, RANK, ALPHA, include_modulation=False, layout="split")
    with pytest.raises(ValueError, match=r"mod_lin has a LoRA on .*norm1.*which the adapter does not cover"):
        lora.load_kohya_lora(tmp_path / "ok.safetensors", no_modulation)


def test_save_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="ss_steps"):
        lora.save_kohya_lora(tmp_path / "x.safetensors", lora_transformer(), {"ss_steps": 750})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- fp8 storage base
def fp8_transformer() -> FluxTransformer2DModel:
    """The tiny model with its block Linears in float8 storage, as models.load_transformer(..., fp8_base=True)."""
    model = tiny_transformer(torch.bfloat16)
    for name in block_linear_names(model):
        old = model.get_submodule(name)
        new = Fp8Linear(old.in_features, old.out_features, bias=True, compute_dtype=torch.bfloat16)
        new.weight = torch.nn.Parameter(old.weight.to(torch.float8_e4m3fn), requires_grad=False)
        new.bias = old.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


@LAYOUTS
def test_lora_trains_on_an_fp8_storage_base(inputs, layout):
    model = fp8_transformer()
    if layout == "fused":
        fuse_projections(model)
        assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in block_linear_names(model))
    base = run(model, inputs, torch.bfloat16)
    lora.add_lora(model, RANK, ALPHA, layout=layout)
    assert lora_layer_names(model) == block_linear_names(tiny_transformer(), layout)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.lora_parameters(model))
    randomise_lora_b(model)
    lora.set_lora_strength(model, 0.0)
    assert torch.equal(run(model, inputs, torch.bfloat16), base)
    lora.set_lora_strength(model, 1.0)
    forward(model, inputs, torch.bfloat16).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.lora_parameters(model))


# --------------------------------------------------------------------------------------------- DoRA
def dora_transformer(seed=0, std=0.05, layout="fused") -> FluxTransformer2DModel:
    """A DoRA adapter moved off its init: random B and magnitudes off the base norms."""
    model = tiny_transformer()
    torch.manual_seed(seed)
    lora.add_lora(model, RANK, ALPHA, dora=True, layout=layout)
    randomise_lora_b(model, std=std, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in lora.lora_parameters_by_name(model).items():
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def comfyui_dora_apply(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float):
    """ComfyUI's `weight_decompose` for a dora_scale with one entry per output row (the output axis)."""
    calc = (weight + delta) * (dora_scale / (weight.norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps))
    return weight + strength * (calc - weight)


@LAYOUTS
def test_dora_starts_as_the_base_and_its_magnitudes_train(inputs, layout):
    model = tiny_transformer()
    base, linears = run(model, inputs), block_linear_names(model, layout)
    lora.add_lora(model, RANK, ALPHA, dora=True, layout=layout)
    params = lora.lora_parameters_by_name(model)
    magnitudes = [k for k in params if k.endswith(".lora_magnitude_vector.weight")]
    assert {k.removesuffix(".lora_magnitude_vector.weight") for k in magnitudes} == linears
    assert all(params[k].dtype == torch.float32 and params[k].requires_grad for k in magnitudes)
    torch.testing.assert_close(run(model, inputs), base, rtol=1e-5, atol=1e-6)
    randomise_lora_b(model)
    forward(model, inputs).square().mean().backward()
    assert all(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in magnitudes)


@LAYOUTS
def test_dora_kohya_file_applied_by_comfyui_rule_equals_peft_merge(layout):
    model = dora_transformer(layout=layout)
    kohya = lora.kohya_state_dict(model, dtype=torch.float32) | lora.kohya_dora_scales(model)
    scale = kohya["lora_unet_single_blocks_0_linear1.dora_scale"]
    assert scale.shape == (224, 1) and scale.dtype == torch.float32
    base = diffusers_to_bfl(diffusers_weights(model, merged=False))
    merged = diffusers_to_bfl(diffusers_weights(model, merged=True))
    for key, weight in base.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if f"{name}.lora_up.weight" not in kohya:
            assert torch.equal(weight, merged[key]), key
            continue
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        delta = kohya[f"{name}.alpha"].item() / down.shape[0] * (up @ down)
        applied = comfyui_dora_apply(weight, delta, kohya[f"{name}.dora_scale"], 1.0)
        torch.testing.assert_close(applied, merged[key], rtol=1e-5, atol=1e-6, msg=key)


@LAYOUTS
@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_dora_file_round_trip(tmp_path, inputs, lora_format, layout):
    model = dora_transformer(layout=layout)
    path = tmp_path / "dora.safetensors"
    lora.save_lora_file(path, model, {}, lora_format=lora_format, dtype=torch.float32)
    fresh = tiny_transformer()
    lora.add_lora(fresh, RANK, ALPHA, dora=True, layout=layout)
    lora.load_lora_file(path, fresh)
    torch.testing.assert_close(run(fresh, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
    plain = tiny_transformer()
    lora.add_lora(plain, RANK, ALPHA, layout=layout)
    with pytest.raises(ValueError, match="dora.safetensors is a DoRA LoRA .*turn dora on"):
        lora.load_lora_file(path, plain)


def test_a_plain_lora_file_continues_as_dora_from_the_same_weights(tmp_path, inputs):
    model = lora_transformer()
    lora.save_lora_file(tmp_path / "plain.safetensors", model, {}, dtype=torch.float32)
    fresh = tiny_transformer()
    lora.add_lora(fresh, RANK, ALPHA, dora=True)
    lora.load_lora_file(tmp_path / "plain.safetensors", fresh)
    torch.testing.assert_close(run(fresh, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- diffusers format
@LAYOUTS
def test_diffusers_file_has_peft_keys_and_applies_like_the_peft_merge(layout):
    """A fused LoRA is written split: the shared down repeated for q, k, v (and the MLP input), up split by rows."""
    model = lora_transformer(layout=layout)
    state = lora.diffusers_state_dict(model, dtype=torch.float32)
    assert {k.rsplit(".", 2)[0] for k in state} == {"transformer." + n for n in lora_layer_names(lora_transformer(
        layout="split"))}
    assert state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (RANK, 32)
    base, merged = (unfuse_state_dict(diffusers_weights(model, merged=m)) for m in (False, True))
    for key, weight in base.items():  # ComfyUI: W += strength * up @ down (no alpha key: alpha = rank)
        module = "transformer." + key.removesuffix(".weight")
        if f"{module}.lora_B.weight" in state:
            weight = weight + state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
        torch.testing.assert_close(weight, merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_diffusers_file_is_smaller_than_kohya_in_the_split_layout_only(tmp_path):
    sizes = {}
    for layout in ("split", "fused"):
        model = lora_transformer(layout=layout)
        for lora_format in lora.LORA_FORMATS:
            path = tmp_path / f"{lora_format}.safetensors"
            lora.save_lora_file(path, model, {}, lora_format=lora_format)
            sizes[layout, lora_format] = sum(v.numel() for k, v in load_file(path).items() if not k.endswith(".alpha"))
    # split: fused qkv at 3r and linear1 at 4r against r per part; fused: the kohya file holds each down once
    assert sizes["split", "diffusers"] < sizes["split", "kohya"]
    assert sizes["fused", "kohya"] < sizes["fused", "diffusers"] == sizes["split", "diffusers"]
    assert sizes["fused", "kohya"] == sum(p.numel() for p in lora.lora_parameters(model))


@LAYOUTS
@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_lora_file_round_trip_and_rank_from_header(tmp_path, inputs, lora_format, layout):
    model = lora_transformer(layout=layout)
    path = tmp_path / "x.safetensors"
    lora.save_lora_file(path, model, {"trigger_word": "sks"}, lora_format=lora_format, dtype=torch.float32)
    assert lora.lora_file_rank(path) == RANK
    fresh = lora_transformer(seed=7, std=0.0, layout=layout)
    assert lora.load_lora_file(path, fresh)["trigger_word"] == "sks"
    torch.testing.assert_close(run(fresh, inputs), run(model, inputs), rtol=1e-6, atol=1e-6)


def test_diffusers_file_with_alpha_and_missing_modules(tmp_path, inputs):
    """Other tools' files: an `.alpha` per module, no `transformer.` prefix, not every Linear covered."""
    model = lora_transformer(layout="split")
    state = {k.removeprefix("transformer."): v for k, v in lora.diffusers_state_dict(model, torch.float32).items()
             if "single_transformer_blocks.1." not in k}
    state = {k: v * 2 if k.endswith("lora_B.weight") else v for k, v in state.items()}
    state |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(RANK / 2)
              for k in state if k.endswith("lora_A.weight")}
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other\.safetensors: the LoRAs on the parts of .*set lora_layout to 'split'"):
        lora.load_lora_file(tmp_path / "other.safetensors", lora_transformer())  # separate downs: not one fused LoRA
    fresh = lora_transformer(seed=3, layout="split")
    lora.load_lora_file(tmp_path / "other.safetensors", fresh)
    assert not any(m.lora_B["default"].weight.any() for n, m in fresh.named_modules()
                   if isinstance(m, LoraLayer) and n.startswith("single_transformer_blocks.1."))
    lora.load_lora_state(model, {k: v * 0 if k.startswith("single_transformer_blocks.1.") and ".lora_B." in k else v
                                 for k, v in lora.lora_state(model).items()})
    torch.testing.assert_close(run(fresh, inputs), run(model, inputs), rtol=1e-6, atol=1e-6)


def test_lora_file_errors_name_the_file(tmp_path):
    model = lora_transformer()
    save_file({"lora_te1_x.alpha": torch.tensor(1.0), "foo.bar": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"odd\.safetensors: not a Flux LoRA file"):
        lora.load_lora_file(tmp_path / "odd.safetensors", model)
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(RANK, 32),
               "transformer.proj_out.lora_B.weight": torch.zeros(64, RANK)}, tmp_path / "top.safetensors")
    with pytest.raises(ValueError, match=r"top\.safetensors: LoRA on modules .*proj_out"):
        lora.load_lora_file(tmp_path / "top.safetensors", model)
    with pytest.raises(FileNotFoundError, match="nope"):
        lora.lora_file_rank(tmp_path / "nope.safetensors")


@LAYOUTS
def test_dora_strength_interpolates_between_base_and_full_as_comfyui_does(inputs, layout):
    model = dora_transformer(std=0.002, layout=layout)
    base_model = tiny_transformer()
    if layout == "fused":
        fuse_projections(base_model)
    base = run(base_model, inputs)
    full = run(model, inputs)
    lora.set_lora_strength(model, 0.0)
    assert torch.equal(run(model, inputs), base)
    lora.set_lora_strength(model, 0.5)
    half = run(model, inputs)  # each Linear is interpolated; the network is near-linear in a small change
    assert (half - base - 0.5 * (full - base)).norm() < 0.05 * (full - base).norm()
    lora.set_lora_strength(model, 1.0)
    assert torch.equal(run(model, inputs), full)
