"""ComfyUI entry point of the Flux LoRA trainer pack (ComfyUI imports this folder as a package).

`trainer_core` is used as a top-level package everywhere (the CLI, the tests, and here), so it exists once per
process: the pack folder is appended to sys.path (appended, not prepended, so our `nodes/` never shadows
ComfyUI's own `nodes` module). The nodes themselves are imported relatively, as parts of this package.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

import trainer_core  # noqa: E402

if os.path.realpath(os.path.dirname(trainer_core.__file__)) != os.path.realpath(os.path.join(_HERE, "trainer_core")):
    raise ImportError(
        f"another package named trainer_core ({trainer_core.__file__}) shadows this pack's; "
        "remove it from the Python path or rename it"
    )

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
