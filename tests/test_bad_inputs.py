"""Every bad input a user can plausibly give, through the layer they give it in, and the message they get back.

One table per layer: the InitTrainer node, the CLI's TOML config, and the TrainLoop / sampling / XY nodes. Each
case asserts the error type and the key part of the message (the widget, field or file, and what to do). The bad
files are built here, tiny, with the key names that identify them. Pickles are canaries: loading one creates a
marker file, and no marker may ever appear. InitTrainer checks everything it can before any model loads, and a
failed InitTrainer leaves the run already trained alive.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_nodes import SAMPLE, init, nodes, save
from test_nodes import base_dir, comfyui_inference_mode, no_model_loads  # noqa: F401  (fixtures)

from trainer_core import cli
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.run_handle import TrainingHandle

# Characteristic key names, enough for a file to be recognised from its header.
SDXL_KEYS = ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"]
SD15_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.down.0.block.0.conv1.weight",
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
KOHYA_LORA_KEYS = [f"lora_unet_double_blocks_0_img_attn_qkv.{suffix}"
                   for suffix in ("lora_down.weight", "lora_up.weight", "alpha")]
NF4_KEYS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.qkv.weight.absmax",
            "double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4", "single_blocks.0.linear1.weight"]
HTML_PAGE = b"<!DOCTYPE html><html><body>Access to model black-forest-labs/FLUX.1-dev is restricted.</body></html>"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:4610115bb0c89560703c8\nsize 23802932552\n"


class CreatesMarker:
    """Unpickling this creates `marker`: the proof, if the marker ever appears, that something unpickled a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@dataclass
class Ctx:
    base: Path  # the ComfyUI-like folder of test_nodes.base_dir
    canary: Path  # where unpickled canaries leave their marker
    handle: TrainingHandle  # the run alive before the case

    def put(self, rel: str, content: bytes | list[str] | Path) -> str:
        """Write models/<rel> (bytes as they are, a list of tensor names as a tiny safetensors file, a Path as a
        copy of it); -> the name a widget gives, relative to its models folder."""
        path = self.base / "models" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copy(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            save_file({k: torch.zeros(2, 2) for k in content}, str(path))
        return rel.split("/", 1)[1]

    def pickle_file(self, rel: str) -> str:
        """A checkpoint as torch.save writes it (a .ckpt / .pt / .bin), holding a canary."""
        path = self.base / "models" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": CreatesMarker(self.canary / Path(rel).name)}, path)
        return rel.split("/", 1)[1]

    def dataset(self, name: str, files: dict[str, bytes | str]) -> str:
        folder = self.base / "input" / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, data in files.items():
            (folder / file_name).write_bytes(data.encode() if isinstance(data, str) else data)
        return name

    def model_file(self, rel: str) -> Path:
        return self.base / "models" / rel


def truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) * 2 // 3]


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height: PIL learns the size without decoding any pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))


def lora_file(ctx: Ctx) -> str:
    """A real LoRA as SaveCheckpoint writes it."""
    _, path = save(ctx.handle)
    return Path(path).name


def state_file(ctx: Ctx) -> Path:
    """A real training state of the run, as SaveCheckpoint writes it."""
    path = ctx.base / "models" / "flux_lora_states" / "nodes_test_000000.state.safetensors"
    ctx.handle.run.trainer.save_state(path, ctx.handle.state)
    return path


# ---------------------------------------------------------------------------------------------------------------
# InitTrainer: every case fails before a model loads, and the run already alive stays alive

