"""Every training setting in one frozen, validated dataclass.

Field names are the ComfyUI widget names and the TOML keys, so an adapter or the CLI builds a config in one line;
unknown keys raise instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .flow_matching import TIMESTEP_SAMPLINGS

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
LR_SCHEDULES = ("constant", "cosine", "cosine_restarts", "cyclic")
MIXED_PRECISIONS = ("bf16", "fp32")


def _parse_resolutions(value) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").replace(" ", ",").split(",") if p]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"resolutions: {value!r} is not a list of whole numbers; write e.g. '512' or '512,768,1024'")
    if isinstance(value, int):
        value = [value]
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class TrainConfig:
    # --- model files (paths; resolved by the caller: the CLI takes them as given, the nodes via ComfyUI's folders)
    transformer_path: str  # Flux transformer: BFL .safetensors (bf16 or fp8) or a diffusers folder; ideally Flux-dev2pro
    vae_path: str  # ae.safetensors or a diffusers VAE folder
    clip_path: str  # clip_l.safetensors or a transformers folder
    t5_path: str  # t5xxl_fp16 / fp8 .safetensors or a transformers folder
    dataset_dir: str  # images with same-stem .txt captions
    clip_tokenizer_dir: str = ""  # CLIP vocab.json + merges.txt; "" = <tokenizer_dir>/clip
    t5_tokenizer_dir: str = ""  # T5 tokenizer.json folder; "" = <tokenizer_dir>/t5
    tokenizer_dir: str = ""  # folder holding clip/ and t5/ tokenizer folders
    validation_transformer_path: str = ""  # base to judge samples on (Flux-dev when training on dev2pro); "" = training base

    # --- data
    trigger_word: str = ""  # prepended to every caption unless already present
    resolutions: tuple[int, ...] = (512,)  # bucket base sizes, multiples of 64; several train multi-resolution
    repeats: int = 1  # times each image is seen per epoch
    batch_size: int = 1
    flip_augment: bool = False  # random horizontal flips (not for subjects whose sides differ, e.g. text)
    caption_dropout: float = 0.0  # probability of training a step on the empty caption
    cache_dir: str = ""  # disk cache of latents and text embeddings; "" = memory only
    max_sequence_length: int = 512  # T5 tokens; 512 for dev, 256 for schnell

    # --- LoRA
    rank: int = 16
    alpha: float = 16.0  # scale is alpha / rank
    lora_dropout: float = 0.0
    blocks: str = "all"  # "all", "double", "single" or e.g. "double:0-9,single:0-37"

    # --- optimisation
    optimizer: str = "adamw"  # adamw, adamw8bit (bitsandbytes), adafactor, prodigy
    learning_rate: float = 1e-4  # for prodigy this is the multiplier d-coefficient, normally 1.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant, cosine, cosine_restarts, cyclic
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of the cosine schedules as a fraction of learning_rate
    lr_cycles: int = 3  # restarts / cycles for cosine_restarts and cyclic
    total_steps: int = 3000  # length of the schedule; the run may stop earlier or go on at the final LR
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping

    # --- flow matching
    timestep_sampling: str = "shift"  # shift, sigmoid, logit_normal, uniform
    timestep_shift: float = 3.1582  # for "shift"
    guidance: float = 1.0  # training guidance for guidance-distilled bases; 1.0 keeps Flux-dev from collapsing

    # --- compute and memory
    mixed_precision: str = "bf16"  # bf16 base and activations with fp32 LoRA, or fp32 throughout
    fp8_base: bool = False  # keep frozen block weights in float8_e4m3fn, compute in bf16 (T5's too, while caching)
    t5_on_cpu: bool = False  # encode the captions with T5 on the CPU: for 8 GB cards, where T5 alone would not fit
    gradient_checkpointing: bool = True
    checkpoint_blocks: int = -1  # with gradient_checkpointing: how many blocks (the last ones) recompute; -1 = all
    blocks_to_swap: int = 0  # transformer blocks kept on the CPU and streamed to the GPU just before use
    compile_blocks: bool = False  # torch.compile each transformer block: faster steps on GPUs after a cold start of minutes
    device: str = "auto"  # auto (cuda when available), cuda, cuda:1, cpu
    seed: int = 42

    # --- output
    output_dir: str = "output"
    output_name: str = "flux_lora"  # file stem; the step is appended

    def __post_init__(self):
        object.__setattr__(self, "resolutions", _parse_resolutions(self.resolutions))
        self._validate()

    def _validate(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        for name in ("transformer_path", "vae_path", "clip_path", "t5_path", "dataset_dir"):
            need(bool(str(getattr(self, name)).strip()), f"{name}: empty; give the path of the file or folder")
        need(len(self.resolutions) > 0, "resolutions: give at least one, e.g. 512 or 512,768,1024")
        for r in self.resolutions:
            need(r >= 64 and r % 64 == 0, f"resolutions: {r} is not a positive multiple of 64; use e.g. 512, 768 or 1024")
        need(self.repeats >= 1, f"repeats: {self.repeats}; use 1 or more")
        need(self.batch_size >= 1, f"batch_size: {self.batch_size}; use 1 or more")
        need(0.0 <= self.caption_dropout < 1.0, f"caption_dropout: {self.caption_dropout}; use a value in [0, 1)")
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
        need(self.total_steps >= 1, f"total_steps: {self.total_steps}; use 1 or more (3000 is typical)")
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
        need(
            not (self.compile_blocks and self.blocks_to_swap),
            "compile_blocks cannot be combined with blocks_to_swap (compiled blocks would capture the swapped weights); "
            "turn one of them off",
        )
        need(bool(self.output_name.strip()), "output_name: empty; give a file name stem such as my_lora")
        check_output_name(self.output_name)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", base_dir: str | Path | None = None) -> "TrainConfig":
        """Strict: unknown keys raise. Relative paths are taken relative to `base_dir` (a config file's folder)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings are: {', '.join(sorted(known))}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ValueError(f"{source}: missing setting(s) {', '.join(missing)}; give the path of each")
        if base_dir is not None:
            values = {k: str(Path(base_dir) / v) if k in _PATH_FIELDS and v and not Path(v).is_absolute() else v
                      for k, v in values.items()}
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PATH_FIELDS = {"transformer_path", "vae_path", "clip_path", "t5_path", "dataset_dir", "tokenizer_dir", "clip_tokenizer_dir",
                "t5_tokenizer_dir", "validation_transformer_path", "cache_dir", "output_dir"}


def read_toml(path: str | Path) -> dict:
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; give the path of a .toml file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad's BOM is fine
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # in "double quotes" a backslash starts an escape, so "C:\Users\me" is an error
        hint = " (write Windows paths in 'single quotes' or with /)" if "\\" in text else ""
        raise ValueError(f"{path}: not valid TOML ({e}); fix the line it names{hint}") from e


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
