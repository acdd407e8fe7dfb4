"""Model loading from the files users have, proven on the tiny stack written in the very same layouts."""
import json
import shutil
import weakref

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from trainer_core import models, tiny
from trainer_core.models import files
from trainer_core.flow_matching import image_ids, text_ids


def transformer_inputs(batch=2, dtype=torch.float32, guidance=True, seed=0) -> dict:
    """Random inputs for the tiny transformer: 4x4 packed latent tokens, 8 text tokens."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(batch, 16, 64, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, 8, 32, generator=g, dtype=dtype),
        pooled_projections=torch.randn(batch, 32, generator=g, dtype=dtype),
        timestep=torch.rand(batch, generator=g, dtype=dtype),
        img_ids=image_ids(8, 8),
        txt_ids=text_ids(8),
    )
    return inputs | ({"guidance": torch.full((batch,), 3.5, dtype=dtype)} if guidance else {})


@torch.no_grad()
def run(model, inputs: dict | None = None) -> torch.Tensor:
    return model(**(inputs or transformer_inputs())).sample


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def real_size_state_dict(config_name: str, **changes) -> dict[str, torch.Tensor]:
    """Meta tensors in the shapes of the real model the shipped config describes: shapes at no memory cost."""
    config = models.shipped_config(config_name) | changes
    with init_empty_weights():
        return FluxTransformer2DModel.from_config(config).state_dict()


# ------------------------------------------------------------------------------------------------ the tiny stack


def test_tiny_stack_is_written_in_the_users_layouts(tiny_flux):
    kinds = {tiny_flux.transformer_bf16: "flux_transformer", tiny_flux.transformer_fp8: "flux_transformer",
             tiny_flux.vae: "flux_vae", tiny_flux.clip_l: "clip", tiny_flux.t5: "t5"}  # fmt: skip
    assert {path: models.detect_file_kind(path) for path in kinds} == kinds
    with safe_open(tiny_flux.transformer_bf16, "pt") as f:
        assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in f.keys()
        assert f.get_tensor("model.diffusion_model.img_in.weight").dtype == torch.bfloat16
    with safe_open(tiny_flux.transformer_fp8, "pt") as f:
        assert f.get_tensor("single_blocks.1.linear1.weight").dtype == torch.float8_e4m3fn
    assert (tiny_flux.transformer_diffusers / "config.json").exists()
    assert (tiny_flux.tokenizers / "clip" / "merges.txt").exists()
    assert (tiny_flux.tokenizers / "t5" / "tokenizer.json").exists()
    transformer = models.load_transformer(tiny_flux.transformer_bf16)
    assert 80_000 < sum(p.numel() for p in transformer.parameters()) < 200_000


def test_tiny_stack_is_deterministic_and_reused(tiny_flux, tmp_path):
    again = tiny.write_tiny_flux(tmp_path / "same")
    other = tiny.write_tiny_flux(tmp_path / "other", seed=1)
    first = load_file(tiny_flux.transformer_bf16)
    assert all(torch.equal(v, load_file(again.transformer_bf16)[k]) for k, v in first.items())
    assert (again.tokenizers / "clip" / "vocab.json").read_text() == (
        tiny_flux.tokenizers / "clip" / "vocab.json").read_text()  # fmt: skip
    assert not torch.equal(first["model.diffusion_model.img_in.weight"],
                           load_file(other.transformer_bf16)["model.diffusion_model.img_in.weight"])  # fmt: skip
    before = again.transformer_bf16.stat().st_mtime_ns
    assert tiny.write_tiny_flux(tmp_path / "same") == again
    assert again.transformer_bf16.stat().st_mtime_ns == before  # reused, not rewritten


def test_tiny_outputs_are_finite_and_not_degenerate(tiny_flux):
    out = run(models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.float32))
    assert torch.isfinite(out).all() and 0.1 < out.std() < 10
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # different inputs, different outputs


# ------------------------------------------------------------------------------------------------ transformer


def test_bf16_file_diffusers_folder_and_fp8_file_give_the_same_outputs(tiny_flux):
    reference = run(models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.float32))
    assert torch.equal(run(models.load_transformer(tiny_flux.transformer_diffusers, dtype=torch.float32)), reference)
    fp8 = run(models.load_transformer(tiny_flux.transformer_fp8, dtype=torch.float32))
    assert 0 < relative_error(fp8, reference) < 0.1  # quantised, but only by float8's rounding


def test_bf16_load_gives_bf16_weights_on_the_requested_device(tiny_flux):
    transformer = models.load_transformer(tiny_flux.transformer_fp8, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in transformer.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in transformer.parameters())


def test_prefix_variants_sharded_folders_and_diffusers_single_files_load_the_same(tiny_flux, tmp_path):
    reference = models.load_transformer(tiny_flux.transformer_bf16).state_dict()
    bfl = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(tiny_flux.transformer_bf16).items()}
    save_file(bfl, tmp_path / "bare.safetensors")
    save_file({f"diffusion_model.{k}": v for k, v in bfl.items()}, tmp_path / "comfy.safetensors")
    diffusers_file = tiny_flux.transformer_diffusers / "diffusion_pytorch_model.safetensors"
    sharded = tmp_path / "sharded"
    diffusers_model = FluxTransformer2DModel.from_pretrained(tiny_flux.transformer_diffusers)
    diffusers_model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").exists()
    pipeline_root = tmp_path / "FLUX.1-tiny"
    shutil.copytree(tiny_flux.transformer_diffusers, pipeline_root / "transformer")
    for path in [tmp_path / "bare.safetensors", tmp_path / "comfy.safetensors", diffusers_file, sharded, pipeline_root]:
        loaded = models.load_transformer(path).state_dict()
        assert loaded.keys() == reference.keys(), path
        assert all(torch.equal(loaded[k], v) for k, v in reference.items()), path


def test_config_is_inferred_from_the_tensors_dev_and_schnell(tiny_flux, tmp_path):
    transformer = models.load_transformer(tiny_flux.transformer_bf16)
    expected = tiny.tiny_transformer_config()
    assert {k: transformer.config[k] for k in expected if not k.startswith("_")} == {
        k: v for k, v in expected.items() if not k.startswith("_")}  # fmt: skip
    assert list(transformer.config.axes_dims_rope) == [4, 6, 6] and sum(transformer.config.axes_dims_rope) == 16

    schnell = {k: v for k, v in load_file(tiny_flux.transformer_bf16).items() if "guidance_in" not in k}
    save_file(schnell, tmp_path / "flux-tiny-schnell.safetensors")
    transformer = models.load_transformer(tmp_path / "flux-tiny-schnell.safetensors", dtype=torch.float32)
    assert transformer.config.guidance_embeds is False
    assert torch.isfinite(run(transformer, transformer_inputs(guidance=False))).all()


@pytest.mark.parametrize("variant", ["flux-dev-transformer.json", "flux-schnell-transformer.json"])
def test_real_flux_shapes_get_exactly_the_real_config(variant):
    bfl = models.diffusers_to_bfl(real_size_state_dict(variant))
    assert bfl["double_blocks.18.img_attn.qkv.weight"].shape == (3 * 3072, 3072)
    assert bfl["single_blocks.37.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    config = models.infer_transformer_config(models.bfl_to_diffusers(bfl))
    assert config == models.shipped_config(variant)
    assert models.rope_axes(128) == (16, 56, 56)


def test_bfl_converter_agrees_with_diffusers_own_on_real_widths():
    """diffusers' converter only works at width 3072; there, both must give the same names, shapes and swap."""
    bfl = models.diffusers_to_bfl(real_size_state_dict("flux-dev-transformer.json", num_layers=2, num_single_layers=2))
    modulation = torch.arange(12.0).reshape(6, 2)  # (shift, scale) halves; a real tensor where the rest is meta
    bfl["final_layer.adaLN_modulation.1.weight"] = modulation
    ours = models.bfl_to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert torch.equal(ours["norm_out.linear.weight"], theirs["norm_out.linear.weight"])
    assert torch.equal(ours["norm_out.linear.weight"][:3], modulation[3:])  # scale first in diffusers


