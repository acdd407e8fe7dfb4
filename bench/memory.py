"""Projected peak VRAM of one Flux.1-dev LoRA training step, per memory preset, from measurements on the CPU.

There is no GPU here, so the peak is assembled from parts:

- Activations are measured: the bytes autograd keeps for backward (`saved_tensors_hooks`, each storage once) in one
  real-width double block and one single block, with peft LoRA rank 16 on all their Linears, with and without
  gradient checkpointing; then multiplied by Flux-dev's 19 and 38 blocks. The blocks run on the meta device: exact
  shapes and dtypes, no memory and no arithmetic, so 1024² takes a second instead of many minutes on two cores. What
  a meta forward would do differently from the trainer's CUDA step (attention kernel, autocast) is put right by
  `CudaLikeMeta`; a test checks the meta figures against real CPU tensors.
- Weights, LoRA, gradients and optimizer state are counted from a meta-device Flux-dev built from its config.
- Overhead is an assumption, stated below, not a measurement.

Approximations:
- With checkpointing a block keeps only its inputs. The block in backward is recomputed, so its transient working
  set is taken as its saved bytes without checkpointing plus the activation gradients coming in and going out.
  Short-lived temporaries inside one backward op (the largest: the gradient of the 12288-wide MLP hidden,
  ~24 KiB/token) are left to the fragmentation margin. Without checkpointing the same two gradients are added.
- Block swap is counted as `trainer_core.block_swap.BlockSwap` swaps (`trainer_core.presets.split_blocks_to_swap`):
  the swapped blocks' frozen weights leave the GPU except two blocks in flight (the one computing and the one being
  prefetched). Their LoRA weights and optimizer state stay on the GPU, as BlockSwap leaves them.
- Text encoders and the VAE are off the GPU while training (their outputs are cached first), as the trainer does.

Every other phase of a run is projected too (`phases`): caching with one model at a time, the base load, samples on
the training base and on another, the XY grid, a new prompt; device and host RAM. Their working sets (T5, CLIP, the
VAE at each resolution, one inference pass) are measured on the meta device as the peak bytes of live tensors
(`LiveBytes`). Host RAM adds an assumed `HOST_BASE` for Python, torch and ComfyUI. The last line is the smallest
headroom over every preset and phase. `pick_checkpoint_blocks` gives the fewest checkpointed blocks per preset and
resolution; the presets use the figure for their own resolution.

Run: .venv/bin/python bench/memory.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: make trainer_core importable

from trainer_core import lora, models  # noqa: E402
from trainer_core.config import NETWORKS  # noqa: E402
from trainer_core.models.text_encoders import T5_FP8  # noqa: E402
from trainer_core.presets import PRESETS, MemoryPreset, split_blocks_to_swap  # noqa: E402

log = logging.getLogger("bench.memory")

GIB, MIB = 2**30, 2**20
TEXT_TOKENS = 512  # Flux-dev's T5 sequence length
RESOLUTIONS = (512, 768, 1024)
QUANTIZED_BASES = ("Q8_0", "Q4_K", "NF4")  # GGUF Q8_0 and Q4_K_S files, bitsandbytes NF4
QUANTIZED_CARDS = ("16GB", "12GB", "8GB")
LORA_RANK = 16
CONFIG_PATH = ROOT / "trainer_core" / "configs" / "flux-dev-transformer.json"
LORA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Assumptions, not measurements (nothing on this machine can measure them):
CUDA_CONTEXT = 1.0 * GIB  # CUDA context, cuBLAS/cuDNN workspaces and loaded kernels: ~0.5-1 GiB on recent cards
FRAGMENTATION = 0.10  # PyTorch's caching allocator reserves more than it hands out: +10% of what is allocated
HEADROOM = 0.10  # a preset must leave this fraction of its card free
PICK_HEADROOM = 0.15  # what un-checkpointing blocks may leave: 5 points more, for what a projection leaves out
HOST_BASE = 3.0 * GIB  # Python, torch, the CUDA libraries and ComfyUI itself, before any model is loaded
HOST_LIMIT = 24 * GIB  # what a 32 GB PC leaves a run, with the desktop and a browser open
XY_ROWS = 4  # LoRA checkpoints an XY grid holds in RAM


# ----------------------------------------------------------------------------------------- measuring what is saved
class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Inside the `with`, record every tensor autograd keeps for backward, one entry per storage.

    Per storage, so views count once (a Linear saves its (B, N, C) input as a (B*N, C) view). The key is the storage
    object rather than its data_ptr, which is 0 for every meta tensor: torch keeps one Python object per storage, and
    holding it here keeps it alive, so no key can be reused.
    """

    def __init__(self):
        self.storages: dict[int, torch.UntypedStorage] = {}
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[id(storage)] = storage
        return tensor

    def nbytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Bytes of the saved storages, leaving out those of `exclude` (weights, which are counted as weights)."""
        skip = {id(t.untyped_storage()) for t in exclude}
        return sum(s.nbytes() for key, s in self.storages.items() if key not in skip)


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for backward while `fn()` runs, each storage once, without `exclude`'s storages."""
    saved = SavedTensors()
    with saved:
        fn()
    return saved.nbytes(exclude)


