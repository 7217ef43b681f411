"""Lazy row updates: the optimizer step of only the rows a batch touched.

A per-datapoint param (one row per datapoint along a plate dim) that a step read as
rows gets a gradient for those rows only. Under ``local_updates="lazy"`` only those
rows move, and only their optimizer state advances: each row behaves as its own
optimizer, stepped when the row is in a batch (its own step count, so Adam's bias
correction counts that row's visits). For SGD without momentum and for Adagrad this is
exactly the dense step (a row with zero gradient does not move there); for optimizers
with momentum it is not, by design (a dense step moves unvisited rows by momentum).

One rule per optimizer family, written on the rows: ``init(p, group)`` gives the state
tensors at the param's full size, ``update(x, g, state, step, group)`` steps rows ``x``
with gradient ``g`` in place, ``state`` holding the same rows of each state tensor and
``step`` the rows' step counts (float64, already advanced, shaped to broadcast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class RowRule(NamedTuple):
    init: Callable[[torch.Tensor, dict], dict]
    update: Callable[[torch.Tensor, torch.Tensor, dict, torch.Tensor, dict], None]


def _zeros(*names: str) -> Callable[[torch.Tensor, dict], dict]:
    return lambda p, group: {n: torch.zeros_like(p) for n in names}


def _signed(g: torch.Tensor, x: torch.Tensor, group: dict, coupled_decay: bool = True):
    """The gradient after ``maximize`` and L2 weight decay, as torch applies them."""
    if group.get("maximize", False):
        g = -g
    if coupled_decay and group.get("weight_decay", 0):
        g = g.add(x, alpha=group["weight_decay"])
    return g


def _adam_init(p: torch.Tensor, group: dict) -> dict:
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
    return _zeros(*names)(p, group)


def _adam_update(x, g, state, step, group) -> None:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    decoupled = group.get("decoupled_weight_decay", False)
    g = _signed(g, x, group, coupled_decay=not decoupled)
    if decoupled and group.get("weight_decay", 0):
        x.mul_(1 - lr * group["weight_decay"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if group.get("amsgrad"):
        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        v = state["max_exp_avg_sq"]
    step_size = (lr / (1 - beta1**step)).to(x.dtype)
    bc2_sqrt = ((1 - beta2**step) ** 0.5).to(x.dtype)
    x.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))


def _sgd_update(x, g, state, step, group) -> None:
    g = _signed(g, x, group)
    momentum = group.get("momentum", 0)
    if momentum:
        buf = state["momentum_buffer"]
        # A row's first step starts its buffer at its gradient (as torch does per param).
        buf.copy_(torch.where(step == 1, g, buf * momentum + (1 - group["dampening"]) * g))
        g = g + momentum * buf if group.get("nesterov") else buf
    x.sub_(group["lr"] * g)


def _adagrad_init(p: torch.Tensor, group: dict) -> dict:
    return {"sum": torch.full_like(p, group.get("initial_accumulator_value", 0.0))}


def _adagrad_update(x, g, state, step, group) -> None:
    g = _signed(g, x, group)
    clr = (group["lr"] / (1 + (step - 1) * group.get("lr_decay", 0))).to(x.dtype)
    state["sum"].addcmul_(g, g, value=1)
    x.sub_(clr * g / (state["sum"].sqrt() + group["eps"]))


def _rmsprop_init(p: torch.Tensor, group: dict) -> dict:
    names = ("square_avg",)
    names += ("momentum_buffer",) if group.get("momentum", 0) > 0 else ()
    names += ("grad_avg",) if group.get("centered") else ()
    return _zeros(*names)(p, group)


def _rmsprop_update(x, g, state, step, group) -> None:
    g = _signed(g, x, group)
    alpha = group["alpha"]
    sq = state["square_avg"]
    sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if group.get("centered"):
        state["grad_avg"].lerp_(g, 1 - alpha)
        avg = sq.addcmul(state["grad_avg"], state["grad_avg"], value=-1).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(group["eps"])
    if group.get("momentum", 0) > 0:
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).addcdiv_(g, avg)
        x.sub_(group["lr"] * buf)
    else:
        x.addcdiv_(g, avg, value=-group["lr"])


def _adadelta_update(x, g, state, step, group) -> None:
    g = _signed(g, x, group)
    rho, eps = group["rho"], group["eps"]
    sq, acc = state["square_avg"], state["acc_delta"]
    sq.mul_(rho).addcmul_(g, g, value=1 - rho)
    delta = acc.add(eps).sqrt_().div_(sq.add(eps).sqrt_()).mul_(g)
    acc.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    x.sub_(group["lr"] * delta)


def _clipped_adam_update(x, g, state, step, group) -> None:
    """Pyro's ClippedAdam: clamped gradient, ``lr * lrd**k`` at a row's k-th step."""
    (beta1, beta2), eps = group["betas"], group["eps"]
    g = g.clamp(-group["clip_norm"], group["clip_norm"])
    if group["weight_decay"]:
        g = g.add(x, alpha=group["weight_decay"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    dev = g - m if group["centered_variance"] else g
    v.mul_(beta2).addcmul_(dev, dev, value=1 - beta2)
    lr = group["lr"] * group["lrd"] ** step
    step_size = (lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)).to(x.dtype)
    x.sub_(step_size * m / (v.sqrt() + eps))


ROW_RULES: dict[type, RowRule] = {
    torch.optim.Adam: RowRule(_adam_init, _adam_update),
    torch.optim.AdamW: RowRule(_adam_init, _adam_update),
    torch.optim.SGD: RowRule(_zeros("momentum_buffer"), _sgd_update),
    torch.optim.Adagrad: RowRule(_adagrad_init, _adagrad_update),
    torch.optim.RMSprop: RowRule(_rmsprop_init, _rmsprop_update),
    torch.optim.Adadelta: RowRule(_zeros("square_avg", "acc_delta"), _adadelta_update),
}
CLIPPED_ADAM_RULE = RowRule(_zeros("exp_avg", "exp_avg_sq"), _clipped_adam_update)


def row_rule(constructor: type) -> RowRule | None:
    """The row rule of a torch optimizer class (its own ``row_rule`` attribute wins)."""
    rule = getattr(constructor, "row_rule", None)
    if rule is not None:
        return rule
    for cls in constructor.__mro__:
        if cls in ROW_RULES:
            return ROW_RULES[cls]
    return None


def init_row_state(rule: RowRule, p: torch.Tensor, dim: int, group: dict) -> dict:
    state = rule.init(p.detach(), group)
    state["step"] = torch.zeros(p.shape[dim], dtype=torch.float64, device=p.device)
    return state


@torch.no_grad()
def step_rows(
    rule: RowRule,
    p: torch.Tensor,
    dim: int,
    index: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    group: dict,
) -> None:
    """Step rows ``index`` (unique) of ``p`` along ``dim`` with their gradient ``grad``."""
    x = p.index_select(dim, index)
    rows = {k: v.index_select(0 if k == "step" else dim, index) for k, v in state.items()}
    rows["step"] += 1
    shape = [1] * p.dim()
    shape[dim] = len(index)
    rule.update(x, grad.to(x.dtype), rows, rows["step"].view(shape), group)
    p.index_copy_(dim, index, x)
    for k, v in rows.items():
        state[k].index_copy_(0 if k == "step" else dim, index, v)
