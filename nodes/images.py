"""LossPlot, ValidationSample and XYLoraStrengthGrid: look at a run, never change it."""
from __future__ import annotations

from trainer_core import plots
from trainer_core.plan import GRID_ROWS
from trainer_core.run_outputs import grid_rows

from . import comfy_bridge
from .common import CATEGORY, CONTROL_INPUTS, HANDLE_INPUT, SAMPLING_INPUTS, image_output, sampling_kwargs

IMAGE_TOOLTIP = "Shown on the node; connect SaveImage to keep it."


def _sampling_progress(total: int):
    """A sampling callback moving one progress bar over `total` denoising steps (the grid's cells share it)."""
    bar = comfy_bridge.progress_bar(total)
    done = 0

    def callback(*_) -> None:
        nonlocal done
        done += 1
        bar.update_absolute(done, total)

    return callback


class LossPlot:
    DESCRIPTION = ("The loss curve of the run up to the incoming handle: raw, smoothed, the LR, saved checkpoints, and "
                   "the validation loss (raw and EMA LoRA) as a second line when InitTrainer's validation_timesteps "
                   "is set.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = (IMAGE_TOOLTIP,)
    FUNCTION = "plot"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"handle": HANDLE_INPUT}}

    def plot(self, handle):
        state = handle.state
        return image_output([plots.loss_plot(state.losses, state.lrs, [c.step for c in handle.checkpoints],
                                             validation=state.validation)], validation=state.validation)


class ValidationSample:
    DESCRIPTION = "Renders prompts with the incoming handle's LoRA at a strength, on the training or validation base."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("One image per prompt line. " + IMAGE_TOOLTIP,)
    FUNCTION = "sample"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "handle": HANDLE_INPUT,
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One prompt per line; include the "
                                   "trigger word to see what the LoRA learnt."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "LoRA strength: 0 is the base model exactly, 1 as trained."}),
            **SAMPLING_INPUTS,
        }, "optional": CONTROL_INPUTS}

    def sample(self, handle, prompts, strength, **sampling):
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise ValueError("prompts: empty; write one prompt per line")
        images = handle.run.sample(handle, lines, strength=strength, step=handle.step,  # one batch
                                   callback=_sampling_progress(sampling["steps"]),
                                   **sampling_kwargs(**sampling))
        return image_output(images)


class XYLoraStrengthGrid:
    DESCRIPTION = ("One labelled image: a row per checkpoint saved along the graph (step; raw LoRA, EMA or both), a "
                   "column per LoRA strength, all from one prompt and seed. Each row shows its validation loss and "
                   "the lowest is marked best. Strength scales the LoRA; no file is reloaded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = (IMAGE_TOOLTIP,)
    FUNCTION = "grid"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "handle": HANDLE_INPUT,
            "strengths": ("STRING", {"default": "0,0.2,0.4,0.6,0.8,1.0", "tooltip": "LoRA strengths for the columns: "
                                     "a list (0,0.5,1) or a range start:stop:step (0:1:0.2)."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The one prompt every cell renders."}),
            **SAMPLING_INPUTS,
            "rows": (list(GRID_ROWS), {"default": "raw", "tooltip": "Rows per checkpoint: the raw LoRA, its EMA "
                     "(InitTrainer's ema_decay) or both."}),
        }, "optional": CONTROL_INPUTS}

    def grid(self, handle, strengths, prompt, rows="raw", **sampling):
        values = plots.parse_strengths(strengths)
        if not prompt.strip():
            raise ValueError("prompt: empty; write the prompt every cell renders, with the trigger word")
        kinds = GRID_ROWS.get(rows)
        if kinds is None:
            raise ValueError(f"rows: {rows!r}; choose one of {', '.join(GRID_ROWS)}")
        cells = sum(len(c.rows(kinds)) for c in handle.checkpoints) * len(values)
        image = handle.run.strength_grid(handle, values, prompt.strip(), kinds=kinds,
                                         callback=_sampling_progress(cells * sampling["steps"]),
                                         **sampling_kwargs(**sampling))
        return image_output([image], rows=grid_rows(handle.checkpoints, kinds)[1])  # the rows' labels
