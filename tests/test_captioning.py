"""Auto-captioning with a tiny random Florence-2 built from a config: its captions are gibberish, so the tests check
which files are written, in which order, what is never overwritten, and cancel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (BartTokenizerFast, CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration,
                          Florence2Processor)

from trainer_core.captioning import caption_dataset

IMAGE_TOKENS = 65  # what the tiny vision tower gives for a 32x32 input: 8x8 patches and one pooled token


def write_tiny_florence2(folder: Path) -> Path:
    """A random Florence-2 of a few thousand weights with a byte-level BART tokenizer, saved as transformers saves one."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet()),
                                         "<mask>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    tokenizer = BartTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                  extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = IMAGE_TOKENS
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=256, d_model=8,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=8, decoder_ffn_dim=8,
                         encoder_attention_heads=1, decoder_attention_heads=1, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[8], num_heads=[1], num_groups=[1], projection_dim=8),
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    Florence2Processor(images, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def florence(tmp_path_factory) -> Path:
    return write_tiny_florence2(tmp_path_factory.mktemp("LLM") / "Florence-2-tiny")


def dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    colours = {"a": "red", "b": "green", "c": "blue", "d": "white"}
    for stem, colour in colours.items():
        Image.new("RGB", (96, 64), colour).save(folder / f"{stem}.png")
    (folder / "b.txt").write_text("my own caption", "utf-8")
    (folder / "c.txt").write_text("  \n", "utf-8")  # empty: counts as no caption
    return folder


def test_captions_only_the_images_without_one_in_order_with_the_trigger(tmp_path, florence):
    folder = dataset(tmp_path / "data")
    (folder / "3_ohwx dog").mkdir()
    Image.new("RGB", (64, 64), "black").save(folder / "3_ohwx dog" / "e.png")
    progress = []

    written = caption_dataset(folder, florence, trigger_word="", max_new_tokens=8,
                              on_progress=lambda done, total: progress.append((done, total)))

    assert [p.relative_to(folder).as_posix() for p in written] == ["3_ohwx dog/e.txt", "a.txt", "c.txt", "d.txt"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert (folder / "b.txt").read_text("utf-8") == "my own caption"
    assert (folder / "3_ohwx dog" / "e.txt").read_text("utf-8").startswith("ohwx dog")  # the kohya folder's trigger
    again = caption_dataset(folder, florence)  # every image has a caption now: the model is not even loaded
    assert again == []


def test_trigger_word_is_prepended_and_overwrite_rewrites_all(tmp_path, florence):
    folder = dataset(tmp_path / "data")
    written = caption_dataset(folder, florence, trigger_word="sks", overwrite=True, max_new_tokens=8)
    assert [p.name for p in written] == ["a.txt", "b.txt", "c.txt", "d.txt"]
    for p in written:
        assert p.read_text("utf-8").startswith("sks")
    assert (folder / "b.txt").read_text("utf-8") != "my own caption"


def test_cancel_keeps_what_was_written_and_nothing_half(tmp_path, florence):
    folder = dataset(tmp_path / "data")
    asked = []

    def stop_after_one() -> bool:
        asked.append(1)
        return len(asked) > 1

    written = caption_dataset(folder, florence, max_new_tokens=8, should_stop=stop_after_one)
    assert [p.name for p in written] == ["a.txt"]
    assert not (folder / "d.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt", "c.png", "c.txt", "d.png"]


def test_a_folder_without_a_model_is_named(tmp_path):
    folder = dataset(tmp_path / "data")
    empty = tmp_path / "models" / "LLM" / "Florence-2-base"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no Florence-2 model in {empty} .*nothing is downloaded"):
        caption_dataset(folder, empty)
    (empty / "config.json").write_text('{"model_type": "bart"}')
    with pytest.raises(ValueError, match="holds a 'bart' model, not Florence-2"):
        caption_dataset(folder, empty)
    assert not (folder / "a.txt").exists()


def test_auto_caption_node_finds_the_model_in_models_llm(tmp_path, florence, monkeypatch):
    import shutil

    from nodes.dataset import AutoCaption

    monkeypatch.setenv("FLUX_LORA_TRAINER_BASE_DIR", str(tmp_path))
    shutil.copytree(florence, tmp_path / "models" / "LLM" / "Florence-2-tiny")
    folder = dataset(tmp_path / "input" / "pets")
    out = AutoCaption().caption("pets", "Florence-2-tiny", "sks", "<CAPTION>", False)
    assert out["result"] == (str(folder),) and out["ui"]["text"] == [f"3 caption(s) written in {folder}"]
    assert (folder / "a.txt").read_text("utf-8").startswith("sks")
    with pytest.raises(FileNotFoundError, match=f"no Florence-2 model in {tmp_path / 'models' / 'LLM' / 'nope'}"):
        AutoCaption().caption("pets", "nope", "", "<CAPTION>", True)
