"""Every training setting in one frozen, validated dataclass.

Field names are the ComfyUI widget names and the TOML keys, so an adapter or the CLI builds a config in one line;
unknown keys raise instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .config_files import config_paths, resolve_config_path
from .typed_fields import check_fields

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
LR_SCHEDULES = ("constant", "cosine", "cosine_restarts", "cyclic")
MIXED_PRECISIONS = ("bf16", "fp32")
# flow_matching.py implements these; they are named here so that checking a config needs no torch import
TIMESTEP_SAMPLINGS = ("shift", "sigmoid", "logit_normal", "uniform")
LORA_FORMATS = ("kohya", "diffusers")
LORA_LAYOUTS = ("fused", "split")
MODEL_TYPES = ("flux", "kontext")
NETWORKS = ("lora", "lokr", "loha")


def _parse_list(value, name: str, convert: type, example: str):
    """A list setting given as text ("512,768", "0.1 0.1") or one number -> a list; its items are then checked to be
    of the field's type by `check_fields`."""
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").replace(" ", ",").split(",") if p]
        try:
            value = [convert(p) for p in parts]
        except ValueError:
            kind = "whole numbers" if convert is int else "numbers"
            raise ValueError(f"{name}: {value!r} is not a list of {kind}; write e.g. {example}")
    if isinstance(value, (int, float)):
        value = [value]
    return value


def _parse_resolutions(value) -> tuple[int, ...]:
    return _parse_list(value, "resolutions", int, "'512' or '512,768,1024'")


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset folder of a run, with its own trigger word, bucket resolutions and repeats (a `[[datasets]]`
    table). None: the run's top-level field of that name (`TrainConfig.dataset_entries` fills it in)."""

    dataset_dir: str  # images with same-stem .txt captions, and/or kohya `N_name` subfolders
    trigger_word: str | None = None
    resolutions: tuple[int, ...] | None = None
    repeats: int | None = None
    control_dir: str | None = None  # Kontext: the control (input) images, each named as its target image
    is_reg: bool = False  # regularization images (prior preservation): their loss is weighted by prior_loss_weight

    def __post_init__(self):
        if self.resolutions is not None:
            object.__setattr__(self, "resolutions", _parse_resolutions(self.resolutions))
        check_fields(self)


def validation_entry(validation_dir: str, first: DatasetEntry) -> DatasetEntry:
    """`validation_dir` as a dataset folder: the first dataset's trigger word and resolutions, no repeats."""
    return DatasetEntry(validation_dir, first.trigger_word, first.resolutions, 1)


