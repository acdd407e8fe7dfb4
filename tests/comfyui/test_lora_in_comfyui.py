"""Gated: our LoRA files (kohya and diffusers format, LoRA and DoRA; LoKr and LoHa in kohya format), applied by
ComfyUI's own LoRA loader to ComfyUI's own Flux model, give exactly the BFL weights of our transformer with the LoRA
merged by peft.

ComfyUI runs in its own Python (`comfy_apply_lora.py`, a subprocess), our code in this one; they meet only through
the files, as they do for users. ComfyUI skips LoRA keys it does not recognise with nothing but a log line, so the
test checks the log, the key mapping and the merged values.
"""
import copy
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core.lora import add_lora, load_lora_state, lora_state, save_lora_file, set_lora_strength
from trainer_core.models import diffusers_to_bfl, load_transformer

STRENGTHS = (1.0, 0.5)
RANK, ALPHA = 4, 2.0  # alpha != rank: a lost .alpha would change the scale
PROBE = Path(__file__).with_name("comfy_apply_lora.py")
# (lora_format, dora, network)
VARIANTS = [("kohya", False, "lora"), ("diffusers", False, "lora"), ("kohya", True, "lora"),
            ("diffusers", True, "lora"), ("kohya", False, "lokr"), ("kohya", False, "loha")]


@dataclass
class Applied:
    expected: dict[float, dict[str, torch.Tensor]]  # strength -> BFL weights with the LoRA merged by peft
    base: dict[str, torch.Tensor]  # BFL weights without the LoRA
    report: dict  # comfy_apply_lora.py's report.json
    out_dir: Path  # ComfyUI's patched weights, patched_<strength>.safetensors


def merged_bfl(transformer: torch.nn.Module, strength: float, dora: bool = False) -> dict[str, torch.Tensor]:
    """BFL weights of `transformer` with its LoRA fused at `strength` by peft (the transformer is left as is).

    DoRA's strength interpolates between the base and the full DoRA weight (`set_lora_strength`), which is what
    ComfyUI does, so its merge at `strength` is taken between peft's merges at 0 and 1."""
    if dora and strength not in (0.0, 1.0):
        base, full = merged_bfl(transformer, 0.0, dora), merged_bfl(transformer, 1.0, dora)
        return {k: base[k] + strength * (full[k] - base[k]) for k in base}
    merged = copy.deepcopy(transformer)
    set_lora_strength(merged, strength)
    if dora and strength == 0.0:  # peft's merge ignores the forward hook that makes strength 0 the base
        merged.unload_lora()
        return diffusers_to_bfl(merged.state_dict())
    merged.fuse_lora()
    merged.unload_lora()
    return diffusers_to_bfl(merged.state_dict())


def comfyui_widths(transformer: torch.nn.Module) -> dict:
    """The unet_config fields ComfyUI's Flux detection fixes at Flux-dev's values, from our transformer's config."""
    c = transformer.config
    return {
        "hidden_size": c.num_attention_heads * c.attention_head_dim,
        "num_heads": c.num_attention_heads,
        "context_in_dim": c.joint_attention_dim,
        "axes_dim": list(c.axes_dims_rope),
    }


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{'dora' if v[1] else v[2]}")
def applied(request, tiny_flux, comfyui_dir, comfyui_python, tmp_path_factory):
    """Our LoRA saved, merged by peft, and applied by ComfyUI."""
    lora_format, dora, network = request.param
    folder = tmp_path_factory.mktemp("lora_in_comfyui")
    transformer = load_transformer(tiny_flux.transformer_bf16, dtype=torch.float32)
    add_lora(transformer, RANK, ALPHA, dora=dora, network=network)
    if network == "lokr":  # both of ComfyUI's LoKr rules: a decomposed w2 (alpha / rank) and full factors (scale 1)
        shapes = {k.rpartition(".")[2] for k in lora_state(transformer)}
        assert {"lokr_w2", "lokr_w2_a"} <= shapes, shapes
    # peft starts B at zero (a no-op LoRA); random bf16-exact values make every part count and survive the bf16 file
    # (alpha / rank = 0.5 keeps them exact in the diffusers file, which folds it into B, and in a LoKr's full w2);
    # magnitudes off the norms
    g = torch.Generator().manual_seed(0)
    state = lora_state(transformer)
    load_lora_state(transformer, {
        k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) if "magnitude" in k
        else (0.1 * torch.randn(v.shape, generator=g)).bfloat16().float() for k, v in state.items()})
    lora_path = folder / "tiny_lora.safetensors"
    save_lora_file(lora_path, transformer, {"ss_base_model_version": "flux1"}, lora_format)

    out = folder / "comfyui"
    command = [
        str(comfyui_python), str(PROBE), str(comfyui_dir), str(tiny_flux.transformer_bf16), str(lora_path), str(out),
        "--widths", json.dumps(comfyui_widths(transformer)), "--strengths", *map(str, STRENGTHS),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout}\n{run.stderr}"
    return Applied(
        expected={s: merged_bfl(transformer, s, dora) for s in STRENGTHS},
        base=merged_bfl(transformer, 0.0, dora),
        report=json.loads((out / "report.json").read_text()),
        out_dir=out,
    )


def test_comfyui_builds_its_flux_model_from_our_file(applied):
    report = applied.report
    assert report["model_class"] == "Flux"
    assert not [w for w in report["warnings"] if w.startswith(("unet missing", "unet unexpected"))], report["warnings"]


def test_every_lora_key_is_consumed(applied):
    report = applied.report
    assert report["lora_modules"], "the LoRA file is empty"
    assert report["unmapped_modules"] == []
    assert not [w for w in report["warnings"] if "lora key not loaded" in w or "NOT LOADED" in w], report["warnings"]


@pytest.mark.parametrize("strength", STRENGTHS)
def test_patched_weights_equal_the_peft_merge(applied, strength):
    expected = applied.expected[strength]
    patched = load_file(applied.out_dir / f"patched_{strength}.safetensors")
    assert patched.keys() == expected.keys()
    changed = sorted(k for k in applied.base if not torch.equal(applied.base[k], expected[k]))
    assert changed == applied.report["patched_keys"][str(strength)], "ComfyUI patched other weights than the LoRA's"
    for key, value in expected.items():
        torch.testing.assert_close(patched[key], value, msg=lambda m, key=key: f"{key}: {m}")