Setup = Callable[[Ctx], dict]
INIT_CASES: list[tuple[str, Setup, type, str]] = [
    # --- model files
    ("transformer misspelled", lambda c: {"transformer": "flux-tiny-bf61.safetensors"}, FileNotFoundError,
     r"transformer: 'flux-tiny-bf61.safetensors' is not in ComfyUI's diffusion_models folder "
     r"\(.*models/diffusion_models.*\); did you mean 'flux-tiny-bf16.safetensors'"),
    ("transformer missing", lambda c: {"transformer": "flux1-dev.safetensors"}, FileNotFoundError,
     r"transformer: 'flux1-dev.safetensors' is not in ComfyUI's diffusion_models folder .*put the file there"),
    ("t5 missing", lambda c: {"t5": "t5xxl_fp16.safetensors"}, FileNotFoundError,
     r"t5: 't5xxl_fp16.safetensors' is not in ComfyUI's text_encoders folder"),
    ("SDXL checkpoint as transformer",
     lambda c: {"transformer": c.put("diffusion_models/sd_xl_base_1.0.safetensors", SDXL_KEYS)}, ValueError,
     r"transformer: sd_xl_base_1.0.safetensors appears to be an SDXL checkpoint, not a Flux transformer"),
    ("SD1.5 checkpoint as transformer",
     lambda c: {"transformer": c.put("diffusion_models/v1-5.safetensors", SD15_KEYS)}, ValueError,
     r"transformer: v1-5.safetensors appears to be a Stable Diffusion 1.x/2.x checkpoint"),
    ("Flux VAE as validation transformer", lambda c: {
        "validation_transformer": c.put("diffusion_models/ae.safetensors", c.model_file("vae/ae.safetensors"))},
     ValueError, r"validation_transformer: ae.safetensors appears to be the Flux VAE .*; it belongs in the vae input"),
    ("SD VAE as vae", lambda c: {"vae": c.put("vae/sdxl_vae.safetensors", [
        "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight", "encoder.conv_out.weight"])},
     ValueError, r"vae: sdxl_vae.safetensors appears to be a Stable Diffusion VAE with 4 latent channels"),
    ("truncated transformer", lambda c: {"transformer": c.put("diffusion_models/cut.safetensors", truncated(
        c.model_file("diffusion_models/flux-tiny-bf16.safetensors")))},
     ValueError, r"cut.safetensors is truncated or corrupt .*download it again"),
    ("an HTML error page saved as the transformer", lambda c: {
        "transformer": c.put("diffusion_models/flux1-dev.safetensors", HTML_PAGE)},
     ValueError, r"flux1-dev.safetensors is truncated or corrupt .*download it again"),
    ("a git-lfs pointer as the vae", lambda c: {"vae": c.put("vae/lfs.safetensors", LFS_POINTER)},
     ValueError, r"lfs.safetensors is truncated or corrupt"),
    ("an empty file as clip_l", lambda c: {"clip_l": c.put("text_encoders/empty.safetensors", b"")},
     ValueError, r"empty.safetensors is truncated or corrupt"),
    ("pickle .ckpt as transformer", lambda c: {"transformer": c.pickle_file("diffusion_models/flux1-dev.ckpt")},
     ValueError, r"flux1-dev.ckpt is a pickle checkpoint \(.ckpt\)\. Unpickling can run arbitrary code, so it is "
                 r"refused: convert it to .safetensors"),
    ("pickle .pt as vae", lambda c: {"vae": c.pickle_file("vae/ae.pt")}, ValueError, r"ae.pt is a pickle checkpoint"),
    ("pickle .bin as t5", lambda c: {"t5": c.pickle_file("text_encoders/pytorch_model.bin")}, ValueError,
     r"pytorch_model.bin is a pickle checkpoint"),
    ("pickle renamed .safetensors", lambda c: {"transformer": c.put(
        "diffusion_models/renamed.safetensors", pickle.dumps(CreatesMarker(c.canary / "renamed")))},
     ValueError, r"renamed.safetensors is truncated or corrupt"),
    ("truncated GGUF as transformer", lambda c: {"transformer": c.put("diffusion_models/flux1-dev-Q4_K_S.gguf",
                                                                      b"GGUF\x03")},
     ValueError, r"flux1-dev-Q4_K_S.gguf is a truncated or corrupt GGUF file .*: download it again"),
    ("bitsandbytes NF4 as transformer",
     lambda c: {"transformer": c.put("diffusion_models/flux1-dev-bnb-nf4.safetensors", NF4_KEYS)}, ValueError,
     r"transformer: flux1-dev-bnb-nf4.safetensors appears to be a bitsandbytes-quantised \(NF4/FP4\) model, which "
     r"cannot be trained on"),
    ("LoRA as transformer", lambda c: {"transformer": c.put("diffusion_models/my_lora.safetensors", KOHYA_LORA_KEYS)},
     ValueError, r"transformer: my_lora.safetensors appears to be a LoRA, not a Flux transformer"),
    ("training state as transformer",
     lambda c: {"transformer": c.put("diffusion_models/run.state.safetensors", state_file(c))}, ValueError,
     r"transformer: run.state.safetensors appears to be a training state .*resume_state"),
    ("T5 where CLIP-L goes", lambda c: {"clip_l": "tiny/t5xxl_tiny.safetensors"}, ValueError,
     r"clip_l: tiny/t5xxl_tiny.safetensors appears to be a T5 text encoder .*not a CLIP text encoder .*; it belongs "
     r"in the t5 input: were two inputs swapped\?"),
    ("both text encoders swapped", lambda c: {"clip_l": "tiny/t5xxl_tiny.safetensors", "t5": "tiny/clip_l.safetensors"},
     ValueError, r"clip_l: .* appears to be a T5 text encoder"),
    ("CLIP-L where T5 goes", lambda c: {"t5": "tiny/clip_l.safetensors"}, ValueError,
     r"t5: tiny/clip_l.safetensors appears to be a CLIP text encoder .*belongs in the clip_l input"),
    # --- dataset folder
    ("dataset relative to input/ missing", lambda c: {"dataset_dir": "my_dataset"}, FileNotFoundError,
     r"dataset_dir: .*/input/my_dataset is not a folder; give an absolute path, or a folder name inside ComfyUI's "
     r"input folder .*/input"),
    ("dataset absolute missing", lambda c: {"dataset_dir": str(c.base / "nowhere")}, FileNotFoundError,
     r"dataset_dir: .*/nowhere is not a folder"),
    ("dataset is a file", lambda c: {"dataset_dir": "data/glyph_00.png"}, FileNotFoundError,
     r"dataset_dir: .*glyph_00.png is not a folder"),
    ("dataset empty", lambda c: {"dataset_dir": c.dataset("empty", {})}, ValueError,
     r"dataset folder .*/empty has no images: put the images \(.png, .jpg"),
    ("dataset of captions only", lambda c: {"dataset_dir": c.dataset("captions", {"a.txt": "a dog", "b.txt": "a cat"})},
     ValueError, r"dataset folder .*/captions has only 2 caption \(.txt\) files: put the images"),
    ("dataset of broken images only", lambda c: {"dataset_dir": c.dataset("broken", {
        "zero.png": b"", "text.jpg": "not an image", "tiny.png": image_bytes(Image.new("RGB", (1, 1)), "PNG")})},
     ValueError, r"none of the 3 images in dataset folder .*/broken could be read .*re-export them as PNG or JPEG"),
    # --- settings
    ("rank 0", lambda c: {"rank": 0}, ValueError, r"rank: 0; use a rank of 1 or more"),
    ("learning rate 0", lambda c: {"learning_rate": 0.0}, ValueError, r"learning_rate: 0.0; use a positive number"),
    ("learning rate NaN", lambda c: {"learning_rate": math.nan}, ValueError, r"learning_rate: nan; use a positive"),
    ("learning rate inf", lambda c: {"learning_rate": math.inf}, ValueError, r"learning_rate: inf; use a positive"),
    ("learning rate negative", lambda c: {"learning_rate": -1e-4}, ValueError, r"learning_rate: -0.0001"),
    ("total_steps negative", lambda c: {"total_steps": -1}, ValueError, r"total_steps: -1; use 0 \(auto"),
    ("repeats 0", lambda c: {"repeats": 0}, ValueError, r"repeats: 0; use 1 or more"),
    ("alpha 0", lambda c: {"alpha": 0.0}, ValueError, r"alpha: 0.0; use a positive number"),
    ("max_sequence_length 0", lambda c: {"max_sequence_length": 0}, ValueError, r"max_sequence_length: 0"),
    ("resolution 500", lambda c: {"resolutions": "500"}, ValueError,
     r"resolutions: 500 is not a positive multiple of 64; use e.g. 512"),
    ("resolution 512x768", lambda c: {"resolutions": "512x768"}, ValueError,
     r"resolutions: '512x768' is not a list of whole numbers; write e.g. '512' or '512,768,1024'"),
    ("resolutions empty", lambda c: {"resolutions": " "}, ValueError, r"resolutions: give at least one"),
    ("output name with ..", lambda c: {"output_name": "../escape"}, ValueError,
     r"output_name: '../escape' cannot be a file name .*use letters, digits"),
    ("output name with /", lambda c: {"output_name": "runs/a"}, ValueError, r"output_name: 'runs/a' cannot be"),
    ("output name with : and *", lambda c: {"output_name": "v1:final*"}, ValueError,
     r"output_name: 'v1:final\*' cannot be a file name \(it contains \*:"),
    ("output name with a control character", lambda c: {"output_name": "a\tb"}, ValueError,
     r"output_name: 'a\\tb' cannot be a file name"),
    ("output name ending in a dot", lambda c: {"output_name": "lora."}, ValueError, r"output_name: 'lora.' cannot"),
    ("output name too long", lambda c: {"output_name": "é" * 101}, ValueError,
     r"output_name: 202 bytes long; file systems refuse such long file names, use at most 200"),
    ("memory preset unknown", lambda c: {"memory_preset": "4GB"}, ValueError,
     r"memory_preset: '4GB'; choose one of custom"),
    # --- resume state
    ("resume state missing", lambda c: {"resume_state": "gone.state.safetensors"}, FileNotFoundError,
     r"resume_state: 'gone.state.safetensors' is not in ComfyUI's flux_lora_states folder"),
    ("resume from a LoRA file", lambda c: {"resume_state": c.put(
        "flux_lora_states/a_lora.safetensors", c.base / "models" / "loras" / lora_file(c))}, ValueError,
     r"a_lora.safetensors is not a training state of this trainer \(a LoRA file\?\); pick a "
     r"\*.state.safetensors file"),
    ("resume from a truncated state", lambda c: {"resume_state": c.put(
        "flux_lora_states/cut.state.safetensors", truncated(state_file(c)))},
     ValueError, r"cut.state.safetensors is damaged or incomplete .*pick an earlier state file"),
    ("resume from a pickle", lambda c: {"resume_state": c.pickle_file("flux_lora_states/last.ckpt")}, ValueError,
     r"last.ckpt is damaged or incomplete"),
    ("resume a run with other settings", lambda c: {"resume_state": state_file(c).name, "rank": 8, "seed": 5},
     ValueError, r"resume_state: nodes_test_000000.state.safetensors belongs to a run with other settings: "
                 r"rank 8 \(state: 4\), seed 5 \(state: 3\)\. Set them as the state had them"),
]


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("canary")


