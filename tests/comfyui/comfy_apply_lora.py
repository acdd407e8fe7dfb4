"""Apply a LoRA file to a Flux transformer file with ComfyUI's own code; run with ComfyUI's Python.

    python comfy_apply_lora.py COMFYUI_DIR MODEL LORA OUT_DIR --widths JSON --strengths 1.0 0.5

Builds ComfyUI's Flux model the way its UNETLoader does (`comfy.model_detection` on the file), except for the
widths that detection fixes at Flux-dev's (hidden size, heads, text width, rope axes): `--widths` gives them, so
a tiny model loads. Then, for each strength, applies the LoRA through `comfy.sd.load_lora_for_models` (what the
LoraLoader node calls) and writes the patched weights (BFL names, float32) to OUT_DIR/patched_<strength>.safetensors.
OUT_DIR/report.json lists every warning logged, the LoRA modules ComfyUI has no mapping for, and the patched
weights, so the caller can tell a silently skipped key from a real merge.
"""
import argparse
import json
import logging
import sys
from pathlib import Path


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comfyui_dir", type=Path)
    parser.add_argument("model", type=Path, help="BFL-layout Flux transformer .safetensors")
    parser.add_argument("lora", type=Path, help="LoRA .safetensors")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--widths", type=json.loads, required=True, help="unet_config fields detection gets wrong")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0])
    a = parser.parse_args()

    recorder = _Recorder()
    logging.getLogger().addHandler(recorder)
    sys.path.insert(0, str(a.comfyui_dir))
    from comfy.cli_args import args

    args.cpu = True  # read when comfy.model_management is first imported
    import torch
    from safetensors.torch import save_file

    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(a.model), safe_load=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    unet_config = comfy.model_detection.detect_unet_config(sd, "") | a.widths
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(torch.float32, None)  # exact: no rounding of the merged weights
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")  # logs "unet missing" / "unet unexpected" on a mismatch
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    lora = comfy.utils.load_torch_file(str(a.lora), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    suffixes = (".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale",
                *(f".lokr_{w}" for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
                *(f".hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")))
    modules = sorted({next((k.removesuffix(x) for x in suffixes if k.endswith(x)), k) for k in lora})
    a.out_dir.mkdir(parents=True, exist_ok=True)
    patched_keys = {}
    for strength in a.strengths:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0.0)
        patched_keys[str(strength)] = sorted(k.removeprefix("diffusion_model.") for k in patched.patches)
        patched.patch_model()
        weights = {
            k.removeprefix("diffusion_model."): v.detach().float().clone().contiguous()
            for k, v in patched.model.state_dict().items()
            if k.startswith("diffusion_model.")
        }
        patched.unpatch_model()
        save_file(weights, a.out_dir / f"patched_{strength}.safetensors")

    report = {
        "model_class": type(model).__name__,
        "unet_config": {k: v for k, v in unet_config.items() if isinstance(v, (int, float, str, bool, list))},
        "warnings": recorder.lines,
        "lora_modules": modules,
        "unmapped_modules": [m for m in modules if m not in key_map],
        "patched_keys": patched_keys,
    }
    (a.out_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
