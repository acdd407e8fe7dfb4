"""The training run: models, cached data, LoRA and optimizer, and a loop that reads top to bottom.

A `Trainer` owns the live state of one run. `snapshot()` copies that state out and `restore()` puts a copy back,
which is what lets ComfyUI re-run a loop from any earlier point and what makes save / load / continue exact. A step's
numbers (noise, prediction, loss) are `training_step.py`'s.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import augment, caching, data, lora, models, validation
from .block_swap import BlockSwap, checkpoint_blocks, model_blocks
from .checkpoints import TrainingState, save_training_state
from .compiled_blocks import CompiledBlocks
from .config import TrainConfig
from .content_hash import content_identity
from .distributed import SINGLE, Processes, process_device, resolve_device
from .ema import LoraEma
from .identity import RESUME_FIELDS, DatasetIdentity, dataset_identity, settings_mismatches
from .optim import check_schedule_covers, learning_rate, make_optimizer, set_learning_rate
from .preflight import preflight
from .run_store import RunStore
from .tensorboard_log import TensorBoardLog
from .training_step import TrainingStep

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the LoRA weights are those of the last completed step (which may be the one
    that diverged: resume from a state saved earlier). The caller (the CLI, a node) says in its own terms what to do
    next, from `step` (the step whose loss diverged) and, set by a `TrainingRun`, `start` (the step the loop started
    from) and `saved` (the loop's input state file, if it came before the divergence and was saved)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
        self.start: int | None = None
        self.saved: Path | None = None


@dataclass
class StepInfo:
    step: int  # optimizer steps done so far in the run
    loss: float
    lr: float
    seconds: float  # wall time of this step


def compute_dtype(config: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32


class Trainer(TrainingStep):
    def __init__(self, config: TrainConfig, transformer, vae, text_encoders, dataset: caching.CachedDataset, device=None,
                 dataset_identity: DatasetIdentity | None = None, processes: Processes = SINGLE,
                 held_out: caching.CachedDataset | None = None):
        """`held_out`: the validation images kept out of `dataset` (None: the validation loss scores `dataset`'s)."""
        self.config = config
        self.dataset_identity = dataset_identity  # identity.dataset_identity of the data, saved with each state
        self.processes = processes  # several when data-parallel: each trains on its share of every batch
        self.device = torch.device(device) if device is not None else resolve_device(config.device)
        self.dtype = compute_dtype(config)
        self.vae = vae
        self.text_encoders = text_encoders
        self.dataset = dataset
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tensorboard = TensorBoardLog(config.output_dir, config.output_name,
                                          enabled=config.tensorboard and processes.is_main)  # one writer per run

        torch.manual_seed(config.seed)  # LoRA dropout draws on the device's own generator
        # the LoRA's init from a CPU generator of the run's seed: the same numbers on any device, swapped or not
        lora.add_lora(transformer, **lora.adapter_settings(config), generator=torch.Generator().manual_seed(config.seed))
        if config.init_lora:
            lora.load_lora_file(config.init_lora, transformer)
            log.info("LoRA initialised from %s", config.init_lora)
        # before checkpointing wraps the blocks' forwards, so that its recomputation in backward is compiled too
        self.compiled = CompiledBlocks(model_blocks(transformer) if config.compile_blocks else ())
        if config.gradient_checkpointing:
            checkpoint_blocks(transformer, config.checkpoint_blocks)
        self.transformer = transformer
        self._swaps: dict[int, BlockSwap] = {}  # per model (training base, validation base) when blocks_to_swap > 0
        self.to_device(transformer)
        self.params = lora.lora_parameters(transformer)
        self.ema = LoraEma(lora.lora_parameters_by_name(transformer), config.ema_decay, config.ema_on_cpu) \
            if config.ema_decay else None
        self.validation_samples = validation.validation_samples(held_out if held_out is not None else dataset)
        self.validation: list[dict] = []  # validation.validation_record of each point scored, oldest first
        self.optimizer = make_optimizer(lora.optimizer_groups(transformer, config.block_lrs, config.learning_rate,
                                                              config.loraplus_lr_ratio), config, self.device)
        # one CPU generator for noise, timesteps, flips and caption dropout: device-independent and saved with the state
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step, self.epoch, self.cursor = 0, 0, 0
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self._order = self._epoch_order(self.epoch)
        self.restored: TrainingState | None = None  # the last state restored (light): where a run around it starts

    # ------------------------------------------------------------------ construction from files
    @classmethod
    def from_config(cls, config: TrainConfig, on_progress: Callable[[str, int, int], None] | None = None,
                    records: list[data.ImageRecord] | None = None, prompts: Sequence[str] = (),
                    processes: Processes = SINGLE) -> "Trainer":
        """Load the models and cache the dataset; `records` come from `preflight(config)`, run here when not given.

        One model on the device at a time: T5 encodes the captions and the validation `prompts` and is freed, then
        CLIP, then the VAE encodes the images; then the transformer loads. The text encoders are not kept: a prompt
        not among `prompts` reloads them (on the CPU) when it is first sampled.
        """
        records = preflight(config) if records is None else records
        device = process_device(processes, config.device) or resolve_device(config.device)
        dtype = compute_dtype(config)
        encoders = models.text_encoder_files(
            config.clip_path, config.t5_path, config.tokenizer_dir or None, dtype=dtype, device=device,
            max_sequence_length=config.max_sequence_length, clip_tokenizer_dir=config.clip_tokenizer_dir or None,
            t5_tokenizer_dir=config.t5_tokenizer_dir or None, t5_fp8=config.fp8_base, t5_on_cpu=config.t5_on_cpu,
            batch_size=config.batch_size,
        )
        hashes = RunStore.of(config).hashes
        identity = "|".join([*(content_identity(p, hashes) for p in (config.vae_path, config.clip_path, config.t5_path)),
                             str(dtype), str(config.max_sequence_length)] + (["t5 fp8"] if config.fp8_base else []))

        def progress(stage: str):
            return (lambda done, total: on_progress(stage, done, total)) if on_progress else None

        records, held_out = validation.split_records(records, config)
        shuffled = augment.shuffled_captions(records, config)
        captions = ["", *(r.caption for r in records), *(r.caption for r in held_out), *(
            c for orders in shuffled.values() for c in orders)]
        text = caching.cache_text([*captions, *prompts], encoders, config.cache_dir or None, identity,
                                  progress("encoding text"))
        vae = models.load_vae(config.vae_path, dtype=dtype, device=device)
        variants = augment.variants(config.color_jitter, config.random_crop, config.augment_variants)
        if variants:
            log.info("augmentations: %d augmented copies of each of %d image(s) encoded (%d latents in all)",
                     len(variants), len({r.path for r in records}),
                     len({(r.path, r.bucket) for r in records}) * (1 + len(variants)) * (1 + config.flip_augment))
        dataset = caching.cache_dataset(
            records, vae, text, cache_dir=config.cache_dir or None, flip=config.flip_augment,
            encoder_identity=identity, on_progress=progress("caching"), variants=variants,
            augment_settings=augment.AugmentSettings.of(config), caption_variants=shuffled,
        )
        held_out = caching.cache_dataset(held_out, vae, text, cache_dir=config.cache_dir or None,
                                         encoder_identity=identity) if held_out and config.validation_timesteps else None
        vae.to("cpu")  # back on the device only while sampling
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # straight to the device, tensor by tensor, unless blocks are swapped: then RAM is where most of it stays
        transformer = models.load_transformer(config.transformer_path, dtype=dtype,
                                              device=torch.device("cpu") if config.blocks_to_swap else device,
                                              fp8_base=config.fp8_base)
        trainer = cls(config, transformer, vae, dataclasses.replace(encoders, device="cpu"), dataset, device,
                      dataset_identity=dataset_identity(config.dataset_entries()), processes=processes,
                      held_out=held_out)
        trainer._prompt_cache.update({p: (text[p]["prompt_embeds"], text[p]["pooled"]) for p in prompts})
        return trainer

    # ------------------------------------------------------------------ the loop
    def train(
        self,
        num_steps: int,
        on_step: Callable[[StepInfo], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Run up to `num_steps` optimizer steps; returns how many were done.

        A step either completes or leaves no trace: if it raises (a cancel, an error, a NaN loss) the data position
        and random state are put back and the LoRA weights are those of the last completed step.
        """
        cfg = self.config
        if cfg.total_steps == 0:
            raise ValueError("total_steps: 0 (auto) was not resolved to the planned steps; set total_steps")
        check_schedule_covers(self.step + num_steps, cfg)
        self.transformer.train()
        done = 0
        with torch.inference_mode(False), torch.enable_grad():
            while done < num_steps:
                if should_stop is not None and self.processes.any(should_stop()):
                    break
                t0 = time.perf_counter()
                position = self._position()
                try:
                    lr = learning_rate(self.step, cfg)
                    set_learning_rate(self.optimizer, lr)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss_sum = torch.zeros((), device=self.device)
                    with self.compiled.training_step():
                        for _ in range(cfg.gradient_accumulation):
                            loss = self._loss(self._next_batch()) / cfg.gradient_accumulation
                            if loss.requires_grad:  # else this process's share of the batch was empty
                                loss.backward()
                            loss_sum += loss.detach()
                    loss_sum = self.processes.sum_gradients(self.params, loss_sum)
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    # the one host sync per step: the progress display needs the loss, and a NaN must stop
                    # the run before the optimizer writes it into the weights
                    loss_value = loss_sum.item()
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(
                            f"the loss became {loss_value} at step {self.step + 1}; the LoRA was kept as it was after "
                            f"step {self.step}. Likely cause: too high a learning rate (learning_rate "
                            f"{cfg.learning_rate:g}).", self.step + 1)
                    self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update()
                except BaseException:
                    self.optimizer.zero_grad(set_to_none=True)
                    self._set_position(position)
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                done += 1
                self.losses.append(loss_value)
                self.lrs.append(lr)
                self.tensorboard.step(self.step, loss_value, lr)
                if on_step is not None:
                    on_step(StepInfo(self.step, loss_value, lr, time.perf_counter() - t0))
                if cfg.validation_every and self.step % cfg.validation_every == 0:
                    self.validate()
        self.tensorboard.flush()
        return done

    def validate(self) -> dict | None:
        """Score the LoRA (and its EMA) at this step on the validation set, once per step, and keep the record in the
        history; None when validation is off."""
        if not self.config.validation_timesteps:
            return None
        if self.validation and self.validation[-1]["step"] == self.step:
            return self.validation[-1]
        record = validation.validation_record(self, self.validation_samples, self.step,
                                              self.ema.state() if self.ema is not None else None)
        self.validation.append(record)
        self.tensorboard.validation(record)
        log.info("step %d: %s", self.step, validation.describe(record))
        return record

    def _next_batch(self) -> list[int]:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.cursor]
        self.cursor += 1
        return batch

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        return data.batches(self.dataset.records, self.config.batch_size, self.config.seed, epoch)

    # ------------------------------------------------------------------ state
    def _position(self) -> tuple:
        return self.epoch, self.cursor, self.generator.get_state(), torch.get_rng_state()

    def _set_position(self, position: tuple) -> None:
        epoch, cursor, gen_state, cpu_state = position
        if epoch != self.epoch:
            self._order = self._epoch_order(epoch)
        self.epoch, self.cursor = epoch, cursor
        self.generator.set_state(gen_state)
        torch.set_rng_state(cpu_state)

    def fingerprint(self) -> dict[str, str]:
        fp = {name: str(getattr(self.config, name)) for name in RESUME_FIELDS}
        tc = self.transformer.config
        fp["architecture"] = f"{tc.num_layers}x{tc.num_single_layers}x{tc.num_attention_heads * tc.attention_head_dim}"
        return fp

    def snapshot(self) -> TrainingState:
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        opt = self.optimizer.state_dict()
        opt = {
            "state": {pid: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for pid, s in opt["state"].items()},
            "param_groups": [dict(g) for g in opt["param_groups"]],
        }
        return TrainingState(
            step=self.step, epoch=self.epoch, cursor=self.cursor, lora=lora.lora_state(self.transformer),
            optimizer=opt, rng=rng, losses=list(self.losses), lrs=list(self.lrs), fingerprint=self.fingerprint(),
            dataset=self.dataset_identity.key if self.dataset_identity else "",
            dataset_files=self.dataset_identity.listing if self.dataset_identity else [],
            ema=self.ema.state() if self.ema is not None else {}, validation=[dict(r) for r in self.validation],
        )

    def restore(self, state: TrainingState) -> None:
        differ = settings_mismatches(state.fingerprint, self.config)
        ours, theirs = self.fingerprint()["architecture"], state.fingerprint.get("architecture")
        if ours != theirs:
            differ.append(f"architecture {ours} (state: {theirs})")
        if differ:
            raise ValueError(f"this training state belongs to a different run ({', '.join(differ)}); "
                             "set those fields as the state had them")
        self.restored = state.light()
        state = state.clone()  # the optimizer keeps the tensors it is given; the caller's state must stay untouched
        lora.load_lora_state(self.transformer, state.lora)
        self.optimizer.load_state_dict(state.optimizer)
        self.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch_cpu"])
        if "torch_cuda" in state.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(state.rng["torch_cuda"], self.device)
        self.step, self.epoch, self.cursor = state.step, state.epoch, state.cursor
        self._order = self._epoch_order(self.epoch)
        self.losses, self.lrs = list(state.losses), list(state.lrs)
        if self.ema is not None:  # a state saved without an EMA starts one from its LoRA
            self.ema.load_state(state.ema or state.lora)
        self.validation = [dict(r) for r in state.validation]

    # ------------------------------------------------------------------ outputs
    def lora_metadata(self) -> dict[str, str]:
        base = content_identity(self.config.transformer_path, RunStore.of(self.config).hashes)
        return lora.lora_metadata(self.config, self.step, self.dataset.records, base)

    def save_lora(self, path: str | Path) -> Path:
        path = Path(path)
        lora.save_lora_file(path, self.transformer, self.lora_metadata(), self.config.lora_format)
        log.info("saved LoRA at step %d to %s", self.step, path)
        return path

    def save_state(self, path: str | Path, state: TrainingState | None = None) -> Path:
        return save_training_state(path, state or self.snapshot(), self.config.to_dict())

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) and (B, D) embeddings; each prompt is encoded once per run (the encoders load on the CPU for
        it, one at a time, and are freed: see `from_config`)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, pooled = self.text_encoders.encode(missing)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = (embeds[i], pooled[i])
        return (torch.stack([self._prompt_cache[p][0] for p in prompts]),
                torch.stack([self._prompt_cache[p][1] for p in prompts]))

    def sample(self, prompts: Sequence[str], *, base_path: str | None = None, step: int | None = None,
               **render_kwargs) -> list:
        """Images for `prompts` with the LoRA at `strength` (0 = the base model exactly); see
        `validation.sampling_session`. They go to TensorBoard at `step` (the LoRA's step; default the trainer's)."""
        with validation.sampling_session(self, base_path) as render:
            images = render(prompts, **render_kwargs)
        self.tensorboard.images("samples", images, self.step if step is None else step)
        return images

    def load_device(self) -> torch.device:
        """Where a base is read to: the device itself, or RAM when blocks are swapped (most of it stays there)."""
        return torch.device("cpu") if self.config.blocks_to_swap else self.device

    def to_device(self, model) -> None:
        if not self.config.blocks_to_swap:
            model.to(self.device)
            return
        if id(model) not in self._swaps:
            self._swaps[id(model)] = BlockSwap(model, self.config.blocks_to_swap, self.device)
        self._swaps[id(model)].attach()  # everything but the swapped blocks' frozen weights

    def drop_base(self, model) -> None:
        """Free `model`'s frozen weights wherever they are (GPU, RAM, a BlockSwap's pinned copies)."""
        swap = self._swaps.pop(id(model), None)
        if swap is not None:
            swap.detach()
        models.drop_frozen_weights(model)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        """Bytes of the tensors this trainer holds (models, optimizer state, cached data), each storage counted once:
        what `release` and dropping the trainer give back."""
        modules = [m for m in (self.transformer, self.vae) if m is not None]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        if self.optimizer is not None:
            tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        if self.ema is not None:
            tensors += list(self.ema.average.values())
        for sample in self.dataset.all_samples():
            tensors += [t for t in (sample.latents, sample.prompt_embeds, sample.pooled, sample.mask,
                                    sample.control_latents) if t is not None]
        tensors += [t for orders in self.dataset.caption_variants.values() for pair in orders for t in pair]
        tensors += [t for pair in (self.dataset.empty_prompt, *self._prompt_cache.values()) for t in pair]
        storages = {}
        for t in tensors:
            storage = t.untyped_storage()
            if storage.device.type != "meta":  # a dropped base's weights hold no memory
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def release(self) -> None:
        """Drop the models so their memory returns at once (a new run replaces this one)."""
        self.tensorboard.close()
        self.transformer = self.vae = self.text_encoders = self.optimizer = None
        self._swaps.clear()
        self.params = []
        self._prompt_cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