class CudaLikeMeta(TorchFunctionMode):
    """Make a meta-device forward save for backward what the trainer's CUDA step saves.

    - Attention: on meta, `scaled_dot_product_attention` takes the math path and saves the (N, N) attention matrix
      in fp32. A CUDA step runs flash attention, which saves q, k, v, the output and a (B, H, N) logsumexp; the CUDA
      flash op has a meta kernel and its own autograd formula, so calling it directly saves exactly that.
    - Autocast: the trainer runs under `torch.autocast("cuda", torch.bfloat16)`, which leaves meta tensors alone.
      CUDA's autocast policy for the ops in a Flux block is: linear and attention in bf16, layer_norm and rms_norm in
      fp32, everything else in its input dtype. The cast copies are new tensors; those a backward needs are saved.
    """

    LOW_PRECISION = (F.linear, F.scaled_dot_product_attention)
    FULL_PRECISION = (F.layer_norm, F.rms_norm)

    def __init__(self, autocast: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.autocast = autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None and func in self.LOW_PRECISION:
            args, kwargs = _cast_floats(args, kwargs, self.autocast)
        elif self.autocast is not None and func in self.FULL_PRECISION:
            args, kwargs = _cast_floats(args, kwargs, torch.float32)
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) < 4:
            return _flash_attention(*args, **kwargs)  # masked attention (CLIP's 77 tokens) runs as it is
        return func(*args, **kwargs)


