"""Dataset folders as LoRA trainers lay them out (kohya `N_name`, several entries), the scan's handling of links,
empty files and over-long captions, the dataset report, and the caption tags written into the LoRA."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nodes.init_trainer import parse_datasets
from trainer_core import cli, lora
from trainer_core.checkpoints import load_training_state
from trainer_core.config import DatasetEntry, TrainConfig
from trainer_core.data import inspect_datasets, scan_dataset, scan_datasets, tag_frequency
from trainer_core.dataset_report import build_report, load_t5_tokenizer, perceptual_hash
from trainer_core.identity import dataset_changes, dataset_identity
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.tiny import MAX_SEQUENCE_LENGTH
from trainer_core.preflight import preflight
from trainer_core.trainer import Trainer


def photo(seed: int, size: tuple[int, int] = (256, 192)) -> Image.Image:
    """A smooth random picture: low-frequency structure, like a photo and unlike noise, so its hash is stable."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def entry(folder: Path, trigger_word: str = "", resolutions=(128,), repeats: int = 1) -> DatasetEntry:
    return DatasetEntry(str(folder), trigger_word, resolutions, repeats)


def put(folder: Path, name: str, image: Image.Image, caption: str | None = None, **save) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, "utf-8")
    return path


# --- folders -------------------------------------------------------------------------------------------------------


def test_kohya_folders_give_repeats_and_trigger(tmp_path):
    put(tmp_path, "10_ohwx woman/a.png", photo(0), "a woman in a park")
    put(tmp_path, "10_ohwx woman/b.png", photo(1), "ohwx woman smiling")
    put(tmp_path, "2_style/c.png", photo(2), "a street")
    put(tmp_path, "0_unused/d.png", photo(3), "left out")
    put(tmp_path, "plain/e.png", photo(4), "no repeats in the name")

    records = scan_dataset(tmp_path, "", resolutions=(128,), repeats=3)
    counts = {p: sum(r.path.name == p for r in records) for p in ("a.png", "b.png", "c.png", "d.png", "e.png")}
    assert counts == {"a.png": 10, "b.png": 10, "c.png": 2, "d.png": 0, "e.png": 3}
    captions = {r.path.name: r.caption for r in records}
    assert captions["a.png"] == "ohwx woman, a woman in a park"
    assert captions["b.png"] == "ohwx woman smiling"  # already holds it
    assert captions["c.png"] == "style, a street"
    assert captions["e.png"] == "no repeats in the name"
    # an explicit trigger word wins over the folder's name; the repeats still come from the name
    records = scan_dataset(tmp_path, "sks", resolutions=(128,))
    assert {r.caption for r in records if r.path.name == "a.png"} == {"sks, a woman in a park"}
    assert sum(r.path.name == "a.png" for r in records) == 10
    skipped = inspect_datasets([entry(tmp_path)]).skipped
    assert [(p.name, "0 repeats" in why) for p, why in skipped] == [("d.png", True)]


def test_several_datasets_each_with_its_own_settings(tmp_path):
    a, b = tmp_path / "subject", tmp_path / "style"
    put(a, "a.png", photo(0, (512, 512)), "a dog")
    put(b, "b.png", photo(1, (512, 512)), "a painting")
    config = TrainConfig.from_dict({
        "transformer_path": "t", "vae_path": "v", "clip_path": "c", "t5_path": "t5", "trigger_word": "top",
        "resolutions": [256],
        "datasets": [{"dataset_dir": "subject", "trigger_word": "sks", "repeats": 3},
                     {"dataset_dir": "style", "resolutions": "128,256"}],
    }, base_dir=tmp_path)
    entries = config.dataset_entries()
    assert entries == (DatasetEntry(str(a), "sks", (256,), 3, ""), DatasetEntry(str(b), "top", (128, 256), 1, ""))
    records = scan_datasets(entries)
    assert [(r.path.name, r.caption, r.bucket) for r in records] == (
        [("a.png", "sks, a dog", (256, 256))] * 3 + [("b.png", "top, a painting", (128, 128)),
                                                     ("b.png", "top, a painting", (256, 256))])
    # the identity covers every entry: a change in the second folder changes it, and the change names that folder
    before = dataset_identity(entries)
    (b / "b.txt").write_text("another caption", "utf-8")
    after = dataset_identity(entries)
    assert after.key != before.key
    assert dataset_changes(before.listing, after.listing) == f"in {b}: edited b.txt"
    # the one-folder form is the same as one entry
    single = TrainConfig(transformer_path="t", vae_path="v", clip_path="c", t5_path="t5", dataset_dir=str(a),
                         trigger_word="sks", resolutions=(256,), repeats=3)
    assert scan_datasets(single.dataset_entries()) == records[:3]


