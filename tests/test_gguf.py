"""GGUF bases: a quantized Linear computes what its dequantized weights do (checked against the gguf package's own
numpy dequantization), keeps only the quantized weight for backward, a GGUF Flux file loads as the model it quantizes,
trains to the bf16 run's losses, resumes exactly, and bad GGUF input is named before any step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from diffusers.quantizers.gguf.utils import GGUFParameter
from safetensors.torch import load_file

from trainer_core import lora, models
from trainer_core.config import TrainConfig
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.demo_stack import demo_stack
from trainer_core.models.gguf import GGUFLinear
from trainer_core.tiny import write_gguf_transformer
from trainer_core.trainer import Trainer

Q = GGMLQuantizationType
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# where the fp16 super-block scales sit in each K-quant block (the rest is quants and 6-bit sub-scales)
K_SCALE_BYTES = {Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}


def quantized_blocks(kind: GGMLQuantizationType, out_features: int, in_features: int) -> np.ndarray:
    """Raw blocks of `kind` for an (out, in) weight: the package's quantizer of a random matrix where it has one; for
    the K-quants (which it only dequantizes) random bytes with sane fp16 scales."""
    rng = np.random.default_rng(0)
    if kind not in K_QUANTS:
        return quantize(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.1, kind)
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (out_features * in_features // block, size), dtype=np.uint8)
    start, end = K_SCALE_BYTES[kind]
    scales = (rng.uniform(0.001, 0.01, (raw.shape[0], (end - start) // 2))).astype(np.float16)
    raw[:, start:end] = scales.view(np.uint8)
    return raw.reshape(out_features, -1)


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q5_0, *K_QUANTS], ids=lambda k: k.name)
def test_a_quantized_linear_computes_what_its_dequantized_weights_do(kind):
    raw = quantized_blocks(kind, 64, 256)
    dense = torch.from_numpy(dequantize(raw, kind).astype(np.float32))  # the gguf package's reference
    layer = GGUFLinear(256, 64, bias=True, compute_dtype=torch.float32)
    layer.weight = torch.nn.Parameter(GGUFParameter(torch.from_numpy(raw), quant_type=kind), requires_grad=False)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    # diffusers' kernels dequantize in float16, as ComfyUI-GGUF's do: equal to the reference up to its rounding
    expected = torch.nn.functional.linear(x, dense, layer.bias)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-3 * expected.abs().max().item())
    (grad,) = torch.autograd.grad(y.sum(), x)
    expected = dense.sum(0).expand(3, -1)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-3 * expected.abs().max().item())
    # backward keeps the quantized blocks (1 byte each), never a float copy of the weight
    assert [t.dtype for t in saved if t.numel() == raw.size] == [torch.uint8]


@pytest.fixture(scope="module")
def q8_file(tiny_flux, tmp_path_factory):
    return write_gguf_transformer(tiny_flux.transformer_bf16, tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf")


def test_a_gguf_flux_file_loads_as_the_model_it_quantizes(tiny_flux, q8_file):
    assert models.transformer_config(q8_file) == models.transformer_config(tiny_flux.transformer_bf16)
    quantized = models.load_transformer(q8_file, torch.float32)
    base = models.load_transformer(tiny_flux.transformer_bf16, torch.float32)
    blocks = [m for n, m in quantized.named_modules() if isinstance(m, GGUFLinear)]
    assert len(blocks) == sum(isinstance(m, torch.nn.Linear) for n, m in base.named_modules() if "blocks." in n)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]))
    with torch.no_grad():
        out, ref = quantized(**inputs).sample, base(**inputs).sample
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()  # Q8_0: 8 bits per weight


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_the_lora_file_of_a_gguf_base_is_the_one_stock_comfyui_loads(tiny_flux, q8_file, tmp_path, lora_format):
    """The same LoRA on the GGUF base and on the bf16 base it quantizes writes the same file, which
    tests/comfyui/test_lora_in_comfyui.py shows stock ComfyUI loads with every key used."""
    files = {}
    for name, path in (("gguf", q8_file), ("bf16", tiny_flux.transformer_bf16)):
        transformer = models.load_transformer(path, torch.float32)
        lora.add_lora(transformer, 4, 4.0, generator=torch.Generator().manual_seed(0))
        state = lora.lora_state(transformer)
        lora.load_lora_state(transformer, {k: torch.full_like(v, 0.01) for k, v in state.items()})  # B non-zero
        lora.save_lora_file(tmp_path / f"{name}.safetensors", transformer, {}, lora_format)
        files[name] = load_file(tmp_path / f"{name}.safetensors")
    assert files["gguf"].keys() == files["bf16"].keys()
    assert all(torch.equal(files["gguf"][k], files["bf16"][k]) for k in files["bf16"])


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo's settings for 40 steps on the demo base as bf16 and as Q8_0."""
    folder = tmp_path_factory.mktemp("demo_gguf")
    dataset = write_demo_dataset(folder / "data")
    stack = demo_stack()
    q8 = write_gguf_transformer(stack.transformer_bf16, folder / "flux-demo-Q8_0.gguf")
    config = demo_config(stack, dataset, folder / "out", steps=40)
    return {name: Trainer.from_config(config.replace(transformer_path=str(path)))
            for name, path in (("bf16", stack.transformer_bf16), ("Q8_0", q8))}


