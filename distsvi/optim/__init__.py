"""Optimizers with Pyro's interface (``pyro.optim``): the wrappers live in :mod:`.optim`
and :mod:`.lr_scheduler`, torch optimizer classes of Pyro's own in :mod:`.clipped_adam` and
:mod:`.adagrad_rmsprop`, at Pyro's module paths. Every name of :mod:`.optim` and
:mod:`.lr_scheduler` is importable from here."""

from . import adagrad_rmsprop as adagrad_rmsprop
from . import clipped_adam as clipped_adam
from . import lr_scheduler as _lr_scheduler
from . import optim as _optim

for _module in (_optim, _lr_scheduler):
    globals().update({k: getattr(_module, k) for k in _module.__all__})
__all__ = list(_optim.__all__)
__all__ += _lr_scheduler.__all__
lr_scheduler, optim = _lr_scheduler, _optim

from .horovod import HorovodOptimizer  # noqa: E402

__all__ += ["HorovodOptimizer"]
