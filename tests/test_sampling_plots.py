"""Sampling against diffusers' FluxPipeline and a hand-written Euler step; the loss plot, the XY grid, strengths."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image

from trainer_core import flow_matching as fm
from trainer_core import lora, plots, sampling

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
           scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
# Flux.1-dev's scheduler_config.json
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
SIZE = dict(width=32, height=48)  # not square, so a swapped width/height shows


def tiny_transformer(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance_embeds).eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**VAE).eval()


@pytest.fixture(scope="module")
def text() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)  # (B, L, D), (B, D)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_same_seed_same_images_other_seed_other_images(vae, text):
    model = tiny_transformer()
    first = sampling.sample_images(model, vae, *text, **SIZE, steps=3, seed=7)
    assert len(first) == 2 and all(im.mode == "RGB" and im.size == (32, 48) for im in first)
    assert np.array_equal(pixels(first), pixels(sampling.sample_images(model, vae, *text, **SIZE, steps=3, seed=7)))
    assert not np.array_equal(pixels(first), pixels(sampling.sample_images(model, vae, *text, **SIZE, steps=3, seed=8)))


def test_one_euler_step_by_hand(text):
    model = tiny_transformer()
    embeds, pooled = text
    noise = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(3))  # (B, 16, H/8, W/8)
    tokens = fm.pack_latents(noise)
    img_ids = torch.tensor([[0.0, r, c] for r in range(3) for c in range(2)])  # (row, column) of each 2x2 patch
    with torch.no_grad():
        v = model(hidden_states=tokens, timestep=torch.ones(2), guidance=torch.full((2,), 2.0),
                  pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=torch.zeros(8, 3),
                  img_ids=img_ids).sample
    expected = fm.unpack_latents(tokens + (0.0 - 1.0) * v, 6, 4)  # one step: sigma 1 -> 0
    got = sampling.sample_latents(model, embeds, pooled, **SIZE, steps=1, guidance=2.0, seed=3)
    assert got.shape == (2, 16, 6, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_matches_diffusers_flux_pipeline(vae, text):
    model = tiny_transformer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = text
    common = dict(num_inference_steps=4, guidance_scale=2.5, prompt_embeds=embeds, pooled_prompt_embeds=pooled, **SIZE)
    packed = pipe(generator=torch.Generator().manual_seed(5), output_type="latent", **common).images
    ours = sampling.sample_latents(model, embeds, pooled, **SIZE, steps=4, guidance=2.5, seed=5)
    torch.testing.assert_close(fm.pack_latents(ours), packed, rtol=0, atol=1e-5)  # the shifted sigmas included

    images = pipe(generator=torch.Generator().manual_seed(5), output_type="np", **common).images  # (B, H, W, 3)
    ours_images = pixels(sampling.sample_images(model, vae, embeds, pooled, **SIZE, steps=4, guidance=2.5, seed=5))
    assert np.abs(ours_images.astype(int) - np.round(images * 255).astype(int)).max() <= 1


@pytest.mark.parametrize("guidance_embeds", [False, True])  # dev2pro-like (no working embedding) and dev-like
def test_true_cfg_matches_diffusers_flux_pipeline(text, guidance_embeds):
    model = tiny_transformer(guidance_embeds)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = text
    g = torch.Generator().manual_seed(9)
    negative = torch.randn(embeds.shape, generator=g), torch.randn(pooled.shape, generator=g)
    packed = pipe(generator=torch.Generator().manual_seed(5), output_type="latent", num_inference_steps=3,
                  guidance_scale=1.0, true_cfg_scale=4.0, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                  negative_prompt_embeds=negative[0], negative_pooled_prompt_embeds=negative[1], **SIZE).images
    ours = sampling.sample_latents(model, embeds, pooled, **SIZE, steps=3, guidance=1.0, seed=5, negative=negative,
                                   true_cfg_scale=4.0)
    torch.testing.assert_close(fm.pack_latents(ours), packed, rtol=0, atol=1e-5)
    plain = sampling.sample_latents(model, embeds, pooled, **SIZE, steps=3, guidance=1.0, seed=5, negative=negative)
    assert not torch.allclose(plain, ours)  # true_cfg_scale 1.0 is off: the negative prompt is not used
    with pytest.raises(ValueError, match="true_cfg_scale"):
        sampling.sample_latents(model, embeds, pooled, **SIZE, steps=3, true_cfg_scale=4.0)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_guidance_only_matters_with_guidance_embeds(text, guidance_embeds):
    model = tiny_transformer(guidance_embeds)
    low, high = (sampling.sample_latents(model, *text, **SIZE, steps=2, guidance=g) for g in (1.0, 5.0))
    assert torch.equal(low, high) != guidance_embeds


def test_strength_zero_is_the_base_model_exactly(vae, text):
    model = tiny_transformer()
    base = sampling.sample_images(model, vae, *text, **SIZE, steps=2)
    base_latents = sampling.sample_latents(model, *text, **SIZE, steps=2)
    torch.manual_seed(1)
    lora.add_lora(model, rank=4, alpha=4)
    with torch.no_grad():  # peft starts B at zero, where any strength is the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    zero = sampling.sample_images(model, vae, *text, **SIZE, steps=2, strength=0.0)
    assert np.array_equal(pixels(zero), pixels(base))
    assert torch.equal(sampling.sample_latents(model, *text, **SIZE, steps=2), base_latents)  # strength stays set
    full = sampling.sample_images(model, vae, *text, **SIZE, steps=2, strength=1.0)
    assert not np.array_equal(pixels(full), pixels(base))
    assert not torch.equal(sampling.sample_latents(model, *text, **SIZE, steps=2), base_latents)


@pytest.mark.parametrize("training", [True, False])
def test_eval_while_sampling_mode_restored_after_no_graph(text, training):
    model = tiny_transformer().train(training)
    model.x_embedder.eval()  # a mixed state must come back as it was, not as the top module's mode
    seen = []
    latents = sampling.sample_latents(model, *text, **SIZE, steps=3,
                                      callback=lambda step, total: seen.append((step, total, model.training)))
    assert seen == [(1, 3, False), (2, 3, False), (3, 3, False)]
    assert model.training == training and not model.x_embedder.training
    assert all(m.training == training for n, m in model.named_modules() if n and not n.startswith("x_embedder"))
    assert not latents.requires_grad


@pytest.mark.parametrize("kwargs, field", [(dict(width=40, height=48), "width"), (dict(width=32, height=0), "height"),
                                           (dict(width=32, height=48, steps=0), "steps")])
def test_invalid_requests_name_the_field(text, kwargs, field):
    with pytest.raises(ValueError, match=field):
        sampling.sample_latents(tiny_transformer(), *text, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Plots


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("n", [0, 1, 500])
def test_loss_plot_sane_image_for_any_length(n):
    losses = [1.0 / (1 + 0.01 * i) for i in range(n)]
    image = plots.loss_plot(losses, [1e-4] * n, checkpoint_steps=[n // 2] if n else [])
    assert image.mode == "RGB" and 400 <= image.width <= 2000 and 300 <= image.height <= 1500
    assert array(image).std() > 1  # something is drawn, if only "no steps yet"


def test_loss_plot_marks_checkpoints_where_they_are():
    losses, lrs = [1.0 / (1 + 0.01 * i) for i in range(500)], [1e-4] * 500
    plain = array(plots.loss_plot(losses, lrs))

    def mark_column(step: int) -> int:
        changed = (array(plots.loss_plot(losses, lrs, [step])) != plain).any(axis=2)  # (H, W)
        column = int(changed.sum(axis=0).argmax())
        assert changed[:, column].sum() > 0.4 * plain.shape[0]  # a vertical line over most of the plot
        return column

    early, middle, late = mark_column(100), mark_column(250), mark_column(400)
    assert early < middle < late
    assert abs((middle - early) - (late - middle)) <= 2  # evenly spaced steps, evenly spaced marks


def test_loss_plot_saves_a_png_and_survives_nan(tmp_path):
    path = tmp_path / "plots" / "loss.png"
    image = plots.loss_plot([0.5, float("nan"), 0.4] * 30, path=path, title="run")
    assert Image.open(path).size == image.size and [p.name for p in path.parent.iterdir()] == ["loss.png"]


def test_moving_average_skips_non_finite_losses():
    avg = plots.moving_average([1.0, float("nan"), 3.0, 5.0], window=2)
    np.testing.assert_allclose(avg, [1.0, 1.0, 3.0, 4.0])


def solid_cells(rows: int, cols: int, size=(40, 30)) -> list[list[Image.Image]]:
    return [[Image.new("RGB", size, (40 + 60 * c, 30 + 90 * r, 200)) for c in range(cols)] for r in range(rows)]


def test_xy_grid_is_labels_plus_cells_each_cell_in_place():
    cells = solid_cells(2, 3)
    grid = plots.xy_grid(cells, ["step 750", "step 1500"], ["0", "0.5", "1"])
    left, top = grid.width - 3 * 40, grid.height - 2 * 30
    assert left > 0 and top > 0
    for r in range(2):
        for c in range(3):
            x, y = left + c * 40, top + r * 30
            colour = cells[r][c].getpixel((0, 0))
            assert grid.getpixel((x, y)) == grid.getpixel((x + 39, y + 29)) == colour
            assert array(grid.crop((0, y, left, y + 30))).min() < 128  # the row's label is drawn beside it
        assert array(grid.crop((left + c * 40, 0, left + (c + 1) * 40, top))).min() < 128  # the column's label
    titled = plots.xy_grid(cells, ["step 750", "step 1500"], ["0", "0.5", "1"], title="a photo of fltglyph")
    assert titled.width == grid.width and titled.height > grid.height


def test_xy_grid_text_grows_with_cells():
    small = plots.xy_grid(solid_cells(1, 2, (64, 64)), ["step 1"], ["0", "1"])
    large = plots.xy_grid(solid_cells(1, 2, (512, 512)), ["step 1"], ["0", "1"])
    assert large.height - 512 > 2 * (small.height - 64) and large.width - 1024 > 2 * (small.width - 128)


def test_xy_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"row 1 \('b'\)"):
        plots.xy_grid([solid_cells(1, 2)[0], solid_cells(1, 1)[0]], ["a", "b"], ["0", "1"])
    with pytest.raises(ValueError, match=r"row 0 \('a'\), column 1"):
        plots.xy_grid([[Image.new("RGB", (8, 8)), Image.new("RGB", (8, 9))]], ["a"], ["0", "1"])
    with pytest.raises(ValueError, match="row labels"):
        plots.xy_grid(solid_cells(2, 1), ["a"], ["0"])


@pytest.mark.parametrize("text, expected", [
    ("0,0.2,0.4", [0.0, 0.2, 0.4]),
    ("0 0.5 1", [0.0, 0.5, 1.0]),
    (" 0, 0.5,1 ", [0.0, 0.5, 1.0]),
    ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("0:1:0.2", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    ("0 : 0.5 : 0.25, -1", [0.0, 0.25, 0.5, -1.0]),
])
def test_parse_strengths_accepts(text, expected):
    assert plots.parse_strengths(text) == expected


@pytest.mark.parametrize("text, token", [("", "empty"), ("0, abc", "'abc'"), ("nan", "'nan'"), ("0:1", "'0:1'"),
                                         ("1:0:0.5", "'1:0:0.5'"), ("0:1:0", "'0:1:0'"), ("0:1:1e-6", "'0:1:1e-6'")])
def test_parse_strengths_rejects_naming_the_field_and_token(text, token):
    with pytest.raises(ValueError, match=f"strengths: .*{token}"):
        plots.parse_strengths(text)