@pytest.mark.parametrize("values, match", [
    ({"dataset_dir": "x", "datasets": [{"dataset_dir": "y"}]}, "dataset_dir: give the one dataset folder, or several"),
    ({}, "dataset_dir: empty"),
    ({"datasets": [{"dataset_dir": "y", "repeat": 2}]}, r"datasets\[0\]: unknown key\(s\) repeat; a \[\[datasets\]\]"),
    ({"datasets": [{"trigger_word": "y"}]}, r"datasets\[0\]: no dataset_dir"),
    ({"datasets": [{"dataset_dir": "y"}, {"dataset_dir": "z", "repeats": 0}]}, r"datasets\[1\]\.repeats: 0"),
    ({"datasets": [{"dataset_dir": "y", "resolutions": [100]}]}, r"datasets\[0\]\.resolutions: \[100\]"),
    ({"datasets": ["y"]}, r"datasets\[0\]: 'y' is not a table"),
])
def test_dataset_settings_errors_name_the_entry(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"transformer_path": "t", "vae_path": "v", "clip_path": "c", "t5_path": "t5", **values})


def test_a_missing_folder_among_several_names_its_entry(tmp_path):
    put(tmp_path / "a", "a.png", photo(0))
    with pytest.raises(FileNotFoundError, match=rf"datasets\[1\]: dataset folder {tmp_path / 'gone'} does not exist"):
        scan_datasets([entry(tmp_path / "a"), entry(tmp_path / "gone")])


def test_node_dataset_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_LORA_TRAINER_BASE_DIR", str(tmp_path))
    (tmp_path / "input" / "cats").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    entries = parse_datasets(f"cats\n\n{tmp_path / 'dogs'} | sks dog | 512,1024 | 5\ncats||768", "top", "256", 2)
    cats = str(tmp_path / "input" / "cats")
    assert entries == [DatasetEntry(cats, "top", (256,), 2), DatasetEntry(str(tmp_path / "dogs"), "sks dog", (512, 1024), 5),
                       DatasetEntry(cats, "top", (768,), 2)]
    with pytest.raises(ValueError, match="dataset_dir line 2: repeats 'many' is not a whole number"):
        parse_datasets("cats\ncats | x | 512 | many", "", "512", 1)
    with pytest.raises(ValueError, match="dataset_dir line 1: .* has 5 parts"):
        parse_datasets("cats|a|512|1|extra\ncats", "", "512", 1)
    with pytest.raises(FileNotFoundError, match="dataset_dir: .*/input/nowhere is not a folder"):
        parse_datasets("cats\nnowhere", "", "512", 1)


# --- the scan: links, empty files, long captions --------------------------------------------------------------------


