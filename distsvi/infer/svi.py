"""Stochastic variational inference: one gradient step of an ELBO at a time."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..params import _PARAM_STORE
from ..poutine import handlers as poutine

GradHook = Callable[[torch.Tensor, dict], "torch.Tensor | None"]


class SVI:
    """Fit a guide to a model by stochastic gradient steps on a loss (an ELBO).

    :param model: the model, a callable with ``sample``/``param`` statements.
    :param guide: the guide (variational family), with a sample site for every latent.
    :param optim: a :mod:`distsvi.optim` optimizer (e.g. ``Adam({"lr": 0.01})``).
    :param loss: an ELBO instance (``Trace_ELBO()``...) or a callable
        ``loss(model, guide, *args, **kwargs) -> tensor`` to differentiate.
    :param loss_and_grads: optional ``fn(model, guide, *args, **kwargs)`` that runs
        backward itself and returns the loss; defaults to ``loss.loss_and_grads``.
    :param grad_hook: optional ``hook(loss, params) -> loss or None``, called after backward
        with the 0-dim loss tensor and ``{name: unconstrained param}`` of this step; it may
        change gradients (e.g. average them across ranks), and returning ``None`` skips the
        optimizer step. This is the seam :mod:`distsvi.distributed` uses.

    Example::

        svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
        for step in range(1000):
            loss = svi.step(data)
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: Any,
        loss: Any,
        loss_and_grads: Callable | None = None,
        num_samples: int = 0,
        num_steps: int = 0,
        grad_hook: GradHook | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(optim):
            raise TypeError(
                f"optim must be a distsvi.optim optimizer (e.g. Adam({{'lr': 0.01}})), got {optim!r}"
            )
        self.model = model
        self.guide = guide
        self.optim = optim
        self.num_samples = num_samples
        self.num_steps = num_steps
        self.grad_hook = grad_hook
        if hasattr(loss, "loss") and hasattr(loss, "loss_and_grads"):
            self.loss = loss.loss
            self.loss_and_grads = loss_and_grads or loss.loss_and_grads
        elif callable(loss):
            self.loss = lambda *a, **k: float(loss(*a, **k))

            def _loss_and_grads(*a, **k):
                value = loss(*a, **k)
                value.backward()
                return value.detach()

            self.loss_and_grads = loss_and_grads or _loss_and_grads
        else:
            raise TypeError(f"loss must be an ELBO or a callable, got {loss!r}")

    def step(self, *args: Any, **kwargs: Any) -> float:
        """Take one optimizer step on the loss; return the loss estimate (a float)."""
        with poutine.trace(param_only=True) as param_capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        store = _PARAM_STORE._params
        params = {name: store[name] for name in param_capture.trace.nodes}
        if self.grad_hook is not None:
            reported = self.grad_hook(loss, params)
            if reported is not None:
                self.optim(params)
                loss = reported
        else:
            self.optim(params)
        for p in params.values():
            p.grad = None
        return float(loss)  # host sync: the one per step, as Pyro's step returns a float

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The loss estimate with no gradient computed and no parameter changed."""
        with torch.no_grad():
            return float(self.loss(self.model, self.guide, *args, **kwargs))
