"""Judging a LoRA: the validation loss on a fixed set, the best checkpoint by it, and the sampling sessions that
render its images (samples, the XY grid).

The validation loss scores the validation images at `validation_timesteps` fixed noise levels, evenly spaced and
shifted as the run's timestep sampling shifts them, with noise drawn from a generator of the run's seed made anew at
each call: the same LoRA always gets the same number, and the run's own generator is never touched. It runs the
forward pass only (no backward), from the cached latents and caption embeddings, a bucket's items batched. Each
value's error is weighted as the training step weights it toward its target (masks, regularization images).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from . import caching, data, lora, masks, models, plots, sampling
from .config import TrainConfig
from .flow_matching import noisy_input_and_target, pack_latents, shift_sigmas

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

RAW, EMA = "raw", "ema"  # the two LoRAs a checkpoint has: the trained weights and their moving average


# ------------------------------------------------------------------------------------------------ the validation set
def split_records(records: Sequence[data.ImageRecord], config: TrainConfig
                  ) -> tuple[list[data.ImageRecord], list[data.ImageRecord]]:
    """(training records, held-out records): with `validation_split`, that share of the images (at least one, never
    all), chosen by the seed, is kept out of training with all its buckets and repeats; with `validation_dir`, its
    images are the held-out ones. Else nothing is held out (the training images are scored)."""
    if config.validation_dir:
        return list(records), validation_dir_records(config)
    if not config.validation_split:
        return list(records), []
    paths = list(dict.fromkeys(r.path for r in records))
    if len(paths) < 2:
        raise ValueError(f"validation_split: {config.validation_split} of a dataset of {len(paths)} image leaves nothing "
                         "to train on; add images, or set validation_split to 0 (the training images are scored)")
    count = min(len(paths) - 1, max(1, round(config.validation_split * len(paths))))
    held = {paths[i] for i in np.random.default_rng(config.seed).permutation(len(paths))[:count].tolist()}
    log.info("validation: %d of %d images held out of training (validation_split %g, seed %d): %s", count, len(paths),
             config.validation_split, config.seed, ", ".join(sorted(p.name for p in held)))
    return [r for r in records if r.path not in held], [r for r in records if r.path in held]


def validation_dir_records(config: TrainConfig) -> list[data.ImageRecord]:
    """The images of `validation_dir` (captions beside them, the trigger word and resolutions of the first dataset)."""
    try:
        return data.scan_datasets([config.validation_entry()], alpha_mask=config.alpha_mask)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"validation_dir: {e}") from e


def validation_samples(dataset: caching.CachedDataset) -> list[caching.CachedSample]:
    """Each image of `dataset` once (its first bucket), unflipped."""
    first = {}
    for record, sample in zip(dataset.records, dataset.samples):
        first.setdefault(record.path, sample)
    return list(first.values())


def validation_sigmas(count: int, config: TrainConfig) -> torch.Tensor:
    """`count` noise levels evenly spaced in (0, 1), shifted as the run's `shift` timestep sampling shifts its draws."""
    u = (torch.arange(count, dtype=torch.float32) + 0.5) / count
    return shift_sigmas(u, config.timestep_shift) if config.timestep_sampling == "shift" else u


# ------------------------------------------------------------------------------------------------ the loss
@torch.no_grad()
def validation_loss(trainer: "Trainer", samples: Sequence[caching.CachedSample]) -> float:
    """The mean flow-matching loss of the adapter's present weights on `samples` at the fixed noise levels.

    Item k scores image k mod N at level k mod T, for k < max(N, T): every image and every level counts, at the
    cost of max(N, T) forward passes rather than N x T (the levels dealt out to the images in turn)."""
    cfg = trainer.config
    sigmas = validation_sigmas(cfg.validation_timesteps, cfg)  # (T,)
    g = torch.Generator().manual_seed(cfg.seed)
    by_bucket: dict[tuple, list] = {}
    for k in range(max(len(samples), len(sigmas))):  # noise drawn in item order, whatever the batching
        s = samples[k % len(samples)]
        x0 = pack_latents(s.latents[None].float())[0]  # (h/2 * w/2, C*4)
        noise = torch.randn(x0.shape, generator=g)
        by_bucket.setdefault(tuple(s.latents.shape), []).append((x0, noise, sigmas[k % len(sigmas)], s))
    chunk = cfg.batch_size * len(sigmas)  # items per forward pass
    losses = []
    was_training = trainer.transformer.training
    trainer.transformer.eval()  # no LoRA dropout: no random draw, the same number every time
    try:
        with torch.inference_mode(False):
            for items in by_bucket.values():
                for i in range(0, len(items), chunk):
                    part = items[i:i + chunk]
                    x0, noise = torch.stack([x for x, *_ in part]), torch.stack([n for _, n, *_ in part])
                    sig = torch.stack([sigma for *_, sigma, _ in part])
                    embeds = torch.stack([s.prompt_embeds for *_, s in part])
                    pooled = torch.stack([s.pooled for *_, s in part])
                    x_t, target = noisy_input_and_target(x0, noise, sig)
                    items = [s for *_, s in part]
                    pred = trainer.predict(x_t, embeds, pooled, sig, items[0].latents.shape[-2:],
                                           caching.control_batch(items))
                    err = (pred.float() - target.to(pred.device).float()).pow(2)
                    weights, _ = masks.batch_weights(items, items[0].latents.shape[0], cfg)
                    if weights is not None:  # scored as trained: inside the masks, regularization images weighted
                        err = err * weights.to(err.device)
                    losses.append(err.mean(dim=tuple(range(1, err.dim()))))
    finally:
        trainer.transformer.train(was_training)
    return torch.cat(losses).mean().item()