def test_links_are_followed_once_and_broken_links_named(tmp_path, caplog):
    put(tmp_path, "a.png", photo(0), "one")
    put(tmp_path, "sub/b.png", photo(1), "two")
    os.symlink(".", tmp_path / "again")  # a link to the folder itself: every image would be found twice
    os.symlink(tmp_path / "a.png", tmp_path / "sub" / "also_a.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    with caplog.at_level(logging.WARNING):
        scan = inspect_datasets([entry(tmp_path)])
    assert [im.path.relative_to(tmp_path).as_posix() for im in scan.images] == ["a.png", "sub/b.png"]
    reasons = {p.relative_to(tmp_path).as_posix(): why for p, why in scan.skipped}
    assert "does not exist" in reasons["dangling.png"] and "loops" in reasons["loop.png"]
    assert "the same file as" in reasons["again/a.png"] and "the same file as" in reasons["sub/also_a.png"]
    assert "dangling.png" in caplog.text and "loop.png" in caplog.text


def test_an_empty_image_file_is_called_empty(tmp_path, caplog):
    put(tmp_path, "a.png", photo(0))
    (tmp_path / "zero.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        scan = inspect_datasets([entry(tmp_path)])
    assert [(p.name, why) for p, why in scan.skipped] == [("zero.jpg", "the file is empty (0 bytes)")]
    assert "zero.jpg: the file is empty" in caplog.text


def test_over_long_captions_are_named_with_the_tokens_dropped(tiny_flux, tmp_path):
    tokenizer = load_t5_tokenizer(tiny_flux.tokenizers / "t5")
    short, long = "a photo", " ".join(["a photo of a dog"] * 20)
    put(tmp_path, "short.png", photo(0), short)
    put(tmp_path, "long.png", photo(1), long)
    report = build_report([entry(tmp_path)], t5_tokenizer=tokenizer,
                          token_limit=MAX_SEQUENCE_LENGTH)
    expected = len(tokenizer(long).input_ids) - MAX_SEQUENCE_LENGTH
    assert expected > 0 and report.dropped_tokens == {tmp_path / "long.png": expected}
    assert f"long.png ({expected} tokens dropped)" in report.text()


# --- the report ----------------------------------------------------------------------------------------------------


def planted_dataset(folder: Path) -> Path:
    for i in range(6):
        put(folder, f"img{i}.png", photo(10 + i, (640, 480)), f"sks, photo {i}, a red chair")
    original = Image.open(folder / "img2.png")
    put(folder, "copy_resized.jpg", original.resize((560, 420)), "sks, a copy", quality=70)  # re-encoded, resized
    put(folder, "copy_brighter.png", original.point(lambda v: min(255, v + 12)), "sks, brighter")
    put(folder, "small.png", photo(30, (200, 150)), "sks, too small")
    put(folder, "no_caption.png", photo(31, (640, 480)))
    put(folder, "empty_caption.png", photo(32, (640, 480)), "  ")
    put(folder, "no_trigger.png", photo(33, (640, 480)), "just a chair")
    return folder


def test_report_finds_planted_problems_and_names_the_files(tmp_path):
    folder = planted_dataset(tmp_path)
    report = build_report([entry(folder, "sks", (512,))])

    pairs = {frozenset((a.name, b.name)) for a, b, _ in report.near_duplicates}
    assert pairs == {frozenset(p) for p in [("img2.png", "copy_resized.jpg"), ("img2.png", "copy_brighter.png"),
                                            ("copy_resized.jpg", "copy_brighter.png")]}
    assert [im.path.name for im in report.undersized()] == ["small.png"]
    issues = {k: [p.name for p in v] for k, v in report.caption_issues().items()}
    assert issues == {"missing": ["no_caption.png"], "empty": ["empty_caption.png"]}
    text = report.text()
    assert "3 near-duplicate pair(s) (perceptual hash within 10/64 bits, mean colour within 24/255)" in text and "copy_resized.jpg ~ img2.png" in text
    assert "small.png  200x150 -> 128x128" in text
    assert "trigger 'sks': already in 9 of 12 caption(s)" in text
    assert "chair 7" in text  # word counts: captions holding the word
    serious = [t for s, t in report.findings() if s]
    assert len(serious) == 4, serious  # duplicates, undersized, missing and empty captions
    sheet = report.contact_sheet()
    assert sheet.size == (10 * 136, 2 * 164)  # 12 images in rows of 10
    assert report.summary().startswith("dataset: 12 image(s) used, 0 skipped, 12 records per epoch")


def test_perceptual_hash_keeps_distinct_images_apart():
    hashes = [perceptual_hash(photo(seed)) for seed in range(40)]
    distances = [(a ^ b).bit_count() for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distances) > 10 and 24 < np.mean(distances) < 40


def test_cli_report_of_a_config_and_its_contact_sheet(tiny_flux, tmp_path, capsys):
    folder = planted_dataset(tmp_path / "data")
    (tmp_path / "train.toml").write_text(
        f"transformer_path = '{tiny_flux.transformer_bf16}'\nvae_path = 'v'\nclip_path = 'c'\nt5_path = 't5'\n"
        f"tokenizer_dir = '{tiny_flux.tokenizers}'\nmax_sequence_length = 8\n"
        "[[datasets]]\ndataset_dir = 'data'\ntrigger_word = 'sks'\nresolutions = [512]\n[plan]\nsteps = 10\n")
    sheet = tmp_path / "sheet.png"
    assert cli.main(["report", str(tmp_path / "train.toml"), "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert f"Folder {folder}: resolutions 512, 12 image(s)" in out
    assert "over T5's 8 tokens" in out and "tokens dropped" in out
    assert Image.open(sheet).size == (1360, 328)


def test_preflight_logs_the_summary_and_warns_on_serious_findings(tiny_flux, tmp_path, caplog):
    folder = planted_dataset(tmp_path / "data")
    config = demo_config(tiny_flux, folder, tmp_path / "out", steps=10).replace(resolutions=(512,), trigger_word="sks",
                                                                                 max_sequence_length=8)
    with caplog.at_level(logging.INFO):
        records = preflight(config)  # no model loads
    assert len(records) == 12
    assert "dataset: 12 image(s) used, 0 skipped, 12 records per epoch" in caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "trainer_core.preflight"]
    for finding in ("near-duplicate", "small.png", "missing: no_caption.png", "empty: empty_caption.png",
                    "longer than T5's 8 tokens"):
        assert sum(finding in m for m in warned) == 1, (finding, warned)
    assert len(warned) == 5


# --- training on several datasets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    write_demo_dataset(root / "first", count=2, size=64)
    write_demo_dataset(root / "second" / "2_zqx", count=1, size=128)
    return [DatasetEntry(str(root / "first"), "fltglyph", (64,), 1), DatasetEntry(str(root / "second"), "", (64, 128), 1)]


def test_several_datasets_train_resume_exactly_and_tag_the_lora(tiny_flux, two_datasets, tmp_path, caplog):
    config = demo_config(tiny_flux, Path(), tmp_path / "out", steps=50).replace(dataset_dir="", datasets=two_datasets)
    with caplog.at_level(logging.INFO):
        straight = Trainer.from_config(config)
    assert "dataset: 3 image(s) used, 0 skipped, 6 records per epoch in 2 bucket(s) over 2 folder(s)" in caplog.text
    assert sorted({r.bucket for r in straight.dataset.records}) == [(64, 64), (128, 128)]
    straight.train(6)

    split = Trainer.from_config(config)
    split.train(3)
    path = split.save_state(tmp_path / "s.state.safetensors")
    resumed = Trainer.from_config(config)
    resumed.restore(load_training_state(path)[0])
    resumed.train(3)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for k, v in lora.lora_state(straight.transformer).items():
        torch.testing.assert_close(lora.lora_state(resumed.transformer)[k], v)

    saved = resumed.save_lora(tmp_path / "l.safetensors")
    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    tags = json.loads(metadata["ss_tag_frequency"])
    assert tags == {"first": {"fltglyph": 2, "a glyph on a teal background": 1, "a glyph on an orange background": 1},
                    "2_zqx": {"zqx": 1, "a glyph on a teal background": 1}}
    assert metadata["ss_resolution"] == "64,128" and metadata["trigger_word"] == "fltglyph"
    assert tag_frequency(resumed.dataset.records) == tags


def test_dataset_report_node_gives_text_and_contact_sheet(tmp_path, monkeypatch):
    from nodes.dataset import DatasetReport

    monkeypatch.setenv("FLUX_LORA_TRAINER_BASE_DIR", str(tmp_path))
    folder = planted_dataset(tmp_path / "input" / "chairs")
    out = DatasetReport().report("chairs", "sks", "512", 1, 512)
    text, sheet = out["result"]
    assert f"Folder {folder}" in text and "copy_resized.jpg ~ img2.png" in text
    assert sheet.shape == (1, 2 * 164, 10 * 136, 3) and len(out["ui"]["images"]) == 1
    assert out["ui"]["text"][0].startswith("dataset: 12 image(s) used")
