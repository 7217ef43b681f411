"""distsvi: stochastic variational inference with Pyro's API, data-parallel on torch.

Port a Pyro model by changing imports::

    import distsvi as pyro
    import distsvi.distributions as dist
    from distsvi.infer import SVI, Trace_ELBO
    from distsvi.optim import Adam

The names below load on first use, so ``distsvi``'s command line can refuse a bad config
before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("distributions", "infer", "nn", "optim", "poutine", "settings", "util")
_NAMES = {
    "clear_param_store": ".params",
    "get_param_store": ".params",
    "set_rng_seed": ".poutine.handlers",
    "deterministic": ".primitives",
    "enable_validation": ".primitives",
    "factor": ".primitives",
    "is_validation_enabled": ".primitives",
    "module": ".primitives",
    "param": ".primitives",
    "plate": ".primitives",
    "plate_stack": ".primitives",
    "sample": ".primitives",
    "subsample": ".primitives",
    "validation_enabled": ".primitives",
}

__all__ = [
    "clear_param_store",
    "deterministic",
    "distributions",
    "enable_validation",
    "factor",
    "get_param_store",
    "infer",
    "is_validation_enabled",
    "module",
    "nn",
    "optim",
    "param",
    "plate",
    "plate_stack",
    "poutine",
    "sample",
    "set_rng_seed",
    "settings",
    "subsample",
    "util",
    "validation_enabled",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    else:
        raise AttributeError(f"module 'distsvi' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES, *_NAMES])
