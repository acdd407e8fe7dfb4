"""Memory presets by card size: the settings that let a Flux.1-dev LoRA train on a 24, 16, 12 or 8 GB card.

Defined once here; `bench/memory.py` projects each preset's peak VRAM and checks it fits its card with 10% headroom,
so a preset changed here is re-checked by running the bench. The ladder follows kohya sd-scripts' published one
(24 GB: fp8 base and checkpointing; 16 GB: + block swap; 12 GB: more blocks swapped; 8 GB: most blocks swapped,
at 512²), though the swap counts differ: see `split_blocks_to_swap`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import OPTIMIZERS

FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
FLUX_BLOCKS = FLUX_DOUBLE_BLOCKS + FLUX_SINGLE_BLOCKS
LORA_DTYPES = ("fp32", "bf16")
# Bytes per block-Linear weight as a base stores it: bf16 / fp8 files, GGUF quantizations (GGML's bytes per block /
# weights per block) and bitsandbytes NF4 (4 bits and an fp32 absmax per 64 weights)
BASE_FORMATS = {"bf16": 2.0, "fp8": 1.0, "Q8_0": 34 / 32, "Q6_K": 210 / 256, "Q5_K": 176 / 256, "Q5_0": 22 / 32,
                "Q4_K": 144 / 256, "Q4_0": 18 / 32, "NF4": 0.5 + 4 / 64}


def split_blocks_to_swap(
    blocks_to_swap: int, num_double: int = FLUX_DOUBLE_BLOCKS, num_single: int = FLUX_SINGLE_BLOCKS
) -> tuple[int, int]:
    """`blocks_to_swap` -> (double blocks, single blocks) whose frozen weights wait in CPU RAM.

    Counted in whole blocks, as `block_swap.BlockSwap` swaps them: the last `blocks_to_swap` of the blocks in
    execution order (19 double, then 38 single), so single blocks go first and double blocks only past 38. A double
    block holds 2.4x a single block's weights (340 M vs 142 M parameters), so the first 38 save less per block than
    the rest, and the numbers are not kohya's (whose unit is half a double block or two single blocks).
    """
    if not 0 <= blocks_to_swap <= num_double + num_single:
        raise ValueError(
            f"blocks_to_swap: {blocks_to_swap}; use 0 (no swap) to {num_double + num_single}, the model's block count"
        )
    return max(0, blocks_to_swap - num_single), min(blocks_to_swap, num_single)


@dataclass(frozen=True)
class MemoryPreset:
    """How to fit a training step on one card size; `train_settings` gives the `TrainConfig` fields it sets."""

    name: str
    card_gib: float  # VRAM of the card the preset targets, GiB
    fp8_base: bool  # frozen block weights stored as float8_e4m3fn (1 byte/param), computed in bf16
    gradient_checkpointing: bool  # a block keeps only its inputs and is recomputed in backward
    blocks_to_swap: int  # whole blocks from the output end, see `split_blocks_to_swap`
    optimizer: str  # one of config.OPTIMIZERS
    resolution: int  # bucket base size, pixels
    batch_size: int
    lora_dtype: str = "fp32"  # LoRA weights, gradients and optimizer state; the trainer keeps fp32 under bf16 autocast
    checkpoint_blocks: int = -1  # with gradient_checkpointing: the last N blocks recompute, -1 = all (bench picks N)
    t5_on_cpu: bool = False  # T5 encodes the captions on the CPU: where even its fp8 weights (5.5 GB) do not fit
    base_format: str = ""  # how the base file stores its block weights (BASE_FORMATS); "" = fp8 or bf16, by fp8_base
    swap_for_base: tuple[tuple[str, int], ...] = ()  # (base format, blocks_to_swap) where a smaller base swaps fewer

    def __post_init__(self):
        if self.base_format and self.base_format not in BASE_FORMATS:
            raise ValueError(f"preset {self.name}: base_format {self.base_format!r}; choose one of "
                             f"{', '.join(BASE_FORMATS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"preset {self.name}: optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"preset {self.name}: lora_dtype {self.lora_dtype!r}; choose {' or '.join(LORA_DTYPES)}")
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError(f"preset {self.name}: resolution {self.resolution} is not a positive multiple of 64")
        if self.batch_size < 1 or self.card_gib <= 0:
            raise ValueError(f"preset {self.name}: batch_size and card_gib must be positive")
        split_blocks_to_swap(self.blocks_to_swap)
        if self.checkpoint_blocks != -1 and not self.blocks_to_swap <= self.checkpoint_blocks <= FLUX_BLOCKS:
            raise ValueError(f"preset {self.name}: checkpoint_blocks {self.checkpoint_blocks}; use -1 (all) or "
                             f"{self.blocks_to_swap} (blocks_to_swap) to {FLUX_BLOCKS}")

    @property
    def linear_bytes(self) -> float:
        """Bytes per block-Linear weight of the base on the card."""
        return BASE_FORMATS[self.base_format or ("fp8" if self.fp8_base else "bf16")]

    def for_base(self, base_format: str) -> MemoryPreset:
        """This preset for a base stored as `base_format` (a GGUF file's quantization, `models.base_format`): the
        blocks swapped that `bench/memory.py` tuned for it, or the preset's own count."""
        swaps = dict(self.swap_for_base)
        if base_format not in swaps:  # the fp8-tuned count, which a base smaller than fp8 fits too
            return dataclasses.replace(self, base_format=base_format)
        return dataclasses.replace(self, base_format=base_format, blocks_to_swap=swaps[base_format],
                                   checkpoint_blocks=-1)

    def for_network(self, network: str) -> MemoryPreset:
        """This preset for the adapter `network` (TrainConfig.network). A LoKr keeps for backward each Linear's input
        and no product (`lora.lycoris.KroneckerLinear`), about what a LoRA keeps, and fits each card with the
        preset's own partial checkpointing (`bench/memory.py --network lokr`: 23-25% headroom). peft's LoHa keeps each
        Linear's whole update (out x in, fp32): every block is checkpointed for it (with the preset's own, the 24GB,
        12GB and 8GB presets do not fit)."""
        if network != "loha":
            return self
        return dataclasses.replace(self, gradient_checkpointing=True, checkpoint_blocks=-1)

    def train_settings(self) -> dict:
        """The `TrainConfig` fields this preset sets: `TrainConfig(**paths, **preset.train_settings())`.

        `lora_dtype` is not among them: the trainer always keeps LoRA weights in fp32; bf16 is for projections only.
        """
        return {
            "fp8_base": self.fp8_base,
            "gradient_checkpointing": self.gradient_checkpointing,
            "checkpoint_blocks": self.checkpoint_blocks,
            "t5_on_cpu": self.t5_on_cpu,
            "blocks_to_swap": self.blocks_to_swap,
            "optimizer": self.optimizer,
            "resolutions": (self.resolution,),
            "batch_size": self.batch_size,
            "mixed_precision": "bf16",
        }


# Tuned with `bench/memory.py`: each fits its card with >= 10% headroom in its projection, 15-20% where two more
# swapped blocks buy it, for what a projection leaves out (a desktop on the same card, driver differences), in
# every phase of a run. checkpoint_blocks is the bench's pick at the preset's resolution (15% headroom in training);
# swap_for_base its pick for a quantized base (15% headroom in every phase, every block checkpointed).
PRESETS: dict[str, MemoryPreset] = {
    p.name: p
    for p in (
        # no memory saving: bf16 base, nothing recomputed or swapped; ~73 GiB, so 96 GB cards (80 GB: use "24GB")
        MemoryPreset("none", 96, fp8_base=False, gradient_checkpointing=False, blocks_to_swap=0, optimizer="adamw",
                     resolution=1024, batch_size=1),
        MemoryPreset("24GB", 24, fp8_base=True, gradient_checkpointing=True, blocks_to_swap=0, optimizer="adamw",
                     resolution=1024, batch_size=1, checkpoint_blocks=54),
        MemoryPreset("16GB", 16, fp8_base=True, gradient_checkpointing=True, blocks_to_swap=28, optimizer="adamw8bit",
                     resolution=1024, batch_size=1, swap_for_base=(("Q8_0", 27), ("Q4_K", 0), ("NF4", 0))),
        MemoryPreset("12GB", 12, fp8_base=True, gradient_checkpointing=True, blocks_to_swap=46, optimizer="adamw8bit",
                     resolution=1024, batch_size=1, checkpoint_blocks=56,
                     swap_for_base=(("Q8_0", 44), ("Q4_K", 17), ("NF4", 17))),
        MemoryPreset("8GB", 8, fp8_base=True, gradient_checkpointing=True, blocks_to_swap=50, optimizer="adafactor",
                     resolution=512, batch_size=1, checkpoint_blocks=54, t5_on_cpu=True,
                     swap_for_base=(("Q8_0", 48), ("Q4_K", 36), ("NF4", 36))),
    )
}
