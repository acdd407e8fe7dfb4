"""LoKr and LoHa (peft's LyCORIS layers), per-block ranks and learning rates, LoRA+: the file ComfyUI loads, strength,
round trips, and training that resumes and continues exactly."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer_core import lora
from trainer_core.checkpoints import load_training_state
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.models import detect_file_kind
from trainer_core.optim import set_learning_rate
from trainer_core.plan import mean_losses
from trainer_core.trainer import Trainer
from tests.test_lora import (  # noqa: F401 (inputs: a fixture)
    ALPHA, RANK, forward, fp8_transformer, inputs, run, tiny_transformer)

NETWORKS = pytest.mark.parametrize("network", ["lokr", "loha"])


def lycoris_transformer(network: str = "lokr", alpha: float = ALPHA, seed: int = 1, **settings):
    """A LoKr / LoHa on the tiny model with every tensor random (peft starts one at zero: a no-op)."""
    model = tiny_transformer()
    lora.add_lora(model, RANK, alpha, network=network, **settings)
    g = torch.Generator().manual_seed(seed)
    lora.load_lora_state(model, {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in lora.lora_state(model).items()})
    return model


def comfyui_delta(keys: dict[str, torch.Tensor]) -> torch.Tensor:
    """comfy/weight_adapter/lokr.py and loha.py at strength 1 on one module's tensors: a LoHa is
    (w1_a @ w1_b) * (w2_a @ w2_b) times alpha / w1_b's rows; a LoKr kron(w1, w2) (each factor full or a @ b) times
    alpha / the decomposed factor's rank, or 1 when both are full or the file has no alpha."""
    k = {name: t.float() for name, t in keys.items()}
    if "hada_w1_a" in k:
        delta, rank = (k["hada_w1_a"] @ k["hada_w1_b"]) * (k["hada_w2_a"] @ k["hada_w2_b"]), k["hada_w1_b"].shape[0]
    else:
        rank = None
        factors = []
        for w in ("w1", "w2"):
            if f"lokr_{w}" in k:
                factors.append(k[f"lokr_{w}"])
            else:
                factors.append(k[f"lokr_{w}_a"] @ k[f"lokr_{w}_b"])
                rank = k[f"lokr_{w}_b"].shape[0]
        delta = torch.kron(*factors)
    return delta * (k["alpha"].item() / rank if "alpha" in k and rank is not None else 1.0)


def file_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules = {}
    for key, tensor in state.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = tensor
    return modules


@NETWORKS
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_file_applied_by_comfyui_rule_equals_peft_delta(network, strength):
    model = lycoris_transformer(network, blocks="double:1,single:0")
    lora.set_lora_strength(model, strength)
    modules = file_modules(lora.kohya_state_dict(model, dtype=torch.float32))
    groups = dict(lora._kohya_groups(model))
    layers = lora._lora_layers(model)
    assert modules.keys() == {k for k, (m,) in groups.items() if m in layers}
    assert "lora_unet_double_blocks_1_img_attn_qkv" in modules and "lora_unet_single_blocks_0_linear1" in modules
    if network == "lokr":  # both of ComfyUI's rules are exercised: a decomposed w2, and both factors full
        assert any("lokr_w2_b" in m for m in modules.values()) and any("lokr_w2" in m for m in modules.values())
    for key, keys in modules.items():
        (module,) = groups[key]
        torch.testing.assert_close(strength * comfyui_delta(keys), layers[module].get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-7, msg=key)


def test_lokr_applies_its_update_as_peft_builds_it_with_the_same_gradients():
    """`KroneckerLinear` (w1 @ X @ w2^T) against peft's own path (x @ kron(w1, w2)^T), on layers with a full and a
    decomposed w2, at strength 0.5: the output, and the gradients of the input and of every LoKr tensor."""
    model = lycoris_transformer("lokr")
    lora.set_lora_strength(model, 0.5)
    layers = lora._lora_layers(model)
    assert all(type(layer) is lora.lycoris.KroneckerLinear for layer in layers.values())
    assert any("default" in layer.lokr_w2 for layer in layers.values())
    assert any("default" in layer.lokr_w2_b for layer in layers.values())
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        x = torch.randn(2, 5, layer.in_features, generator=g, requires_grad=True)
        params = [x, *lora.lycoris.tensors(layer).values()]
        ours = layer._get_delta_activations("default", x)
        ours_grads = torch.autograd.grad(ours.square().sum(), params)
        peft = super(lora.lycoris.KroneckerLinear, layer)._get_delta_activations("default", x)
        peft_grads = torch.autograd.grad(peft.square().sum(), params)
        torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-6, msg=name)
        for ours_grad, peft_grad in zip(ours_grads, peft_grads):
            torch.testing.assert_close(ours_grad, peft_grad, rtol=1e-4, atol=1e-5, msg=name)


