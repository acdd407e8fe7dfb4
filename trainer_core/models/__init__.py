"""Loading the Flux model files users really have, from local files only.

- Transformer: a BFL single file (`flux1-dev.safetensors`, the fp8 files, with or without the
  `model.diffusion_model.` prefix, or a ComfyUI all-in-one checkpoint), a GGUF file as ComfyUI-GGUF users have them
  (`flux1-dev-Q4_K_S.gguf`: its block weights stay quantized), a diffusers-layout single file, or a diffusers folder.
- VAE: BFL `ae.safetensors` or a diffusers folder.
- Text encoders: ComfyUI's `clip_l` / `t5xxl` single files (fp16, fp8, scaled fp8) or transformers folders, with
  the tokenizers from local folders (ComfyUI ships them in its source tree).

Models are built on the meta device and the file's tensors are assigned into them as they are read, so a 12B file
is never held twice. Every model is returned frozen in eval mode; LoRA adds the trainable parameters.

One module per concern: `files` (kinds, headers, reading), `convert` (BFL <-> diffusers), `fp8`, `gguf`,
`transformer`, `vae`, `text_encoders`, `fused` (the fused-projection layout). The public names are re-exported here,
so `models.load_transformer(...)` is the API.
"""
from .convert import DOUBLE_BLOCK_LINEARS, SINGLE_BLOCK_LINEARS, bfl_to_diffusers, diffusers_to_bfl, flux_module_map
from .files import (
    KIND_DESCRIPTIONS,
    MODEL_ROLES,
    ModelRole,
    SafetensorsHeader,
    check_model_file,
    detect_file_kind,
    read_safetensors_header,
    shipped_config,
)
from .fp8 import Fp8Linear, to_fp8_linears, use_fp8_linears
from .gguf import GGUFLinear, base_format
from .fused import FUSIONS, fuse_projections, fuse_state_dict, is_fused, part_sizes, unfuse_state_dict
from .text_encoders import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    TextEncoderFiles,
    TextEncoders,
    infer_clip_config,
    infer_t5_config,
    load_text_encoders,
    text_encoder_files,
)
from .transformer import (
    drop_frozen_weights,
    infer_transformer_config,
    load_transformer,
    reload_frozen_weights,
    rope_axes,
    transformer_config,
)
from .vae import VAE_SCALE_FACTOR, infer_vae_config, load_vae
