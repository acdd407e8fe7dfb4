"""The VRAM projection (bench/memory.py): its saved-bytes counter, the meta-device stand-in for a CUDA step, the
arithmetic, and the memory presets it checks (trainer_core/presets.py)."""
import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench import memory
from trainer_core import lora
from trainer_core.block_swap import BlockSwap
from trainer_core.config import TrainConfig
from trainer_core.optim import make_optimizer
from trainer_core.presets import BASE_FORMATS, PRESETS, split_blocks_to_swap

# the width diffusers' own Flux tests use: 2 heads of 16
TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 32, "in_channels": 16, "axes_dims_rope": [4, 6, 6],
        "guidance_embeds": True}
PATHS = {name: "unused" for name in ("transformer_path", "vae_path", "clip_path", "t5_path", "dataset_dir")}


# ---------------------------------------------------------------------------------------- the saved-bytes counter
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_saved_bytes_of_a_linear_and_gelu_match_the_hand_count(device):
    linear = nn.Linear(5, 7, device=device)
    x = torch.randn(2, 3, 5, device=device, requires_grad=True)
    # Linear keeps its input (as a (6, 5) view) for its weight's gradient; GELU keeps its (2, 3, 7) input
    activations = (2 * 3 * 5 + 2 * 3 * 7) * 4
    assert memory.saved_bytes(lambda: F.gelu(linear(x)), exclude=linear.parameters()) == activations
    # Linear also keeps its weight, for the input's gradient
    assert memory.saved_bytes(lambda: F.gelu(linear(x))) == activations + 7 * 5 * 4


def test_views_of_one_storage_count_once():
    x = torch.randn(4, 6, requires_grad=True)
    assert memory.saved_bytes(lambda: x[1:] * x[:-1]) == x.numel() * 4  # mul keeps both operands: two views of x


def test_a_checkpointed_function_keeps_only_its_inputs():
    linear = nn.Linear(5, 7)
    x = torch.randn(2, 3, 5, requires_grad=True)
    run = partial(checkpoint, lambda t: F.gelu(linear(t)), x, use_reentrant=False)
    assert memory.saved_bytes(run, exclude=linear.parameters()) == x.numel() * 4