@NETWORKS
def test_lycoris_layers_return_the_base_layers_dtype_under_autocast_as_a_lora_does(network):
    """After a LayerNorm, autocast hands a Linear float32: peft's LoKr / LoHa return that dtype, so the rest of the
    block would compute and keep float32 activations; ours return the base layer's bf16, the same numbers."""
    layers = lora._lora_layers(lycoris_transformer(network))
    peft_class = {"lokr": lora.lycoris.LoKrLinear, "loha": lora.lycoris.LoHaLinear}[network]
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        assert isinstance(layer, lora.lycoris.BaseDtypeOut) and isinstance(layer, peft_class), name
        x = torch.randn(2, 5, layer.in_features, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, peft, base = layer(x), peft_class.forward(layer, x), layer.base_layer(x)
        assert ours.dtype == base.dtype == torch.bfloat16 and peft.dtype == torch.float32, name
        assert torch.equal(ours.float(), peft), name
        assert not torch.equal(ours, base), name  # the update is in it


@NETWORKS
def test_strength_zero_is_the_base_exactly_and_scales_the_effect(inputs, network):
    model = lycoris_transformer(network)
    full = forward(model, inputs)
    lora.set_lora_strength(model, 0.0)
    at_zero = forward(model, inputs)
    base = tiny_transformer()
    lora.add_lora(base, RANK, ALPHA, network=network)  # a fresh one is a no-op: one factor starts at zero
    assert torch.equal(at_zero, forward(base, inputs))
    assert not torch.equal(full, at_zero)
    lora.set_lora_strength(model, 1.0)
    assert torch.equal(forward(model, inputs), full)


@NETWORKS
def test_trains_on_an_fp8_storage_base(inputs, network):
    model = fp8_transformer()
    base = run(model, inputs, torch.bfloat16)
    lora.add_lora(model, RANK, ALPHA, network=network)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.lora_parameters(model))
    assert torch.equal(run(model, inputs, torch.bfloat16), base)  # one factor starts at zero
    forward(model, inputs, torch.bfloat16).square().mean().backward()
    grads = {k: p.grad for k, p in lora.lora_parameters_by_name(model).items()}
    zero_start = "lokr_w1" if network == "lokr" else "hada_w2_b"  # the only ones a zero factor lets learn at first
    assert all(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.endswith(zero_start))


@NETWORKS
@pytest.mark.parametrize("alpha", [float(RANK), ALPHA])
def test_file_round_trip(tmp_path, inputs, network, alpha):
    """alpha = rank: the adapter takes exactly the file's tensors. Otherwise a LoKr's full factors carry the scale in
    the file (ComfyUI applies none there), so loading divides it out again: equal up to float rounding."""
    model = lycoris_transformer(network, alpha=alpha)
    path = tmp_path / "lycoris.safetensors"
    lora.save_lora_file(path, model, {"ss_network_dim": str(RANK)})
    other = tiny_transformer()
    lora.add_lora(other, RANK, alpha, network=network)
    lora.load_lora_file(path, other)
    if alpha == RANK:
        rounded = {k: v.bfloat16().float() for k, v in lora.lora_state(model).items()}
        assert all(torch.equal(v, rounded[k]) for k, v in lora.lora_state(other).items())
    else:
        torch.testing.assert_close(forward(other, inputs), forward(model, inputs), rtol=2e-2, atol=2e-3)
        model_layers, other_layers = lora._lora_layers(model), lora._lora_layers(other)
        for name, layer in other_layers.items():
            want = model_layers[name].get_delta_weight("default")
            torch.testing.assert_close(layer.get_delta_weight("default"), want, rtol=2e-2, atol=1e-3, msg=name)
    assert lora.lora_file_rank(path) == RANK
    assert detect_file_kind(path) == "lora"  # a model widget given it says so


