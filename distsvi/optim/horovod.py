"""``pyro.optim.HorovodOptimizer``'s name, so scripts that import it run unchanged.

distsvi does its own data parallelism (:mod:`distsvi.distributed`), so a script's
``--no-horovod`` path runs as is; asking for the Horovod wrapper says what to use instead.
"""

from __future__ import annotations

from typing import Any


class HorovodOptimizer:
    """Refuses with directions: distsvi averages gradients with ``DataParallelSVI``."""

    def __init__(self, pyro_optim: Any, **horovod_kwargs: Any):
        raise ImportError(
            "HorovodOptimizer: distsvi does not use Horovod. Keep the plain optimizer and wrap "
            "the SVI instead: distsvi.distributed.DataParallelSVI(SVI(...), init()), run "
            "under torchrun (see the README's 'Data-parallel SVI in your own script')."
        )


__all__ = ["HorovodOptimizer"]