def _cast_floats(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    def cast(a):
        return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(B, H, N, D) query, key, value -> (B, H, N, D), through the CUDA flash-attention op."""
    if attn_mask is not None or enable_gqa:
        raise NotImplementedError("flash attention takes no mask and no GQA; Flux uses neither")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]


@dataclass(frozen=True)
class Activations:
    """Bytes kept for backward at one resolution and batch size, measured on one block of each kind."""

    resolution: int
    batch_size: int
    tokens: int  # image tokens (R/16)² + text tokens
    double: int  # one double block, no checkpointing
    single: int  # one single block, no checkpointing
    double_inputs: int  # one double block under checkpointing: its inputs only
    single_inputs: int
    head: int  # norm_out, proj_out and the loss after the last block
    batch: int  # the batch itself: noisy latents (bf16) and target (fp32) as tokens, T5 and CLIP embeddings (bf16)
    shared: int  # rotary embedding and temb: made once per step, alive for all blocks until the end of backward


def measure_activations(blocks: FluxTransformer2DModel, resolution: int, batch_size: int = 1) -> Activations:
    """Measure one double block, one single block and the output head of `blocks` (a 1+1-block Flux, `lora_flux`).

    Block inputs require grad, as they do for every block but the first; temb does not (no LoRA before it).
    Weights, temb and the rotary embedding are left out of the per-block figures: weights are counted as weights,
    and the other two exist once per step however many blocks use them (`shared`).
    """
    device, dim, cfg = blocks.device, blocks.inner_dim, blocks.config
    image_tokens = (resolution // 16) ** 2  # 8x VAE, then 2x2 patches
    tokens = image_tokens + TEXT_TOKENS
    hidden = torch.randn(batch_size, image_tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    context = torch.randn(batch_size, TEXT_TOKENS, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    temb = torch.randn(batch_size, dim, device=device, dtype=torch.bfloat16)
    rotary = blocks.pos_embed(torch.zeros(tokens, 3, device=device))  # positions do not change what is saved
    target = torch.randn(batch_size, image_tokens, blocks.out_channels, device=device)
    latents = image_tokens * cfg.in_channels  # values per sample in the packed noisy input (bf16) and target (fp32)
    text = TEXT_TOKENS * cfg.joint_attention_dim + cfg.pooled_projection_dim  # T5 and CLIP embeddings (bf16)

    def block_bytes(block: nn.Module, checkpointing: bool) -> int:
        args = (hidden, context, temb, rotary)
        # checkpointed as diffusers' enable_gradient_checkpointing does it
        run = partial(checkpoint, block, *args, use_reentrant=False) if checkpointing else partial(block, *args)
        return saved_bytes(run, exclude=[*block.parameters(), temb, *rotary])

    def head() -> torch.Tensor:
        return F.mse_loss(blocks.proj_out(blocks.norm_out(hidden, temb)).float(), target)

    double, single = blocks.transformer_blocks[0], blocks.single_transformer_blocks[0]
    return Activations(
        resolution=resolution,
        batch_size=batch_size,
        tokens=tokens,
        double=block_bytes(double, checkpointing=False),
        single=block_bytes(single, checkpointing=False),
        double_inputs=block_bytes(double, checkpointing=True),
        single_inputs=block_bytes(single, checkpointing=True),
        head=saved_bytes(head, exclude=[*blocks.parameters(), temb]),
        batch=batch_size * (latents * (2 + 4) + 2 * text),
        shared=sum(t.untyped_storage().nbytes() for t in (temb, *rotary)),
    )


# ----------------------------------------------------------------------------------------- models on the meta device
def flux_dev_config() -> dict:
    """Flux-dev's transformer config: the project's copy if present, else diffusers' defaults, which are Flux-dev's."""
    if CONFIG_PATH.is_file():
        return json.loads(CONFIG_PATH.read_text())
    return {"guidance_embeds": True}


def meta_flux(config: dict) -> FluxTransformer2DModel:
    """A Flux transformer on the meta device, to count its parameters: real shapes, no memory."""
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def lora_flux(config: dict, fp8_base: bool, lora_dtype: str, device: str = "meta", network: str = "lora"
              ) -> FluxTransformer2DModel:
    """`config`'s Flux cut to one double and one single block in the fused layout, LoRA (or the `network`'s
    adapter) rank 16 on every block Linear, base frozen.

    With `fp8_base` the block Linears are the trainer's own `models.Fp8Linear`, so what they save for backward
    (the dequantized weight) is measured, not assumed; those are made on the meta device only.
    """
    assert device == "meta" or not fp8_base
    with torch.device(device):
        model = FluxTransformer2DModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
    fp8_weights = models.use_fp8_linears(model, torch.bfloat16) if fp8_base else set()
    model.bfloat16()
    for name in fp8_weights:
        model.get_parameter(name).data = model.get_parameter(name).data.to(torch.float8_e4m3fn)
    models.fuse_projections(model)  # the default lora_layout's model, as the trainer builds it
    linears = sum(isinstance(m, nn.Linear) for blocks in (model.transformer_blocks, model.single_transformer_blocks)
                  for m in blocks.modules())
    lora.add_lora(model, LORA_RANK, LORA_RANK, lora_dtype=LORA_DTYPES[lora_dtype], network=network)  # the trainer's
    layers = lora._lora_layers(model)
    assert len(layers) == linears, f"LoRA on {len(layers)} of {linears} block Linears"
    return model


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the base transformer and of its LoRA."""

    num_double: int
    num_single: int
    params: int  # base transformer
    block_linear: int  # of which Linear weights inside the blocks: what fp8_base stores in one byte
    double: tuple[int, int]  # one double block: (params, Linear weights)
    single: tuple[int, int]  # one single block: (params, Linear weights)
    lora: int  # LoRA parameters on every block Linear
    lora_factored: int  # rows + columns of every LoRA matrix: the size of Adafactor's factored second moment


def count_sizes(full: FluxTransformer2DModel, adapted: FluxTransformer2DModel) -> ModelSizes:
    """Count `full` (no LoRA) and the adapter of `adapted` (one block of each kind, `lora_flux`) scaled to `full`'s
    blocks."""
    nd, ns = len(full.transformer_blocks), len(full.single_transformer_blocks)
    adapter = lora.lora_parameters_by_name(adapted)

    def lora_params(prefix: str) -> list[torch.Tensor]:
        return [p for name, p in adapter.items() if name.startswith(prefix)]

    double, single = full.transformer_blocks[0], full.single_transformer_blocks[0]
    lora_double, lora_single = lora_params("transformer_blocks.0."), lora_params("single_transformer_blocks.0.")
    return ModelSizes(
        num_double=nd,
        num_single=ns,
        params=sum(p.numel() for p in full.parameters()),
        block_linear=sum(_linear_weights(b) for b in (*full.transformer_blocks, *full.single_transformer_blocks)),
        double=(sum(p.numel() for p in double.parameters()), _linear_weights(double)),
        single=(sum(p.numel() for p in single.parameters()), _linear_weights(single)),
        lora=nd * sum(p.numel() for p in lora_double) + ns * sum(p.numel() for p in lora_single),
        lora_factored=nd * sum(sum(p.shape) for p in lora_double) + ns * sum(sum(p.shape) for p in lora_single),
    )