@NETWORKS
def test_wrong_files_and_settings_are_refused_by_name(tmp_path, network):
    model = lycoris_transformer(network)
    path = tmp_path / "lycoris.safetensors"
    lora.save_lora_file(path, model, {})
    plain = tiny_transformer()
    lora.add_lora(plain, RANK, ALPHA)
    with pytest.raises(ValueError, match=f"is a {network} file.*set network to {network}"):
        lora.load_lora_file(path, plain)
    wider = tiny_transformer()
    lora.add_lora(wider, 2, ALPHA, network=network)
    with pytest.raises(ValueError, match=f"{path}.*set rank"):
        lora.load_lora_file(path, wider)
    with pytest.raises(ValueError, match="lora_format: diffusers has no"):
        lora.save_lora_file(tmp_path / "d.safetensors", model, {}, "diffusers")
    bad = {k: v for k, v in load_file(path).items()} | {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight":
                                                         torch.zeros(1)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="lora_up.weight is not a"):
        lora.load_lora_file(tmp_path / "bad.safetensors", model)
    with pytest.raises(ValueError, match="network lokr: needs lora_layout fused"):
        lora.add_lora(tiny_transformer(), RANK, ALPHA, network="lokr", layout="split")


@pytest.mark.parametrize("changes, field", [
    (dict(network="lokr", dora=True), "dora: peft's LoKr has no DoRA"),
    (dict(network="loha", lora_layout="split"), "lora_layout: 'split' with network loha"),
    (dict(network="lokr", lora_format="diffusers"), "lora_format: diffusers has no LoKr"),
    (dict(network="loha", lora_dropout=0.1), "lora_dropout: peft's LoHa"),
    (dict(network="lokr", loraplus_lr_ratio=16.0), "loraplus_lr_ratio: LoRA\\+"),
    (dict(network="boft"), "network: 'boft'"),
    (dict(network="lokr", transformer_path="flux-Q8_0.gguf"), "network lokr cannot train on a GGUF base"),
    (dict(lokr_factor=0), "lokr_factor: 0"),
    (dict(loraplus_lr_ratio=0.0), "loraplus_lr_ratio: 0.0"),
])
def test_config_refuses_what_a_network_cannot_do(tiny_flux, tmp_path, changes, field):
    config = demo_config(tiny_flux, tmp_path, tmp_path / "out", steps=10)
    with pytest.raises(ValueError, match=field):
        config.replace(**changes)


@pytest.mark.parametrize("network", ["lora", "loha"])
def test_block_ranks_show_in_the_file_shapes_and_load_back(tmp_path, network):
    settings = dict(network=network, block_ranks="double:1=2,single=8,single:1=3")
    model = lycoris_transformer(**settings) if network != "lora" else tiny_transformer()
    if network == "lora":
        lora.add_lora(model, RANK, ALPHA, **settings)
    state = lora.kohya_state_dict(model, dtype=torch.float32)
    lora.save_lora_file(tmp_path / "blocks.safetensors", model, {})
    other = tiny_transformer()
    lora.add_lora(other, RANK, ALPHA, **settings)
    lora.load_lora_file(tmp_path / "blocks.safetensors", other)
    rounded = {k: v.bfloat16().float() for k, v in lora.lora_state(model).items()}
    assert all(torch.equal(v, rounded[k]) for k, v in lora.lora_state(other).items())
    down = "lora_down.weight" if network == "lora" else "hada_w1_b"
    rank = {k.split(".")[0]: v.shape[0] for k, v in state.items() if k.endswith(down)}
    assert rank["lora_unet_double_blocks_0_img_attn_proj"] == RANK
    assert rank["lora_unet_double_blocks_1_img_attn_proj"] == 2
    assert rank["lora_unet_single_blocks_0_linear2"] == 8 and rank["lora_unet_single_blocks_1_linear2"] == 3
    # alpha is one number for every module, as kohya's: each module's file alpha is it
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {ALPHA}


