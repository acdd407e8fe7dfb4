"""Dataset scanning, buckets, image decoding, batch order, and the latent / text-embedding caches."""
from __future__ import annotations

import gc
import logging
import math
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from trainer_core.caching import cache_dataset
from trainer_core.config import DatasetEntry
from trainer_core.data import (
    ImageRecord,
    batches,
    bucket_sizes,
    choose_bucket,
    load_image,
    scan_dataset,
)
from trainer_core.identity import dataset_identity

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SEQ_LEN, EMBED_DIM, POOLED_DIM = 5, 12, 6


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """A `mode` image whose left half is `left` and right half `right`."""
    im = Image.new(mode, size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    return im


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def mean_rgb(pixels: torch.Tensor) -> list[float]:
    """(3, H, W) -> the mean of each channel."""
    return pixels.mean(dim=(1, 2)).tolist()


# --- buckets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_bucket_sizes_are_multiples_of_64_within_area_and_aspect(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= resolution**2
        assert 1 / 4 <= w / h <= 4
        assert (h, w) in sizes
    assert max(max(s) for s in sizes) == 2 * resolution


def test_bucket_keeps_the_aspect_ratio_and_never_enlarges_the_image():
    for width in range(256, 3000, 97):
        for height in range(256, 3000, 89):
            if max(width / height, height / width) > 4:
                continue
            for resolution in (512, 1024):
                bw, bh = choose_bucket(width, height, resolution)
                assert bw * bh <= min(resolution**2, width * height)
                assert max(bw / width, bh / height) <= 1.1 + 1e-9  # at most a slight stretch of one side
                if width * height >= resolution**2:
                    # a large image uses the whole area of its resolution, at about its own aspect ratio
                    assert bw * bh > 0.75 * resolution**2
                    assert abs(math.log(bw / bh) - math.log(width / height)) < 0.16


def test_scan_buckets_each_image_at_each_resolution(tmp_path):
    save(Image.new("RGB", (1024, 768), RED), tmp_path / "wide.png")
    save(Image.new("RGB", (600, 1200), RED), tmp_path / "tall.jpg")
    save(Image.new("RGB", (300, 300), RED), tmp_path / "small.png")  # under both resolutions: one shared bucket

    records = scan_dataset(tmp_path, "sks", resolutions=(1024, 512), repeats=3)

    by_image: dict[str, list[tuple[int, int]]] = {}
    for r in records:
        by_image.setdefault(r.path.name, []).append(r.bucket)
    assert sorted(by_image) == ["small.png", "tall.jpg", "wide.png"]
    assert [r.path.name for r in records] == sorted(r.path.name for r in records)  # sorted, repeats adjacent
    assert len(by_image["small.png"]) == 3
    for name in ("wide.png", "tall.jpg"):
        buckets = sorted(set(by_image[name]), key=lambda b: b[0] * b[1])
        assert len(buckets) == 2 and len(by_image[name]) == 6
        assert buckets[0][0] * buckets[0][1] <= 512**2 < buckets[1][0] * buckets[1][1] <= 1024**2
    assert all(w > h for w, h in by_image["wide.png"]) and all(w < h for w, h in by_image["tall.jpg"])
    assert scan_dataset(tmp_path, "sks", resolutions=(512, 1024), repeats=3) == records


def test_resolutions_and_repeats_are_validated(tmp_path):
    save(Image.new("RGB", (128, 128)), tmp_path / "a.png")
    for bad in [(500,), (), (0,), (512, 1000)]:
        with pytest.raises(ValueError, match="resolutions"):
            scan_dataset(tmp_path, "sks", resolutions=bad)
    with pytest.raises(ValueError, match="repeats"):
        scan_dataset(tmp_path, "sks", repeats=0)


# --- the folder and its files ------------------------------------------------------------------------------------


def test_folder_errors_name_the_folder_and_say_what_to_do(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        scan_dataset(missing, "sks")

    a_file = write(tmp_path / "file.txt", "x")
    with pytest.raises(ValueError, match=f"{a_file} is a file, not a folder"):
        scan_dataset(a_file, "sks")

    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty / "notes.md", "no images here")
    with pytest.raises(ValueError, match=f"{empty} has no images: put the images"):
        scan_dataset(empty, "sks")

    captions_only = tmp_path / "captions"
    write(captions_only / "a.txt", "a dog")
    write(captions_only / "b.txt", "a cat")
    with pytest.raises(ValueError, match=f"{captions_only} has only 2 caption"):
        scan_dataset(captions_only, "sks")

    broken = tmp_path / "broken"
    write(broken / "a.png", b"")
    write(broken / "b.jpg", "not a jpeg")
    with pytest.raises(ValueError, match=f"none of the 2 images in dataset folder {broken} could be read"):
        scan_dataset(broken, "sks")


def test_unreadable_images_are_named_in_the_log_and_skipped(tmp_path, caplog, monkeypatch):
    save(Image.new("RGB", (128, 128), RED), tmp_path / "good.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    jpeg = save(noise, tmp_path / "whole.jpg", quality=90).read_bytes()
    (tmp_path / "whole.jpg").unlink()
    write(tmp_path / "truncated.jpg", jpeg[: len(jpeg) // 2])
    png = save(noise, tmp_path / "whole.png").read_bytes()
    (tmp_path / "whole.png").unlink()
    write(tmp_path / "truncated.png", png[: len(png) // 2])
    write(tmp_path / "zero.jpg", b"")
    save(Image.new("RGB", (1, 1)), tmp_path / "one_pixel.png")
    save(Image.new("RGB", (400, 40)), tmp_path / "thin.png")
    write(tmp_path / "text.png", "this is not an image")
    save(Image.new("RGB", (200, 200)), tmp_path / "bomb.png")
    frames = [Image.new("RGB", (128, 128), colour) for colour in (RED, BLUE)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write(tmp_path / "readme.md", "ignored")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 130 * 130)  # bomb.png is over PIL's limit, the rest under

    with caplog.at_level(logging.WARNING):
        records = scan_dataset(tmp_path, "sks", resolutions=(128,))

    assert [r.path.name for r in records] == ["animated.gif", "good.png"]
    skipped = [r.getMessage() for r in caplog.records if "skipping image" in r.getMessage()]
    for name in ("truncated.jpg", "truncated.png", "zero.jpg", "one_pixel.png", "thin.png", "text.png", "bomb.png"):
        assert sum(name in message for message in skipped) == 1, name
    assert any("one_pixel.png" in m and "1x1" in m for m in skipped)
    assert any("truncated.jpg" in m and "truncated" in m.split("truncated.jpg")[1] for m in skipped)
    assert "readme.md" not in caplog.text
    gif = load_image(records[0])
    assert mean_rgb(gif) == pytest.approx([1, -1, -1], abs=0.02)  # the first frame


def test_captions_and_trigger_word(tmp_path, caplog):
    image = Image.new("RGB", (128, 128))
    captions = {
        "a": "a photo of a dog",
        "b": "SKS dog\non the grass",  # already holds the trigger word: kept as is
        "c": "sksdog runs",  # only as part of a word: the trigger is prepended
        "e": "  \n ",
    }
    for stem, text in captions.items():
        save(image, tmp_path / f"{stem}.png")
        write(tmp_path / f"{stem}.txt", text)
    save(image, tmp_path / "d.png")  # no caption file
    save(image, tmp_path / "f.jpg")
    write(tmp_path / "f.txt", "café au lait".encode("cp1252"))
    save(image, tmp_path / "g.webp")
    write(tmp_path / "g.txt", "\ufeffnaïve art")  # UTF-8 with a byte-order mark
    save(image, tmp_path / "sub" / "h.png")
    write(tmp_path / "sub" / "h.txt", "in a subfolder")
    save(image, tmp_path / "sub" / "deeper" / "i.png")  # two levels down: not scanned
    save(image, tmp_path / ".hidden" / "j.png")
    write(tmp_path / "notes.json", "{}")

    with caplog.at_level(logging.WARNING):
        records = scan_dataset(tmp_path, "sks", resolutions=(128,))

    assert {r.path.relative_to(tmp_path).as_posix(): r.caption for r in records} == {
        "a.png": "sks, a photo of a dog",
        "b.png": "SKS dog on the grass",
        "c.png": "sks, sksdog runs",
        "d.png": "sks",
        "e.png": "sks",
        "f.jpg": "sks, café au lait",
        "g.webp": "sks, naïve art",
        "sub/h.png": "sks, in a subfolder",
    }
    warned = [r.getMessage() for r in caplog.records]
    assert any("d.txt" in m and "no caption" in m for m in warned)
    assert any("e.txt" in m and "empty" in m for m in warned)
    assert any("f.txt" in m and "not UTF-8" in m for m in warned)
    assert not any("g.txt" in m or "a.txt" in m for m in warned)
    without_trigger = {r.path.name: r.caption for r in scan_dataset(tmp_path, "", resolutions=(128,))}
    assert without_trigger["a.png"] == "a photo of a dog" and without_trigger["d.png"] == ""


# --- decoding ----------------------------------------------------------------------------------------------------


def test_dataset_identity_changes_with_each_edit_and_not_with_the_folder_path(tmp_path):
    folder = tmp_path / "data"
    for i in range(2):
        save(halves((96, 96), RED, BLUE), folder / f"img{i}.png")
        write(folder / f"img{i}.txt", f"caption {i}")

    def fingerprint(path=folder, trigger="ohwx"):
        return dataset_identity([DatasetEntry(str(path), trigger, (512,), 1)]).key

    base = fingerprint()
    scan_dataset(folder, "ohwx")
    assert fingerprint() == base  # scanning reads, it changes nothing
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert fingerprint(moved) == base
    moved.rename(folder)
    assert fingerprint(trigger="sks") != base  # the captions trained on changed
    write(folder / "img0.txt", "caption edited")
    edited = fingerprint()
    assert edited != base
    write(folder / "img0.txt", "caption edited")  # saved again unchanged: the same caption, the same data
    assert fingerprint() == edited
    save(halves((96, 96), GREEN, BLUE), folder / "img1.png")  # same size on disk is possible: mtime still moves
    repainted = fingerprint()
    assert repainted != edited
    save(halves((96, 96), RED, BLUE), folder / "img2.png")
    assert fingerprint() != repainted


@pytest.mark.parametrize(
    "name, image, left, right, tolerance",
    [
        # transparent pixels are composited on white
        ("rgba.png", halves((128, 128), (255, 0, 0, 255), (0, 255, 0, 0), "RGBA"), RED, (255, 255, 255), 0),
        ("la.png", halves((128, 128), (100, 255), (100, 0), "LA"), (100,) * 3, (255, 255, 255), 0),
        ("grey.png", halves((128, 128), 0, 200, "L"), (0, 0, 0), (200,) * 3, 0),
        # 16-bit grey is scaled down (PIL's own convert would clip 32896 to 255)
        ("grey16.png", halves((128, 128), 65535, 32896, "I;16"), (255,) * 3, (128,) * 3, 0),
        ("grey32.tif", halves((128, 128), 65535, 32896, "I"), (255,) * 3, (128,) * 3, 0),
        ("cmyk.jpg", halves((128, 128), (255, 0, 0, 0), (0, 0, 0, 255), "CMYK"), (0, 255, 255), (0, 0, 0), 0.05),
        ("rgb.webp", halves((128, 128), RED, BLUE), RED, BLUE, 0.05),
    ],
)
def test_load_image_converts_every_mode_to_rgb(tmp_path, name, image, left, right, tolerance):
    path = save(image, tmp_path / name, **({"quality": 100} if name.endswith((".jpg", ".webp")) else {}))
    pixels = load_image(ImageRecord(path, "", (128, 128)))
    assert pixels.shape == (3, 128, 128) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    expected = lambda rgb: [v / 127.5 - 1 for v in rgb]  # noqa: E731
    assert mean_rgb(pixels[:, :, 8:56]) == pytest.approx(expected(left), abs=tolerance + 1e-6)
    assert mean_rgb(pixels[:, :, 72:120]) == pytest.approx(expected(right), abs=tolerance + 1e-6)


def test_palette_image_with_transparency(tmp_path):
    im = halves((128, 128), 0, 1, "P")
    im.putpalette([*RED, *GREEN])
    path = save(im, tmp_path / "palette.png", transparency=1)
    pixels = load_image(ImageRecord(path, "", (128, 128)))
    assert mean_rgb(pixels[:, :, :64]) == pytest.approx([1, -1, -1])
    assert mean_rgb(pixels[:, :, 64:]) == pytest.approx([1, 1, 1])  # the transparent index is white, not green


def test_exif_orientation_turns_the_pixels(tmp_path):
    # stored 512 x 256, red left / blue right; orientation 6 says "turn 90 degrees clockwise to display"
    stored = halves((512, 256), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = save(stored, tmp_path / "turned" / "turned.jpg", exif=exif, quality=95)
    plain = save(stored, tmp_path / "plain" / "plain.jpg", quality=95)

    (record,) = scan_dataset(turned.parent, "sks", resolutions=(256,))
    (plain_record,) = scan_dataset(plain.parent, "sks", resolutions=(256,))
    assert record.path == turned
    width, height = record.bucket
    assert height > width and plain_record.bucket == (height, width)

    pixels = load_image(record)
    assert pixels.shape == (3, height, width)
    assert mean_rgb(pixels[:, : height // 4]) == pytest.approx([1, -1, -1], abs=0.05)  # red on top
    assert mean_rgb(pixels[:, -height // 4 :]) == pytest.approx([-1, -1, 1], abs=0.05)  # blue below
    plain_pixels = load_image(plain_record)
    assert mean_rgb(plain_pixels[:, :, : height // 4]) == pytest.approx([1, -1, -1], abs=0.05)  # red on the left


def test_load_image_covers_the_bucket_centre_crops_and_flips(tmp_path):
    # a 3:1 image: green | red | blue thirds; a 2:1 bucket crops the outer sixth of each side
    im = Image.new("RGB", (600, 200), GREEN)
    im.paste(RED, (200, 0, 400, 200))
    im.paste(BLUE, (400, 0, 600, 200))
    path = save(im, tmp_path / "thirds.png")
    record = ImageRecord(path, "", (256, 128))

    pixels = load_image(record)
    assert pixels.shape == (3, 128, 256)
    # the crop keeps x in [50, 550) of 600: green is 150 wide, red 200, blue 150 -> 64 | 85 | 64 at 256 px wide
    assert mean_rgb(pixels[:, :, :60]) == pytest.approx([-1, 1, -1], abs=0.02)
    assert mean_rgb(pixels[:, :, 70:186]) == pytest.approx([1, -1, -1], abs=0.02)
    assert mean_rgb(pixels[:, :, -60:]) == pytest.approx([-1, -1, 1], abs=0.02)
    assert torch.equal(load_image(record, flip=True), pixels.flip(-1))


# --- batch order -------------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_epoch_and_share_a_bucket():
    buckets = [(512, 512)] * 11 + [(576, 448)] * 7 + [(448, 576)] * 5
    records = [ImageRecord(Path(f"{i}.png"), "", b) for i, b in enumerate(buckets)]

    epoch0 = batches(records, batch_size=4, seed=7, epoch=0)
    assert batches(records, batch_size=4, seed=7, epoch=0) == epoch0
    assert batches(records, batch_size=4, seed=7, epoch=1) != epoch0
    assert batches(records, batch_size=4, seed=8, epoch=0) != epoch0
    for order in (epoch0, batches(records, batch_size=4, seed=7, epoch=1)):
        assert sorted(i for batch in order for i in batch) == list(range(len(records)))
        assert all(1 <= len(batch) <= 4 and len({records[i].bucket for i in batch}) == 1 for batch in order)
        assert len(order) == 3 + 2 + 2  # ceil(11/4) + ceil(7/4) + ceil(5/4)
    assert [i for batch in epoch0 for i in batch] != list(range(len(records)))  # really shuffled
    def bucket_changes(order: list[list[int]]) -> int:
        return sum(records[a[0]].bucket != records[b[0]].bucket for a, b in zip(order, order[1:]))

    assert max(bucket_changes(batches(records, 4, seed, 0)) for seed in range(5)) > 2  # buckets interleave
    with pytest.raises(ValueError, match="batch_size"):
        batches(records, batch_size=0, seed=7, epoch=0)


# --- caching -----------------------------------------------------------------------------------------------------


def tiny_vae() -> AutoencoderKL:
    """A 16-channel AutoencoderKL with Flux's shift and scale and 8x downsampling, small enough for the CPU."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=16,
        norm_num_groups=2,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return tiny_vae()


class FakeTextEncoders:
    """Stands in for `models.TextEncoders`: a fixed random embedding per prompt; records every prompt encoded."""

    def __init__(self):
        self.prompts: list[str] = []

    @staticmethod
    def embed(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        return torch.randn(SEQ_LEN, EMBED_DIM, generator=g), torch.randn(POOLED_DIM, generator=g)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.prompts += prompts
        prompt_embeds, pooled = zip(*map(self.embed, prompts))
        return torch.stack(prompt_embeds), torch.stack(pooled)


def count_vae_calls(vae: AutoencoderKL, monkeypatch) -> list[int]:
    """Patch `vae.encode` to record the batch size of every call."""
    calls: list[int] = []
    encode = vae.encode

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return calls


def manual_latents(vae: AutoencoderKL, record: ImageRecord, flip: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return (vae.encode(load_image(record, flip)[None]).latent_dist.mode()[0] - 0.1159) * 0.3611


@pytest.fixture
def records(tmp_path) -> list[ImageRecord]:
    """Four images in three buckets at resolution 256 and two captions, twice each."""
    folder = tmp_path / "images"
    for name, size, left, caption in [
        ("a.png", (256, 256), RED, "red"),
        ("b.png", (384, 256), RED, "red"),
        ("c.jpg", (256, 384), GREEN, "blue"),
        ("d.png", (256, 256), GREEN, "blue"),
    ]:
        save(halves(size, left, BLUE), folder / name)
        write((folder / name).with_suffix(".txt"), caption)
    return scan_dataset(folder, "sks", resolutions=(256,), repeats=2)


def test_cache_shapes_shift_scale_and_each_input_encoded_once(records, vae, monkeypatch):
    assert len({r.bucket for r in records}) == 3
    calls = count_vae_calls(vae, monkeypatch)
    text_encoders = FakeTextEncoders()

    cached = cache_dataset(records, vae, text_encoders, batch_size=2)

    assert sorted(calls) == [1, 1, 2]  # the two square images share a batch
    assert sorted(text_encoders.prompts) == ["", "sks, blue", "sks, red"]
    assert cached.flipped is None and cached.records == records and len(cached.samples) == len(records)
    for record, sample in zip(records, cached.samples):
        width, height = record.bucket
        assert sample.latents.shape == (16, height // 8, width // 8) and sample.latents.dtype == torch.float32
        assert torch.allclose(sample.latents, manual_latents(vae, record), atol=1e-5)
        expected_embeds, expected_pooled = FakeTextEncoders.embed(record.caption)
        assert torch.equal(sample.prompt_embeds, expected_embeds) and torch.equal(sample.pooled, expected_pooled)
        assert (sample.caption, sample.bucket) == (record.caption, record.bucket)
    assert cached.samples[0].latents is cached.samples[1].latents  # repeats share one tensor
    assert torch.equal(cached.empty_prompt[0], FakeTextEncoders.embed("")[0])
    assert torch.equal(cached.empty_prompt[1], FakeTextEncoders.embed("")[1])


def test_flip_caches_the_mirrored_image_with_the_same_text(records, vae):
    cached = cache_dataset(records, vae, FakeTextEncoders(), flip=True)

    assert len(cached.flipped) == len(cached.samples)
    for record, sample, flipped in zip(records, cached.samples, cached.flipped):
        assert torch.allclose(flipped.latents, manual_latents(vae, record, flip=True), atol=1e-5)
        assert not torch.allclose(flipped.latents, sample.latents, atol=1e-3)
        assert flipped.prompt_embeds is sample.prompt_embeds and flipped.caption == sample.caption


def test_second_run_reads_the_disk_cache_without_calling_the_models(records, vae, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    identity = "ae:1234|clip:5678|t5:9abc|float32"
    first = cache_dataset(records, vae, FakeTextEncoders(), cache_dir=cache_dir, flip=True, encoder_identity=identity)
    names = [p.name for p in cache_dir.iterdir()]
    assert sum(n.startswith("latents-") for n in names) == 4 * 2 and sum(n.startswith("text-") for n in names) == 3
    assert all(n.endswith(".safetensors") for n in names) and len(names) == 8 + 3  # no temporary file left

    calls = count_vae_calls(vae, monkeypatch)
    text_encoders = FakeTextEncoders()
    second = cache_dataset(records, vae, text_encoders, cache_dir=cache_dir, flip=True, encoder_identity=identity)
    assert calls == [] and text_encoders.prompts == []
    for a, b in zip(first.samples + first.flipped, second.samples + second.flipped):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
        assert torch.equal(a.pooled, b.pooled)

    # other models must not reuse this cache
    cache_dataset(records, vae, text_encoders, cache_dir=cache_dir, encoder_identity=identity.replace("1234", "4321"))
    assert sum(calls) == 4 and len(text_encoders.prompts) == 3

    with pytest.raises(ValueError, match="encoder_identity"):
        cache_dataset(records, vae, text_encoders, cache_dir=cache_dir)


def test_damaged_cache_files_are_recomputed_with_a_warning(records, vae, tmp_path, monkeypatch, caplog):
    cache_dir = tmp_path / "cache"
    ids = {"encoder_identity": "ae|te"}
    first = cache_dataset(records, vae, FakeTextEncoders(), cache_dir=cache_dir, **ids)
    latent_file = sorted(cache_dir.glob("latents-*.safetensors"))[0]
    text_file = sorted(cache_dir.glob("text-*.safetensors"))[0]
    latent_file.write_bytes(b"garbage")
    text_file.write_bytes(text_file.read_bytes()[:-10])  # truncated

    calls = count_vae_calls(vae, monkeypatch)
    text_encoders = FakeTextEncoders()
    with caplog.at_level(logging.WARNING):
        second = cache_dataset(records, vae, text_encoders, cache_dir=cache_dir, **ids)

    assert calls == [1] and len(text_encoders.prompts) == 1
    assert latent_file.name in caplog.text and text_file.name in caplog.text
    for a, b in zip(first.samples, second.samples):
        assert torch.allclose(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
    third = FakeTextEncoders()
    cache_dataset(records, vae, third, cache_dir=cache_dir, **ids)  # the rewritten files are whole again
    assert calls == [1] and third.prompts == []


def test_cache_reports_progress_and_keeps_no_reference_to_the_models(records):
    vae, text_encoders = tiny_vae(), FakeTextEncoders()
    progress: list[tuple[int, int]] = []
    with torch.inference_mode():  # as ComfyUI runs nodes
        cached = cache_dataset(records, vae, text_encoders, on_progress=lambda *done_total: progress.append(done_total))

    total = 4 + 3  # distinct images + distinct captions with ""
    assert progress[-1] == (total, total) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    sample = cached.samples[0]
    for tensor in (sample.latents, sample.prompt_embeds, *cached.empty_prompt):
        assert not tensor.is_inference() and not tensor.requires_grad and tensor.device.type == "cpu"
    vae_ref, text_ref = weakref.ref(vae), weakref.ref(text_encoders)
    del vae, text_encoders
    gc.collect()
    assert vae_ref() is None and text_ref() is None
