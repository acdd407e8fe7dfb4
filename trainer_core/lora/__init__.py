"""peft LoRA on Flux's transformer blocks, its strength, and the kohya-layout file that stock ComfyUI loads.

The adapter lives on diffusers' `FluxTransformer2DModel` (adapter name "default") in one of two layouts:
- "fused" (kohya's and BFL's): the model is put in the fused layout (`models.fuse_projections`) and each fused q, k, v
  (and single blocks' `linear1`: q, k, v and the MLP input) has one LoRA; the kohya file holds it as trained.
- "split" (diffusers'): one LoRA per diffusers Linear; the kohya file fuses the per-part LoRAs exactly (stacked down,
  block-diagonal up) and `load_kohya_lora` splits them back. Runs made before the fused layout used it.

One module per concern: `adapter` (peft injection, strength, state), `dora`, `lycoris` (LoKr / LoHa layers),
`per_block` (block ranges: ranks, learning rates), `formats` (pure state-dict conversions, no model) and `files`
(save / load). The names other modules use are re-exported here: `lora.add_lora(...)`.
"""
from ..config import LORA_FORMATS, LORA_LAYOUTS
from .adapter import (
    ADAPTER,
    _kohya_groups,
    _lora_layers,
    _scale,
    adapter_off,
    adapter_settings,
    add_lora,
    check_lora_settings,
    load_lora_state,
    lora_parameters,
    lora_parameters_by_name,
    lora_state,
    model_layout,
    network_of,
    optimizer_groups,
    set_lora_strength,
    target_regex,
)
from .dora import kohya_dora_scales
from .per_block import param_groups, parse_block_values, parse_blocks
from .files import (
    diffusers_state_dict,
    kohya_state_dict,
    load_diffusers_lora,
    load_kohya_lora,
    load_lora_file,
    lora_file_rank,
    save_kohya_lora,
    save_kohya_state,
    save_lora_file,
)
from .formats import (describe_network, file_network, fuse_split_state, kohya_from_lora_state, lora_metadata,
                      network_metadata, split_fused_state, state_layout)
from .linear import FoldedLoraLinear