def test_bfl_diffusers_round_trips_are_the_identity(tiny_flux):
    bfl = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(tiny_flux.transformer_bf16).items()}
    diffusers_sd = models.bfl_to_diffusers(bfl)
    back = models.diffusers_to_bfl(diffusers_sd)
    assert back.keys() == bfl.keys() and all(torch.equal(back[k], v) for k, v in bfl.items())
    again = models.bfl_to_diffusers(back)
    assert again.keys() == diffusers_sd.keys() and all(torch.equal(again[k], v) for k, v in diffusers_sd.items())


def test_converters_reject_what_they_do_not_understand(tiny_flux):
    bfl = load_file(tiny_flux.transformer_bf16) | {"double_blocks.0.img_attn.extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.extra\.weight"):
        models.bfl_to_diffusers(bfl)
    diffusers_sd = models.load_transformer(tiny_flux.transformer_bf16).state_dict() | {"lora.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"lora\.weight"):
        models.diffusers_to_bfl(diffusers_sd)


def test_all_in_one_checkpoint_loads_every_part(tiny_flux, tmp_path):
    parts = {  # the layout of ComfyUI's all-in-one flux1-dev-fp8.safetensors
        "model.diffusion_model.": tiny_flux.transformer_bf16,
        "vae.": tiny_flux.vae,
        "text_encoders.clip_l.transformer.": tiny_flux.clip_l,
        "text_encoders.t5xxl.transformer.": tiny_flux.t5,
    }
    checkpoint = {}
    for prefix, path in parts.items():
        checkpoint |= {prefix + k.removeprefix("model.diffusion_model."): v for k, v in load_file(path).items()}
    path = tmp_path / "flux1-dev-tiny-checkpoint.safetensors"
    save_file(checkpoint, path, metadata={"num_attention_heads": "2", "max_sequence_length": "32"})
    assert models.detect_file_kind(path) == "flux_checkpoint"
    same = lambda a, b: all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())  # noqa: E731
    assert same(models.load_transformer(path), models.load_transformer(tiny_flux.transformer_bf16))
    assert same(models.load_vae(path), models.load_vae(tiny_flux.vae))
    both = models.load_text_encoders(path, path, tiny_flux.tokenizers)
    separate = models.load_text_encoders(tiny_flux.clip_l, tiny_flux.t5, tiny_flux.tokenizers)
    assert same(both.clip, separate.clip) and same(both.t5, separate.t5)


