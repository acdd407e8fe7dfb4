"""A tiny random Flux stack, written to disk in the layouts users have, so the demo and the tests load it through
`models` exactly as they load the real files.

Transformer ~100k parameters (1 double + 2 single blocks, 2 heads of 16), a 16-latent-channel VAE with 4 blocks
(scale factor 8, as every Flux VAE), CLIP-L and T5 encoders 32 wide, and tokenizers built offline.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from .models import diffusers_to_bfl, rope_axes, shipped_config

FORMAT_VERSION = 1  # bump when the files written change, so cached stacks are rebuilt
MAX_SEQUENCE_LENGTH = 32  # T5 tokens of the tiny stack, written in the T5 file's metadata
CLIP_HEADS = 2

# Words the tokenizers know whole; any other text still tokenizes, byte by byte (CLIP) or letter by letter (T5).
WORDS = """
a an the of in on at with and or to from by for over under near behind beside between into through without
photo photograph picture image painting drawing sketch illustration render portrait landscape closeup close up
woman man girl boy child person people face eyes hair hand hands smile smiling standing sitting walking running
lying looking holding wearing dress shirt jacket coat hat glasses shoes suit uniform armor helmet mask scarf
dog cat bird horse fish lion tiger bear fox wolf rabbit dragon robot car bicycle train boat ship plane house
castle tower bridge road street city town village forest tree trees flower flowers grass garden field mountain
mountains hill river lake sea ocean beach sand rock rocks snow rain fog cloud clouds sky sun moon star stars
night day morning evening sunset sunrise light shadow dark bright red orange yellow green blue purple pink
brown black white gray grey gold silver colorful golden wooden stone metal glass old new young small large big
tall long short beautiful detailed realistic cinematic dramatic soft sharp blurry vintage modern futuristic
fantasy style art artwork oil watercolor pencil ink digital anime cartoon comic pixel studio lighting background
foreground center left right top bottom front back side view shot angle wide macro film camera lens bokeh
high quality resolution masterpiece simple minimal abstract pattern texture table chair room window door wall
floor bed kitchen book cup bottle lamp candle fire water ice wind smoke steam sword shield crown flag sign text
one two three four five many some very quite trigger token sks ohwx
""".split()


@dataclass(frozen=True)
class TinyFluxPaths:
    transformer_bf16: Path  # BFL keys, bf16, `model.diffusion_model.` prefix
    transformer_fp8: Path  # BFL keys, float8_e4m3fn matrices, no prefix
    transformer_diffusers: Path  # diffusers folder (config.json + diffusion_pytorch_model.safetensors)
    vae: Path  # BFL ae.safetensors layout
    clip_l: Path  # ComfyUI clip_l layout (text_model.* keys)
    t5: Path  # ComfyUI t5xxl layout (shared.weight, encoder.block.*)
    tokenizers: Path  # clip/ (vocab.json + merges.txt) and t5/ (tokenizer.json)


def tiny_transformer_config() -> dict:
    """The tiny transformer's config: the real Flux-dev config narrowed, with the rope split inference picks."""
    config = shipped_config("flux-dev-transformer.json")
    config.update(
        num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=list(rope_axes(16)),
    )  # fmt: skip
    return config


def tiny_vae_config() -> dict:
    """The tiny VAE: 4 blocks (so 8 pixels per latent) and Flux's 16 latent channels, on narrow widths."""
    config = shipped_config("flux-vae.json")
    config.update(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
    return config


def write_tiny_flux(folder: str | Path, seed: int = 0) -> TinyFluxPaths:
    """Build the tiny random Flux stack from `seed` and write it under `folder`; deterministic.

    A folder already holding the stack for this seed is reused as is, so repeated calls are cheap.
    """
    folder = Path(folder)
    paths = TinyFluxPaths(
        transformer_bf16=folder / "flux-tiny-bf16.safetensors",
        transformer_fp8=folder / "flux-tiny-fp8.safetensors",
        transformer_diffusers=folder / "flux-tiny-diffusers",
        vae=folder / "ae.safetensors",
        clip_l=folder / "clip_l.safetensors",
        t5=folder / "t5xxl_tiny.safetensors",
        tokenizers=folder / "tokenizers",
    )
    marker = folder / "tiny_flux.json"  # written last: a stack interrupted mid-write is rebuilt
    stamp = {"seed": seed, "format_version": FORMAT_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == stamp and all(p.exists() for p in astuple(paths)):
        return paths
    folder.mkdir(parents=True, exist_ok=True)

    clip_vocab_size = _write_clip_tokenizer(paths.tokenizers / "clip")
    t5_vocab_size = _write_t5_tokenizer(paths.tokenizers / "t5")
    with torch.random.fork_rng():  # leave the caller's RNG alone
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel.from_config(tiny_transformer_config()).bfloat16()
        vae = AutoencoderKL.from_config(tiny_vae_config())
        clip = CLIPTextModel(tiny_clip_config(clip_vocab_size))
        t5 = T5EncoderModel(tiny_t5_config(t5_vocab_size))

    write_transformer_files(transformer, paths.transformer_bf16, paths.transformer_fp8)
    transformer.save_pretrained(paths.transformer_diffusers)
    write_vae_file(vae, paths.vae)
    # fp16 like ComfyUI's clip_l / t5xxl_fp16; the head count is not in CLIP's weights, so the file says it.
    clip_sd = {f"text_model.{k}": v.half() for k, v in clip.state_dict().items()}
    save_file(clip_sd, paths.clip_l, metadata={"num_attention_heads": str(CLIP_HEADS)})
    t5_sd = {k: v.half() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    save_file(t5_sd, paths.t5, metadata={"max_sequence_length": str(MAX_SEQUENCE_LENGTH)})
    marker.write_text(json.dumps(stamp))
    return paths


def write_transformer_files(transformer: FluxTransformer2DModel, bf16_path: Path, fp8_path: Path) -> None:
    """The transformer as BFL files: bf16 with the `model.diffusion_model.` prefix, and float8_e4m3fn matrices."""
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(transformer.state_dict()).items()}
    save_file({f"model.diffusion_model.{k}": v.bfloat16() for k, v in bfl.items()}, bf16_path)
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.bfloat16() for k, v in bfl.items()}, fp8_path)


