"""Loading the Flux model files users really have, from local files only (see `files`)."""
from .files import *  # noqa: F401,F403
from .files import DOUBLE_BLOCK_LINEARS, SINGLE_BLOCK_LINEARS  # noqa: F401
