"""CLIP-L and T5 from ComfyUI's `clip_l` / `t5xxl` single files (fp16, fp8, scaled fp8) or transformers folders,
with the tokenizers from local folders (ComfyUI ships them in its source tree)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .files import assign_weights, check_model_file, count_blocks, existing_path, key_prefix, model_folder, \
    read_safetensors_header, read_state_dict, shipped_config, weight_files
from .fp8 import to_fp8_linears, use_fp8_linears

logger = logging.getLogger(__name__)

# T5's Linears stored in fp8: those of its blocks, but `wo`, whose input T5 casts to wo's own dtype
T5_FP8 = dict(under=("encoder.block.",), keep=(".wo",))
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # Flux-dev's T5 length; a T5 file may declare its own in its metadata


def infer_clip_config(state_dict: dict[str, Tensor], metadata: dict[str, str]) -> CLIPTextConfig:
    """CLIPTextConfig for a CLIPTextModel state dict: the real CLIP-L config with the sizes read off the tensors.

    The head count is not in the weights: the file's `num_attention_heads` metadata when present (tiny files
    write it), else one head per 64 channels (CLIP-L: 12).
    """
    sd = state_dict
    vocab_size, hidden = sd["embeddings.token_embedding.weight"].shape
    config = shipped_config("clip-l.json")
    config.update(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_blocks(sd, "encoder.layers"),
        num_attention_heads=int(metadata.get("num_attention_heads", max(1, hidden // 64))),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
    )
    return CLIPTextConfig.from_dict(config)


def infer_t5_config(state_dict: dict[str, Tensor]) -> T5Config:
    """T5Config for a T5 encoder state dict: the real T5-XXL config with the sizes read off the tensors.

    The head count is the width of the relative-attention bias (buckets x heads).
    """
    sd = state_dict
    vocab_size, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    num_layers = count_blocks(sd, "encoder.block")
    config = shipped_config("t5-xxl-encoder.json")
    config.update(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=wi.shape[0],
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        num_heads=heads,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5Config.from_dict(config)


def _load_clip(path: str | Path, dtype: torch.dtype, device) -> CLIPTextModel:
    path = check_model_file(path, "clip")
    if path.is_dir():
        return _load_pretrained(CLIPTextModel, model_folder(path, "text_encoder"), dtype, device)
    prefix = key_prefix(path, "embeddings.token_embedding.weight", "CLIP text encoder")
    state_dict = read_state_dict(path, prefix, dtype, device)
    for extra in ("embeddings.position_ids", "text_projection.weight", "logit_scale"):  # not CLIPTextModel's
        state_dict.pop(extra, None)
    with init_empty_weights():
        model = CLIPTextModel(infer_clip_config(state_dict, read_safetensors_header(path).metadata))
    assign_weights(model, state_dict, path)
    return model.to(device)  # the position_ids buffer was created on the CPU


def _load_t5(path: str | Path, dtype: torch.dtype, device, fp8: bool = False) -> T5EncoderModel:
    """T5 from a file or folder; with `fp8`, its block Linears (but `wo`, which T5 casts its input to) are stored
    as float8_e4m3fn and computed in `dtype`: T5-XXL takes ~6 GB instead of ~9.5 GB. A file is read tensor by
    tensor, each cast as read."""
    path = check_model_file(path, "t5")
    if path.is_dir():
        model = _load_pretrained(T5EncoderModel, model_folder(path, "text_encoder_2"), dtype, "cpu")
        if fp8:
            to_fp8_linears(model, dtype, **T5_FP8)
        return model.to(device)
    prefix = key_prefix(path, "shared.weight", "T5 text encoder")
    shapes = {k[len(prefix):]: torch.empty(shape, device="meta")
              for k, shape in read_safetensors_header(path).shapes.items() if k.startswith(prefix)}
    with init_empty_weights():
        model = T5EncoderModel(infer_t5_config(shapes))
    fp8_names = use_fp8_linears(model, dtype, **T5_FP8) if fp8 else set()
    state_dict = read_state_dict(path, prefix, dtype, device, fp8=fp8_names)
    state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"]  # tied; files usually omit it
    assign_weights(model, state_dict, path)
    model.tie_weights()
    return model


def _load_pretrained(cls, folder: Path, dtype: torch.dtype, device):
    """A transformers text encoder from its local folder, checking first that the folder holds that model."""
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != cls.config_class.model_type:
        raise ValueError(f"{folder} holds a {model_type} model, not {cls.config_class.model_type}: "
                         "were the two text encoder inputs swapped?")  # fmt: skip
    weight_files(folder, "model")  # our messages for a pickle-only or incomplete folder
    model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def _declared_sequence_length(t5_path: Path) -> int:
    """The T5 length a T5 file declares in its metadata (tiny files do), else Flux-dev's 512."""
    metadata = {} if t5_path.is_dir() else read_safetensors_header(t5_path).metadata
    return int(metadata.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))