# ----------------------------------------------------------------------------------------- the projection (pure)
def weight_bytes(params: int, linear: int, linear_bytes: float) -> int:
    """bf16 weights, but `linear_bytes` per block-Linear weight (1 for fp8, ~0.56 for Q4_K: `presets.BASE_FORMATS`);
    biases and norms stay bf16, as models.Fp8Linear and GGUFLinear keep them."""
    return round(2 * params - linear * (2 - linear_bytes))


def resident_weight_bytes(sizes: ModelSizes, linear_bytes: float, blocks_to_swap: int) -> int:
    """Base weights on the GPU: all of them, less the swapped blocks', plus up to two swapped blocks in flight.

    Two in flight (the one computing, the next arriving) is what a prefetching swap needs, so swapping one or two
    blocks saves nothing; the largest swapped kind is taken for both.
    """
    n_double, n_single = split_blocks_to_swap(blocks_to_swap, sizes.num_double, sizes.num_single)
    double, single = weight_bytes(*sizes.double, linear_bytes), weight_bytes(*sizes.single, linear_bytes)
    in_flight = min(2, n_double + n_single) * (double if n_double else single)
    full = weight_bytes(sizes.params, sizes.block_linear, linear_bytes)
    return full - n_double * double - n_single * single + in_flight


def training_state_bytes(sizes: ModelSizes, optimizer: str, lora_dtype: str) -> int:
    """LoRA weights, their gradients and the optimizer's state."""
    size = LORA_DTYPES[lora_dtype].itemsize
    state = {
        "adamw": 2 * sizes.lora * size,  # torch AdamW: exp_avg and exp_avg_sq, in the parameter's dtype
        "adamw8bit": 2 * sizes.lora * (1 + 4 / 256),  # bitsandbytes: two uint8 states + an fp32 absmax per 256 values
        "adafactor": sizes.lora_factored * size,  # transformers' Adafactor, beta1=None: a row and a column per matrix
        "prodigy": 4 * sizes.lora * size,  # prodigyopt: exp_avg, exp_avg_sq, s, p0 (less p0 of zero-init LoRA B)
    }[optimizer]
    return 2 * sizes.lora * size + round(state)


def activation_bytes(act: Activations, sizes: ModelSizes, checkpointed: int | bool) -> int:
    """Peak activation bytes of a step: what is kept for backward, the block in backward's working set, the batch.

    `checkpointed`: how many blocks, the last ones in execution order (single blocks first), keep only their inputs
    (`block_swap.checkpoint_blocks`); True or -1 = all, False = none.
    """
    nd, ns = sizes.num_double, sizes.num_single
    count = nd + ns if checkpointed is True or checkpointed == -1 else min(int(checkpointed), nd + ns)
    ns_c, nd_c = min(count, ns), max(0, count - ns)
    grads = 2 * max(act.double_inputs, act.single_inputs)  # the activation gradient coming in and the one going out
    kept = (nd - nd_c) * act.double + nd_c * act.double_inputs + (ns - ns_c) * act.single + ns_c * act.single_inputs
    # a checkpointed block in backward is recomputed and holds its full saved set
    recompute = max([act.double] * (nd_c > 0) + [act.single] * (ns_c > 0), default=0)
    return kept + recompute + grads + act.head + act.shared + act.batch


@dataclass(frozen=True)
class Projection:
    """Projected peak VRAM of one preset, in bytes."""

    name: str
    resolution: int
    card_gib: float
    weights: int  # base weights on the GPU
    activations: int  # kept for backward, in backward, and the batch
    training_state: int  # LoRA, its gradients, the optimizer state
    overhead: int  # CUDA context + allocator fragmentation (assumptions)

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.training_state + self.overhead

    @property
    def headroom(self) -> float:
        return 1 - self.peak / (self.card_gib * GIB)

    @property
    def fits(self) -> bool:
        return self.headroom >= HEADROOM


def project(preset: MemoryPreset, sizes: ModelSizes, act: Activations) -> Projection:
    """Peak VRAM of `preset`'s training step, from `act` measured with its resolution, batch, fp8_base, lora_dtype."""
    assert (act.resolution, act.batch_size) == (preset.resolution, preset.batch_size)
    weights = resident_weight_bytes(sizes, preset.linear_bytes, preset.blocks_to_swap)
    checkpointed = preset.checkpoint_blocks if preset.gradient_checkpointing else 0
    activations = activation_bytes(act, sizes, checkpointed)
    state = training_state_bytes(sizes, preset.optimizer, preset.lora_dtype)
    overhead = round(CUDA_CONTEXT + FRAGMENTATION * (weights + activations + state))
    return Projection(preset.name, preset.resolution, preset.card_gib, weights, activations, state, overhead)


