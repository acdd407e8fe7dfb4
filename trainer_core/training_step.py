"""One training step's numbers: the noisy input drawn from the run's generator, the transformer's prediction and the
loss (masks, regularization images, masked prior preservation). `TrainingStep` is a part of `trainer.Trainer`, whose
loop calls `_loss` on each batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import augment, caching, lora, masks
from .flow_matching import append_control, image_ids, noisy_input_and_target, pack_latents, sample_sigmas, text_ids


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of the squared error times `weights` over every value (kohya's masked loss: a mask that covers less
    of the image teaches less per step); a weight of 0 gives that value exactly no gradient."""
    return (weights * (pred - target).square()).mean()


def _pinned_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`: through pinned memory and without waiting on the host when that is a GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class TrainingStep:
    """The step's numbers; mixed into `Trainer`, which owns `config`, `generator`, `dataset`, `processes`,
    `transformer`, `device` and `dtype`."""

    def _loss(self, batch: list[int]) -> torch.Tensor:
        """The loss of this process's share of `batch`, weighted by that share: the processes' losses (and their
        gradients) add up to the whole batch's mean loss. Every process draws the random numbers of the whole batch,
        so the run's generator stays the same whatever the number of processes."""
        cfg, g = self.config, self.generator
        n = len(batch)
        flip = torch.rand(n, generator=g) < 0.5 if self.dataset.flipped else torch.zeros(n, dtype=torch.bool)
        drop = torch.rand(n, generator=g) < cfg.caption_dropout
        variants = augment.draw_variants(n, cfg, g)  # no draw (and the draws of before) when augmentation is off
        orders = augment.draw_captions(n, cfg, g)
        samples = [self.dataset.sample(i, f, v) for i, f, v in zip(batch, flip.tolist(), variants)]
        latent_shape = pack_latents(samples[0].latents[None].float()).shape[1:]
        noise = torch.randn((n, *latent_shape), generator=g)
        sigmas = sample_sigmas(n, cfg.timestep_sampling, g, shift=cfg.timestep_shift)
        mine = self.processes.share(n)
        samples, drop, noise, sigmas = samples[mine], drop[mine], noise[mine], sigmas[mine]
        if not samples:
            return torch.zeros((), device=self.device)
        n_mine = len(samples)

        orders = [None] * n_mine if orders is None else orders[mine].tolist()
        texts = [self.dataset.empty_prompt if d else self._text(s, o) for s, d, o in zip(samples, drop.tolist(), orders)]
        latents = torch.stack([s.latents for s in samples])  # (B, C, h, w), one bucket per batch
        prompt_embeds = torch.stack([e for e, _ in texts])
        pooled = torch.stack([p for _, p in texts])

        # drawn on the CPU generator (the run's numbers on any device), moved from pinned memory without a host wait;
        # x_t and the target are made where the model runs
        x0, noise, sigmas = (_pinned_to(t, self.device) for t in (pack_latents(latents.float()), noise, sigmas))
        x_t, target = noisy_input_and_target(x0, noise, sigmas)  # x0: (B, h/2 * w/2, C*4)
        control = caching.control_batch(samples)
        pred = self.predict(x_t, prompt_embeds, pooled, sigmas, latents.shape[-2:], control).float()
        toward_target, toward_base = masks.batch_weights(samples, latents.shape[1], cfg)
        if toward_target is None:  # no mask, no weighted regularization image: the plain mean, as before either existed
            loss = F.mse_loss(pred, target.float())
        else:
            loss = weighted_mse(pred, target.float(), _pinned_to(toward_target, self.device))
        if toward_base is not None:
            with torch.no_grad(), lora.adapter_off(self.transformer):
                base = self.predict(x_t, prompt_embeds, pooled, sigmas, latents.shape[-2:], control).float()
            loss = loss + weighted_mse(pred, base, _pinned_to(toward_base, self.device))
        return loss if n_mine == n else loss * (n_mine / n)

    def _text(self, sample: caching.CachedSample, order: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample's caption embeddings: with `order` (a draw in [0, 1)), of that pick among its tag orders."""
        orders = self.dataset.caption_variants.get(sample.caption) if order is not None else None
        if not orders:
            return sample.prompt_embeds, sample.pooled
        return orders[min(int(order * len(orders)), len(orders) - 1)]

    def predict(self, x_t: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, sigmas: torch.Tensor,
                latent_size: tuple[int, int], control: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's velocity for packed noisy latents x_t (B, h/2 * w/2, C*4) of latents `latent_size`
        (h, w), with the captions' (B, L, D) and (B, D') embeddings, at noise levels `sigmas` (B,).

        Kontext: `control` (B, C, h', w') latents of the control images, packed and appended to the image tokens with
        position index 1 (as FluxKontextPipeline does); the velocity is that of the image tokens only."""
        dev, dt = self.device, self.dtype
        h, w = latent_size
        n, tokens = x_t.shape[:2]
        ids = image_ids(h, w, device=dev)
        if control is not None:
            x_t, ids = append_control(x_t.to(dev), ids, control)
        guidance = torch.full((n,), self.config.guidance, device=dev) if self.transformer.config.guidance_embeds \
            else None
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            return self.transformer(
                hidden_states=x_t.to(dev, dt),
                encoder_hidden_states=prompt_embeds.to(dev, dt),
                pooled_projections=pooled.to(dev, dt),
                timestep=sigmas.to(dev, dt),
                img_ids=ids,
                txt_ids=text_ids(prompt_embeds.shape[1], device=dev),
                guidance=guidance,
                return_dict=False,
            )[0][:, :tokens]
