"""The demo shows learning, measured from pixels: the subject (a yellow disc crossed by a red bar) is absent from the
base's pictures and appears in the XY grid with training steps and LoRA strength. Also the shipped demo stack: its
VAE keeps colours exactly and is the one `demo_vae` writes."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from numerics import assert_ulps
from trainer_core import models
from trainer_core.demo import (DEMO_BACKGROUNDS, PROMPT, STRENGTHS, background_shift, demo_config, run_demo,
                               subject_score, write_demo_dataset)
from trainer_core.demo_stack import COLOURS, SIZE, SUBJECT_COLOURS, demo_stack, demo_vae, draw_shape, world_picture
from trainer_core.trainer import Trainer

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo exactly as `bash scripts/demo.sh` runs it (half a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("demo")
    _, result, summary = run_demo(out)
    return out, result, summary


def score_table(summary) -> dict[int, dict[float, float]]:
    table = {}
    for cell in summary["cells"]:
        table.setdefault(cell["step"], {})[cell["strength"]] = cell["score"]
    return table


def round_trip(vae, images: list[Image.Image]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        return (vae.decode(vae.encode(x).latent_dist.sample()).sample + 1) * 127.5, (x + 1) * 127.5


def test_the_shipped_vae_is_the_hand_written_one_and_keeps_every_colour():
    shipped = models.load_vae(demo_stack().vae, dtype=torch.float32)
    written = demo_vae().state_dict()
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {k: v.shape for k, v in written.items()}
    for k, v in written.items():  # QR and matrix products: the last bit depends on the CPU that ran them
        assert_ulps(shipped.state_dict()[k], v, what=k)
    flat = [Image.new("RGB", (SIZE, SIZE), c) for c in [*COLOURS.values(), *SUBJECT_COLOURS.values()]]
    decoded, pixels = round_trip(shipped, flat)
    inside = (decoded - pixels)[..., 8:-8, 8:-8]  # the outermost pixels fade towards grey (zero padding)
    assert inside.abs().max() < 0.5  # of 255: the same 8-bit colour


def test_the_score_sees_the_subject_in_the_training_pictures_and_never_in_the_world(tmp_path):
    rng = random.Random(1)
    assert max(subject_score(world_picture(rng)[0]) for _ in range(200)) == 0.0
    dataset = write_demo_dataset(tmp_path, count=len(DEMO_BACKGROUNDS))
    pictures = [Image.open(p) for p in sorted(dataset.glob("*.png"))]
    decoded, _ = round_trip(demo_vae(), pictures)
    through_vae = [Image.fromarray(d.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()) for d in decoded]
    own = [subject_score(p) for p in pictures]
    assert all(s > 0.1 for s in own)
    # the best a LoRA can draw is a training picture as the VAE renders it: most of the subject's pixels survive
    assert np.mean([subject_score(p) for p in through_vae]) > 0.6 * np.mean(own)


def test_summary_lists_every_cell_as_a_png_and_the_dataset(demo):
    out, result, summary = demo
    assert summary == json.loads((out / "summary.json").read_text())
    assert [(c["step"], c["strength"]) for c in summary["cells"]] == [(s, x) for s in (50, 100, 150, 200)
                                                                       for x in STRENGTHS]
    for cell in summary["cells"]:
        assert Image.open(cell["path"]).size == (SIZE, SIZE)
    assert len(summary["dataset"]) == 4 and all(s > 0.1 for s in summary["dataset_scores"])


def test_strength_0_is_the_base_in_every_row(demo):
    _, _, summary = demo
    base = [np.asarray(Image.open(c["path"])) for c in summary["cells"] if c["strength"] == 0.0]
    assert all(np.array_equal(base[0], other) for other in base[1:])


def test_the_subject_appears_with_strength_and_with_steps(demo):
    _, _, summary = demo
    table = score_table(summary)
    steps = sorted(table)
    target = float(np.mean(summary["dataset_scores"]))
    assert all(row[0.0] < 0.01 * target for row in table.values()), table  # the base does not draw it
    last = [table[steps[-1]][s] for s in STRENGTHS]
    assert last == sorted(last) and last[0] < last[-2] < last[-1], table  # it comes in with the strength
    assert table[steps[0]][1.0] < table[steps[-1]][1.0], table  # and with the steps
    assert last[-1] >= 0.5 * target, (table, target)  # at the last step and strength 1: clearly the subject


def test_the_validation_loss_falls_from_the_first_checkpoint_to_the_last_and_names_the_best(demo):
    out, result, summary = demo
    scored = summary["validation"]["checkpoints"]
    assert [r["step"] for r in scored] == [50, 100, 150, 200]
    for kind in ("raw", "ema"):
        assert scored[-1][kind] < 0.9 * scored[0][kind], scored  # the trend, over the run
    every = [(r[kind], r["step"], kind) for r in scored for kind in ("raw", "ema")]
    loss, step, kind = min(every)
    assert summary["validation"]["best"] == {"step": step, "kind": kind, "loss": loss}
    assert [p.name for p in result.ema_loras] == [f"flux_tiny_demo_{s:06d}_ema.safetensors" for s in (50, 100, 150, 200)]


def test_writing_the_demo_dataset_again_keeps_its_files_and_so_its_identity(tmp_path):
    """A second demo into the same folder finds the same dataset and loads its stored loops instead of retraining."""
    folder = write_demo_dataset(tmp_path)
    for path in folder.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    write_demo_dataset(tmp_path)
    assert {p.stat().st_mtime_ns for p in folder.iterdir()} == {1_000_000_000}
    (folder / "glyph_00.txt").write_text("edited")
    write_demo_dataset(tmp_path)
    assert (folder / "glyph_00.txt").read_text() == "a glyph on a teal background"


# --- masked training on the demo ---------------------------------------------------------------------------------


def masked_run(out, **settings) -> dict[float, Image.Image]:
    """The demo's run (its 200 steps) on the demo's pictures, each with a mask on the subject's disc (mask_floor 0):
    the prompt sampled at strength 0 and 1 as the demo's grid samples it, and the training pictures' mean subject
    score."""
    dataset = write_demo_dataset(out / "dataset")
    for picture in sorted(dataset.glob("glyph_??.png")):
        mask = Image.new("L", (SIZE, SIZE), 0)
        draw_shape(ImageDraw.Draw(mask), "circle", 255, SIZE / 2, SIZE / 2, SIZE * 0.3)
        mask.save(picture.with_name(f"{picture.stem}_mask.png"))
    config = demo_config(demo_stack(), dataset, out / "loras", 200).replace(lora_layout="split", tensorboard=False,
                                                                            **settings)
    trainer = Trainer.from_config(config)
    assert all(s.mask is not None for s in trainer.dataset.samples)
    trainer.train(200)
    cells = {s: trainer.sample([PROMPT], strength=s, steps=12, width=SIZE, height=SIZE, seed=1)[0] for s in (0.0, 1.0)}
    cells["dataset_score"] = float(np.mean([subject_score(Image.open(p)) for p in sorted(dataset.glob("glyph_??.png"))]))
    trainer.release()
    return cells


@pytest.fixture(scope="module")
def masked_demo(tmp_path_factory) -> dict[float, Image.Image]:
    return masked_run(tmp_path_factory.mktemp("masked_demo"))


@pytest.fixture(scope="module")
def masked_prior_demo(tmp_path_factory) -> dict[float, Image.Image]:
    """As `masked_demo`, with masked prior preservation (`masked_prior_weight` 1)."""
    return masked_run(tmp_path_factory.mktemp("masked_prior_demo"), masked_prior_weight=1.0)


@pytest.mark.parametrize("run", ["masked_demo", "masked_prior_demo"])
def test_with_masks_on_the_subject_the_subject_is_learned(run, request):
    cells = request.getfixturevalue(run)
    target = cells["dataset_score"]  # as in the unmasked demo's test: the training pictures' own score
    assert subject_score(cells[0.0]) < 0.01 * target
    assert subject_score(cells[1.0]) >= 0.5 * target, (subject_score(cells[1.0]), target)


def test_masked_prior_preservation_keeps_the_background_that_masks_alone_let_go(masked_demo, masked_prior_demo):
    """Masks alone (mask_floor 0) leave the outside untaught, and this small base's LoRA paints the subject's colours
    over all of it; pulled toward the base's own prediction there, the background moves less than half as far
    (measured: 75 against 195, of 441)."""
    assert background_shift(masked_prior_demo) <= 0.5 * background_shift(masked_demo), \
        (background_shift(masked_prior_demo), background_shift(masked_demo))


@pytest.mark.xfail(strict=True, reason="issue 25's criterion, not met: even with masked prior preservation the "
                   "background at strength 1 moves 75 (of 441) from the base's, against 14 for the LoRA trained without "
                   "masks, whose captions name every background. Measured cause: inpainting around the subject, this "
                   "small base moves its own background 55-59 (8-10 around a blue-and-green disc of the same shape; "
                   "51-72 for a base rebuilt with yellow and red shapes in its world); the pull toward the base "
                   "teaches the LoRA that reaction")
def test_with_masks_the_background_moves_at_most_half_as_far_as_without(demo, masked_prior_demo):
    _, _, summary = demo
    unmasked = {c["strength"]: Image.open(c["path"]) for c in summary["cells"]
                if c["step"] == 200 and c["lora"] == "raw" and c["strength"] in (0.0, 1.0)}
    assert background_shift(masked_prior_demo) <= 0.5 * background_shift(unmasked), \
        (background_shift(masked_prior_demo), background_shift(unmasked))