# ----------------------------------------------------------------------------------------- the report
class Bench:
    """Meta-device Flux-dev and its 1+1-block LoRA variants, with activations measured once per setting."""

    def __init__(self, config: dict, network: str = "lora"):
        self.config, self.network = config, network
        self._blocks: dict[tuple[bool, str], FluxTransformer2DModel] = {}
        self.measured: dict[tuple[int, int, bool, str], Activations] = {}
        self.sizes = count_sizes(meta_flux(config), self.blocks(False, "fp32"))

    def blocks(self, fp8_base: bool, lora_dtype: str) -> FluxTransformer2DModel:
        if (fp8_base, lora_dtype) not in self._blocks:
            self._blocks[fp8_base, lora_dtype] = lora_flux(self.config, fp8_base, lora_dtype, network=self.network)
        return self._blocks[fp8_base, lora_dtype]

    def activations(self, resolution: int, batch_size: int, fp8_base: bool, lora_dtype: str) -> Activations:
        key = (resolution, batch_size, fp8_base, lora_dtype)
        if key not in self.measured:
            log.info("measuring %d², batch %d, fp8 base %s, %s LoRA", *key)
            with CudaLikeMeta():
                blocks = self.blocks(fp8_base, lora_dtype)
                self.measured[key] = measure_activations(blocks, resolution, batch_size)
        return self.measured[key]

    def project(self, preset: MemoryPreset) -> Projection:
        # a quantized base's Linears keep what Fp8Linear's do for backward (GGUFLinear is one)
        low_bit = preset.fp8_base or bool(preset.base_format)
        act = self.activations(preset.resolution, preset.batch_size, low_bit, preset.lora_dtype)
        return project(preset, self.sizes, act)


def comparison(bench: Bench, resolution: int) -> dict[str, Projection]:
    """The "none" preset at `resolution`, then with checkpointing, then with an fp8 base too: why the options matter."""
    base = dataclasses.replace(PRESETS["none"], resolution=resolution)
    variants = {
        "bf16": base,
        "bf16 + checkpointing": dataclasses.replace(base, gradient_checkpointing=True),
        "fp8 + checkpointing": dataclasses.replace(base, gradient_checkpointing=True, fp8_base=True),
    }
    return {label: bench.project(preset) for label, preset in variants.items()}


