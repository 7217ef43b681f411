"""Pyro's ClippedAdam as a torch optimizer (``pyro.optim.clipped_adam.ClippedAdam``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["ClippedAdam"]


class ClippedAdam(torch.optim.Optimizer):
    """Adam with element-wise gradient clipping and learning-rate decay, as Pyro's.

    Each :meth:`step` first multiplies every group's ``lr`` by ``lrd`` (so the k-th step
    uses ``lr * lrd**k``), then clamps each gradient to ``[-clip_norm, clip_norm]`` and
    takes an Adam step. With ``centered_variance`` the second moment tracks
    ``(grad - exp_avg)**2`` instead of ``grad**2``.

    :param params: the tensors to optimize, or dicts of param groups.
    :param lr: the learning rate.
    :param betas: the decay rates of the two moment averages.
    :param eps: added to the denominator.
    :param weight_decay: an L2 penalty added to the gradient.
    :param clip_norm: the bound of each gradient element.
    :param lrd: the factor applied to ``lr`` at every step.
    :param centered_variance: use the centered second moment.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_norm: float = 10.0,
        lrd: float = 1.0,
        centered_variance: bool = False,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"ClippedAdam lr must be > 0, got {lr}")
        if not clip_norm > 0:
            raise ValueError(f"ClippedAdam clip_norm must be > 0, got {clip_norm}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "clip_norm": clip_norm,
            "lrd": lrd,
            "centered_variance": centered_variance,
        }
        super().__init__(params, defaults)

    def _lr(self, group: dict, step: int) -> float:
        return group["lr"]  # decayed in place by step()

    def _decay(self, group: dict) -> None:
        group["lr"] *= group["lrd"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._decay(group)
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.clamp_(-group["clip_norm"], group["clip_norm"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k = state["step"]
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                dev = grad - exp_avg if group["centered_variance"] else grad
                exp_avg_sq.mul_(beta2).addcmul_(dev, dev, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = self._lr(group, k) * math.sqrt(1 - beta2**k) / (1 - beta1**k)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


class PerParamClippedAdam(ClippedAdam):
    """ClippedAdam whose decay counts each param's own steps: at a param's k-th update the
    learning rate is ``lr * lrd**k`` and the group's ``lr`` stays as given.

    This is what :func:`distsvi.optim.ClippedAdam` runs: Pyro keeps one optimizer per param,
    so a param that sits out a step (absent from that step's trace) does not decay then,
    while here many params share one group. Saved state shows Pyro's decayed ``lr`` (see
    :meth:`export_options`), so states load either way.
    """

    def _lr(self, group: dict, step: int) -> float:
        return group["lr"] * group["lrd"] ** step

    def _decay(self, group: dict) -> None:
        pass

    @staticmethod
    def export_options(options: dict, state: dict) -> dict:
        """A param's group options as Pyro's optimizer for that param holds them."""
        step = int(state.get("step", 0))
        return {**options, "lr": options["lr"] * options["lrd"] ** step}

    @staticmethod
    def import_options(options: dict, state: dict) -> dict:
        """The inverse of :meth:`export_options`."""
        if "lr" not in options or "lrd" not in options:
            return options
        step = int(state.get("step", 0))
        return {**options, "lr": options["lr"] / options["lrd"] ** step}
