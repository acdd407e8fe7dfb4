"""Gated: a real ComfyUI server starts with this pack in its custom_nodes/ and serves the harness's base directory."""
from trainer_core.tiny import write_gguf_transformer


def test_server_runs_on_the_cpu_from_the_temporary_base_directory(comfyui):
    stats = comfyui.get("/system_stats")
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    assert "--base-directory" in stats["system"]["argv"]

    (comfyui.models_dir("loras") / "probe.safetensors").write_bytes(b"")
    assert "probe.safetensors" in comfyui.get("/models/loras")
    assert {"UNETLoader", "LoraLoader", "KSampler"} <= comfyui.object_info().keys()


def test_pack_imports_and_registers_its_nodes(comfyui):
    pack = f"custom_nodes/{comfyui.pack_name}"
    import_lines = [line for line in comfyui.log().splitlines() if line.rstrip().endswith(pack)]
    assert import_lines, f"ComfyUI never tried to import {pack}:\n{comfyui.log_tail()}"
    assert "IMPORT FAILED" not in import_lines[0], f"the pack failed to import:\n{comfyui.log_tail()}"
    module = f"custom_nodes.{comfyui.pack_name}"
    ours = [name for name, info in comfyui.object_info().items() if info["python_module"] == module]
    assert ours, "the pack imported but registered no node (NODE_CLASS_MAPPINGS)"


def test_gguf_bases_are_listed_for_training_but_not_for_stock_loaders(comfyui, tiny_flux):
    """The pack registers `unet_gguf` over the diffusion_models folders (as ComfyUI-GGUF does): InitTrainer lists a
    GGUF base from models/unet, ComfyUI's UNETLoader, which cannot load one, does not."""
    (comfyui.models_dir("unet")).mkdir(parents=True, exist_ok=True)
    write_gguf_transformer(tiny_flux.transformer_bf16, comfyui.models_dir("unet") / "flux-probe-Q8_0.gguf")
    info = comfyui.object_info()
    assert "flux-probe-Q8_0.gguf" in info["FluxLoRA_InitTrainer"]["input"]["required"]["transformer"][0]
    assert "flux-probe-Q8_0.gguf" not in info["UNETLoader"]["input"]["required"]["unet_name"][0]