# ----------------------------------------------------------------------------------------- every phase of a run
class LiveBytes(TorchDispatchMode):
    """Inside the `with`, the peak bytes of the tensors ops made that are still alive (inputs and weights aside).

    On the meta device this is an inference pass's working set at exact shapes in a second, with no memory. Views
    and in-place results make no new storage and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def working_set(fn: Callable[[], object]) -> int:
    """Peak bytes of what `fn()` allocates, run without grad under `CudaLikeMeta` (flash attention, bf16)."""
    with torch.no_grad(), CudaLikeMeta(), LiveBytes() as live:
        fn()
    return live.peak


@dataclass(frozen=True)
class EncoderSizes:
    """Bytes of the models around the transformer, and the working sets they need (meta-measured, bf16)."""

    t5: int  # T5-XXL encoder in bf16
    t5_fp8: int  # with its block Linears but `wo` in float8 (`models.text_encoders.T5_FP8`)
    t5_largest: int  # its largest tensor: what a streaming load holds in RAM at once
    t5_forward: int  # encoding one 512-token prompt
    clip: int
    clip_forward: int
    vae: int
    vae_encode: dict[int, int]  # resolution -> encoding one image
    vae_decode: dict[int, int]
    flux_forward: dict[int, int]  # resolution -> one inference pass of the transformer, batch 1
    flux_largest: int  # the transformer's largest tensor in bf16: what a streaming load holds in RAM at once


def measure_encoders(config: dict, resolutions: Iterable[int]) -> EncoderSizes:
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config.from_dict(models.shipped_config("t5-xxl-encoder.json"))).bfloat16()
        clip = CLIPTextModel(CLIPTextConfig.from_dict(models.shipped_config("clip-l.json"))).bfloat16()
        vae = AutoencoderKL.from_config(models.shipped_config("flux-vae.json")).bfloat16()
        flux = FluxTransformer2DModel.from_config(config).bfloat16()
    t5_params = {name: p for name, p in t5.named_parameters()}
    fp8_names = {f"{name}.weight" for name, m in t5.named_modules() if isinstance(m, nn.Linear)
                 and name.startswith(T5_FP8["under"]) and not name.endswith(T5_FP8["keep"])}
    t5_bytes = sum(p.nbytes for p in t5_params.values())
    ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")

    def flux_forward(r: int):
        n = (r // 16) ** 2
        flux(hidden_states=torch.empty(1, n, flux.config.in_channels, device="meta", dtype=torch.bfloat16),
             encoder_hidden_states=torch.empty(1, TEXT_TOKENS, flux.config.joint_attention_dim, device="meta",
                                               dtype=torch.bfloat16),
             pooled_projections=torch.empty(1, flux.config.pooled_projection_dim, device="meta", dtype=torch.bfloat16),
             timestep=torch.ones(1, device="meta"), guidance=torch.ones(1, device="meta"),
             img_ids=torch.zeros(n, 3, device="meta"), txt_ids=torch.zeros(TEXT_TOKENS, 3, device="meta"))

    def image(r: int) -> torch.Tensor:
        return torch.empty(1, 3, r, r, device="meta", dtype=torch.bfloat16)

    def latent(r: int) -> torch.Tensor:
        return torch.empty(1, 16, r // 8, r // 8, device="meta", dtype=torch.bfloat16)

    return EncoderSizes(
        t5=t5_bytes,
        t5_fp8=t5_bytes - sum(t5_params[n].numel() for n in fp8_names),
        t5_largest=max(p.nbytes for p in t5_params.values()),
        t5_forward=working_set(lambda: t5(ids)),
        clip=sum(p.nbytes for p in clip.parameters()),
        clip_forward=working_set(lambda: clip(ids[:, :77])),
        vae=sum(p.nbytes for p in vae.parameters()),
        vae_encode={r: working_set(lambda: vae.encode(image(r))) for r in resolutions},
        vae_decode={r: working_set(lambda: vae.decode(latent(r))) for r in resolutions},
        flux_forward={r: working_set(lambda: flux_forward(r)) for r in resolutions},
        flux_largest=max(p.nbytes for p in flux.parameters()),
    )


@dataclass(frozen=True)
class Phase:
    """One phase of a run under a preset: bytes on the card (with overhead) and in host RAM."""

    preset: str
    name: str
    card_gib: float
    device: int  # allocated on the card, before overhead
    host: int  # resident in RAM, HOST_BASE included

    @property
    def peak(self) -> int:
        return round(self.device + CUDA_CONTEXT + FRAGMENTATION * self.device)

    @property
    def headroom(self) -> float:
        return 1 - self.peak / (self.card_gib * GIB)


def phases(preset: MemoryPreset, bench: Bench, enc: EncoderSizes) -> list[Phase]:
    """Every phase of a run under `preset`, as `Trainer` runs it: caching one model at a time (T5 in fp8 with an
    fp8 base), the transformer load (read to RAM, then moved), training, validation samples on the training base
    and on another (the training base's frozen weights dropped, the other's read), the XY grid, and a prompt not
    seen while caching (T5 reloaded on the CPU while the base waits on the card)."""
    s, r, fp8, linear = bench.sizes, preset.resolution, preset.fp8_base, preset.linear_bytes
    train = bench.project(preset)
    full = weight_bytes(s.params, s.block_linear, linear)
    resident = resident_weight_bytes(s, linear, preset.blocks_to_swap)
    n_double, n_single = split_blocks_to_swap(preset.blocks_to_swap, s.num_double, s.num_single)
    swapped = n_double * weight_bytes(*s.double, linear) + n_single * weight_bytes(*s.single, linear)
    lora_weights = s.lora * LORA_DTYPES[preset.lora_dtype].itemsize
    t5 = enc.t5_fp8 if fp8 else enc.t5
    sampling = resident + train.training_state + enc.vae + max(enc.flux_forward[r], enc.vae_decode[r])
    # a base streams to the card unless blocks are swapped: then it is read to RAM first (`trainer._load_device`)
    base_read = HOST_BASE + (full if preset.blocks_to_swap else enc.flux_largest)
    t5_card = 0 if preset.t5_on_cpu else t5 + enc.t5_forward
    t5_host = t5 + enc.t5_forward if preset.t5_on_cpu else enc.t5_largest
    rows = [
        ("cache: T5" + (" (CPU)" if preset.t5_on_cpu else ""), t5_card, HOST_BASE + t5_host),
        ("cache: CLIP", enc.clip + enc.clip_forward, HOST_BASE + enc.clip),
        ("cache: VAE", enc.vae + enc.vae_encode[r], HOST_BASE + enc.vae),
        ("load base", resident, base_read),
        ("train", train.weights + train.activations + train.training_state, HOST_BASE + swapped),
        ("sample", sampling, HOST_BASE + swapped),
        ("sample other base", sampling + lora_weights, max(base_read, HOST_BASE + swapped)),
        ("XY grid", sampling, HOST_BASE + swapped + XY_ROWS * lora_weights),
        ("new prompt", sampling, HOST_BASE + swapped + t5 + enc.t5_forward),
    ]
    return [Phase(preset.name, name, preset.card_gib, device, host) for name, device, host in rows]


def pick_checkpoint_blocks(preset: MemoryPreset, bench: Bench) -> int:
    """The fewest checkpointed blocks (no fewer than the swapped ones) with which `preset`'s training step keeps
    `PICK_HEADROOM`; -1 when it needs them all."""
    total = bench.sizes.num_double + bench.sizes.num_single
    for count in range(preset.blocks_to_swap, total):
        projection = bench.project(dataclasses.replace(preset, gradient_checkpointing=True, checkpoint_blocks=count))
        if projection.headroom >= PICK_HEADROOM:
            return count
    return -1


def pick_blocks_to_swap(preset: MemoryPreset, bench: Bench, enc: EncoderSizes,
                        headroom: float = HEADROOM) -> int | None:
    """The fewest blocks swapped (every block checkpointed) with which every phase of `preset` keeps `headroom`;
    None when swapping them all is not enough. The presets' `swap_for_base` are these at `PICK_HEADROOM`."""
    for count in range(bench.sizes.num_double + bench.sizes.num_single + 1):
        candidate = dataclasses.replace(preset, gradient_checkpointing=True, blocks_to_swap=count, checkpoint_blocks=-1)
        if all(phase.headroom >= headroom for phase in phases(candidate, bench, enc)):
            return count
    return None


