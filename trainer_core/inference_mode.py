"""ComfyUI runs nodes under `torch.inference_mode()`: tensors made there can never join autograd. A run's entry points
step out of it."""
from __future__ import annotations

import functools

import torch


def outside_inference_mode(method):
    """`method` run with inference mode off: every call that trains, restores or creates trainer tensors."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapper
