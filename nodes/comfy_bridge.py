"""The one place that touches ComfyUI (`folder_paths`, `comfy.*`, its `server`), imported lazily.

Outside ComfyUI (tests, scripts) every function degrades to plain behaviour: no progress bar, no interrupt, no
live view, and model folders laid out as ComfyUI's under the base folder named by the environment variable
`FLUX_LORA_TRAINER_BASE_DIR` (default: the current folder): `models/diffusion_models`, `models/vae`, ...
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

BASE_DIR_ENV = "FLUX_LORA_TRAINER_BASE_DIR"
MODEL_EXTENSIONS = (".safetensors", ".sft")
STATES = "flux_lora_states"  # the run store and the training states users save: our own folder, not models/loras
# GGUF transformers in the diffusion_models folders: the name and setting ComfyUI-GGUF registers, so with that pack
# installed both list the same files, and ComfyUI's own loaders never list a .gguf they cannot load
GGUF_MODELS = "unet_gguf"
# ComfyUI's folder names and, outside ComfyUI, where they live under the base folder (its legacy names included)
_FOLDERS = {
    "diffusion_models": ("models/diffusion_models", "models/unet"),
    "vae": ("models/vae",),
    "text_encoders": ("models/text_encoders", "models/clip"),
    "loras": ("models/loras",),
    STATES: (f"models/{STATES}",),
}
_FOLDERS[GGUF_MODELS] = _FOLDERS["diffusion_models"]


def _extensions(folder: str) -> tuple[str, ...]:
    return (".gguf",) if folder == GGUF_MODELS else MODEL_EXTENSIONS


def _comfy(module: str):
    """The ComfyUI module, or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _base_dir() -> Path:
    return Path(os.environ.get(BASE_DIR_ENV, ".")).resolve()


def folder_paths(folder: str) -> list[Path]:
    """The folders ComfyUI searches for `folder` ("diffusion_models", "vae", "text_encoders", "loras", STATES)."""
    fp = _folder_paths()
    if fp is not None:
        return [Path(p) for p in fp.get_folder_paths(folder)]
    return [_base_dir() / sub for sub in _FOLDERS[folder]]


def _folder_paths():
    """ComfyUI's `folder_paths` with `STATES` (models/flux_lora_states) registered as one of its model folders,
    so `extra_model_paths.yaml` may point it elsewhere; None outside ComfyUI. Looked up when first needed: the
    pack's import must import nothing of ComfyUI."""
    fp = _comfy("folder_paths")
    if not hasattr(fp, "folder_names_and_paths"):  # outside ComfyUI, or another module of that name
        return None
    if STATES not in fp.folder_names_and_paths:
        fp.folder_names_and_paths[STATES] = ([os.path.join(fp.models_dir, STATES)], set(MODEL_EXTENSIONS))
    if GGUF_MODELS not in fp.folder_names_and_paths:  # the same list object: extra_model_paths.yaml entries apply
        fp.folder_names_and_paths[GGUF_MODELS] = (fp.folder_names_and_paths["diffusion_models"][0], {".gguf"})
    return fp


def filename_list(folder: str) -> list[str]:
    """File names (relative to their folder) for a combo widget."""
    fp = _folder_paths()
    if fp is not None:
        return fp.get_filename_list(folder)
    names = {
        p.relative_to(root).as_posix()
        for root in folder_paths(folder) if root.is_dir()
        for p in root.rglob("*") if p.suffix in _extensions(folder) and p.is_file()
    }
    return sorted(names)


def full_path(folder: str, name: str, field: str) -> Path:
    """The file a combo value names; FileNotFoundError naming the widget `field` and the folders searched."""
    fp = _folder_paths()
    try:
        return Path(fp.get_full_path_or_raise(folder, name)) if fp is not None else _find(folder, name)
    except FileNotFoundError as e:
        searched = ", ".join(str(p) for p in folder_paths(folder))
        close = difflib.get_close_matches(name, filename_list(folder), n=3, cutoff=0.6)  # a workflow from elsewhere
        hint = f"did you mean {' or '.join(map(repr, close))}? Else put" if close else "put"
        raise FileNotFoundError(
            f"{field}: {name!r} is not in ComfyUI's {folder} folder ({searched}); {hint} the file there, "
            "then refresh the node (press R) and pick it"
        ) from e


