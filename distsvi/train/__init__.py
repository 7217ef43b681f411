"""The training job behind ``distsvi train``: typed config, loop, checkpoints, metrics.

Example::

    from distsvi.train import load_config, train

    train(load_config("quickstart", ["run.steps=500"]))
"""

from __future__ import annotations

import importlib
from typing import Any

# The config loads without torch, so a bad config is refused at once; the loop loads on use.
_NAMES = {
    "ConfigError": "distsvi.train.errors",
    "TrainConfig": "distsvi.train.config",
    "load_config": "distsvi.train.config",
    "evaluate": "distsvi.train.loop",
    "predict": "distsvi.train.loop",
    "train": "distsvi.train.loop",
}

__all__ = ["ConfigError", "TrainConfig", "evaluate", "load_config", "predict", "train"]


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'distsvi.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value
