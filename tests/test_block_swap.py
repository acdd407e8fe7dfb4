"""Block swap changes where weights wait, never what is computed.

This machine has no GPU, so "the device" and RAM are both the CPU here: what these tests prove is the swap's
bookkeeping (which blocks are resident, that they come back for backward's recompute, that sampling works with it on)
and that training with it is bit-for-bit the training without it.
"""
import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from trainer_core import lora
from trainer_core.block_swap import BlockSwap, model_blocks
from trainer_core.config import TrainConfig
from trainer_core.trainer import Trainer

from bench.step import make_dataset  # noqa: E402  (the benchmark's synthetic cached dataset)

MODEL = dict(in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**MODEL)


def trainer(base, **changes):
    settings = dict(rank=4, alpha=4.0, learning_rate=1e-3, mixed_precision="fp32", device="cpu", gradient_checkpointing=True)
    config = TrainConfig(transformer_path="m", vae_path="v", clip_path="c", t5_path="t", dataset_dir="d", **{**settings, **changes})
    return Trainer(config, copy.deepcopy(base), vae=None, text_encoders=None, dataset=make_dataset(2), device="cpu")


def test_training_with_every_block_swapped_equals_training_without(base):
    plain, swapped = trainer(base), trainer(base, blocks_to_swap=99)  # capped at the model's 5 blocks
    resident = []
    swap = next(iter(swapped._swaps.values()))
    for block in model_blocks(swapped.transformer):
        block.register_forward_pre_hook(lambda *_: resident.append(swap.on_device_count()))  # after the swap's own
    plain.train(3)
    swapped.train(3)
    assert len(swap.blocks) == 5
    assert swapped.losses == plain.losses
    for k, v in lora.lora_state(plain.transformer).items():
        assert torch.equal(lora.lora_state(swapped.transformer)[k], v)
    # forward and backward's recomputation both ran through the hooks, never holding more than two blocks
    assert len(resident) == 3 * 5 * 2 and max(resident) <= 2


def test_swap_moves_only_frozen_weights_and_detaches_cleanly(base):
    model = copy.deepcopy(base)
    lora.add_lora(model, 4, 4.0)
    lora_before = {id(p) for p in lora.lora_parameters(model)}
    swap = BlockSwap(model, 2, torch.device("cpu")).attach()
    swapped_ids = {id(t) for b in swap.blocks for t, _ in swap._home[id(b)]}
    assert swapped_ids and not (swapped_ids & lora_before)
    swap.detach()
    assert swap.on_device_count() == 0 and not swap._handles


def test_swap_needs_gradient_checkpointing():
    with pytest.raises(ValueError, match="blocks_to_swap needs gradient_checkpointing"):
        TrainConfig(transformer_path="m", vae_path="v", clip_path="c", t5_path="t", dataset_dir="d",
                    blocks_to_swap=4, gradient_checkpointing=False)


def test_partial_checkpointing_recomputes_only_the_last_blocks_and_trains_the_same_weights(base, monkeypatch):
    from trainer_core import block_swap

    recomputed = []
    real_checkpoint = block_swap.checkpoint
    monkeypatch.setattr(block_swap, "checkpoint", lambda forward, *a, **k: (
        recomputed.append(forward.__self__), real_checkpoint(forward, *a, **k))[1])
    full, partial, none = trainer(base), trainer(base, checkpoint_blocks=2), trainer(base, gradient_checkpointing=False)
    for run in (full, partial, none):
        run.train(3)

    assert set(recomputed) == set(model_blocks(partial.transformer)[-2:]) and len(recomputed) == 3 * 2
    assert partial.losses == full.losses == none.losses
    for k, v in lora.lora_state(full.transformer).items():
        assert torch.equal(lora.lora_state(partial.transformer)[k], v)
        assert torch.equal(lora.lora_state(none.transformer)[k], v)