_alive: dict[str, TrainingHandle] = {}


@pytest.fixture
def ctx(base_dir, canary) -> Ctx:
    """The module's run (started again if a test replaced it); after the test, no canary went off."""
    if "run" not in _alive or _alive["run"].run.released:
        _alive["run"] = init()
        _alive["run"].run.trainer.snapshot()  # models load lazily: now, before cases forbid loading, for their files
    yield Ctx(base_dir, canary, _alive["run"])
    assert not any(canary.iterdir()), "a pickle was unpickled"


def test_the_pickle_canaries_go_off_when_unpickled(ctx):
    """The canaries are live: both ways of loading a pickle create the marker (so its absence elsewhere means
    nothing unpickled the file)."""
    torch_pickle = ctx.model_file(f"diffusion_models/{ctx.pickle_file('diffusion_models/canary.ckpt')}")
    torch.load(torch_pickle, weights_only=False)
    assert (ctx.canary / "canary.ckpt").is_file()
    pickle.loads(pickle.dumps(CreatesMarker(ctx.canary / "plain")))
    assert (ctx.canary / "plain").is_file()
    for marker in ctx.canary.iterdir():
        marker.unlink()


@pytest.mark.parametrize("setup, error, match", [c[1:] for c in INIT_CASES], ids=[c[0] for c in INIT_CASES])
def test_init_trainer_rejects_before_loading_and_keeps_the_run(ctx, no_model_loads, setup, error, match):  # noqa: F811
    changes = setup(ctx)
    with pytest.raises(error, match=match):
        init(**changes)
    assert not ctx.handle.run.released, "a failed InitTrainer released the run already alive"


