"""Flux.1 LoRA training engine: plain Python, no ComfyUI import anywhere (the node pack in `nodes/` wraps it)."""

__version__ = "0.1.0"
