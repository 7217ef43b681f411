"""Optimizers with Pyro's interface (``pyro.optim``): the wrappers live in :mod:`.optim`,
torch optimizer classes of Pyro's own in :mod:`.clipped_adam` and :mod:`.adagrad_rmsprop`,
at Pyro's module paths. Every name of :mod:`.optim` is importable from here."""

from . import optim as _optim

globals().update({k: v for k, v in vars(_optim).items() if not k.startswith("__")})
__all__ = list(_optim.__all__)

from .horovod import HorovodOptimizer  # noqa: E402

__all__ += ["HorovodOptimizer"]
