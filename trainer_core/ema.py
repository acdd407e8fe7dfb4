"""An exponential moving average of the LoRA's weights, updated after each optimizer step.

ema <- decay * ema + (1 - decay) * weights, in float32 from the LoRA's first weights. It only reads the weights, so
the raw LoRA trains the same numbers with it or without it; it lives on the device or, with `on_cpu`, in RAM.
"""
from __future__ import annotations

import torch


class LoraEma:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, on_cpu: bool = False):
        """`params`: the adapter's parameters by name (`lora.lora_parameters_by_name`)."""
        self.params = params
        self.decay = decay
        self.device = torch.device("cpu") if on_cpu else None  # None: each tensor beside its parameter
        self.average = {k: p.detach().to(self.device or p.device, torch.float32, copy=True) for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for key, p in self.params.items():
            self.average[key].lerp_(p.detach().to(self.average[key].device, torch.float32), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The average under the `lora.lora_state` names, cloned to the CPU (the format of a LoRA state)."""
        return {k: v.to("cpu", copy=True) for k, v in self.average.items()}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(self.average.keys() ^ state.keys())
        if missing:
            raise ValueError(f"EMA state does not match the adapter ({', '.join(missing[:5])}); resume with the rank "
                             "and blocks the state was saved with")
        for key, value in self.average.items():
            value.copy_(state[key])