def write_gguf_transformer(source: str | Path, path: str | Path, qtype: str = "Q8_0") -> Path:
    """A BFL transformer file as a GGUF, the way ComfyUI-GGUF's converter writes them: block Linear weights quantized
    as `qtype` where their width allows (else F16, as it does), other matrices F16, vectors F32; architecture flux."""
    import gguf  # only the GGUF tests and benches write these
    from gguf.quants import quantize

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in load_file(source).items():
        name = name.removeprefix("model.diffusion_model.")
        array = tensor.float().numpy()
        if name.startswith(("double_blocks.", "single_blocks.")) and array.ndim == 2 and array.shape[1] % block == 0:
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype("float16" if array.ndim == 2 else "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_same_layout_copy(source: str | Path, path: str | Path, noise: float = 0.05) -> Path:
    """`source`'s tensors each scaled by 1 + `noise` x a seeded normal draw, saved with its metadata: the same
    header (names, dtypes, shapes, offsets) and size, other weights, as two bases converted by one tool."""
    g = torch.Generator().manual_seed(0)
    tensors = {k: (v.float() * (1 + noise * torch.randn(v.shape, generator=g))).to(v.dtype)
               for k, v in load_file(source).items()}
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, path, metadata=metadata)
    return Path(path)


def write_vae_file(vae: AutoencoderKL, path: Path) -> None:
    """The VAE in BFL's `ae.safetensors` layout."""
    save_file(vae_to_bfl(vae.state_dict(), len(vae.config.block_out_channels)), path)


def tiny_clip_config(vocab_size: int) -> CLIPTextConfig:
    """CLIP-L's config, 32 wide and 2 layers deep."""
    config = shipped_config("clip-l.json")
    config.update(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=CLIP_HEADS)  # fmt: skip
    return CLIPTextConfig.from_dict(config)


def tiny_t5_config(vocab_size: int) -> T5Config:
    """T5-XXL's encoder config, 32 wide and 2 layers deep."""
    config = shipped_config("t5-xxl-encoder.json")
    config.update(vocab_size=vocab_size, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                  num_decoder_layers=2)  # fmt: skip
    return T5Config.from_dict(config)


def vae_to_bfl(state_dict: dict[str, Tensor], num_blocks: int) -> dict[str, Tensor]:
    """Diffusers AutoencoderKL names -> BFL `ae.safetensors` names (inverse of diffusers' LDM VAE converter)."""
    renames = [
        (r"conv_norm_out", "norm_out"),
        (r"conv_shortcut", "nin_shortcut"),
        (r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}"),
        (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
         lambda m: "mid.attn_1." + {"group_norm": "norm", "to_out.0": "proj_out"}.get(m[1], m[1][-1])),
        (r"down_blocks\.(\d+)\.resnets", r"down.\1.block"),
        (r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample"),
        # diffusers numbers the decoder's blocks from the bottom, BFL from the top
        (r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{num_blocks - 1 - int(m[1])}.block"),
        (r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{num_blocks - 1 - int(m[1])}.upsample"),
    ]  # fmt: skip
    out = {}
    for key, t in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and t.ndim == 2:
            t = t[:, :, None, None]  # BFL stores the attention projections as 1x1 convs
        out[key] = t.contiguous()
    return out


def _write_clip_tokenizer(folder: Path) -> int:
    """CLIP byte-level BPE files (vocab.json + merges.txt); returns the vocabulary size.

    Every byte is a token (alone and word-final), so any text tokenizes; merges are learnt from `WORDS`. The two
    special tokens come last, as in CLIP, so end-of-text has the highest id (CLIP pools at the highest id).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(WORDS)  # plain ASCII words: their byte-level characters are themselves
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return len(vocab)


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges until every word is one token: the most frequent pair first, ties in alphabetical order.

    (tokenizers' BpeTrainer breaks ties differently from run to run, and the tiny stack must be deterministic.)
    """
    corpus = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)  # CLIP marks the end of each word
    merges = []
    while True:
        pairs = Counter()
        for word, n in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        corpus = Counter({_merge(word, best): n for word, n in corpus.items()})


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _write_t5_tokenizer(folder: Path) -> int:
    """A T5 Unigram tokenizer (tokenizer.json) over `WORDS` and single characters; returns its size.

    Built from a vocabulary list: in transformers 5, `T5Tokenizer(vocab_file=...)` is silently ignored.
    """
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0 - i / len(WORDS)) for i, w in enumerate(dict.fromkeys(WORDS))]
    pieces += [(c, -10.0) for c in chars] + [(f"▁{c}", -10.5) for c in chars]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)