def _load_tokenizer(folder: Path, cls, required: tuple[str, ...], model: nn.Module, what: str, **kwargs):
    """A tokenizer from a local folder, checked against the vocabulary of the model it feeds."""
    folder = existing_path(folder, f"{what} tokenizer folder")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{what} tokenizer folder {folder} lacks {', '.join(missing)}.")
    tokenizer = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    if not 3 < len(tokenizer) <= model.config.vocab_size:
        raise ValueError(
            f"{what} tokenizer in {folder} has {len(tokenizer)} tokens but its text encoder has "
            f"{model.config.vocab_size}: the tokenizer does not belong to that model."
        )
    return tokenizer


@dataclass
class TextEncoders:
    """CLIP-L and T5 with their tokenizers; `encode` gives Flux's text conditioning as diffusers' FluxPipeline."""

    clip: CLIPTextModel
    clip_tokenizer: CLIPTokenizer
    t5: T5EncoderModel
    t5_tokenizer: PreTrainedTokenizerBase
    max_sequence_length: int  # T5 tokens: 512 for dev, 256 for schnell, small for tiny

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> prompt_embeds (B, max_sequence_length, t5_dim), pooled_projections (B, clip_dim).

        CLIP's pooled output at its full 77 tokens, T5's last hidden state padded to `max_sequence_length`.
        """
        pooled = _clip_pooled(self.clip, self.clip_tokenizer, prompts)
        return _t5_embeds(self.t5, self.t5_tokenizer, prompts, self.max_sequence_length), pooled

    def to(self, device) -> TextEncoders:
        """Move both encoders (e.g. off the GPU once the captions are cached); returns self."""
        self.clip.to(device)
        self.t5.to(device)
        return self


@torch.no_grad()
def _clip_pooled(clip: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> Tensor:
    """(B, clip_dim) CLIP pooled output at its full 77 tokens."""
    ids = _tokenize(tokenizer, prompts, clip.config.max_position_embeddings, "CLIP")
    return clip(ids.to(clip.device)).pooler_output


@torch.no_grad()
def _t5_embeds(t5: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> Tensor:
    """(B, length, t5_dim) T5's last hidden state, padded to `length` tokens."""
    return t5(_tokenize(tokenizer, prompts, length, "T5").to(t5.device)).last_hidden_state