def validation_record(trainer: "Trainer", samples: Sequence[caching.CachedSample], step: int,
                      ema_state: dict[str, torch.Tensor] | None) -> dict:
    """{"step", "raw", "ema"}: the validation loss of the adapter's weights and of `ema_state` (None: no EMA)."""
    record = {"step": step, RAW: validation_loss(trainer, samples), EMA: None}
    if ema_state is not None:
        with lora_weights(trainer.transformer, ema_state):
            record[EMA] = validation_loss(trainer, samples)
    return record


@contextlib.contextmanager
def lora_weights(transformer, weights: dict[str, torch.Tensor]):
    """The adapter holding `weights` (a `lora.lora_state`) inside the block; its own are copied back after, bit for
    bit."""
    own = lora.lora_state(transformer)
    lora.load_lora_state(transformer, weights)
    try:
        yield
    finally:
        lora.load_lora_state(transformer, own)


def best(records: Sequence[dict]) -> tuple[int, str, float] | None:
    """(step, "raw" or "ema", loss) of the lowest validation loss among `records`; None when there is none."""
    scored = [(r[kind], r["step"], kind) for r in records for kind in (RAW, EMA) if r.get(kind) is not None]
    if not scored:
        return None
    loss, step, kind = min(scored)
    return step, kind, loss


def describe(record: dict) -> str:
    """"validation loss 0.1234 (EMA 0.1200)" for the log, the live view and a grid row's label."""
    ema = f" (EMA {record[EMA]:.4f})" if record.get(EMA) is not None else ""
    return f"validation loss {record[RAW]:.4f}{ema}"


def describe_best(records: Sequence[dict]) -> str:
    found = best(records)
    if found is None:
        return ""
    step, kind, loss = found
    return f"best so far: step {step} {kind} ({loss:.4f})"


def live_view(records: Sequence[dict]) -> dict:
    """The live view's numbers: the last record's losses and the best point so far (JSON-ready)."""
    last = records[-1]
    step, kind, loss = best(records)
    return {"step": last["step"], RAW: last[RAW], EMA: last.get(EMA), "best": {"step": step, "kind": kind, "loss": loss}}