@pytest.mark.parametrize("changes, match", [
    (dict(rank=33), r"rank: must be an integer from 1 to 32 \(the narrowest targeted layer\), got 33"),
    (dict(blocks="double:3"), r"blocks: 'double:3' is outside the model's 1 double blocks \(indices 0-0\)"),
    (dict(blocks="dubble"), r"blocks: cannot read 'dubble'; write 'all', 'double', 'single'"),
], ids=["rank above the layer width", "blocks out of range", "blocks misspelled"])
def test_init_trainer_rejects_lora_settings_the_model_cannot_take(ctx, no_model_loads, changes, match):  # noqa: F811
    """Tried on an empty model shaped from the file's header: no weight loads and the live run is kept."""
    with pytest.raises(ValueError, match=match):
        init(**changes)
    assert not ctx.handle.run.released, "a failed InitTrainer released the run already alive"


def test_a_pasted_quoted_path_and_a_sft_file_are_accepted(ctx):
    """Windows' "Copy as path" quotes the path; BFL first released Flux-dev as .sft: both are what users have."""
    sft = ctx.put("diffusion_models/flux1-dev.sft", ctx.model_file("diffusion_models/flux-tiny-bf16.safetensors"))
    handle = init(dataset_dir=f'"{ctx.base / "input" / "data"}"', transformer=sft)
    assert handle.run.trainer.config.transformer_path.endswith("flux1-dev.sft")
    assert len(handle.run.trainer.dataset.records) == 2


