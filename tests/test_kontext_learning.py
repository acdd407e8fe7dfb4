"""A Kontext LoRA learns an edit, measured from pixels on the demo's small base: pairs whose target is the control
picture with the demo's subject drawn in. Afterwards, editing pictures of backgrounds it never trained on puts the
subject in (more with strength and with steps; strength 0 is the base exactly) and keeps the picture's background."""
import functools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from trainer_core import lora
from trainer_core.demo import DEMO_TRIGGER, demo_config, subject_score
from trainer_core.demo_stack import COLOURS, SUBJECT_COLOURS, demo_stack, draw_shape
from trainer_core.trainer import Trainer

SIZE = 128  # the demo's pictures at half size: the pairs' doubled token count trains in seconds
TRAIN_BACKGROUNDS = ("teal", "orange", "purple", "grey", "green", "pink")
NEW_BACKGROUNDS = ("blue", "brown")  # never in a training pair
INSTRUCTION = f"{DEMO_TRIGGER}, put the glyph in the middle"


def with_subject(img: Image.Image) -> Image.Image:
    draw = ImageDraw.Draw(img)
    for shape, colour in (("circle", "yellow"), ("bar", "red")):
        draw_shape(draw, shape, SUBJECT_COLOURS[colour], SIZE / 2, SIZE / 2, SIZE * 0.3)
    return img


def plain(name: str) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), COLOURS[name])


def corner_colour(image: Image.Image) -> np.ndarray:
    """The mean colour of two opposite corners, away from the subject in the middle."""
    a = np.asarray(image, dtype=np.float32)
    k = SIZE // 4
    return np.concatenate([a[:k, :k].reshape(-1, 3), a[-k:, -k:].reshape(-1, 3)]).mean(0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kontext")
    targets, controls = folder / "targets", folder / "controls"
    targets.mkdir()
    controls.mkdir()
    for name in TRAIN_BACKGROUNDS:
        plain(name).save(controls / f"{name}.png")
        with_subject(plain(name)).save(targets / f"{name}.png")
        (targets / f"{name}.txt").write_text("put the glyph in the middle")
    config = demo_config(demo_stack(), targets, folder / "out", steps=200).replace(
        model_type="kontext", control_dir=str(controls), resolutions=(SIZE,))
    trainer = Trainer.from_config(config)
    trainer.train(100)
    halfway = lora.lora_state(trainer.transformer)
    trainer.train(100)

    @functools.cache
    def edit(background: str, strength: float, at_halfway: bool = False) -> Image.Image:
        return trainer.sample([INSTRUCTION], strength=strength, lora_state=halfway if at_halfway else None, steps=12,
                              width=SIZE, height=SIZE, seed=1, control_image=plain(background))[0]

    return edit


def test_the_edit_puts_the_subject_in_with_strength_and_steps(trained):
    edit = trained
    for background in NEW_BACKGROUNDS:
        base = edit(background, 0.0)
        assert subject_score(base) == 0.0
        assert np.array_equal(np.asarray(base), np.asarray(edit(background, 0.0, True)))  # the base exactly
        scores = [subject_score(edit(background, s)) for s in (0.5, 1.0)]
        assert scores[1] > 0.08 and scores[1] > scores[0], (background, scores)
        assert subject_score(edit(background, 1.0, True)) < scores[1], background


def test_the_edit_keeps_the_pictures_background(trained):
    edit = trained
    for background in NEW_BACKGROUNDS:
        own = np.float32(COLOURS[background])
        others = [np.float32(COLOURS[b]) for b in NEW_BACKGROUNDS if b != background]
        corner = corner_colour(edit(background, 1.0))
        # the base ignores the picture (one image for every control); the LoRA's edit follows it
        assert all(np.linalg.norm(corner - own) < np.linalg.norm(corner - o) for o in others), (background, corner)
        assert np.linalg.norm(corner - own) < np.linalg.norm(corner_colour(edit(background, 0.0)) - own), background
