"""Effect handlers, as in ``pyro.poutine``."""

from .handlers import (
    block,
    condition,
    get_mask,
    get_plates,
    mask,
    replay,
    scale,
    seed,
    substitute,
    trace,
)
from .runtime import Messenger, am_i_wrapped, apply_stack
from .trace_struct import Trace

__all__ = [
    "Messenger",
    "Trace",
    "am_i_wrapped",
    "apply_stack",
    "block",
    "condition",
    "get_mask",
    "get_plates",
    "mask",
    "replay",
    "scale",
    "seed",
    "substitute",
    "trace",
]
