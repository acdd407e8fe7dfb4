"""TensorBoard event files of a run: loss and learning rate per step, validation losses, samples and XY grids.

Optional: without the `tensorboard` package (or with `tensorboard = false`) every call is a no-op. Each run writes
to its own folder, `<output_dir>/tensorboard/<output_name>/<start time>`, so TensorBoard pointed at
`<output_dir>/tensorboard` lists the runs side by side.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class TensorBoardLog:
    """Writes nothing, and creates no folder, until the first value arrives."""

    def __init__(self, output_dir: str | Path, output_name: str, enabled: bool = True):
        self.folder = Path(output_dir) / "tensorboard" / output_name / time.strftime("%Y%m%d-%H%M%S")
        self._enabled = enabled
        self._writer = None

    def _open(self):
        if self._writer is None and self._enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                log.info("tensorboard is not installed: no event files (pip install tensorboard to get them)")
                self._enabled = False
                return None
            self._writer = SummaryWriter(str(self.folder))
            log.info("TensorBoard event files in %s", self.folder)
        return self._writer

    def step(self, step: int, loss: float, lr: float) -> None:
        if (writer := self._open()) is not None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/learning_rate", lr, step)

    def validation(self, record: dict) -> None:
        """A `validation.validation_record`: the raw LoRA's loss and its EMA's, at the record's step."""
        if (writer := self._open()) is not None:
            for kind in ("raw", "ema"):
                if record.get(kind) is not None:
                    writer.add_scalar(f"validation/loss_{kind}", record[kind], record["step"])
            writer.flush()

    def images(self, tag: str, images: Sequence[Image.Image], step: int) -> None:
        """Each image as `<tag>/<index>` at `step`, written out at once (samples are rare and wanted now)."""
        if (writer := self._open()) is not None:
            for i, image in enumerate(images):
                writer.add_image(f"{tag}/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