# ---------------------------------------------------------------------------------------- meta standing in for CUDA
def test_on_meta_attention_keeps_what_flash_attention_keeps():
    q, k, v = (torch.empty(1, 2, 1024, 16, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    attention = partial(F.scaled_dot_product_attention, q, k, v)
    with memory.CudaLikeMeta(autocast=None):
        flash = memory.saved_bytes(attention)
    qkv_out_lse = 4 * q.numel() * 2 + 2 * 1024 * 4  # q, k, v, output in bf16; a (B, H, N) fp32 logsumexp
    assert qkv_out_lse <= flash <= qkv_out_lse + 64  # + the kernel's RNG seed and offset
    assert memory.saved_bytes(attention) > 2 * 1024 * 1024 * 4  # plain meta keeps the (N, N) attention matrix


def test_emulated_autocast_keeps_what_cpu_autocast_keeps_for_a_lora_linear():
    def lora_down(device: str) -> int:  # fp32 LoRA weight on a bf16 activation, as the trainer runs it
        weight = torch.randn(16, 64, device=device, requires_grad=True)
        x = torch.randn(2, 8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        return memory.saved_bytes(lambda: F.linear(x.float(), weight), exclude=[weight])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu = lora_down("cpu")
    with memory.CudaLikeMeta():
        meta = lora_down("meta")
    assert meta == cpu == (2 * 8 * 64 + 16 * 64) * 2  # bf16 copies of the input and of the weight


def test_emulated_autocast_runs_norms_in_fp32_and_linears_in_bf16():
    x = torch.empty(2, 8, 64, device="meta", dtype=torch.bfloat16)
    with memory.CudaLikeMeta():
        assert F.layer_norm(x, (64,)).dtype == torch.float32
        assert F.rms_norm(x, (64,)).dtype == torch.float32
        assert F.linear(x.float(), torch.empty(3, 64, device="meta")).dtype == torch.bfloat16


def test_meta_measurement_matches_real_cpu_tensors():
    cpu = memory.measure_activations(memory.lora_flux(TINY, False, "fp32", device="cpu"), resolution=64)
    with memory.CudaLikeMeta(autocast=None):
        meta = memory.measure_activations(memory.lora_flux(TINY, False, "fp32"), resolution=64)
    # Meta keeps a little more, as CUDA does: layer norm's mean and rstd in fp32, not bf16 (4 bytes per normalized
    # row; at most two norms per token), and flash attention's RNG state. Its math attention would keep ~50% more.
    assert cpu.double_inputs == cpu.single_inputs == cpu.tokens * 32 * 2  # checkpointed: (B, tokens, 32) bf16 inputs
    allowance = 4 * 2 * cpu.tokens + 64
    for field in ("double", "single", "double_inputs", "single_inputs", "head", "shared", "batch"):
        assert getattr(cpu, field) <= getattr(meta, field) <= getattr(cpu, field) + allowance, field


def test_lora_goes_on_every_block_linear_and_only_lora_trains():
    model = memory.lora_flux(TINY, fp8_base=True, lora_dtype="fp32")  # asserts it covered every block Linear
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    assert not isinstance(model.proj_out, LoraLayer)
    assert model.transformer_blocks[0].attn.to_qkv.base_layer.weight.dtype == torch.float8_e4m3fn  # fused layout


# ---------------------------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "prodigy"])
def test_optimizer_state_matches_the_trainers_optimizer(optimizer):
    model = memory.lora_flux(TINY, False, "fp32", device="cpu")
    sizes = memory.count_sizes(memory.meta_flux(TINY), model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, TrainConfig(**PATHS, optimizer=optimizer), torch.device("cpu"))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim)
    weights_and_grads = 2 * 4 * sum(p.numel() for p in params)
    # Prodigy keeps no starting copy of an all-zero tensor (LoRA B at init); the projection counts one: an upper bound
    unkept = 4 * sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n) if optimizer == "prodigy" else 0
    assert memory.training_state_bytes(sizes, optimizer, "fp32") == weights_and_grads + state + unkept


@pytest.mark.parametrize("network", ["lora", "lokr", "loha"])
def test_the_adapter_counted_is_the_networks(network):
    """One block of each kind scaled to the model's blocks: the count the trainer's settings check makes."""
    sizes = memory.count_sizes(memory.meta_flux(TINY), memory.lora_flux(TINY, False, "fp32", network=network))
    assert sizes.lora == lora.check_lora_settings(TINY, memory.LORA_RANK, memory.LORA_RANK, network=network)


@pytest.fixture(scope="module")
def flux_dev() -> memory.Bench:
    return memory.Bench(memory.flux_dev_config())


def test_flux_dev_and_its_lora_are_counted(flux_dev):
    sizes = flux_dev.sizes
    assert (sizes.num_double, sizes.num_single) == (19, 38)
    assert round(sizes.params / 1e9, 2) == 11.90  # the published count
    assert 76e6 < sizes.lora < 77e6  # rank 16 on every block Linear, fused q,k,v / linear1 (85.9 M split)


def test_fp8_nearly_halves_the_weights_and_a_q4_base_quarters_them(flux_dev):
    bf16, fp8, q4 = (memory.resident_weight_bytes(flux_dev.sizes, BASE_FORMATS[base], blocks_to_swap=0)
                     for base in ("bf16", "fp8", "Q4_K"))
    assert bf16 == 2 * flux_dev.sizes.params
    assert 0.5 < fp8 / bf16 < 0.51  # only biases, norms, embedders and the output layer stay bf16
    assert 0.28 < q4 / bf16 < 0.29  # 4.5 bits per block weight


def test_swapping_blocks_moves_their_weights_off_the_gpu(flux_dev):
    sizes = flux_dev.sizes
    resident = {n: memory.resident_weight_bytes(sizes, 1.0, n) for n in (0, 2, 3, 20, 38, 46, 57)}
    assert resident[0] == resident[2]  # both swapped blocks are in flight at once
    assert resident[2] > resident[3] > resident[20] > resident[38] > resident[46] > resident[57]
    double, single = memory.weight_bytes(*sizes.double, 1.0), memory.weight_bytes(*sizes.single, 1.0)
    assert resident[0] - resident[20] == 18 * single  # 20 single blocks swapped, 2 in flight
    assert resident[0] - resident[46] == 38 * single + 6 * double  # + 8 double, 2 of them in flight


def test_resolution_costs_memory_and_checkpointing_saves_it(flux_dev):
    preset = PRESETS["24GB"]
    low, high = (flux_dev.project(dataclasses.replace(preset, resolution=r)) for r in (512, 1024))
    assert low.activations < high.activations and low.peak < high.peak and low.weights == high.weights
    kept_all = flux_dev.project(dataclasses.replace(preset, resolution=1024, gradient_checkpointing=False))
    assert kept_all.activations > 5 * high.activations


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fits_its_card_with_headroom(flux_dev, name):
    projection = flux_dev.project(PRESETS[name])
    assert projection.fits, f"{name}: {projection.peak / memory.GIB:.1f} GiB on a {projection.card_gib:g} GiB card"


def test_every_preset_fits_its_card_for_a_lokr_as_it_is():
    """A LoKr keeps for backward its Linears' inputs and no product: the presets' partial checkpointing holds."""
    bench = memory.Bench(memory.flux_dev_config(), "lokr")
    for name, preset in PRESETS.items():
        assert preset.for_network("lokr") == preset
        projection = bench.project(preset)
        assert projection.fits, f"{name}: {projection.peak / memory.GIB:.1f} GiB on a {projection.card_gib:g} GiB card"


def test_every_preset_fits_its_card_for_a_loha_with_every_block_checkpointed():
    """peft's LoHa keeps each Linear's whole update for backward: the presets checkpoint every block for it."""
    bench = memory.Bench(memory.flux_dev_config(), "loha")
    for name, preset in PRESETS.items():
        projection = bench.project(preset.for_network("loha"))
        assert projection.fits, f"{name}: {projection.peak / memory.GIB:.1f} GiB on a {projection.card_gib:g} GiB card"
    assert not all(bench.project(preset).fits for preset in PRESETS.values())  # the LoRA's partial checkpointing


def test_partial_checkpointing_projects_between_none_and_all(flux_dev):
    act, sizes = flux_dev.activations(512, 1, True, "fp32"), flux_dev.sizes
    by_count = [memory.activation_bytes(act, sizes, n) for n in range(58)]
    assert by_count[0] == memory.activation_bytes(act, sizes, False)
    assert by_count[57] == memory.activation_bytes(act, sizes, True) == memory.activation_bytes(act, sizes, -1)
    assert all(a > b for a, b in zip(by_count[1:], by_count[2:]))  # each more checkpointed block saves memory
    assert by_count[1] < by_count[0] + act.single  # the first one costs at most its own recompute


@pytest.mark.parametrize("name", ["24GB", "12GB", "8GB"])
def test_presets_checkpoint_the_blocks_the_projection_picks(flux_dev, name):
    assert memory.pick_checkpoint_blocks(PRESETS[name], flux_dev) == PRESETS[name].checkpoint_blocks


def test_live_bytes_counts_what_is_alive_at_once():
    def chain(keep: list):
        y = torch.ones(1000, device="meta") * 2  # the ones die once the product exists: 2 tensors at most
        keep.append(y + 1)

    assert memory.working_set(lambda: chain([])) == 2 * 4000
    assert memory.working_set(lambda: [torch.ones(1000, device="meta") for _ in range(3)]) == 3 * 4000


@pytest.fixture(scope="module")
def encoders() -> memory.EncoderSizes:
    return memory.measure_encoders(memory.flux_dev_config(), sorted({p.resolution for p in PRESETS.values()}))


def test_encoder_sizes_are_the_real_models(encoders):
    assert 8.8 < encoders.t5 / memory.GIB < 8.9  # T5-XXL encoder: 4.76 B parameters in bf16
    assert 0.55 < encoders.t5_fp8 / encoders.t5 < 0.65  # fp8 but `wo`
    assert encoders.vae_decode[1024] > 3 * encoders.vae_decode[512]  # the decoder's working set grows with pixels


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_phase_of_every_preset_fits_the_card_and_a_32_gb_pc(flux_dev, encoders, name):
    projected = memory.phases(PRESETS[name], flux_dev, encoders)
    assert [p.name.removesuffix(" (CPU)") for p in projected] == [
        "cache: T5", "cache: CLIP", "cache: VAE", "load base", "train", "sample", "sample other base", "XY grid",
        "new prompt"]
    for p in projected:
        assert p.headroom >= memory.HEADROOM, f"{name} {p.name}: {p.peak / memory.GIB:.1f} GiB of {p.card_gib:g}"
        assert p.host <= memory.HOST_LIMIT, f"{name} {p.name}: {p.host / memory.GIB:.1f} GiB of RAM"


@pytest.mark.parametrize("name", ["16GB", "12GB", "8GB"])
def test_on_a_quantized_base_a_preset_swaps_what_the_projection_picks_and_fits_every_phase(flux_dev, encoders, name):
    preset = PRESETS[name]
    for base, count in preset.swap_for_base:
        variant = preset.for_base(base)
        assert variant.blocks_to_swap == count == memory.pick_blocks_to_swap(
            dataclasses.replace(preset, base_format=base), flux_dev, encoders, memory.PICK_HEADROOM), base
        assert all(p.headroom >= memory.HEADROOM for p in memory.phases(variant, flux_dev, encoders)), base
    assert dict(preset.swap_for_base)["Q4_K"] < preset.blocks_to_swap  # what a 4-bit base buys
    assert preset.for_base("Q6_K").blocks_to_swap == preset.blocks_to_swap  # unlisted: the fp8 count, also safe


def test_a_q4_base_swaps_fewer_blocks_than_fp8_on_8_gb_at_1024_px(flux_dev):
    encoders = memory.measure_encoders(memory.flux_dev_config(), (1024,))
    picks = memory.quantized_bases(flux_dev, encoders, (1024,))[("8GB", 1024)]
    assert picks["Q4_K"] < picks["fp8"] <= picks["Q8_0"], picks


def test_t5_in_bf16_would_not_fit_the_small_cards(flux_dev, encoders):
    """Why caching holds one model at a time with T5 in fp8 (or on the CPU for 8 GB)."""
    for name in ("12GB", "8GB"):
        bf16 = memory.phases(dataclasses.replace(PRESETS[name], fp8_base=False, t5_on_cpu=False), flux_dev, encoders)
        assert bf16[0].headroom < memory.HEADROOM
    on_card = memory.phases(dataclasses.replace(PRESETS["8GB"], t5_on_cpu=False), flux_dev, encoders)
    assert on_card[0].headroom < memory.HEADROOM


# ---------------------------------------------------------------------------------------- the presets
@pytest.mark.parametrize("blocks_to_swap", range(6))
def test_blocks_to_swap_are_counted_as_block_swap_swaps_them(blocks_to_swap):
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({**TINY, "num_layers": 2, "num_single_layers": 3})
    swapped = BlockSwap(model, blocks_to_swap, torch.device("cpu")).blocks
    double = sum(block in model.transformer_blocks for block in swapped)
    assert split_blocks_to_swap(blocks_to_swap, num_double=2, num_single=3) == (double, len(swapped) - double)


def test_blocks_to_swap_beyond_the_model_is_refused():
    assert split_blocks_to_swap(57) == (19, 38)
    with pytest.raises(ValueError, match=r"blocks_to_swap: 58; use 0 \(no swap\) to 57"):
        split_blocks_to_swap(58)


def test_preset_settings_are_train_config_fields():
    for preset in PRESETS.values():
        config = TrainConfig(**PATHS, **preset.train_settings())
        assert (config.blocks_to_swap, config.resolutions) == (preset.blocks_to_swap, (preset.resolution,))


def test_a_preset_with_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        dataclasses.replace(PRESETS["24GB"], optimizer="sgd")