@dataclass(frozen=True)
class TrainConfig:
    # --- model files (paths; resolved by the caller: the CLI takes them as given, the nodes via ComfyUI's folders)
    transformer_path: str  # Flux transformer: BFL .safetensors (bf16 or fp8), a GGUF (Q8_0 ... Q4_K) or a diffusers folder; ideally Flux-dev2pro
    vae_path: str  # ae.safetensors or a diffusers VAE folder
    clip_path: str  # clip_l.safetensors or a transformers folder
    t5_path: str  # t5xxl_fp16 / fp8 .safetensors or a transformers folder
    dataset_dir: str = ""  # images with same-stem .txt captions (and/or kohya `N_name` subfolders); or use datasets
    clip_tokenizer_dir: str = ""  # CLIP vocab.json + merges.txt; "" = <tokenizer_dir>/clip
    t5_tokenizer_dir: str = ""  # T5 tokenizer.json folder; "" = <tokenizer_dir>/t5
    tokenizer_dir: str = ""  # folder holding clip/ and t5/ tokenizer folders
    validation_transformer_path: str = ""  # base to judge samples on (Flux-dev when training on dev2pro); "" = training base
    model_type: str = "flux"  # flux, or kontext (FLUX.1 Kontext [dev]: learns an edit from control -> target pairs)

    # --- data
    trigger_word: str = ""  # prepended to every caption unless already present
    resolutions: tuple[int, ...] = (512,)  # bucket base sizes, multiples of 64; several train multi-resolution
    repeats: int = 1  # times each image is seen per epoch
    datasets: tuple[DatasetEntry, ...] = ()  # several folders, each with its own settings ([[datasets]] tables)
    batch_size: int = 1  # images per step (of one bucket); more needs more memory
    flip_augment: bool = False  # random horizontal flips (not for subjects whose sides differ, e.g. text)
    caption_dropout: float = 0.0  # probability of training a step on the empty caption
    cache_dir: str = ""  # disk cache of latents and text embeddings; "" = memory only
    max_sequence_length: int = 512  # T5 tokens; 512 for dev, 256 for schnell
    control_dir: str = ""  # Kontext: control images named as their targets in dataset_dir (same stem, any image type)

    # --- masks, regularization, caption tags, augmentations
    alpha_mask: bool = False  # each image's alpha channel is its loss mask (else <stem>_mask.png beside it, or masks/)
    mask_floor: float = 0.0  # loss weight outside a mask: 0 learns nothing there, e.g. 0.1 keeps a little
    masked_prior_weight: float = 0.0  # outside a mask, pull toward the base model's own prediction (0: off; +1 forward)
    prior_loss_weight: float = 1.0  # loss weight of regularization images ([[datasets]] entries with is_reg = true)
    shuffle_caption: bool = False  # shuffle each caption's comma-separated tags at every step
    keep_tokens: int = 1  # with shuffle_caption: the first N tags stay in place (1: the trigger word stays first)
    caption_variants: int = 8  # with shuffle_caption: shuffled orders per caption, each encoded once (T5 time, RAM)
    color_jitter: float = 0.0  # probability that a step sees an image colour-jittered
    color_jitter_strength: tuple[float, ...] = (0.1, 0.1, 0.1, 0.02)  # brightness, contrast, saturation, hue: largest change
    random_crop: float = 0.0  # probability that a step sees an image randomly cropped and scaled back to its bucket
    random_crop_scale: float = 0.8  # smallest crop side as a share of the bucket's side
    augment_variants: int = 4  # with color_jitter or random_crop: augmented copies per image, each encoded once

    # --- LoRA
    rank: int = 16  # LoRA rank: capacity and file size; 16 suits a subject or style
    alpha: float = 16.0  # scale is alpha / rank
    lora_dropout: float = 0.0  # dropout inside the LoRA layers while training
    blocks: str = "all"  # "all", "double", "single" or e.g. "double:0-9,single:0-37"
    init_lora: str = ""  # a kohya or diffusers-format Flux LoRA file to start from (its rank); "" = a fresh LoRA
    dora: bool = False  # DoRA (peft's use_dora): a trained magnitude per output row on top of the LoRA
    lora_layout: str = "fused"  # fused: one LoRA per fused qkv / linear1, as kohya; split: q, k, v apart (older runs)
    network: str = "lora"  # lora; lokr (Kronecker product) or loha (Hadamard product): LyCORIS, smaller files
    lokr_factor: int = -1  # lokr: each dimension split near this factor (-1 = near its square root: the smallest)
    block_ranks: str = ""  # rank per block range, e.g. "double:0-9=32,single:0-37=8"; blocks not named take rank
    block_lrs: str = ""  # learning rate per block range, e.g. "double=2e-4,single:20-37=5e-5"; others learning_rate
    train_modulation: bool = True  # adapt the blocks' modulation Linears too (musubi-tuner leaves them out)
    loraplus_lr_ratio: float = 1.0  # LoRA+: the up-projections (lora_B) learn this many times faster; 1 = off

    # --- optimisation
    optimizer: str = "adamw"  # adamw, adamw8bit (bitsandbytes), adafactor, prodigy
    learning_rate: float = 1e-4  # for prodigy this is the multiplier d-coefficient, normally 1.0
    weight_decay: float = 0.0  # decoupled weight decay of the optimizer
    lr_schedule: str = "constant"  # constant, cosine, cosine_restarts, cyclic
    warmup_steps: int = 0  # steps of linear learning-rate warmup from 0
    min_lr_ratio: float = 0.0  # floor of the cosine schedules as a fraction of learning_rate
    lr_cycles: int = 3  # restarts / cycles for cosine_restarts and cyclic
    total_steps: int = 3000  # length of the schedule; 0 = auto: the steps the run plans (the graph's TrainLoops, the CLI plan)
    gradient_accumulation: int = 1  # batches summed per optimizer step: a larger batch in the same memory
    max_grad_norm: float = 1.0  # 0 disables clipping

    # --- flow matching
    timestep_sampling: str = "shift"  # shift, sigmoid, logit_normal, uniform
    timestep_shift: float = 3.1582  # for "shift"
    guidance: float = 1.0  # training guidance for guidance-distilled bases; 1.0 keeps Flux-dev from collapsing

    # --- compute and memory
    mixed_precision: str = "bf16"  # bf16 base and activations with fp32 LoRA, or fp32 throughout
    fp8_base: bool = False  # keep frozen block weights in float8_e4m3fn, compute in bf16 (T5's too, while caching)
    t5_on_cpu: bool = False  # encode the captions with T5 on the CPU: for 8 GB cards, where T5 alone would not fit
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory, ~30% slower
    checkpoint_blocks: int = -1  # with gradient_checkpointing: how many blocks (the last ones) recompute; -1 = all
    blocks_to_swap: int = 0  # transformer blocks kept on the CPU and streamed to the GPU just before use
    compile_blocks: bool = False  # torch.compile the blocks for training steps: faster after a first step that compiles
    device: str = "auto"  # auto (cuda when available), cuda, cuda:1, cpu
    seed: int = 42  # LoRA init, data order, noise and timesteps: the same seed trains the same LoRA

    # --- output
    output_dir: str = "output"  # LoRA files, training states, samples and plots
    output_name: str = "flux_lora"  # file stem; the step is appended
    lora_format: str = "kohya"  # kohya (fused qkv, BFL names) or diffusers (peft keys, separate q/k/v)
    tensorboard: bool = True  # TensorBoard event files in <output_dir>/tensorboard/<output_name> (if installed)
    store_dir: str = ""  # the run store (every loop's state, so no step is trained twice); "" = <output_dir>/run_store
    store_max_gb: float = 10.0  # the run store's size budget: least recently used loops of other runs go first

    # --- validation and EMA
    validation_timesteps: int = 0  # validation loss at this many fixed noise levels (e.g. 8); 0 = no validation loss
    validation_split: float = 0.0  # share of the dataset's images held out of training to score (chosen by the seed)
    validation_dir: str = ""  # held-out images (captions beside them) to score instead; "" = the split, else the training images
    validation_every: int = 0  # also score every this many steps (besides each checkpoint); 0 = at checkpoints only
    ema_decay: float = 0.0  # exponential moving average of the LoRA, saved as <name>_<step>_ema; 0 = off, e.g. 0.99
    ema_on_cpu: bool = False  # keep the EMA in RAM instead of on the GPU (for small cards; a copy per step)

    def __post_init__(self):
        object.__setattr__(self, "resolutions", _parse_resolutions(self.resolutions))
        object.__setattr__(self, "color_jitter_strength", _parse_list(self.color_jitter_strength,
                                                                      "color_jitter_strength", float, "'0.1,0.1,0.1,0.02'"))
        object.__setattr__(self, "datasets", tuple(self._dataset_entry(i, e) for i, e in enumerate(self.datasets)))
        check_fields(self)
        self._validate()

    def _dataset_entry(self, index: int, entry) -> DatasetEntry:
        """A `[[datasets]]` table (a dict) -> DatasetEntry."""
        if isinstance(entry, DatasetEntry):
            return entry
        if not isinstance(entry, dict):
            raise ValueError(f"datasets[{index}]: {entry!r} is not a table; write [[datasets]] tables with a dataset_dir")
        known = {f.name for f in dataclasses.fields(DatasetEntry)}
        unknown = sorted(set(entry) - known)
        if unknown or "dataset_dir" not in entry:
            raise ValueError(f"datasets[{index}]: {'unknown key(s) ' + ', '.join(unknown) if unknown else 'no dataset_dir'}"
                             f"; a [[datasets]] table takes {', '.join(sorted(known))}")
        try:
            return DatasetEntry(**entry)
        except ValueError as e:  # its messages start with the field's name
            raise ValueError(f"datasets[{index}].{e}") from None

    def dataset_entries(self) -> tuple[DatasetEntry, ...]:
        """The run's dataset folders, complete: `datasets` with the top-level fields for what an entry leaves out,
        or the one-folder form of the top-level fields."""
        def value(entry: DatasetEntry, name: str):
            own = getattr(entry, name)
            return getattr(self, name) if own is None else own

        fields = ("trigger_word", "resolutions", "repeats", "control_dir")
        return tuple(DatasetEntry(e.dataset_dir, *(value(e, n) for n in fields), is_reg=e.is_reg)
                     for e in self.datasets) or (DatasetEntry(self.dataset_dir, *(getattr(self, n) for n in fields)),)

    def validation_entry(self) -> DatasetEntry:
        return validation_entry(self.validation_dir, self.dataset_entries()[0])

    def _validate(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        for name in ("transformer_path", "vae_path", "clip_path", "t5_path"):
            need(bool(str(getattr(self, name)).strip()), f"{name}: empty; give the path of the file or folder")
        need(bool(self.dataset_dir.strip()) != bool(self.datasets),
             "dataset_dir: give the one dataset folder, or several as [[datasets]] tables, not both"
             if self.datasets else "dataset_dir: empty; give the path of the folder of images")
        for i, entry in enumerate(self.dataset_entries() if self.datasets else ()):
            need(bool(entry.dataset_dir.strip()), f"datasets[{i}].dataset_dir: empty; give the path of the folder")
            need(len(entry.resolutions) > 0 and all(r >= 64 and r % 64 == 0 for r in entry.resolutions),
                 f"datasets[{i}].resolutions: {list(entry.resolutions)}; use multiples of 64, e.g. 512 or 512,768,1024")
            need(entry.repeats >= 1, f"datasets[{i}].repeats: {entry.repeats}; use 1 or more")
        need(len(self.resolutions) > 0, "resolutions: give at least one, e.g. 512 or 512,768,1024")
        for r in self.resolutions:
            need(r >= 64 and r % 64 == 0, f"resolutions: {r} is not a positive multiple of 64; use e.g. 512, 768 or 1024")
        need(self.repeats >= 1, f"repeats: {self.repeats}; use 1 or more")
        need(self.model_type in MODEL_TYPES, f"model_type: {self.model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        for i, entry in enumerate(self.dataset_entries()):
            where = f"datasets[{i}]." if self.datasets else ""
            if self.model_type == "kontext":
                need(bool(entry.control_dir.strip()), f"{where}control_dir: empty; model_type kontext trains on "
                     "pairs: give the folder of control images, each named as its target in the dataset folder")
            else:
                need(not entry.control_dir.strip(), f"{where}control_dir: {entry.control_dir!r} is for Kontext "
                     "pairs; set model_type to kontext, or leave control_dir empty")
        need(self.model_type != "kontext" or not self.validation_dir, "validation_dir: held-out images have no "
             "control images for Kontext; leave it empty and hold out a share of the pairs with validation_split")
        need(self.batch_size >= 1, f"batch_size: {self.batch_size}; use 1 or more")
        need(0.0 <= self.caption_dropout < 1.0, f"caption_dropout: {self.caption_dropout}; use a value in [0, 1)")
        self._validate_dataset_extras(need)
        need(self.max_sequence_length >= 1, f"max_sequence_length: {self.max_sequence_length}; use 512 (dev) or 256 (schnell)")
        need(self.rank >= 1, f"rank: {self.rank}; use a rank of 1 or more (16 is typical)")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha: {self.alpha}; use a positive number (often equal to rank)")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout: {self.lora_dropout}; use a value in [0, 1)")
        need(self.optimizer in OPTIMIZERS, f"optimizer: {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        need(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate: {self.learning_rate}; use a positive number such as 1e-4 (AdamW) or 1.0 (Prodigy)",
        )
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay: {self.weight_decay}; use 0 or more")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule: {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        need(self.warmup_steps >= 0, f"warmup_steps: {self.warmup_steps}; use 0 or more")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio: {self.min_lr_ratio}; use a value in [0, 1]")
        need(self.lr_cycles >= 1, f"lr_cycles: {self.lr_cycles}; use 1 or more")
        need(self.total_steps >= 0, f"total_steps: {self.total_steps}; use 0 (auto: the planned steps) or more")
        need(self.gradient_accumulation >= 1, f"gradient_accumulation: {self.gradient_accumulation}; use 1 or more")
        need(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, f"max_grad_norm: {self.max_grad_norm}; use 0 (off) or more")
        need(
            self.timestep_sampling in TIMESTEP_SAMPLINGS,
            f"timestep_sampling: {self.timestep_sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}",
        )
        need(math.isfinite(self.timestep_shift) and self.timestep_shift > 0, f"timestep_shift: {self.timestep_shift}; use a positive number")
        need(math.isfinite(self.guidance) and self.guidance >= 0, f"guidance: {self.guidance}; use 1.0 for training Flux-dev")
        need(self.mixed_precision in MIXED_PRECISIONS, f"mixed_precision: {self.mixed_precision!r}; choose bf16 or fp32")
        need(self.blocks_to_swap >= 0, f"blocks_to_swap: {self.blocks_to_swap}; use 0 or more")
        need(
            self.blocks_to_swap == 0 or self.gradient_checkpointing,
            "blocks_to_swap needs gradient_checkpointing on (swapped weights cannot wait in RAM while backward "
            "still needs them); turn gradient_checkpointing on or set blocks_to_swap to 0",
        )
        need(self.checkpoint_blocks >= -1, f"checkpoint_blocks: {self.checkpoint_blocks}; use -1 (all) or 0 or more")
        need(
            self.checkpoint_blocks == -1 or self.checkpoint_blocks >= self.blocks_to_swap,
            f"checkpoint_blocks {self.checkpoint_blocks} is fewer than blocks_to_swap {self.blocks_to_swap} (swapped "
            "blocks must be checkpointed); raise checkpoint_blocks or set it to -1 (all)",
        )
        need(self.lora_layout in LORA_LAYOUTS, f"lora_layout: {self.lora_layout!r}; choose one of "
             f"{', '.join(LORA_LAYOUTS)} (split: the layout of runs made before the fused one)")
        self._validate_network()
        need(self.lora_format in LORA_FORMATS, f"lora_format: {self.lora_format!r}; choose one of {', '.join(LORA_FORMATS)}")
        need(not (self.dora and self.fp8_base), "dora cannot train on an fp8 base (peft's DoRA adds the LoRA to the "
             "float8 weight to measure its norms); turn fp8_base off (memory_preset custom) or dora off")
        need(not (self.dora and self.transformer_path.lower().endswith(".gguf")), "dora cannot train on a GGUF base "
             "(peft's DoRA reads the weight's norms, which stay quantized); give the bf16 or fp8 transformer_path or "
             "turn dora off")
        need(not (self.dora and self.blocks_to_swap), "dora cannot be combined with blocks_to_swap (DoRA's weight norms "
             "read every swapped weight, untested with block swap); set blocks_to_swap to 0 or dora off")
        need(math.isfinite(self.store_max_gb) and self.store_max_gb > 0, f"store_max_gb: {self.store_max_gb}; use a "
             "positive size in GB (a rank-16 Flux-dev loop takes about 1 GB with AdamW)")
        need(self.validation_timesteps >= 0, f"validation_timesteps: {self.validation_timesteps}; use 0 (off) or more, e.g. 8")
        need(0.0 <= self.validation_split < 1.0, f"validation_split: {self.validation_split}; use a share in [0, 1), "
             "e.g. 0.1 to hold one image in ten out of training")
        need(not (self.validation_split and self.validation_dir), "validation_split and validation_dir both set; hold "
             "images out of the dataset (validation_split) or give a folder of them (validation_dir), not both")
        need(self.validation_every >= 0, f"validation_every: {self.validation_every}; use 0 (at checkpoints only) or more")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay: {self.ema_decay}; use 0 (off) or a value in (0, 1) such as 0.99")
        need(bool(self.output_name.strip()), "output_name: empty; give a file name stem such as my_lora")
        check_output_name(self.output_name)

    def _validate_network(self):
        """`network` and the settings it constrains; the block ranges are read against the model in `add_lora`."""
        if self.network not in NETWORKS:
            raise ValueError(f"network: {self.network!r}; choose one of {', '.join(NETWORKS)}")
        if self.lokr_factor != -1 and self.lokr_factor < 1:
            raise ValueError(f"lokr_factor: {self.lokr_factor}; use -1 (near the square root) or a factor such as 8")
        if not (math.isfinite(self.loraplus_lr_ratio) and self.loraplus_lr_ratio > 0):
            raise ValueError(f"loraplus_lr_ratio: {self.loraplus_lr_ratio}; use 1 (off) or a ratio such as 16")
        if self.network == "lora":
            return
        name = {"lokr": "LoKr", "loha": "LoHa"}[self.network]
        for ok, message in (
            (not self.dora, f"dora: peft's {name} has no DoRA; turn dora off or set network to lora"),
            (self.lora_layout == "fused", f"lora_layout: 'split' with network {self.network}: a {name} per q, k and v "
             "cannot be written as the one fused qkv / linear1 module ComfyUI loads (a stack of such products is not "
             "one); use lora_layout fused"),
            (self.lora_format == "kohya", f"lora_format: diffusers has no {name} format for Flux; use kohya (the "
             "LyCORIS keys ComfyUI loads)"),
            (self.lora_dropout == 0, f"lora_dropout: peft's {name} has no input dropout; set it to 0"),
            (not self.transformer_path.lower().endswith(".gguf"), f"network {self.network} cannot train on a GGUF "
             f"base (peft's {name} shapes its update as the base weight, which stays quantized blocks); give the bf16 "
             "or fp8 transformer_path or use network lora"),
            (self.loraplus_lr_ratio == 1.0, f"loraplus_lr_ratio: LoRA+ speeds up LoRA's up-projection (lora_B); a "
             f"{name} has no such factor, set it to 1"),
        ):
            if not ok:
                raise ValueError(message)

    def _validate_dataset_extras(self, need) -> None:
        need(0.0 <= self.mask_floor <= 1.0, f"mask_floor: {self.mask_floor}; use a weight in [0, 1], e.g. 0.1")
        need(math.isfinite(self.masked_prior_weight) and self.masked_prior_weight >= 0,
             f"masked_prior_weight: {self.masked_prior_weight}; use 0 (off) or more, e.g. 1.0")
        need(math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0,
             f"prior_loss_weight: {self.prior_loss_weight}; use 0 or more (1.0 weighs regularization images as the rest)")
        need(self.keep_tokens >= 0, f"keep_tokens: {self.keep_tokens}; use 0 or more (1 keeps the trigger word first)")
        need(self.caption_variants >= 1, f"caption_variants: {self.caption_variants}; use 1 or more, e.g. 8")
        for name in ("color_jitter", "random_crop"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name}: {getattr(self, name)}; use a probability in [0, 1]")
        strength = self.color_jitter_strength
        need(len(strength) == 4 and all(0.0 <= v < 1.0 for v in strength) and strength[3] <= 0.5,
             f"color_jitter_strength: {list(strength)}; give 4 values in [0, 1): brightness, contrast, saturation "
             "and hue (at most 0.5), e.g. [0.1, 0.1, 0.1, 0.02]")
        need(0.0 < self.random_crop_scale <= 1.0,
             f"random_crop_scale: {self.random_crop_scale}; use a share in (0, 1], e.g. 0.8")
        need(self.augment_variants >= 1, f"augment_variants: {self.augment_variants}; use 1 or more, e.g. 4")

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", base_dir: str | Path | None = None) -> "TrainConfig":
        """Strict: unknown keys raise. Relative paths are taken relative to `base_dir` (a config file's folder)."""
        known = {f.name for f in dataclasses.fields(cls)}
        for old, new in _REPLACED.items():
            if old in values:
                raise ValueError(f"{source}: {old} is no longer a setting; {new}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings are: {', '.join(sorted(known))}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ValueError(f"{source}: missing setting(s) {', '.join(missing)}; give the path of each")
        if base_dir is not None:
            values = dict(values)
            for entry, key, value, where in config_paths(values, source):
                entry[key] = resolve_config_path(key, value, base_dir, where)
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# settings that were replaced -> what to write instead
_REPLACED = {"keep_runs": "the run store is bounded by size now: remove keep_runs and set store_max_gb (GB, default "
                          "10) if the default does not suit"}

_FORBIDDEN_NAME_CHARS = set('<>:"/\\|?*') | {chr(c) for c in range(32)}
# file systems refuse names over 255 bytes; `_<step>.state.safetensors` and a temporary file's marks add up to 55
MAX_OUTPUT_NAME_BYTES = 200


def check_output_name(name: str) -> str:
    """A file stem that stays inside its folder on every OS; raises naming the `output_name` field otherwise."""
    bad = sorted({c for c in name if c in _FORBIDDEN_NAME_CHARS})
    if bad or ".." in name or name.strip() in (".", "") or name != name.strip() or name.endswith("."):
        shown = "".join(c if c.isprintable() else repr(c) for c in bad)
        raise ValueError(
            f"output_name: {name!r} cannot be a file name (it contains {shown or '..'} or leading/trailing spaces or dots); "
            "use letters, digits, '-', '_' and single dots only"
        )
    if len(name.encode("utf-8")) > MAX_OUTPUT_NAME_BYTES:
        raise ValueError(f"output_name: {len(name.encode('utf-8'))} bytes long; file systems refuse such long file "
                         f"names, use at most {MAX_OUTPUT_NAME_BYTES}")
    return name
