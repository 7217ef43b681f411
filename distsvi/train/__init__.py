"""The training job behind ``distsvi train``: typed config, loop, checkpoints, metrics.

Example::

    from distsvi.train import load_config, train

    train(load_config("quickstart", ["run.steps=500"]))
"""

from distsvi.train.config import ConfigError, TrainConfig, load_config
from distsvi.train.loop import evaluate, predict, train

__all__ = ["ConfigError", "TrainConfig", "evaluate", "load_config", "predict", "train"]
