"""DatasetReport and AutoCaption: look at a dataset before training, and caption the images that have no caption."""
from __future__ import annotations

from pathlib import Path

from trainer_core.captioning import TASKS, caption_dataset
from trainer_core.dataset_report import build_report, load_t5_tokenizer
from trainer_core.distributed import resolve_device

from . import comfy_bridge
from .common import CATEGORY, image_output
from .init_trainer import DATASET_DIR_TOOLTIP, dataset_path, parse_datasets


class DatasetReport:
    DESCRIPTION = ("The dataset as training will see it, without loading a model: images used and skipped, buckets "
                   "and upscaling, near-duplicates, missing / empty / over-long captions, trigger-word coverage, "
                   "masks and regularization images, caption words; and a contact sheet with the problem images "
                   "framed in red.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "contact_sheet")
    OUTPUT_TOOLTIPS = ("The report as text.", "Thumbnails labelled with size and bucket; connect SaveImage to keep it.")
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset_dir": ("STRING", {"default": "", "multiline": True, "tooltip": DATASET_DIR_TOOLTIP}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "The trigger word training will prepend."}),
            "resolutions": ("STRING", {"default": "512", "tooltip": "Bucket sizes, as in InitTrainer."}),
            "repeats": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "Times each image is seen per epoch."}),
            "max_sequence_length": ("INT", {"default": 512, "min": 1, "max": 512, "tooltip": "T5 tokens a caption "
                                            "may use (512 for Flux-dev); longer captions are named."}),
            "alpha_mask": ("BOOLEAN", {"default": False, "tooltip": "Each image's alpha channel is its loss mask, "
                           "as InitTrainer's alpha_mask."}),
        }}

    def report(self, dataset_dir, trigger_word, resolutions, repeats, max_sequence_length, alpha_mask=False):
        tokenizers = comfy_bridge.tokenizer_dirs()  # ComfyUI's own T5 tokenizer files count the caption tokens
        report = build_report(parse_datasets(dataset_dir, trigger_word, resolutions, repeats),
                              t5_tokenizer=load_t5_tokenizer(tokenizers[1] if tokenizers else ""),
                              token_limit=max_sequence_length, alpha_mask=alpha_mask)
        out = image_output([report.contact_sheet()])
        return {"ui": {**out["ui"], "text": [report.summary()]}, "result": (report.text(), *out["result"])}


class AutoCaption:
    DESCRIPTION = ("Writes a caption .txt for each image of a dataset folder that has none, with a local Florence-2 "
                   "(from models/LLM; nothing is downloaded). Existing captions are kept unless overwrite is on.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("dataset_dir",)
    OUTPUT_TOOLTIPS = ("The dataset folder, once captioned: connect it to InitTrainer's or DatasetReport's dataset_dir.",)
    FUNCTION = "caption"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset_dir": ("STRING", {"default": "", "tooltip": "The folder of images: an absolute path, or a folder "
                                       "name inside ComfyUI's input folder."}),
            "model": ("STRING", {"default": "Florence-2-base", "tooltip": "A transformers Florence-2 folder (e.g. "
                                 "florence-community/Florence-2-base) inside models/LLM, or an absolute path."}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "Put in front of each new caption."}),
            "task": (list(TASKS), {"tooltip": "Florence-2's caption length: a paragraph, a sentence or two, or a "
                                              "short phrase."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Rewrite existing captions too (off: only the "
                                                                   "images without a caption get one)."}),
        }}

    def caption(self, dataset_dir, model, trigger_word, task, overwrite):
        folder = dataset_path(dataset_dir)
        model_dir = Path(model.strip()).expanduser()
        model_dir = model_dir if model_dir.is_absolute() else comfy_bridge.llm_directory() / model_dir
        bar = comfy_bridge.progress_bar(1)
        written = caption_dataset(folder, model_dir, trigger_word=trigger_word, overwrite=overwrite, task=task,
                                  device=resolve_device(comfy_bridge.torch_device()),
                                  on_progress=lambda done, total: bar.update_absolute(done, total),
                                  should_stop=comfy_bridge.raise_if_cancelled)
        return {"ui": {"text": [f"{len(written)} caption(s) written in {folder}"]}, "result": (str(folder),)}