@pytest.mark.parametrize("text, message", [
    ("double:0-5=4", "block_ranks: cannot read 'double:0-5=4' .*outside the model's 2 double blocks"),
    ("double=four", "block_ranks: cannot read 'double=four' .*not a whole number"),
    ("double:1", "block_ranks: cannot read 'double:1' .*no '=value'"),
    ("middle=4", "block_ranks: cannot read 'middle=4'"),
])
def test_block_range_errors_name_the_field_and_the_bad_part(text, message):
    with pytest.raises(ValueError, match=message):
        lora.add_lora(tiny_transformer(), RANK, ALPHA, block_ranks=text)
    with pytest.raises(ValueError, match=message.replace("block_ranks", "block_lrs").replace("whole number",
                                                                                             "positive number")
                       if "four" in text else message.replace("block_ranks", "block_lrs")):
        model = tiny_transformer()
        lora.add_lora(model, RANK, ALPHA)
        lora.optimizer_groups(model, text, 1e-4)


def test_block_lrs_and_loraplus_make_the_optimizer_groups():
    model = tiny_transformer()
    lora.add_lora(model, RANK, ALPHA)
    params = lora.lora_parameters_by_name(model)
    one = lora.optimizer_groups(model, "", 1e-4)
    assert len(one) == 1 and one[0]["params"] == list(params.values())  # as before these settings
    groups = lora.optimizer_groups(model, "double:1=2e-4,single=5e-5", 1e-4, loraplus_lr_ratio=16.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    set_learning_rate(optimizer, 1e-4)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in params.items():
        block = 2e-4 if name.startswith("transformer_blocks.1.") else 5e-5 if name.startswith("single_") else 1e-4
        assert lr_of[id(param)] == pytest.approx(block * (16.0 if ".lora_B." in name else 1.0)), name


def test_train_modulation_off_leaves_the_modulation_alone():
    model = tiny_transformer()
    lora.add_lora(model, RANK, ALPHA, network="loha", include_modulation=False)
    names = lora._lora_layers(model).keys()
    assert names and not [n for n in names if "norm" in n]


# --------------------------------------------------------------------------------------------- in a run
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=2, size=64)


def make_trainer(tiny_flux, dataset, tmp_path, **changes):
    config = demo_config(tiny_flux, dataset, tmp_path / "out", steps=100).replace(
        resolutions=(64,), **(dict(rank=RANK, alpha=float(RANK)) | changes))
    return Trainer.from_config(config)


@NETWORKS
def test_each_network_trains(tiny_flux, dataset, tmp_path, network):
    """The overfit check of tests/test_training.py: the same noise every step, so the adapter can memorise. LoKr and
    LoHa take a higher rate than a LoRA (3e-3 there), as LyCORIS advises."""
    trainer = make_trainer(tiny_flux, dataset, tmp_path, network=network, learning_rate=2e-2, lr_schedule="constant",
                           warmup_steps=0)
    trainer.train(80, on_step=lambda info: trainer.generator.manual_seed(0))
    first, last = mean_losses(trainer.losses)
    assert last < 0.6 * first, (first, last)