# ---------------------------------------------------------------------------------------------------------------
# The images users have: the odd ones load, the broken ones are skipped with a warning naming them


def test_odd_images_load_and_broken_ones_are_skipped_by_name(ctx, caplog):
    cmyk = Image.new("CMYK", (128, 128), (200, 0, 0, 0))
    sixteen_bit = Image.fromarray(np.full((128, 128), 50_000, dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90°, so this 256x128 file displays as 128x256
    frames = [Image.new("RGB", (128, 128), c) for c in ("red", "blue")]
    good = image_bytes(NOISE, "JPEG")
    name = ctx.dataset("odd", {
        "good.jpg": good, "good.txt": "café au lait".encode("cp1252"),
        "cmyk.jpg": image_bytes(cmyk, "JPEG"), "cmyk.txt": "a cyan square".encode("utf-16"),  # Notepad's "Unicode"
        "sixteen_bit.png": image_bytes(sixteen_bit, "PNG"), "sixteen_bit.txt": " \n",
        "rotated.jpg": image_bytes(NOISE.resize((256, 128)), "JPEG", exif=exif),
        "animated.gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        "truncated.jpg": good[: len(good) // 2], "zero.png": b"",
        "one_pixel.png": image_bytes(Image.new("RGB", (1, 1)), "PNG"),
        "bomb.png": png_claiming(30_000, 30_000), "big_bomb.png": png_claiming(10_000, 10_000),
        "notes.png": "not an image",
    })
    with caplog.at_level(logging.WARNING):
        handle = init(dataset_dir=name, resolutions="128")

    records = {r.path.name: r for r in handle.run.trainer.dataset.records}
    assert set(records) == {"good.jpg", "cmyk.jpg", "sixteen_bit.png", "rotated.jpg", "animated.gif"}
    assert records["rotated.jpg"].bucket == (64, 192)  # portrait, as displayed (the stored pixels are landscape)
    assert records["good.jpg"].caption == "fltglyph, café au lait"
    assert records["cmyk.jpg"].caption == "fltglyph, a cyan square"
    assert records["sixteen_bit.png"].caption == "fltglyph"
    skipped = [r.getMessage() for r in caplog.records if "skipping image" in r.getMessage()]
    for bad in ("truncated.jpg", "zero.png", "one_pixel.png", "bomb.png", "big_bomb.png", "notes.png"):
        assert sum(f"/{bad}:" in m for m in skipped) == 1, (bad, skipped)
    assert len(skipped) == 6
    warnings = caplog.text
    assert "good.txt is not UTF-8: read as Windows-1252" in warnings and "cmyk.txt is not UTF-8" not in warnings
    assert "sixteen_bit.txt is empty" in warnings and "no caption file" in warnings and "rotated.txt" in warnings
    for sample in handle.run.trainer.dataset.samples:  # every usable image was decoded and cached
        assert torch.isfinite(sample.latents).all()


# ---------------------------------------------------------------------------------------------------------------
# TrainLoop, ValidationSample and the XY grid


def with_checkpoint(handle: TrainingHandle) -> TrainingHandle:
    return save(handle)[0]


NODE_CASES = [
    ("loop of 0 steps", lambda h: h.run.train(h, 0), r"steps: 0; use 1 or more"),  # the widget's min is 1
    ("XY strengths empty", lambda h: nodes["XYLoraStrengthGrid"].grid(with_checkpoint(h), " ", "x", **SAMPLE),
     r"strengths: empty; give LoRA strengths like '0, 0.5, 1'"),
    ("XY strengths with a word",
     lambda h: nodes["XYLoraStrengthGrid"].grid(with_checkpoint(h), "0, half, 1", "x", **SAMPLE),
     r"strengths: 'half' is not a number"),
    ("XY strengths nan", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "0, nan", "x", **SAMPLE),
     r"strengths: 'nan' is not a number"),
    ("XY range backwards", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "1:0:0.2", "x", **SAMPLE),
     r"strengths: range '1:0:0.2' needs start <= stop and a step > 0"),
    ("XY range of two parts", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "0:1", "x", **SAMPLE),
     r"strengths: '0:1' is not a range; write it as start:stop:step"),
    ("XY range with step 0", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "0:1:0", "x", **SAMPLE),
     r"strengths: range '0:1:0' needs start <= stop and a step > 0"),
    ("XY range of a million cells", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "0:1:0.000001", "x", **SAMPLE),
     r"strengths: range '0:1:0.000001' gives \d+ values, more than 100; use a larger step"),
    ("XY prompt empty", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "0,1", "  ", **SAMPLE),
     r"prompt: empty; write the prompt"),
    ("XY without a checkpoint", lambda h: nodes["XYLoraStrengthGrid"].grid(h, "0,1", "x", **SAMPLE),
     r"no checkpoint was saved on the way to this node; connect it after SaveCheckpoint"),
    ("sample prompts empty", lambda h: nodes["ValidationSample"].sample(h, "\n \n", 1.0, **SAMPLE),
     r"prompts: empty; write one prompt per line"),
    ("sample width not a multiple of 16", lambda h: nodes["ValidationSample"].sample(
        h, "x", 1.0, **{**SAMPLE, "width": 100}), r"width: 100 is not a positive multiple of 16; use e.g. 96"),
]