def test_comfyui_scaled_fp8_files_are_dequantised(tiny_flux, tmp_path):
    bfl = {k: v.float() for k, v in load_file(tiny_flux.transformer_bf16).items()}
    scaled = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in bfl.items():
        if v.ndim == 2:
            scale = v.abs().max() / 448  # the largest float8_e4m3fn value
            scaled[k], scaled[k.removesuffix("weight") + "scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale
        else:
            scaled[k] = v
    save_file(scaled, tmp_path / "flux-tiny-fp8-scaled.safetensors")
    out = run(models.load_transformer(tmp_path / "flux-tiny-fp8-scaled.safetensors", dtype=torch.float32))
    reference = run(models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.float32))
    assert relative_error(out, reference) < 0.1


def test_fp8_base_stores_float8_and_trains_a_peft_lora(tiny_flux):
    reference = models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.bfloat16)
    transformer = models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.bfloat16, fp8_base=True)
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, models.Fp8Linear) and isinstance(to_q, nn.Linear)
    assert to_q.weight.dtype == torch.float8_e4m3fn and to_q.bias.dtype == torch.bfloat16
    assert transformer.x_embedder.weight.dtype == torch.bfloat16  # only the blocks are stored in float8
    inputs = transformer_inputs(dtype=torch.bfloat16)
    assert relative_error(run(transformer, inputs), run(reference, inputs)) < 0.05

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"]))
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    assert lora_params and all(p.dtype != torch.float8_e4m3fn for p in lora_params)
    optimizer = torch.optim.AdamW(lora_params, lr=1e-2)
    target = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(transformer(**inputs).sample.float(), target.float())
        optimizer.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert to_q.weight.dtype == torch.float8_e4m3fn and to_q.weight.grad is None