@NETWORKS
def test_resumes_bit_identically_and_continues_from_its_own_file(tiny_flux, dataset, tmp_path, network):
    settings = dict(network=network, block_ranks="single:1=2", block_lrs="double=2e-3", train_modulation=False)
    straight = make_trainer(tiny_flux, dataset, tmp_path, **settings)
    straight.train(4)
    first = make_trainer(tiny_flux, dataset, tmp_path, **settings)
    first.train(2)
    path = first.save_state(tmp_path / "s.state.safetensors")
    state = load_training_state(path)[0]
    with pytest.raises(ValueError, match="block_lrs double=1e-3 \\(state: double=2e-3\\)"):
        make_trainer(tiny_flux, dataset, tmp_path, **(settings | dict(block_lrs="double=1e-3"))).restore(state)
    resumed = make_trainer(tiny_flux, dataset, tmp_path, **settings)
    resumed.restore(state)
    resumed.train(2)
    assert resumed.losses == straight.losses
    want = lora.lora_state(straight.transformer)
    assert all(torch.equal(v, want[k]) for k, v in lora.lora_state(resumed.transformer).items())
    assert len(resumed.optimizer.param_groups) == 2

    file = straight.save_lora(tmp_path / "own.safetensors")
    header = load_file(file)
    assert any(k.endswith("lokr_w1" if network == "lokr" else "hada_w1_a") for k in header)
    continued = make_trainer(tiny_flux, dataset, tmp_path, **settings, init_lora=str(file))
    rounded = {k: v.bfloat16().float() for k, v in want.items()}
    assert all(torch.equal(v, rounded[k]) for k, v in lora.lora_state(continued.transformer).items())
    continued.train(1)
    metadata = continued.lora_metadata()
    assert metadata["network"] == network and metadata["ss_network_module"] == "lycoris.kohya"
    assert metadata["block_ranks"] == "single:1=2" and metadata["block_lrs"] == "double=2e-3"
    assert f'"algo": "{network}"' in metadata["ss_network_args"]


@pytest.mark.parametrize("network", ["lora", "lokr", "loha"])
def test_the_settings_check_counts_the_networks_parameters(tiny_flux, network):
    """What preflight and the CLI's free-space projection count: the adapter of these settings on this base."""
    from trainer_core.models import load_transformer, transformer_config

    settings = dict(network=network, block_ranks="single:1=2")
    count = lora.check_lora_settings(transformer_config(tiny_flux.transformer_bf16), RANK, ALPHA, **settings)
    real = load_transformer(tiny_flux.transformer_bf16, dtype=torch.float32)
    lora.add_lora(real, RANK, ALPHA, **settings)
    assert count == sum(p.numel() for p in lora.lora_parameters(real))


@NETWORKS
def test_strength_in_the_xy_grid_on_a_validation_base(tiny_flux, dataset, tmp_path, network):
    """The grid's cells (ValidationSample renders the same way): strength 0 of the trained adapter is the base image
    exactly, as is strength 1 of the fresh one (a factor starts at zero); on a validation base it is added with the
    run's own settings."""
    import numpy as np

    from trainer_core.validation import strength_cells

    trainer = make_trainer(tiny_flux, dataset, tmp_path, network=network, learning_rate=1e-2,
                           validation_transformer_path=str(tiny_flux.transformer_fp8))
    fresh = trainer.snapshot().lora
    trainer.train(2)
    own = lora.lora_state(trainer.transformer)
    cells = strength_cells(trainer, [(0, fresh), (2, own)], [0.0, 1.0], "fltglyph",
                           base_path=str(tiny_flux.transformer_fp8), steps=2, width=64, height=64)
    pixels = [[np.asarray(image) for image in row] for row in cells]
    assert np.array_equal(pixels[1][0], pixels[0][1]) and np.array_equal(pixels[1][0], pixels[0][0])
    assert not np.array_equal(pixels[1][1], pixels[1][0])


def test_a_planned_run_writes_its_checkpoints_and_ema_as_lokr_files(tiny_flux, dataset, tmp_path):
    """The run store's checkpoint writer (`TrainingRun.save_checkpoint`): the LoRA and its EMA of each checkpoint in
    the network's LyCORIS keys, each the adapter's state of that step."""
    from trainer_core.plan import RunPlan, execute

    trainer = make_trainer(tiny_flux, dataset, tmp_path, network="lokr", ema_decay=0.5, total_steps=4)
    result = execute(trainer, RunPlan(steps=4, save_every=2, save_state=False))
    assert len(result.loras) == len(result.ema_loras) == 2
    for path, state in ((result.loras[-1], lora.lora_state(trainer.transformer)), (result.ema_loras[-1],
                                                                                  trainer.ema.state())):
        assert all(".lokr_" in k or k.endswith(".alpha") for k in load_file(path))
        model = make_trainer(tiny_flux, dataset, tmp_path, network="lokr", init_lora=str(path)).transformer
        rounded = {k: v.bfloat16().float() for k, v in state.items()}
        assert all(torch.equal(v, rounded[k]) for k, v in lora.lora_state(model).items()), path
