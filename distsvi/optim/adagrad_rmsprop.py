"""Pyro's AdagradRMSProp as a torch optimizer (``pyro.optim.adagrad_rmsprop``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["AdagradRMSProp"]


class AdagradRMSProp(torch.optim.Optimizer):
    """The step-size rule of ADVI (Kucukelbir et al. 2017, eqs. 10-11): a running average
    of squared gradients, as in RMSProp, started from the first squared gradient, and a
    step size that shrinks as in Adagrad.

    At a param's k-th step: ``s = g**2`` when ``k == 1``, else ``s = (1 - t) * s + t * g**2``;
    then ``p -= eta * k**(-1/2 + delta) * g / (1 + sqrt(s))``.

    :param params: the tensors to optimize, or dicts of param groups.
    :param eta: the step-size scale.
    :param delta: shifts the exponent of the step-size decay.
    :param t: the weight of the newest squared gradient in the average.
    """

    def __init__(
        self, params: Iterable[Any], eta: float = 1.0, delta: float = 1.0e-16, t: float = 0.1
    ) -> None:
        if not eta > 0:
            raise ValueError(f"AdagradRMSProp eta must be > 0, got {eta}")
        if not 0 < t <= 1:
            raise ValueError(f"AdagradRMSProp t must be in (0, 1], got {t}")
        super().__init__(params, {"eta": eta, "delta": delta, "t": t})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise NotImplementedError("AdagradRMSProp does not take sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if state["step"] == 1:
                    state["sum"] = grad * grad
                else:
                    state["sum"].mul_(1.0 - group["t"]).add_(group["t"] * grad * grad)
                lr = group["eta"] * state["step"] ** (-0.5 + group["delta"])
                p.addcdiv_(grad, state["sum"].sqrt().add_(1.0), value=-lr)
        return loss