def test_widgets_declare_the_limits_comfyui_enforces_before_running():
    """ComfyUI refuses a prompt whose INT/FLOAT widget is out of its min..max, so 0 steps never reaches a node."""
    loop = nodes["TrainLoop"].INPUT_TYPES()["required"]
    init_widgets = nodes["InitTrainer"].INPUT_TYPES()["required"]
    assert loop["steps"][1]["min"] == 1
    for name in ("rank", "repeats", "max_sequence_length"):
        assert init_widgets[name][1]["min"] == 1, name
    assert init_widgets["total_steps"][1]["min"] == 0  # 0 = auto
    assert init_widgets["learning_rate"][1]["min"] > 0 and init_widgets["alpha"][1]["min"] > 0


@pytest.mark.parametrize("call, match", [c[1:] for c in NODE_CASES], ids=[c[0] for c in NODE_CASES])
def test_nodes_reject_bad_widgets_and_the_run_goes_on(ctx, call, match):
    before = ctx.handle.run.trainer.snapshot()
    with pytest.raises(ValueError, match=match):
        call(ctx.handle)
    after = ctx.handle.run.trainer.snapshot()
    assert after.step == before.step
    assert all(torch.equal(after.lora[k], v) for k, v in before.lora.items())


# ---------------------------------------------------------------------------------------------------------------
# The CLI: `python -m trainer_core train CONFIG.toml`


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else f"{'-' if value < 0 else ''}inf"
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(toml_value(v) for v in value)}]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


