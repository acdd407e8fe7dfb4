"""Every phase of a run holds only what it needs: one encoder at a time while caching, no text encoder afterwards
(unless a new prompt comes), one base at a time while sampling on another."""
import dataclasses
import weakref

import pytest
import torch

from trainer_core import lora, models
from trainer_core.demo import demo_config, write_demo_dataset
from trainer_core.models import text_encoders
from trainer_core.trainer import Trainer
from trainer_core.validation import sampling_session


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), count=2, size=64)


def config_for(tiny_flux, dataset, tmp_path, **changes):
    return demo_config(tiny_flux, dataset, tmp_path / "out", steps=100).replace(resolutions=(64,), **changes)


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, list[str]]]:
    """Each T5, CLIP and VAE load, as (what, the models still alive when it loaded)."""
    alive: dict[str, weakref.ref] = {}
    record: list[tuple[str, list[str]]] = []

    def tracking(what, load):
        def wrapped(*args, **kwargs):
            record.append((what, sorted(k for k, ref in alive.items() if ref() is not None)))
            model = load(*args, **kwargs)
            alive[what] = weakref.ref(model)
            return model
        return wrapped

    monkeypatch.setattr(text_encoders, "_load_t5", tracking("t5", text_encoders._load_t5))
    monkeypatch.setattr(text_encoders, "_load_clip", tracking("clip", text_encoders._load_clip))
    monkeypatch.setattr(models, "load_vae", tracking("vae", models.load_vae))
    return record


def test_caching_holds_one_encoder_at_a_time_and_encodes_the_validation_prompts(tiny_flux, dataset, tmp_path,
                                                                                  loads):
    trainer = Trainer.from_config(config_for(tiny_flux, dataset, tmp_path, fp8_base=True),
                                  prompts=["fltglyph, a red square"])

    assert loads == [("t5", []), ("clip", []), ("vae", [])]  # each model freed before the next one loads
    assert isinstance(trainer.text_encoders, models.TextEncoderFiles)  # files, not models: nothing is kept
    embeds, pooled = trainer.encode_prompts(["fltglyph, a red square"])
    assert len(loads) == 3  # the validation prompt was encoded while T5 was loaded for the captions
    new_embeds, _ = trainer.encode_prompts(["an unseen prompt"])
    assert [what for what, _ in loads[3:]] == ["t5", "clip"]  # reloaded only for a prompt it had not seen
    assert embeds.shape == new_embeds.shape and not torch.equal(embeds, new_embeds)


def test_t5_in_fp8_encodes_close_to_t5_in_full_precision(tiny_flux):
    files = models.text_encoder_files(tiny_flux.clip_l, tiny_flux.t5, tiny_flux.tokenizers, dtype=torch.float32)
    prompts = ["fltglyph, a red square", "a blue circle"]
    full, pooled = files.encode(prompts)
    fp8, fp8_pooled = dataclasses.replace(files, t5_fp8=True).encode(prompts)
    t5 = text_encoders._load_t5(tiny_flux.t5, torch.float32, "cpu", fp8=True)
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q, models.Fp8Linear)
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # T5 casts to wo's dtype
    assert torch.equal(pooled, fp8_pooled)  # CLIP is untouched
    assert ((fp8 - full).norm() / full.norm()).item() < 0.1


def test_sampling_on_another_base_re_reads_the_training_base_and_training_goes_on_the_same(tiny_flux, dataset,
                                                                                            tmp_path):
    other = str(tiny_flux.transformer_fp8)
    straight = Trainer.from_config(config_for(tiny_flux, dataset, tmp_path))
    straight.train(4)
    visited = Trainer.from_config(config_for(tiny_flux, dataset, tmp_path))
    visited.train(2)
    before = {k: v.clone() for k, v in visited.transformer.state_dict().items()}

    with sampling_session(visited, other) as render:
        assert visited.transformer.x_embedder.weight.is_meta  # dropped, not parked in RAM
        render(["fltglyph"], steps=1, width=64, height=64)

    after = visited.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    visited.train(2)
    assert visited.losses == pytest.approx(straight.losses, rel=1e-5)
    for k, v in lora.lora_state(straight.transformer).items():
        torch.testing.assert_close(lora.lora_state(visited.transformer)[k], v)
