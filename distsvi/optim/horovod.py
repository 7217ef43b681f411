"""``HorovodOptimizer`` at Pyro's module path, so scripts that import it run unchanged.

distsvi's data parallelism is torchrun with torch.distributed (``distsvi train`` or
``distsvi.distributed``), not Horovod: a script that only imports the name, or runs with its
Horovod switch off, works; constructing one says where to go instead.
"""

from __future__ import annotations

from typing import Any


class HorovodOptimizer:
    """Placeholder for Pyro's Horovod wrapper: refuses with a pointer to torchrun."""

    def __init__(self, pyro_optim: Any = None, **horovod_kwargs: Any) -> None:
        raise NotImplementedError(
            "HorovodOptimizer: distsvi does not run on Horovod. Keep the plain optimizer and "
            "launch data-parallel training with torchrun (distsvi train CONFIG, or "
            "distsvi.distributed for your own loop); gradients are all-reduced for you."
        )


__all__ = ["HorovodOptimizer"]