class WeightCopies(TorchDispatchMode):
    """Inside the `with`, the dtypes of every tensor made in the shape of a given weight (its copies)."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.dtypes = shape, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.shape == self.shape:
                self.dtypes.add(t.dtype)
        return out


def test_fp8_linear_under_autocast_upcasts_to_the_autocast_dtype_not_to_fp32():
    g = torch.Generator().manual_seed(0)
    layer = models.Fp8Linear(64, 32, bias=True, compute_dtype=torch.bfloat16).requires_grad_(False)
    layer.weight.data = (torch.randn(32, 64, generator=g) / 8).to(torch.float8_e4m3fn)
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(4, 64, generator=g, requires_grad=True)  # fp32, as a layer norm's output is under autocast

    with WeightCopies(layer.weight.shape) as copies:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()

    assert copies.dtypes == {torch.bfloat16}  # bf16 upcasts of the weight, never an fp32 one
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    reference = torch.nn.functional.linear(x.detach().bfloat16(), layer.weight.bfloat16(), layer.bias)
    assert torch.equal(y.detach(), reference)
    expected_grad = (2 * reference.float()).bfloat16() @ layer.weight.bfloat16()
    assert relative_error(x.grad, expected_grad) < 1e-2


def test_fp8_base_from_a_bf16_file_casts_each_block_weight_as_it_is_read(tiny_flux, monkeypatch):
    read, peak_alive = [], []
    real_safe_open = files.safe_open

    class Tracked:
        """safe_open, noting each block weight read and how many read before it are still alive in bf16."""

        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            tensor = self.file.get_tensor(name)
            if "blocks." in name and tensor.ndim == 2:
                peak_alive.append(sum(ref() is not None for ref in read))
                read.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(files, "safe_open", Tracked)
    model = models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.bfloat16, fp8_base=True)
    assert len(read) > 10 and max(peak_alive) == 0  # no bf16 block weight outlives its own read
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_a_dropped_base_is_re_read_from_its_file_with_the_lora_kept(tiny_flux):
    model = models.load_transformer(tiny_flux.transformer_bf16, dtype=torch.float32, fp8_base=True)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "proj_mlp"], init_lora_weights=False))
    inputs = transformer_inputs()
    before = run(model, inputs)
    lora_weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    models.drop_frozen_weights(model)
    assert model.x_embedder.weight.is_meta and model.transformer_blocks[0].attn.to_q.base_layer.weight.is_meta
    assert all(not v.is_meta for k, v in model.state_dict().items() if "lora_" in k)
    models.reload_frozen_weights(model, tiny_flux.transformer_bf16, dtype=torch.float32)

    assert model.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert all(torch.equal(v, lora_weights[k]) for k, v in model.state_dict().items() if "lora_" in k)
    assert torch.equal(run(model, inputs), before)


# ------------------------------------------------------------------------------------------------ VAE


def test_vae_encodes_and_decodes_at_scale_factor_8(tiny_flux):
    vae = models.load_vae(tiny_flux.vae, dtype=torch.float32)
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == 0.3611
    assert 2 ** (len(vae.config.block_out_channels) - 1) == models.VAE_SCALE_FACTOR
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, 64 // models.VAE_SCALE_FACTOR, 48 // models.VAE_SCALE_FACTOR)
    assert decoded.shape == image.shape and torch.isfinite(decoded).all() and latents.std() > 0.1


def test_vae_bfl_file_round_trips_and_diffusers_folder_loads_the_same(tiny_flux, tmp_path):
    vae = models.load_vae(tiny_flux.vae, dtype=torch.float32)
    written = load_file(tiny_flux.vae)
    back = tiny.vae_to_bfl(vae.state_dict(), num_blocks=4)
    assert back.keys() == written.keys() and all(torch.equal(back[k], v) for k, v in written.items())
    assert models.infer_vae_config(written) == tiny.tiny_vae_config()
    vae.save_pretrained(tmp_path / "vae")
    from_folder = models.load_vae(tmp_path / "vae", dtype=torch.float32)
    assert isinstance(from_folder, AutoencoderKL)
    assert all(torch.equal(from_folder.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_vae_config_for_real_flux_widths():
    with init_empty_weights():
        real = AutoencoderKL.from_config(models.shipped_config("flux-vae.json"))
    bfl = tiny.vae_to_bfl(real.state_dict(), num_blocks=4)
    assert models.infer_vae_config(bfl) == models.shipped_config("flux-vae.json")


# ------------------------------------------------------------------------------------------------ text encoders


def test_text_encoders_encode_exactly_as_diffusers_flux_pipeline(tiny_flux):
    encoders = models.load_text_encoders(tiny_flux.clip_l, tiny_flux.t5, tiny_flux.tokenizers, dtype=torch.float32)
    assert encoders.max_sequence_length == tiny.MAX_SEQUENCE_LENGTH  # read from the T5 file's metadata
    prompts = ["a photo of sks dog in the snow", "an oil painting of a red house at night"]
    prompts.append(prompts[0])
    prompt_embeds, pooled = encoders.encode(prompts)
    assert prompt_embeds.shape == (3, tiny.MAX_SEQUENCE_LENGTH, 32) and pooled.shape == (3, 32)
    assert not torch.allclose(prompt_embeds[0], prompt_embeds[1]) and not torch.allclose(pooled[0], pooled[1])
    assert torch.equal(prompt_embeds[0], prompt_embeds[2]) and torch.equal(pooled[0], pooled[2])
    assert not prompt_embeds.requires_grad

    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, encoders.clip, encoders.clip_tokenizer,
                        encoders.t5, encoders.t5_tokenizer, None)  # fmt: skip
    expected_embeds, expected_pooled, _ = pipe.encode_prompt(
        prompts, prompt_2=None, device="cpu", max_sequence_length=encoders.max_sequence_length)  # fmt: skip
    assert torch.equal(prompt_embeds, expected_embeds) and torch.equal(pooled, expected_pooled)


def test_text_encoder_configs_are_inferred_and_tokenizer_folders_can_be_given_apart(tiny_flux):
    encoders = models.load_text_encoders(
        tiny_flux.clip_l, tiny_flux.t5, clip_tokenizer_dir=tiny_flux.tokenizers / "clip",
        t5_tokenizer_dir=tiny_flux.tokenizers / "t5", dtype=torch.float32, max_sequence_length=7,
    )  # fmt: skip
    assert encoders.max_sequence_length == 7 and encoders.encode(["a cat"])[0].shape == (1, 7, 32)
    clip, t5 = tiny.tiny_clip_config(len(encoders.clip_tokenizer)), tiny.tiny_t5_config(len(encoders.t5_tokenizer))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(encoders.clip.config, key) == getattr(clip, key), key
    for key in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "feed_forward_proj", "vocab_size"):
        assert getattr(encoders.t5.config, key) == getattr(t5, key), key
    assert encoders.t5.encoder.embed_tokens.weight is encoders.t5.shared.weight


def test_text_encoders_load_from_transformers_folders_and_pipeline_roots(tiny_flux, tmp_path):
    files = models.load_text_encoders(tiny_flux.clip_l, tiny_flux.t5, tiny_flux.tokenizers, dtype=torch.float32)
    files.clip.save_pretrained(tmp_path / "FLUX.1-tiny" / "text_encoder")
    files.t5.save_pretrained(tmp_path / "FLUX.1-tiny" / "text_encoder_2")
    folders = models.load_text_encoders(tmp_path / "FLUX.1-tiny", tmp_path / "FLUX.1-tiny" / "text_encoder_2",
                                        tiny_flux.tokenizers, dtype=torch.float32, max_sequence_length=32)  # fmt: skip
    prompts = ["a photo of sks dog", "a red car"]
    for a, b in zip(files.encode(prompts), folders.encode(prompts)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds a t5 model, not clip_text_model.*swapped"):
        models.load_text_encoders(tmp_path / "FLUX.1-tiny" / "text_encoder_2", tmp_path / "FLUX.1-tiny",
                                  tiny_flux.tokenizers)  # fmt: skip


def test_real_clip_l_and_t5_xxl_shapes_get_the_real_configs():
    with init_empty_weights():
        clip = CLIPTextModel(CLIPTextConfig.from_dict(models.shipped_config("clip-l.json")))
        t5 = T5EncoderModel(T5Config.from_dict(models.shipped_config("t5-xxl-encoder.json")))
    clip_config = models.infer_clip_config(clip.state_dict(), metadata={})  # heads: 768 / 64
    assert (clip_config.num_attention_heads, clip_config.hidden_size, clip_config.num_hidden_layers) == (12, 768, 12)
    t5_config = models.infer_t5_config(t5.state_dict())
    assert (t5_config.num_heads, t5_config.d_kv, t5_config.d_ff, t5_config.num_layers) == (64, 64, 10240, 24)
    assert t5_config.is_gated_act and t5_config.vocab_size == 32128


def test_tokenizers_round_trip_and_keep_their_vocabulary(tiny_flux):
    encoders = models.load_text_encoders(tiny_flux.clip_l, tiny_flux.t5, tiny_flux.tokenizers, dtype=torch.float32)
    clip_tok, t5_tok = encoders.clip_tokenizer, encoders.t5_tokenizer
    assert len(clip_tok) == len(json.loads((tiny_flux.tokenizers / "clip" / "vocab.json").read_text()))
    assert len(t5_tok) == encoders.t5.config.vocab_size > 300  # not the few tokens of a silently broken T5 tokenizer
    text = "a photo of sks dog, 3 cats!"
    assert clip_tok.decode(clip_tok(text).input_ids, skip_special_tokens=True) == "a photo of sks dog , 3 cats !"
    assert t5_tok.decode(t5_tok(text).input_ids, skip_special_tokens=True) == text
    assert clip_tok.tokenize("photo") == ["photo</w>"]  # whole words were learnt as merges
    odd = clip_tok("Ünïcødé ☃ xyzzy").input_ids  # any text tokenizes, byte by byte
    assert odd[0] == clip_tok.bos_token_id and clip_tok.eos_token_id not in odd[1:-1]
    assert t5_tok.unk_token_id not in t5_tok("Zebra quokka 42").input_ids


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file_names_the_path_and_close_matches(tiny_flux):
    wrong = tiny_flux.transformer_bf16.with_name("flux-tiny-bf61.safetensors")
    with pytest.raises(FileNotFoundError, match="flux-tiny-bf61.safetensors") as error:
        models.load_transformer(wrong)
    assert "flux-tiny-bf16.safetensors" in str(error.value) and str(wrong.parent) in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_vae(tiny_flux.vae.parent / "nowhere" / "ae.safetensors")


@pytest.mark.parametrize(
    ("keys", "said"),
    [
        (["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
          "model.diffusion_model.input_blocks.0.0.weight"], "an SDXL checkpoint"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.down.0.block.0.conv1.weight",
          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"], "Stable Diffusion 1"),
    ],
)  # fmt: skip
def test_stable_diffusion_files_given_as_the_transformer_are_named(tmp_path, keys, said):
    save_file({k: torch.zeros(2, 2) for k in keys}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=said) as error:
        models.load_transformer(tmp_path / "model.safetensors")
    assert "model.safetensors" in str(error.value) and "Flux.1 model files" in str(error.value)


def test_vae_given_as_the_transformer_is_named(tiny_flux):
    with pytest.raises(ValueError, match="appears to be the Flux VAE.*belongs in the VAE input"):
        models.load_transformer(tiny_flux.vae)


def test_truncated_file_says_download_again(tiny_flux, tmp_path):
    data = tiny_flux.transformer_bf16.read_bytes()
    (tmp_path / "flux1-dev.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"flux1-dev\.safetensors is truncated or corrupt.*download it again"):
        models.load_transformer(tmp_path / "flux1-dev.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, suffix):
    path = tmp_path / f"flux1-dev{suffix}"
    path.write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(ValueError, match="pickle.*convert it to .safetensors"):
        models.load_transformer(path)


def test_swapped_text_encoders_are_reported(tiny_flux):
    with pytest.raises(ValueError, match=r"t5xxl_tiny\.safetensors appears to be a T5 text encoder.*swapped"):
        models.load_text_encoders(tiny_flux.t5, tiny_flux.clip_l, tiny_flux.tokenizers)
    with pytest.raises(ValueError, match=r"clip_l\.safetensors appears to be a CLIP text encoder.*in the CLIP-L input"):
        models.load_text_encoders(tiny_flux.clip_l, tiny_flux.clip_l, tiny_flux.tokenizers)


def test_wrong_tokenizer_folder_is_reported(tiny_flux):
    with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt"):
        models.load_text_encoders(tiny_flux.clip_l, tiny_flux.t5, clip_tokenizer_dir=tiny_flux.tokenizers / "t5",
                                  t5_tokenizer_dir=tiny_flux.tokenizers / "t5")  # fmt: skip
    with pytest.raises(ValueError, match="tokenizer_dir"):
        models.load_text_encoders(tiny_flux.clip_l, tiny_flux.t5)


def test_the_config_read_from_headers_alone_is_the_loaded_models(tiny_flux):
    for path in (tiny_flux.transformer_bf16, tiny_flux.transformer_fp8, tiny_flux.transformer_diffusers):
        loaded = dict(models.load_transformer(path, dtype=torch.float32).config)
        from_header = models.transformer_config(path)
        assert {k: from_header[k] for k in loaded if not k.startswith("_")} == \
            {k: v for k, v in loaded.items() if not k.startswith("_")}, path