def _find(folder: str, name: str) -> Path:
    """Outside ComfyUI: an absolute path as given, else the name in the folder; like ComfyUI, `..` cannot leave it."""
    candidates = [Path(name)] if Path(name).is_absolute() else [
        p for root in folder_paths(folder) if (p := Path(os.path.normpath(root / name))).is_relative_to(root)]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(name)
    return found


def input_directory() -> Path:
    fp = _comfy("folder_paths")
    return Path(fp.get_input_directory()) if fp is not None else _base_dir() / "input"


def llm_directory() -> Path:
    """ComfyUI's models/LLM, where caption models such as Florence-2 are kept (ComfyUI itself registers no such
    folder, so it is found beside the other model folders)."""
    fp = _comfy("folder_paths")
    return Path(fp.models_dir) / "LLM" if fp is not None else _base_dir() / "models" / "LLM"


def temp_directory() -> Path:
    fp = _comfy("folder_paths")
    return Path(fp.get_temp_directory()) if fp is not None else _base_dir() / "temp"


def tokenizer_dirs() -> tuple[Path, Path] | None:
    """ComfyUI's own CLIP-L and T5 tokenizer folders (shipped in its source tree), or None outside ComfyUI."""
    comfy = _comfy("comfy")
    if comfy is None:
        return None
    root = Path(comfy.__file__).parent
    return root / "sd1_tokenizer", root / "text_encoders" / "t5_tokenizer"


def torch_device() -> str:
    """The device ComfyUI computes on (it honours --cpu and --cuda-device), or "auto" outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    return str(mm.get_torch_device()) if mm is not None else "auto"


class _NoProgressBar:
    def __init__(self, total: int):
        self.total = total

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        pass


def progress_bar(total: int):
    """ComfyUI's progress bar for the running node; its update raises ComfyUI's interrupt on Cancel."""
    utils = _comfy("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _NoProgressBar(total)


def raise_if_cancelled() -> bool:
    """Raise ComfyUI's InterruptProcessingException if Cancel was pressed; False (never stop) otherwise.

    Shaped as a `should_stop` hook, so the trainer checks it before every step."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    return False


