"""The pack imported the way ComfyUI imports it, shared by the node, workflow and progress tests."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    """Import the repository folder as ComfyUI does: a package named after its path, from its __init__.py."""
    name = str(ROOT).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