@pytest.fixture(scope="module")
def cli_config(tiny_flux, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cli")
    dataset = write_demo_dataset(folder / "data", count=2, size=64)
    config = demo_config(tiny_flux, dataset, folder / "out", steps=4).replace(resolutions=(64,), max_sequence_length=8)
    return config.to_dict()


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, canary) -> Path:
    """The wrong files the CLI cases name as FILE/...: an SDXL file, a LoRA, a pickle, model folders of pickles."""
    folder = tmp_path_factory.mktemp("cli_files")
    save_file({k: torch.zeros(2, 2) for k in SDXL_KEYS}, str(folder / "sd_xl_base.safetensors"))
    save_file({k: torch.zeros(2, 2) for k in KOHYA_LORA_KEYS}, str(folder / "lora.safetensors"))
    torch.save(CreatesMarker(canary / "cli.ckpt"), folder / "flux1-dev.ckpt")
    for name, config, weights in [("vae_folder", {"_class_name": "AutoencoderKL"}, "diffusion_pytorch_model.bin"),
                                  ("clip_folder", {"model_type": "clip_text_model"}, "pytorch_model.bin"),
                                  ("flux_folder", {"_class_name": "FluxTransformer2DModel"},
                                   "diffusion_pytorch_model.bin")]:
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config))
        torch.save(CreatesMarker(canary / name), folder / name / weights)
    return folder


