"""InitTrainer: pick the model files and settings, check all of them, then load the models and start a run."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from trainer_core.checkpoints import STATE_SUFFIX, TrainingState, latest_state_file, load_training_state
from trainer_core.config import (LORA_FORMATS, LORA_LAYOUTS, LR_SCHEDULES, MIXED_PRECISIONS, MODEL_TYPES, NETWORKS,
                                 OPTIMIZERS, DatasetEntry, TrainConfig, validation_entry)
from trainer_core.flow_matching import TIMESTEP_SAMPLINGS
from trainer_core.identity import check_resume, dataset_identity
from trainer_core.models import KIND_DESCRIPTIONS, MODEL_ROLES, base_format, detect_file_kind
from trainer_core.presets import PRESETS
from trainer_core.run_handle import TrainingRun, active_config
from trainer_core.run_store import DAMAGED, RUNS

from . import comfy_bridge, model_sharing
from .common import CATEGORY, HANDLE
from .queued_graph import loop_chains, planned_train_steps, validation_prompts

log = logging.getLogger(__name__)

SAME_AS_TRAINING = "same as training"
CUSTOM = "custom"
NONE = "none"
LATEST = "latest"  # the newest state saved under this output_name: after a crash the user just queues again
MEMORY_FIELDS = ("fp8_base", "gradient_checkpointing", "blocks_to_swap")  # the memory widgets (custom)
PRESET_FIELDS = (*MEMORY_FIELDS, "checkpoint_blocks", "t5_on_cpu")  # what a preset decides
# widget -> (ComfyUI folder, the models.MODEL_ROLES input it feeds)
MODEL_WIDGETS = {
    "transformer": ("diffusion_models", "transformer"),
    "validation_transformer": ("diffusion_models", "transformer"),
    "vae": ("vae", "vae"),
    "clip_l": ("text_encoders", "clip"),
    "t5": ("text_encoders", "t5"),
}


def model_path(widget: str, name: str) -> Path:
    """The file a model widget names, checked (from its header only) to be the kind of model that widget takes."""
    folder, role = MODEL_WIDGETS[widget]
    if folder == "diffusion_models" and name.lower().endswith(".gguf"):
        folder = comfy_bridge.GGUF_MODELS
    path = comfy_bridge.full_path(folder, name, widget)
    kind, kinds = detect_file_kind(path), MODEL_ROLES[role].kinds
    if kind not in kinds:
        owner = next((w for w, (_, r) in MODEL_WIDGETS.items() if kind in MODEL_ROLES[r].kinds), None)
        hint = f"it belongs in the {owner} input: were two inputs swapped?" if owner else "pick the right file"
        raise ValueError(f"{widget}: {name} appears to be {KIND_DESCRIPTIONS[kind]}, "
                         f"not {KIND_DESCRIPTIONS[kinds[0]]}; {hint}")
    return path


def dataset_path(value: str, widget: str = "dataset_dir") -> Path:
    """An absolute folder, or one relative to ComfyUI's input folder that `..` cannot leave (a symlink may)."""
    root = Path(os.path.abspath(comfy_bridge.input_directory()))
    value = value.strip().strip('"\'')  # Windows' "Copy as path" wraps the path in quotes
    if not value:
        raise ValueError(f"{widget}: empty; give a folder of images with .txt captions, absolute or inside "
                         f"ComfyUI's input folder {root}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(os.path.normpath(root / path))
        if not path.is_relative_to(root):
            raise ValueError(f"{widget}: {value!r} points outside ComfyUI's input folder {root}; "
                             "give an absolute path instead")
    if not path.is_dir():
        raise FileNotFoundError(f"{widget}: {path} is not a folder; give an absolute path, or a folder name inside "
                                f"ComfyUI's input folder {root}")
    return path


def parse_datasets(dataset_dir: str, trigger_word: str, resolutions: str, repeats: int) -> list[DatasetEntry]:
    """The dataset_dir widget: one folder, or one entry per line `folder | trigger word | resolutions | repeats`,
    where a part left out (or empty) takes its widget's value; a fifth part `reg` marks regularization images."""
    lines = [line for line in dataset_dir.splitlines() if line.strip()] or [""]
    entries = []
    for n, line in enumerate(lines, 1):
        where = f"dataset_dir line {n}" if len(lines) > 1 else "dataset_dir"
        parts = [p.strip() for p in line.split("|")]
        if len(parts) > 5 or (len(parts) == 5 and parts[4].lower() not in ("reg", "")):
            raise ValueError(f"{where}: {line!r} has {len(parts)} parts; write folder | trigger word | resolutions "
                             "| repeats, and | reg for regularization images")
        folder, trigger, res, reps, reg = parts + [""] * (5 - len(parts))
        if reps and not reps.isdigit():
            raise ValueError(f"{where}: repeats {reps!r} is not a whole number; write e.g. 10")
        path = str(dataset_path(folder))  # its errors name the folder
        try:
            entries.append(DatasetEntry(path, trigger or trigger_word, res or resolutions, int(reps) if reps else repeats,
                                        is_reg=reg.lower() == "reg"))
        except ValueError as e:  # resolutions that are not numbers
            raise ValueError(f"{where}: {e}") from e
    return entries


def tokenizer_settings(clip_path: Path) -> dict[str, str]:
    """`tokenizers/clip` + `tokenizers/t5` beside the CLIP file (as the tiny demo ships), else ComfyUI's own."""
    beside = clip_path.parent / "tokenizers"
    if (beside / "clip").is_dir() and (beside / "t5").is_dir():
        return {"tokenizer_dir": str(beside)}
    comfy = comfy_bridge.tokenizer_dirs()
    if comfy is not None and all(d.is_dir() for d in comfy):
        return {"clip_tokenizer_dir": str(comfy[0]), "t5_tokenizer_dir": str(comfy[1])}
    raise FileNotFoundError(f"clip_l: no tokenizer files: put tokenizers/clip and tokenizers/t5 folders beside "
                            f"{clip_path}, or run inside ComfyUI, whose own tokenizer files are used then")


def memory_settings(memory_preset: str, explicit: dict, transformer: Path) -> dict:
    """The memory options: a preset's (with fewer blocks swapped on a quantized `transformer`, every block
    checkpointed for a LoKr / LoHa `network`), or the explicit widgets' for "custom"."""
    if memory_preset == CUSTOM:
        return {k: explicit[k] for k in MEMORY_FIELDS}
    if memory_preset not in PRESETS:
        raise ValueError(f"memory_preset: {memory_preset!r}; choose one of {CUSTOM}, {', '.join(PRESETS)}")
    preset = PRESETS[memory_preset].for_base(base_format(transformer)).for_network(explicit.get("network", "lora"))
    settings = preset.train_settings()
    return {k: settings[k] for k in PRESET_FIELDS}


def load_resume(name: str, config: TrainConfig) -> TrainingState | None:
    """The saved state to start from, checked to continue under `config` (its settings, its dataset)."""
    if name == NONE:
        return None
    if name == LATEST:
        path = latest_state_file(config.store_dir, config.output_name)
        if path is None:
            log.info("resume_state latest: no state of %s in %s yet; starting at step 0", config.output_name,
                     config.store_dir)
            return None
        name = path.name
        log.info("resume_state latest: resuming from %s", path)
    else:
        path = comfy_bridge.full_path(comfy_bridge.STATES, name, "resume_state")
    state = load_training_state(path)[0]
    check_resume(state, config, dataset_identity(config.dataset_entries()), f"resume_state: {name}",
                 f"choose resume_state {NONE}")
    return state


def dataset_settings(dataset_dir: str, settings: dict) -> dict:
    """`dataset_dir` for one folder on one line, else `datasets` with an entry per line (see `parse_datasets`)."""
    if len([line for line in dataset_dir.splitlines() if line.strip()]) <= 1 and "|" not in dataset_dir:
        return {"dataset_dir": str(dataset_path(dataset_dir))}
    return {"datasets": parse_datasets(dataset_dir, settings["trigger_word"], settings["resolutions"],
                                       settings["repeats"])}
def auto_total_steps(total_steps: int, prompt: dict | None, unique_id: str | None) -> int:
    """total_steps as set, or for 0 (auto) the steps the queued graph's TrainLoops add up to."""
    if total_steps != 0:
        return total_steps
    planned = planned_train_steps(prompt, unique_id)
    if planned is None:
        raise ValueError("total_steps: 0 (auto) needs every TrainLoop's steps as a number in the queued graph, and "
                         "at least one TrainLoop after this node; set total_steps to the steps of all loops instead")
    log.info("total_steps auto: %d, the steps of the queued TrainLoops", planned)
    return planned


def build_config(transformer: str, validation_transformer: str, vae: str, clip_l: str, t5: str, dataset_dir: str,
                 memory_preset: str, resume_state: str, init_lora: str = NONE, prompt: dict | None = None,
                 unique_id: str | None = None, **settings) -> tuple[TrainConfig, TrainingState | None]:
    """Every widget checked and no model loaded yet: errors name the widget and say what to do. `prompt` and
    `unique_id` (the queued graph and this node's id) make total_steps 0 the loops' total."""
    paths = {w: str(model_path(w, name)) for w, name in
             (("transformer", transformer), ("vae", vae), ("clip_l", clip_l), ("t5", t5))}
    validation = "" if validation_transformer == SAME_AS_TRAINING else \
        str(model_path("validation_transformer", validation_transformer))
    if "total_steps" in settings:
        settings["total_steps"] = auto_total_steps(settings["total_steps"], prompt, unique_id)
    for folder in ("validation_dir", "control_dir"):
        if settings.get(folder):
            settings[folder] = str(dataset_path(settings[folder], folder))
    config = TrainConfig(
        transformer_path=paths["transformer"], vae_path=paths["vae"], clip_path=paths["clip_l"], t5_path=paths["t5"],
        validation_transformer_path=validation, **dataset_settings(dataset_dir, settings),
        init_lora="" if init_lora == NONE else str(comfy_bridge.full_path("loras", init_lora, "init_lora")),
        output_dir=str(comfy_bridge.folder_paths("loras")[0]), device=comfy_bridge.torch_device(),
        store_dir=str(comfy_bridge.folder_paths(comfy_bridge.STATES)[0]),
        **tokenizer_settings(Path(paths["clip_l"])),
        **{**settings, **memory_settings(memory_preset, settings, Path(paths["transformer"]))},
    )
    preset = PRESETS.get(memory_preset)
    largest = max(r for entry in config.dataset_entries() for r in entry.resolutions)
    if preset is not None and largest > preset.resolution:
        log.warning("memory_preset %s was sized for %d px; %d px may run out of memory",
                    preset.name, preset.resolution, largest)
    return config, load_resume(resume_state, config)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
DATASET_DIR_TOOLTIP = (
    "Folder of images with same-name .txt captions: an absolute path, or a folder name inside ComfyUI's input folder. "
    "Kohya subfolders '10_ohwx woman' repeat their images 10 times (and give the trigger word when it is empty). "
    "Several datasets: one per line, 'folder | trigger word | resolutions | repeats'; parts left out take the "
    "widgets' values. Regularization images: end the line with '| reg'.")


class InitTrainer:
    DESCRIPTION = ("Checks every setting and starts a training run. The Flux model files load (and ComfyUI's loaded "
                   "models are freed) only when a loop must train or a sample render: loops already in the run store "
                   "are loaded from it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (HANDLE,)
    RETURN_NAMES = ("handle",)
    OUTPUT_TOOLTIPS = ("The run at its first step (or at the resumed state); connect a TrainLoop.",)
    FUNCTION = "init"

    @classmethod
    def INPUT_TYPES(cls):
        transformers = [*comfy_bridge.filename_list("diffusion_models"),
                        *comfy_bridge.filename_list(comfy_bridge.GGUF_MODELS)]
        encoders = comfy_bridge.filename_list("text_encoders")
        loras = comfy_bridge.filename_list("loras")
        states = [n for n in comfy_bridge.filename_list(comfy_bridge.STATES)
                  if n.endswith(STATE_SUFFIX) and not n.startswith((f"{RUNS}/", f"{DAMAGED}/"))]  # not the store's own
        d = _DEFAULTS
        return {"required": {
            "transformer": (transformers, {"tooltip": "Flux transformer to train on (models/diffusion_models or "
                                                      "models/unet; .safetensors or GGUF); Flux-dev2pro trains best at "
                                                      "guidance 1.0."}),
            "validation_transformer": ([SAME_AS_TRAINING, *transformers], {
                "tooltip": "Base the samples and XY grid may use instead (e.g. Flux-dev when training on dev2pro)."}),
            "vae": (comfy_bridge.filename_list("vae"), {"tooltip": "The Flux VAE (ae.safetensors), from models/vae."}),
            "clip_l": (encoders, {"tooltip": "CLIP-L text encoder from models/text_encoders (or models/clip)."}),
            "t5": (encoders, {"tooltip": "T5-XXL text encoder from models/text_encoders (or models/clip)."}),
            "dataset_dir": ("STRING", {"default": "", "multiline": True, "tooltip": DATASET_DIR_TOOLTIP}),
            "trigger_word": ("STRING", {"default": d["trigger_word"],
                                        "tooltip": "Made-up word put in front of every caption that lacks it."}),
            "resolutions": ("STRING", {"default": "512", "tooltip": "Bucket sizes: one (512) or several "
                                       "(512,768,1024), multiples of 64."}),
            "repeats": ("INT", {"default": d["repeats"], "min": 1, "max": 1000, "tooltip": "Times each image is "
                                "seen per epoch."}),
            "rank": ("INT", {"default": d["rank"], "min": 1, "max": 256, "tooltip": "LoRA rank (4-32; 16 typical)."}),
            "alpha": ("FLOAT", {"default": d["alpha"], "min": 0.01, "max": 1024.0, "step": 0.01,
                                "tooltip": "LoRA alpha; the LoRA is scaled by alpha / rank."}),
            "blocks": ("STRING", {"default": d["blocks"], "tooltip": "Blocks to train: all, double, single or e.g. "
                                  "double:0-9,single:0-37."}),
            "optimizer": (list(OPTIMIZERS), {"default": d["optimizer"], "tooltip": "adamw8bit needs bitsandbytes and "
                                             "a CUDA GPU; prodigy takes learning_rate 1.0."}),
            "learning_rate": ("FLOAT", {"default": d["learning_rate"], "min": 1e-7, "max": 10.0, "step": 1e-5,
                                        "round": False, "tooltip": "Peak learning rate (1e-4 for AdamW)."}),
            "lr_schedule": (list(LR_SCHEDULES), {"default": d["lr_schedule"],
                                                 "tooltip": "How the learning rate moves over total_steps."}),
            "total_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "Length of the LR "
                                    "schedule; 0 = auto, the steps of the TrainLoops in the queued graph."}),
            "timestep_sampling": (list(TIMESTEP_SAMPLINGS), {"default": d["timestep_sampling"], "tooltip": "How "
                                  "noise levels are drawn: shift (3.1582) as kohya; sigmoid for de-distilled bases."}),
            "guidance": ("FLOAT", {"default": d["guidance"], "min": 0.0, "max": 10.0, "step": 0.1, "tooltip":
                                   "Training guidance of distilled bases: 1.0 keeps Flux-dev from collapsing."}),
            "seed": ("INT", {"default": d["seed"], "min": 0, "max": 2**32 - 1, "control_after_generate": False,
                             "tooltip": "Seed of the LoRA init, data order and noise; same seed, same run."}),
            "max_sequence_length": ("INT", {"default": d["max_sequence_length"], "min": 1, "max": 512,
                                            "tooltip": "T5 tokens per caption: 512 for Flux-dev, 256 for schnell."}),
            "mixed_precision": (list(MIXED_PRECISIONS), {"default": d["mixed_precision"],
                                                         "tooltip": "bf16 on GPUs; fp32 is faster on most CPUs."}),
            "memory_preset": ([CUSTOM, *PRESETS], {"default": "24GB", "tooltip": "Memory options for your card "
                              "size; custom uses fp8_base, gradient_checkpointing and blocks_to_swap below."}),
            "fp8_base": ("BOOLEAN", {"default": d["fp8_base"], "tooltip": "custom only: keep the base weights in "
                                     "fp8 (half the memory of bf16)."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": d["gradient_checkpointing"], "tooltip": "custom only: "
                                                   "recompute activations in backward to save memory."}),
            "blocks_to_swap": ("INT", {"default": d["blocks_to_swap"], "min": 0, "max": 57, "tooltip": "custom "
                                       "only: transformer blocks kept in RAM and streamed to the GPU."}),
            "output_name": ("STRING", {"default": d["output_name"], "tooltip": "File name stem of the saved LoRAs "
                                       "in models/loras; the step is appended."}),
            "resume_state": ([NONE, LATEST, *states], {"tooltip": "A *.state.safetensors saved by SaveCheckpoint (in "
                                                       f"models/{comfy_bridge.STATES}) to "
                                                       "continue from, with the same settings; latest: the newest of "
                                                       "this output_name (step 0 if none), so after a crash just "
                                                       "queue again; none starts fresh."}),
            # appended, so saved workflows keep their widget positions
            "init_lora": ([NONE, *(n for n in loras if not n.endswith(STATE_SUFFIX))], {
                "tooltip": "A Flux LoRA (kohya or diffusers format) to start from instead of a fresh one; rank must "
                           "be the file's."}),
            "dora": ("BOOLEAN", {"default": d["dora"], "tooltip": "DoRA: also learn a magnitude per output row. "
                                 "Not with fp8_base or blocks_to_swap (memory_preset custom)."}),
            "lora_format": (list(LORA_FORMATS), {"default": d["lora_format"], "tooltip": "kohya: fused qkv, as "
                            "kohya saves; diffusers: peft keys, separate q/k/v. Both load in ComfyUI."}),
            "tensorboard": ("BOOLEAN", {"default": d["tensorboard"], "tooltip": "TensorBoard event files (loss, LR, "
                            "samples, grids) in models/loras/tensorboard/<output_name>, if tensorboard is installed."}),
            "store_max_gb": ("FLOAT", {"default": d["store_max_gb"], "min": 0.1, "max": 10000.0, "step": 0.5,
                                       "tooltip": "Size budget of the run store (models/flux_lora_states/runs): "
                                       "least recently used loops of other runs are deleted beyond it; ~1 GB per "
                                       "rank-16 loop with AdamW."}),
            "lora_layout": (list(LORA_LAYOUTS), {"default": d["lora_layout"], "tooltip": "fused: one LoRA per fused "
                            "q,k,v and single-block linear1, as kohya trains (faster, smaller kohya files); split: one "
                            "per q, k, v, the layout of runs and states made before fused: use it to continue them."}),
            "validation_timesteps": ("INT", {"default": d["validation_timesteps"], "min": 0, "max": 64, "tooltip":
                                     "Validation loss at each checkpoint, at this many fixed noise levels (8 is "
                                     "plenty); 0 = off. Shown on LossPlot, the live view and the XY grid's rows."}),
            "validation_split": ("FLOAT", {"default": d["validation_split"], "min": 0.0, "max": 0.9, "step": 0.05,
                                 "tooltip": "Share of the images held out of training to score (chosen by the seed); "
                                 "0 = score the training images (or validation_dir's)."}),
            "validation_dir": ("STRING", {"default": d["validation_dir"], "tooltip": "Folder of held-out images with "
                               "captions to score instead: absolute, or inside ComfyUI's input folder; empty = none."}),
            "validation_every": ("INT", {"default": d["validation_every"], "min": 0, "max": 1_000_000, "tooltip":
                                 "Also score every this many steps; 0 = at the end of each loop only."}),
            "ema_decay": ("FLOAT", {"default": d["ema_decay"], "min": 0.0, "max": 0.9999, "step": 0.001,
                                    "round": False, "tooltip": "Keep a moving average of the LoRA (e.g. 0.99), saved "
                                    "beside each checkpoint as <name>_ema and scored too; 0 = off."}),
            "ema_on_cpu": ("BOOLEAN", {"default": d["ema_on_cpu"], "tooltip": "Keep the EMA in RAM, not on the GPU "
                                       "(small cards)."}),
            "model_type": (list(MODEL_TYPES), {"default": d["model_type"], "tooltip": "kontext: train FLUX.1 Kontext "
                           "[dev] (the transformer input) on control -> target pairs: the edit in the captions, the "
                           "control images in control_dir. It cannot be told from the file: say so here."}),
            "control_dir": ("STRING", {"default": d["control_dir"], "tooltip": "Kontext: folder of control images "
                            "(the pictures to edit), each named as its target in dataset_dir (a.png with a.jpg); "
                            "absolute or inside ComfyUI's input folder. Empty for Flux."}),
            # the adapter's kind and per-block settings (issue 26)
            "network": (list(NETWORKS), {"default": d["network"], "tooltip": "lora; lokr (Kronecker product) or "
                        "loha (Hadamard product): LyCORIS adapters with smaller files, saved in the keys ComfyUI "
                        "loads. lokr / loha: kohya format, fused layout, no DoRA, no lora_dropout, often a higher "
                        "learning rate."}),
            "lokr_factor": ("INT", {"default": d["lokr_factor"], "min": -1, "max": 256, "tooltip": "lokr: each "
                            "dimension is split near this factor; -1 = near its square root (the smallest file)."}),
            "block_ranks": ("STRING", {"default": d["block_ranks"], "tooltip": "Rank per block range, e.g. "
                            "double:0-9=32,single:0-37=8; blocks not named take rank. alpha is the same for all."}),
            "block_lrs": ("STRING", {"default": d["block_lrs"], "tooltip": "Learning rate per block range, e.g. "
                          "double=2e-4,single:20-37=5e-5; the schedule scales them like learning_rate."}),
            "train_modulation": ("BOOLEAN", {"default": d["train_modulation"], "tooltip": "Also adapt the blocks' "
                                 "modulation Linears (img_mod, txt_mod, modulation); musubi-tuner leaves them out."}),
            "loraplus_lr_ratio": ("FLOAT", {"default": d["loraplus_lr_ratio"], "min": 0.01, "max": 1000.0,
                                  "step": 0.5, "tooltip": "LoRA+: the up-projections (lora_B) learn this many times "
                                  "faster (16 is common); 1 = off. LoRA only."}),
            # masks, regularization, caption tags, augmentations
            "alpha_mask": ("BOOLEAN", {"default": d["alpha_mask"], "tooltip": "Use each image's alpha channel as its "
                           "loss mask (else a <name>_mask.png beside it, or masks/<name>.png, is used if present)."}),
            "mask_floor": ("FLOAT", {"default": d["mask_floor"], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                           "Loss weight outside a mask: 0 learns nothing there, 0.1 keeps a little."}),
            "prior_loss_weight": ("FLOAT", {"default": d["prior_loss_weight"], "min": 0.0, "max": 10.0, "step": 0.05,
                                  "tooltip": "Loss weight of regularization images (a dataset_dir line ending in "
                                  "'| reg')."}),
            "shuffle_caption": ("BOOLEAN", {"default": d["shuffle_caption"], "tooltip": "Shuffle each caption's "
                                "comma-separated tags at every step (keep_tokens stay first)."}),
            "keep_tokens": ("INT", {"default": d["keep_tokens"], "min": 0, "max": 100, "tooltip": "Tags that stay "
                            "in place when shuffling; 1 keeps the trigger word first."}),
            "caption_variants": ("INT", {"default": d["caption_variants"], "min": 1, "max": 256, "tooltip":
                                 "Shuffled tag orders per caption, each encoded once (more: more T5 time and RAM)."}),
            "color_jitter": ("FLOAT", {"default": d["color_jitter"], "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "Probability that a step sees an image colour-jittered; 0 = off."}),
            "color_jitter_strength": ("STRING", {"default": ",".join(map(str, d["color_jitter_strength"])),
                                      "tooltip": "Largest change of brightness, contrast, saturation and hue."}),
            "random_crop": ("FLOAT", {"default": d["random_crop"], "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                            "Probability that a step sees an image randomly cropped (and scaled back); 0 = off."}),
            "random_crop_scale": ("FLOAT", {"default": d["random_crop_scale"], "min": 0.1, "max": 1.0, "step": 0.05,
                                  "tooltip": "Smallest crop side as a share of the image's bucket."}),
            "augment_variants": ("INT", {"default": d["augment_variants"], "min": 1, "max": 64, "tooltip":
                                 "Jittered / cropped copies of each image, each encoded once (RAM, disk cache)."}),
            "masked_prior_weight": ("FLOAT", {"default": d["masked_prior_weight"], "min": 0.0, "max": 10.0,
                                    "step": 0.1, "tooltip": "With masks: outside each mask, pull the LoRA toward the "
                                    "base model's own prediction (masked prior preservation; 1 is a start); 0 = off. "
                                    "Costs one more forward pass per step."}),
            "compile_blocks": ("BOOLEAN", {"default": d["compile_blocks"], "tooltip": "torch.compile the "
                               "transformer blocks for the training steps: faster steps after a first step that "
                               "compiles (again per new bucket shape, and after the models reload). Needs triton "
                               "(Windows: triton-windows). Compiled kernels round differently: another run."}),
        }, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}  # the queued graph: total_steps auto

    @classmethod
    def IS_CHANGED(cls, dataset_dir: str, trigger_word: str = "", resolutions: str = "512", repeats: int = 1,
                   control_dir: str = "", validation_dir: str = "", **_):
        """Re-run when the dataset's identity changes (files or captions edited, added or removed: names, sizes,
        mtimes, nothing decoded; Kontext's control images and validation_dir's images too), else cached."""
        try:
            control = str(dataset_path(control_dir, "control_dir")) if control_dir.strip() else None
            entries = [dataclasses.replace(e, control_dir=control)
                       for e in parse_datasets(dataset_dir, trigger_word, resolutions, repeats)]
            if validation_dir.strip():
                entries.append(validation_entry(str(dataset_path(validation_dir, "validation_dir")), entries[0]))
            return dataset_identity(entries).key
        except (ValueError, OSError) as e:
            return str(e)  # init raises it, naming the widget

    def init(self, prompt=None, unique_id=None, **widgets):
        config, resume = build_config(prompt=prompt, unique_id=unique_id, **widgets)
        previous = active_config()
        # models load only when a loop must really train or a sample render: the run store may hold every loop;
        # the queued graph's validation prompts are encoded then, while T5 is loaded for the captions
        handle = TrainingRun.start(
            config, resume, before_load=comfy_bridge.free_comfy_models,
            on_progress=lambda stage, done, total: comfy_bridge.progress_bar(total).update_absolute(done, total),
            prompts=validation_prompts(prompt, unique_id), on_loaded=model_sharing.trainer_loaded)
        log_loops_to_train(handle, loop_chains(prompt, unique_id) or {}, previous)
        return (handle,)


def log_loops_to_train(handle, chains: dict[str, tuple[int, ...]], previous: TrainConfig | None) -> None:
    """Before any loop runs: which queued TrainLoops will train (the others load from the run store), and why."""
    run = handle.run
    todo = sorted(((chain, node) for node, chain in chains.items()
                   if not run.store.path(run.identity, handle.chain + chain).is_file()), key=lambda c: sum(c[0]))
    if not todo:
        return
    loops = ", ".join(f"TrainLoop {node} (steps {handle.step + sum(chain) - chain[-1] + 1}-{handle.step + sum(chain)})"
                      for chain, node in todo)
    total = run.config.total_steps
    if previous is not None and previous.replace(total_steps=total) == run.config and previous.total_steps != total:
        log.info("the queued loops add up to %d steps, not %d: the learning-rate schedule (total_steps auto) now "
                 "spans %d, which changes the learning rate of every step, so these loops train again: %s",
                 total, previous.total_steps, total, loops)
    else:
        log.info("these loops will train (the run store does not hold them for these settings): %s", loops)
