"""The LoRA Linear the adapter injects: peft's, with the plain LoRA's product added inside one matrix product.

peft computes `base(x) + B(A(x)) * scale`: a multiply and an add that each read and write the whole output, forward
and again backward, in every LoRA Linear of every block. Here the scale goes on B (rank x out numbers, not tokens x
out) and the product is added by `addmm`, so both passes over the output are gone. The numbers differ from peft's only
by float rounding (the same sums in another order); at scale 0 the output is the base's exactly. DoRA, other or
several active adapters, disabled adapters and merged weights take peft's own path.
"""
from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoraLinear

ADAPTER = "default"


class FoldedLoraLinear(PeftLoraLinear):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [ADAPTER]
                or ADAPTER in self.lora_variant or ADAPTER not in self.lora_A):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        hidden = lora_a(self.lora_dropout[ADAPTER](self._cast_input_dtype(x, lora_a.weight.dtype)))
        up = (lora_b.weight * self.scaling[ADAPTER]).t()
        # under autocast, addmm casts all three to the autocast dtype, as peft's `+` of two autocast outputs does
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(hidden.dtype), hidden.reshape(-1, hidden.shape[-1]),
                          up.to(hidden.dtype))
        return out.view(result.shape).to(result.dtype)