def free_comfy_models() -> None:
    """Unload the models ComfyUI holds so training gets the memory."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()


# ComfyUI's model management and queue, for sharing memory with it (the policy is nodes/model_sharing.py's). Its
# list of loaded models is changed only from the thread that runs prompts: ComfyUI walks it there without a lock.
def register_loaded_model(kind: type) -> bool:
    """Put `kind(device)` (ComfyUI's device), shaped like `comfy.model_management.LoadedModel`, among the models
    ComfyUI's model management unloads when it needs memory (`free_memory`, "Unload models"), replacing any other
    of `kind`; False outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    loaded = getattr(mm, "current_loaded_models", None)
    if loaded is None:
        if mm is not None:  # a ComfyUI whose model management changed: tests/comfyui/test_memory_in_comfyui.py fails
            log.warning("ComfyUI's model management has no current_loaded_models: the trainer's models will not "
                        "make way when ComfyUI needs the memory")
        return False
    unregister_loaded_models(kind)
    loaded.insert(0, kind(mm.get_torch_device()))  # where ComfyUI puts the model it loaded last
    return True


def unregister_loaded_models(kind: type) -> None:
    loaded = getattr(_comfy("comfy.model_management"), "current_loaded_models", None)
    if loaded is not None:
        loaded[:] = [m for m in loaded if not isinstance(m, kind)]


def executing_node() -> tuple[str, str] | None:
    """(prompt id, node id) of the node ComfyUI is running now; None outside a prompt."""
    get_context = getattr(_comfy("comfy_execution.utils"), "get_executing_context", None)
    context = get_context() if get_context is not None else None
    return None if context is None else (str(context.prompt_id), str(context.node_id))


def _queue_items() -> tuple[list, list]:
    """ComfyUI's running and waiting queue items, `(number, prompt_id, graph, extra_data, output ids, ...)`."""
    items = getattr(getattr(_prompt_server(), "prompt_queue", None), "get_current_queue_volatile", None)
    return items() if items is not None else ([], [])


def queued_graphs() -> list[dict]:
    """The API-format graphs of the prompts running or waiting in ComfyUI's queue."""
    running, waiting = _queue_items()
    return [item[2] for item in (*running, *waiting)]


def running_graph(prompt_id: str) -> tuple[dict, list[str]] | None:
    """The graph of the running prompt `prompt_id` and the ids of the output nodes ComfyUI executes in it."""
    running, _ = _queue_items()
    return next(((item[2], [str(n) for n in item[4]]) for item in running if str(item[1]) == prompt_id), None)


def on_prompt_queued(handler) -> bool:
    """Have ComfyUI's server call `handler(graph)` with each prompt posted to it, before queueing it (on the
    server's thread); False outside ComfyUI."""
    def on_prompt(json_data: dict) -> dict:
        handler(json_data.get("prompt"))
        return json_data

    return add_prompt_handler(on_prompt)


def save_previews(images) -> list[dict]:
    """PNG previews of PIL images in ComfyUI's temp folder, as the `ui.images` entries PreviewImage returns."""
    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for image in images:
        name = f"flux_lora_{uuid.uuid4().hex[:12]}.png"
        image.save(folder / name, compress_level=1)
        entries.append({"filename": name, "subfolder": "", "type": "temp"})
    return entries


def _prompt_server():
    """ComfyUI's running server (`server.PromptServer.instance`), or None outside ComfyUI.

    Looked up, never imported: ComfyUI imported its `server` before loading packs, while an import here could load
    an unrelated module of that name (or, at pack import, import ComfyUI's server before ComfyUI does)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def send_event(event: str, data: dict) -> None:
    """Send `data` to every open ComfyUI tab (each sees the run; none owns it)."""
    instance = _prompt_server()
    if instance is not None:
        instance.send_sync(event, data)


def running_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is running (or ran last); None outside ComfyUI."""
    return getattr(_prompt_server(), "last_prompt_id", None)


def cached_nodes(prompt_id: str) -> set[str] | None:
    """The nodes ComfyUI served from its cache (ran nothing for) in prompt `prompt_id`, from its history once the
    prompt has run; None while it is queued or running, once the history forgot it, and outside ComfyUI."""
    queue = getattr(_prompt_server(), "prompt_queue", None)
    entry = queue.get_history(prompt_id=prompt_id).get(prompt_id) if queue is not None else None
    messages = ((entry or {}).get("status") or {}).get("messages") or []
    return next((set(map(str, data["nodes"])) for kind, data in messages if kind == "execution_cached"), None)


def add_prompt_handler(handler: Callable[[dict], dict]) -> bool:
    """Call `handler(json_data)` on every prompt POSTed to ComfyUI, before it is validated and queued (it may change
    the prompt and give it its "prompt_id"); False outside ComfyUI."""
    instance = _prompt_server()
    if instance is None:
        return False
    if handler not in getattr(instance, "on_prompt_handlers", ()):  # the pack imported twice
        instance.add_on_prompt_handler(handler)
    return True


def register_route(path: str, answer: Callable[[dict[str, str]], object]) -> bool:
    """Serve `answer(query parameters)` as JSON at GET `path` on ComfyUI's server; False outside ComfyUI."""
    instance = _prompt_server()
    if instance is None:
        return False
    from aiohttp import web  # ComfyUI's server is aiohttp

    if any(getattr(route, "path", None) == path for route in instance.routes):
        return True  # the pack was imported twice: aiohttp refuses a second handler for the same route

    @instance.routes.get(path)
    async def route(request: web.Request) -> web.Response:
        return web.json_response(answer(dict(request.query)))

    return True