def quantized_bases(bench: Bench, enc: EncoderSizes, resolutions: Iterable[int]) -> dict[tuple[str, int], dict]:
    """(card preset, resolution) -> {base format: fewest blocks swapped}, for the fp8 base and the quantized ones."""
    return {(card, r): {base: pick_blocks_to_swap(dataclasses.replace(PRESETS[card], resolution=r, base_format=base),
                                                  bench, enc) for base in ("fp8", *QUANTIZED_BASES)}
            for card in QUANTIZED_CARDS for r in resolutions}


def quantized_report(picks: dict[tuple[str, int], dict]) -> str:
    bases = ("fp8", *QUANTIZED_BASES)
    lines = ["", f"blocks_to_swap for {HEADROOM:.0%} headroom in every phase, by base (every block checkpointed; "
             "'-' = does not fit even with all swapped):", "  card  res  " + "  ".join(f"{b:>5}" for b in bases)]
    for (card, r), counts in picks.items():
        cells = ("-" if counts[b] is None else str(counts[b]) for b in bases)
        lines.append(f"  {card:>4}  {r:>4} " + "  ".join(f"{c:>5}" for c in cells))
    return "\n".join(lines)


def report(bench: Bench, projections: list[Projection], resolutions: Iterable[int]) -> str:
    def gib(n: float) -> str:
        return f"{n / GIB:.1f}"

    s = bench.sizes
    lines = [
        f"Flux-dev: {s.params / 1e9:.2f} B params ({s.num_double} double, {s.num_single} single blocks; "
        f"{s.double[0] / 1e6:.0f} M / {s.single[0] / 1e6:.0f} M each); {bench.network} rank {LORA_RANK}: "
        f"{s.lora / 1e6:.1f} M",
        f"assumed: CUDA context {gib(CUDA_CONTEXT)} GiB, fragmentation {FRAGMENTATION:.0%} of allocated; "
        f"required headroom {HEADROOM:.0%}",
        "",
        "kept for backward per block, batch 1, bf16 autocast, fp32 LoRA, MiB (per token); without checkpointing this",
        "is also the working set of a checkpointed block in backward; an fp8 base adds its dequantized weights:",
    ]
    for r in resolutions:
        a, fp8 = bench.activations(r, 1, False, "fp32"), bench.activations(r, 1, True, "fp32")
        lines.append(
            f"  {r}² ({a.tokens} tokens): double {a.double / MIB:.0f} ({a.double / MIB / a.tokens:.3f}), "
            f"single {a.single / MIB:.0f} ({a.single / MIB / a.tokens:.3f}); fp8 base {fp8.double / MIB:.0f} / "
            f"{fp8.single / MIB:.0f}; checkpointed {a.double_inputs / MIB:.0f} / {a.single_inputs / MIB:.0f}"
        )
    lines += ["", "peak GiB, batch 1, AdamW, no swap:"]
    for r in resolutions:
        lines.append(f"  {r}²: " + " | ".join(f"{k} {gib(p.peak)}" for k, p in comparison(bench, r).items()))
    header = ("preset", "res", "weights", "activ.", "LoRA+opt", "overhead", "peak GiB", "card GiB", "headroom", "fits")
    rows = [
        (p.name, str(p.resolution), gib(p.weights), gib(p.activations), gib(p.training_state), gib(p.overhead),
         gib(p.peak), f"{p.card_gib:g}", f"{p.headroom:.0%}", "yes" if p.fits else "NO")
        for p in projections
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines += ["", *("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (header, *rows))]
    return "\n".join(lines)


def phase_report(all_phases: list[Phase], picks: dict[tuple[str, int], int]) -> str:
    def gib(n: float) -> str:
        return f"{n / GIB:.1f}"

    header = ("preset", "phase", "card use GiB", "card GiB", "headroom", "host RAM GiB")
    rows = [(p.preset, p.name, gib(p.peak), f"{p.card_gib:g}", f"{p.headroom:.0%}", gib(p.host)) for p in all_phases]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["", f"every phase, overhead included; host RAM assumes {gib(HOST_BASE)} GiB for Python, torch and "
             "ComfyUI:"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (header, *rows)]
    lines += ["", f"checkpoint_blocks the projection picks (fewest for {PICK_HEADROOM:.0%} headroom in training; "
              "-1 = all):"]
    lines += [f"  {name} at {r}²: {n}" for (name, r), n in picks.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="measure 512² only, and project every preset at 512²")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--network", choices=NETWORKS, default="lora", help="the adapter (TrainConfig.network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = flux_dev_config()
    log.info("config: %s", CONFIG_PATH if CONFIG_PATH.is_file() else "diffusers defaults, guidance_embeds=True")
    bench = Bench(config, args.network)
    resolutions = (512,) if args.quick else RESOLUTIONS
    presets = list(PRESETS.values())
    if args.quick:
        log.warning("--quick: every preset is projected at 512², not at its own resolution")
        presets = [dataclasses.replace(p, resolution=512) for p in presets]
    projections = [bench.project(p) for p in presets]
    print(report(bench, projections, resolutions))
    log.info("measuring T5, CLIP, the VAE and an inference pass")
    encoders = measure_encoders(config, sorted({*resolutions, *(p.resolution for p in presets)}))
    all_phases = [phase for p in presets for phase in phases(p, bench, encoders)]
    picks = {(p.name, r): pick_checkpoint_blocks(dataclasses.replace(p, resolution=r), bench)
             for p in presets if p.gradient_checkpointing for r in resolutions}
    print(phase_report(all_phases, picks))
    quantized = quantized_bases(bench, encoders, [r for r in resolutions if r in (512, 1024)])
    print(quantized_report(quantized))
    swaps = {p.name: {b: pick_blocks_to_swap(dataclasses.replace(p, base_format=b), bench, encoders, PICK_HEADROOM)
                      for b in QUANTIZED_BASES} for p in presets if p.name in QUANTIZED_CARDS}
    print(f"swap_for_base of the presets ({PICK_HEADROOM:.0%} headroom at their own resolution): "
          + "; ".join(f"{name} {counts}" for name, counts in swaps.items()))

    if args.json:
        numbers = {
            "assumptions": {"cuda_context": CUDA_CONTEXT, "fragmentation": FRAGMENTATION, "headroom": HEADROOM,
                            "host_base": HOST_BASE},
            "sizes": dataclasses.asdict(bench.sizes),
            "encoders": dataclasses.asdict(encoders),
            "activations": [{**dataclasses.asdict(a), "fp8_base": fp8, "lora_dtype": lora}
                            for (_, _, fp8, lora), a in bench.measured.items()],
            "presets": [{**dataclasses.asdict(p), "peak": p.peak, "headroom": p.headroom, "fits": p.fits}
                        for p in projections],
            "phases": [{**dataclasses.asdict(p), "peak": p.peak, "headroom": p.headroom} for p in all_phases],
            "checkpoint_blocks": {f"{name}@{r}": n for (name, r), n in picks.items()},
            "blocks_to_swap_by_base": {f"{name}@{r}": counts for (name, r), counts in quantized.items()},
            "comparison": {r: {k: p.peak for k, p in comparison(bench, r).items()} for r in resolutions},
        }
        args.json.write_text(json.dumps(numbers, indent=2))
    misfits = sorted({f"{p.preset} ({p.name})" for p in all_phases if p.headroom < HEADROOM or p.host > HOST_LIMIT})
    if misfits:
        log.error("under %d%% card headroom or over %d GiB of RAM: %s; change them in trainer_core/presets.py",
                  HEADROOM * 100, HOST_LIMIT // GIB, ", ".join(misfits))
    worst = min(all_phases, key=lambda p: p.headroom)
    print(f"worst phase headroom {worst.headroom * 100:.0f}% ({worst.preset}, {worst.name}); "
          f"host RAM peak {max(p.host for p in all_phases) / GIB:.1f} GiB")
    return 1 if misfits else 0


if __name__ == "__main__":
    sys.exit(main())