def test_a_run_on_a_q8_base_trains_to_the_bf16_runs_losses(demo_runs):
    for trainer in demo_runs.values():
        trainer.train(40)
    bf16, q8 = (np.mean(demo_runs[k].losses) for k in ("bf16", "Q8_0"))
    assert abs(q8 - bf16) < 0.03 * bf16, (bf16, q8)
    # the file is the same LoRA for stock loaders: the same keys and shapes as one trained on the bf16 base
    shapes = [{k: v.shape for k, v in lora.lora_state(t.transformer).items()} for t in demo_runs.values()]
    assert shapes[0] == shapes[1]


def test_a_run_on_a_gguf_base_resumes_bit_identically(tiny_flux, q8_file, tmp_path):
    dataset = write_demo_dataset(tmp_path / "data", count=2, size=64)
    config = demo_config(tiny_flux, dataset, tmp_path / "out", steps=20).replace(
        transformer_path=str(q8_file), resolutions=(64,))
    straight = Trainer.from_config(config)
    straight.train(4)
    resumed = Trainer.from_config(config)
    resumed.train(2)
    state = resumed.snapshot()
    resumed.train(1)
    resumed.restore(state)
    resumed.train(2)
    assert resumed.losses == straight.losses
    for k, v in lora.lora_state(straight.transformer).items():
        assert torch.equal(lora.lora_state(resumed.transformer)[k], v), k


def write_gguf(path, tensors: dict, arch: str = "flux", raw_dtype=None):
    writer = GGUFWriter(str(path), arch)
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype if array.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_input_is_named_before_any_weight_is_read(q8_file, tmp_path):
    truncated = tmp_path / "flux1-dev-Q4_K_S.gguf"
    truncated.write_bytes(q8_file.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"flux1-dev-Q4_K_S.gguf is a truncated or corrupt GGUF file .* download it"):
        models.check_model_file(truncated, "transformer")

    llm = write_gguf(tmp_path / "llama-3-8b-Q8_0.gguf", {"token_embd.weight": np.zeros((8, 32), np.float32),
                                                         "blk.0.attn_q.weight": np.zeros((32, 32), np.float32)},
                     "llama")
    with pytest.raises(ValueError, match=r"appears to be a GGUF file of another model .*, not a Flux transformer"):
        models.check_model_file(llm, "transformer")

    iq2 = np.zeros((32, GGML_QUANT_SIZES[Q.IQ2_XXS][1]), np.uint8)  # one 256-wide block per row
    unsupported = write_gguf(tmp_path / "flux1-dev-IQ2_XXS.gguf", {
        "img_in.weight": np.zeros((32, 64), np.float32), "double_blocks.0.img_attn.qkv.weight": iq2},
        raw_dtype=Q.IQ2_XXS)
    with pytest.raises(ValueError, match=r"quantized as IQ2_XXS, which this trainer cannot read: use a file in"):
        models.check_model_file(unsupported, "transformer")

    renamed = tmp_path / "ae.safetensors"
    renamed.write_bytes(q8_file.read_bytes())  # a GGUF under a .safetensors name, given as the VAE
    with pytest.raises(ValueError, match=r"ae.safetensors appears to be a Flux transformer \(GGUF\), not the Flux VAE"
                                         r".* It belongs in the transformer input"):
        models.check_model_file(renamed, "vae")


def test_dora_on_a_gguf_base_is_refused_by_name(tiny_flux, q8_file, tmp_path):
    config = demo_config(tiny_flux, tmp_path, tmp_path / "out", steps=10).to_dict()
    with pytest.raises(ValueError, match=r"dora .* GGUF"):
        TrainConfig(**{**config, "transformer_path": str(q8_file), "dora": True})