# the model files a config can name wrongly; tests/test_cli.py runs the settings, folder and resume cases as processes
CLI_CASES = [  # (id, config changes (None deletes), [plan] changes, extra arguments, expected message)
    ("total_steps negative", {"total_steps": -1}, {}, [], r"total_steps: -1; use 0 \(auto"),
    ("resolution 1000", {"resolutions": [512, 1000]}, {}, [], r"resolutions: 1000 is not a positive multiple of 64"),
    ("transformer misspelled", {"transformer_path": "TINY/flux-tiny-bf61.safetensors"}, {}, [],
     r"Flux transformer not found: .*flux-tiny-bf61.safetensors\. Did you mean: flux-tiny-bf16.safetensors"),
    ("SDXL as transformer", {"transformer_path": "FILE/sd_xl_base.safetensors"}, {}, [],
     r"sd_xl_base.safetensors appears to be an SDXL checkpoint, not a Flux transformer .*pick those instead"),
    ("pickle as transformer", {"transformer_path": "FILE/flux1-dev.ckpt"}, {}, [],
     r"flux1-dev.ckpt is a pickle checkpoint \(.ckpt\)\. Unpickling can run arbitrary code"),
    ("text encoders swapped", {"clip_path": "TINY/t5xxl_tiny.safetensors", "t5_path": "TINY/clip_l.safetensors"}, {},
     [], r"t5xxl_tiny.safetensors appears to be a T5 text encoder .*not the CLIP-L text encoder .*It belongs in the "
         r"T5 input: were two model inputs swapped\?"),
    ("VAE folder of pickle weights", {"vae_path": "FILE/vae_folder"}, {}, [],
     r"vae_folder holds only pickle weights \(diffusion_pytorch_model.bin\), which are refused: convert them"),
    ("CLIP folder of pickle weights", {"clip_path": "FILE/clip_folder"}, {}, [],
     r"clip_folder holds only pickle weights \(pytorch_model.bin\), which are refused"),
    ("transformer folder of pickle weights", {"transformer_path": "FILE/flux_folder"}, {}, [],
     r"flux_folder holds only pickle weights \(diffusion_pytorch_model.bin\), which are refused"),
    ("resume from a LoRA file", {}, {}, ["--resume", "FILE/lora.safetensors"],
     r"lora.safetensors is not a training state of this trainer \(a LoRA file\?\)"),
]


@pytest.mark.parametrize("changes, plan, args, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_reports_the_field_or_file_and_exits_2(cli_config, cli_files, tiny_flux, tmp_path, capsys, canary,
                                                   changes, plan, args, match):
    def resolve(value):
        if isinstance(value, str):
            return value.replace("TINY/", f"{tiny_flux.clip_l.parent}/").replace("FILE/", f"{cli_files}/")
        return value

    values = {k: v for k, v in {**cli_config, **changes}.items() if v is not None}
    lines = [f"{k} = {toml_value(resolve(v))}" for k, v in values.items()]
    plan = {"steps": cli_config["total_steps"], **plan}  # the schedule's length
    lines += ["[plan]", "prompts = []", *(f"{k} = {toml_value(v)}" for k, v in plan.items())]
    (tmp_path / "run.toml").write_text("\n".join(lines), encoding="utf-8")

    code = cli.main(["train", str(tmp_path / "run.toml"), *map(resolve, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and re.search(match, err), err
    assert not any(canary.iterdir()), "a pickle was unpickled"


@pytest.mark.parametrize("text, match", [
    ("output_name = 'café'".encode("cp1252"), r"run.toml is not UTF-8 text \(invalid continuation byte at byte 18\); "
                                               r"save it as UTF-8"),
    ("rank = 16\nlearning_rate = 1e-4 4",
     r"run.toml: not valid TOML \(.*at line 2, column 22\)+; fix the line it names"),
    ("rank = 16\nrank = 8", r"run.toml: not valid TOML \(Cannot overwrite a value"),
    ('dataset_dir = "C:\\Users\\me\\data"', r"not valid TOML \(.*at line 1, column 20\)+; fix the line it "
                                             r"names \(write Windows paths in 'single quotes' or with /\)"),
], ids=["Windows-1252", "two values on a line", "key twice", "Windows path in double quotes"])
def test_cli_names_the_line_of_a_broken_config(tmp_path, capsys, text, match):
    (tmp_path / "run.toml").write_bytes(text if isinstance(text, bytes) else text.encode())
    assert cli.main(["train", str(tmp_path / "run.toml")]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_names_a_missing_config_file(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.toml")]) == 2
    assert f"config file {tmp_path / 'missing.toml'} does not exist; give the path of a .toml file" in \
        capsys.readouterr().err