# ------------------------------------------------------------------------------------------------ sampling sessions
@contextlib.contextmanager
def sampling_session(trainer: "Trainer", base_path: str | None = None):
    """Set sampling up once, for any number of images, and put the run back as it was afterwards.

    Yields `render(prompts, *, strength=1.0, lora_state=None, seed=0, steps=20, guidance=3.5, width=512,
    height=512, callback=None, negative_prompt="", true_cfg_scale=1.0, control_image=None) -> images`; Kontext
    runs take a control image (an RGB PIL image, fitted to width x height) to edit. `lora_state` renders another
    checkpoint's LoRA (the XY grid); `true_cfg_scale` other than 1 turns true CFG with `negative_prompt` on.
    `base_path` judges the LoRA on another base (train on Flux-dev2pro, look at it on Flux-dev): the training
    base's frozen weights are dropped and re-read from its file afterwards (its LoRA and optimizer stay), so
    neither the GPU nor the RAM ever holds two bases; the swap happens once per session.
    """
    cfg = trainer.config
    other_base = bool(base_path) and Path(base_path).resolve() != Path(cfg.transformer_path).resolve()
    own = lora.lora_state(trainer.transformer)
    if other_base:
        trainer.drop_base(trainer.transformer)
        model = _validation_model(trainer, base_path)
        trainer.to_device(model)
    else:
        model = trainer.transformer
    loaded_other = other_base  # whether `model` holds LoRA weights other than the run's own
    trainer.vae.to(trainer.device)

    def render(prompts: Sequence[str], *, strength: float = 1.0, lora_state: dict | None = None, seed: int = 0,
               steps: int = 20, guidance: float = 3.5, width: int = 512, height: int = 512, callback=None,
               negative_prompt: str = "", true_cfg_scale: float = 1.0, control_image=None) -> list:
        nonlocal loaded_other
        control = None
        if control_image is not None:
            if cfg.model_type != "kontext":
                raise ValueError(f"control_image: this run trains model_type {cfg.model_type}; a control image is for "
                                 "Kontext runs (InitTrainer's model_type kontext); disconnect it")
            control = caching.encode_pixels(trainer.vae, data.fit_pixels(data.to_rgb(control_image), (width, height))[None])
        embeds, pooled = trainer.encode_prompts(list(prompts))
        negative = None
        if true_cfg_scale != 1.0:
            negative = tuple(t.to(trainer.device, trainer.dtype)
                             for t in trainer.encode_prompts([negative_prompt] * len(prompts)))
        if lora_state is not None or loaded_other:
            lora.load_lora_state(model, lora_state if lora_state is not None else own)
            loaded_other = lora_state is not None or other_base
        with torch.inference_mode(False), torch.no_grad():
            return sampling.sample_images(
                model, trainer.vae, embeds.to(trainer.device, trainer.dtype), pooled.to(trainer.device, trainer.dtype),
                width=width, height=height, steps=steps, guidance=guidance, seed=seed, strength=strength,
                callback=callback, negative=negative, true_cfg_scale=true_cfg_scale, control_latents=control,
            )

    try:
        yield render
    finally:
        lora.set_lora_strength(model, 1.0)
        if other_base:
            trainer.drop_base(model)
            del model
            models.reload_frozen_weights(trainer.transformer, cfg.transformer_path, trainer.dtype,
                                         trainer.load_device())
            trainer.to_device(trainer.transformer)
        elif loaded_other:
            lora.load_lora_state(trainer.transformer, own)
        trainer.vae.to("cpu")


def _validation_model(trainer: "Trainer", path: str):
    """The other base with an adapter shaped like ours, read from its file (streamed, fp8 as read)."""
    cfg = trainer.config
    model = models.load_transformer(path, dtype=trainer.dtype, device=trainer.load_device(), fp8_base=cfg.fp8_base)
    lora.add_lora(model, **(lora.adapter_settings(cfg) | {"dropout": 0.0}))  # it only samples
    return model.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ the XY grid
def row_label(step: int, kind: str = RAW, record: dict | None = None, best_row: bool = False) -> str:
    """A grid row's label: "step 150 EMA", its validation loss beside it, and a star on the best checkpoint."""
    label = f"step {step}" + (" EMA" if kind == EMA else "")
    if record is not None and record.get(kind) is not None:
        label += f"  val {record[kind]:.4f}"
    return label + ("  * best" if best_row else "")


def strength_grid(trainer: "Trainer", checkpoints: Sequence[tuple[int, dict]], strengths: Sequence[float],
                  prompt: str, base_path: str | None = None, labels: Sequence[str] | None = None, **sample_kwargs):
    """The LoRA-strength x training-step comparison: rows are (step, LoRA state) checkpoints, columns strengths;
    `labels` name the rows (default "step N")."""
    cells = strength_cells(trainer, checkpoints, strengths, prompt, base_path, **sample_kwargs)
    return label_grid(trainer, cells, [step for step, _ in checkpoints], strengths, prompt, labels,
                      sample_kwargs.get("control_image"))


def strength_cells(trainer: "Trainer", checkpoints: Sequence[tuple[int, dict]], strengths: Sequence[float],
                   prompt: str, base_path: str | None = None, **sample_kwargs) -> list[list]:
    """The grid's images, a row per (step, LoRA state) checkpoint and a column per strength.

    One sampling session for all cells: the prompt is encoded once, a validation base is swapped in once, and each
    cell only loads its row's LoRA weights and rescales the adapter, so no file is read per cell.
    """
    with sampling_session(trainer, base_path) as render:
        return [[render([prompt], strength=s, lora_state=state, **sample_kwargs)[0] for s in strengths]
                for _, state in checkpoints]


def label_grid(trainer: "Trainer", cells: Sequence[Sequence], steps: Sequence[int], strengths: Sequence[float],
               prompt: str, labels: Sequence[str] | None = None, control_image=None):
    """The cells as one labelled picture (rows: checkpoints, columns: strengths; Kontext: the control image first in
    every row, so each edit sits beside what it edits), also sent to TensorBoard."""
    columns = [f"{s:g}" for s in strengths]
    if control_image is not None:
        control = ImageOps.fit(data.to_rgb(control_image), cells[0][0].size, method=Image.Resampling.LANCZOS)
        cells, columns = [[control, *row] for row in cells], ["control", *columns]
    grid = plots.xy_grid(cells, list(labels or [row_label(step) for step in steps]), columns, title=prompt)
    trainer.tensorboard.images("xy_grid", [grid], max(steps))
    return grid