@dataclass(frozen=True)
class TextEncoderFiles:
    """CLIP-L and T5 as files, loaded only to encode and freed right after, one model at a time: T5 encodes every
    prompt, leaves, then CLIP does. What caching uses, and what a run keeps to encode a prompt it has not seen, so
    neither encoder stays on the device or in RAM. `encode` gives what `TextEncoders.encode` gives."""

    clip_path: Path
    t5_path: Path
    clip_tokenizer_dir: Path
    t5_tokenizer_dir: Path
    max_sequence_length: int
    dtype: torch.dtype = torch.bfloat16
    device: str | torch.device = "cpu"
    t5_fp8: bool = False  # T5's block Linears stored as float8 (see `_load_t5`)
    t5_on_cpu: bool = False  # T5 runs on the CPU whatever `device` is (a card too small for it)
    batch_size: int = 1  # prompts per forward pass

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> prompt_embeds (B, max_sequence_length, t5_dim), pooled_projections (B, clip_dim), on the CPU."""
        chunks = [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        t5 = _load_t5(self.t5_path, self.dtype, "cpu" if self.t5_on_cpu else self.device, fp8=self.t5_fp8)
        tokenizer = _load_tokenizer(self.t5_tokenizer_dir, T5TokenizerFast, ("tokenizer.json",), t5, "T5")
        embeds = torch.cat([_t5_embeds(t5, tokenizer, c, self.max_sequence_length).cpu() for c in chunks])
        del t5
        _free(self.device)
        clip = _load_clip(self.clip_path, self.dtype, self.device)
        tokenizer = _clip_tokenizer(self.clip_tokenizer_dir, clip)
        pooled = torch.cat([_clip_pooled(clip, tokenizer, c).cpu() for c in chunks])
        del clip
        _free(self.device)
        logger.info("encoded %d prompt(s), T5 then CLIP, each freed after use", len(prompts))
        return embeds, pooled


def _free(device) -> None:
    """Return a freed model's memory on a CUDA device to the driver, for the next model to load."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _clip_tokenizer(folder: Path, clip: CLIPTextModel):
    # ComfyUI's CLIP tokenizer config says 8192 tokens; CLIP-L has 77 positions.
    return _load_tokenizer(folder, CLIPTokenizer, ("vocab.json", "merges.txt"), clip, "CLIP",
                           model_max_length=clip.config.max_position_embeddings)  # fmt: skip


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int, what: str) -> Tensor:
    """(B, length) token ids, padded and truncated; warns about what truncation drops."""
    too_long = [p for p, ids in zip(prompts, tokenizer(prompts).input_ids) if len(ids) > length]
    if too_long:
        logger.warning("%d prompt(s) exceed %s's %d tokens and are truncated, e.g. %r",
                       len(too_long), what, length, too_long[0])  # fmt: skip
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def text_encoder_files(
    clip_path: str | Path,
    t5_path: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    max_sequence_length: int | None = None,
    *,
    clip_tokenizer_dir: str | Path | None = None,
    t5_tokenizer_dir: str | Path | None = None,
    t5_fp8: bool = False,
    t5_on_cpu: bool = False,
    batch_size: int = 1,
) -> TextEncoderFiles:
    """CLIP-L and T5 files and their tokenizer folders, checked (headers and folders only) but not loaded; what
    `load_text_encoders` loads, and what caching encodes with one model at a time (`TextEncoderFiles`)."""
    if clip_tokenizer_dir is None or t5_tokenizer_dir is None:
        if tokenizer_dir is None:
            raise ValueError("No tokenizer folders: pass tokenizer_dir (holding clip/ and t5/) or both "
                             "clip_tokenizer_dir and t5_tokenizer_dir.")
        clip_tokenizer_dir = clip_tokenizer_dir or Path(tokenizer_dir) / "clip"
        t5_tokenizer_dir = t5_tokenizer_dir or Path(tokenizer_dir) / "t5"
    clip_path, t5_path = check_model_file(clip_path, "clip"), check_model_file(t5_path, "t5")
    return TextEncoderFiles(
        clip_path, t5_path, existing_path(clip_tokenizer_dir, "CLIP tokenizer folder"),
        existing_path(t5_tokenizer_dir, "T5 tokenizer folder"),
        max_sequence_length or _declared_sequence_length(t5_path), dtype, device, t5_fp8, t5_on_cpu, batch_size,
    )


def load_text_encoders(*args, **kwargs) -> TextEncoders:
    """CLIP-L and T5 from ComfyUI-style single files or transformers folders, tokenizers from local folders; the
    arguments are `text_encoder_files`' (paths, tokenizer folders, dtype, device, max_sequence_length, t5_fp8).

    Tokenizers: `tokenizer_dir/clip` (vocab.json + merges.txt, as ComfyUI's comfy/sd1_tokenizer) and
    `tokenizer_dir/t5` (tokenizer.json, as comfy/text_encoders/t5_tokenizer), or each folder given on its own.
    `max_sequence_length` defaults to the T5 file's `max_sequence_length` metadata, else 512 (Flux-dev).
    """
    files = text_encoder_files(*args, **kwargs)
    clip = _load_clip(files.clip_path, files.dtype, files.device)
    t5 = _load_t5(files.t5_path, files.dtype, files.device, fp8=files.t5_fp8)
    t5_tokenizer = _load_tokenizer(files.t5_tokenizer_dir, T5TokenizerFast, ("tokenizer.json",), t5, "T5")
    return TextEncoders(clip, _clip_tokenizer(files.clip_tokenizer_dir, clip), t5, t5_tokenizer,
                        files.max_sequence_length)
