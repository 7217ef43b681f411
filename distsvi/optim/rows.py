"""Lazy row updates of local params: each row behaves as its own optimizer, stepped only
when the row is in a step's batch.

One function per optimizer family maps ``(rows of the param, their gradient, their state,
their step counts, the group's options)`` to the rows' new values and state; the driver,
:func:`update_rows`, gathers the rows, calls it and writes the rows back. The state lives
in the torch optimizer's state for the full param, with the same keys torch uses plus a
per-row ``step`` (one count per row, so that bias corrections are per row), so that
checkpoints hold it like any other optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RowFn = Callable[[torch.Tensor, torch.Tensor, dict, torch.Tensor, dict], torch.Tensor]


def _grad(p, g, group):
    """The gradient a step uses: negated to maximize, then with L2 weight decay (torch's
    order)."""
    if group.get("maximize"):
        g = -g
    wd = group.get("weight_decay", 0)
    return g.add(p, alpha=wd) if wd else g


def _adam(p, g, st, k, group, decoupled=False, clipped=False):
    """Adam, AdamW and ClippedAdam (element-wise gradient clamp, ``lrd`` decay per step)."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    if clipped:
        g = g.clamp(-group["clip_norm"], group["clip_norm"])
        lr = lr * group["lrd"] ** k
    if decoupled:
        if group.get("maximize"):
            g = -g
        p = p * (1 - lr * group["weight_decay"])
    else:
        g = _grad(p, g, group)
    m = st["exp_avg"].lerp(g, 1 - beta1)
    dev = g - m if group.get("centered_variance") else g
    v = st["exp_avg_sq"] * beta2 + dev * dev * (1 - beta2)
    st["exp_avg"], st["exp_avg_sq"] = m, v
    if group.get("amsgrad"):
        v = st["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], v)
    bias1 = 1 - beta1**k
    bias2 = 1 - beta2**k
    if clipped:  # Pyro's ClippedAdam puts eps before the bias correction
        return p - (lr * bias2.sqrt() / bias1) * m / (v.sqrt() + group["eps"])
    return p - (lr / bias1) * m / (v.sqrt() / bias2.sqrt() + group["eps"])


def _sgd(p, g, st, k, group):
    g = _grad(p, g, group)
    momentum = group.get("momentum", 0)
    if momentum:
        buf = torch.where(
            k == 1, g, st["momentum_buffer"] * momentum + g * (1 - group.get("dampening", 0))
        )
        st["momentum_buffer"] = buf
        g = g + momentum * buf if group.get("nesterov") else buf
    return p - group["lr"] * g


def _adagrad(p, g, st, k, group):
    g = _grad(p, g, group)
    lr = group["lr"] / (1 + (k - 1) * group.get("lr_decay", 0))
    st["sum"] = st["sum"] + g * g
    return p - lr * g / (st["sum"].sqrt() + group["eps"])


def _rmsprop(p, g, st, k, group):
    g = _grad(p, g, group)
    alpha = group["alpha"]
    sq = st["square_avg"] = st["square_avg"] * alpha + g * g * (1 - alpha)
    if group.get("centered"):
        avg_g = st["grad_avg"] = st["grad_avg"].lerp(g, 1 - alpha)
        avg = (sq - avg_g * avg_g).sqrt() + group["eps"]
    else:
        avg = sq.sqrt() + group["eps"]
    if group.get("momentum", 0):
        buf = st["momentum_buffer"] = st["momentum_buffer"] * group["momentum"] + g / avg
        return p - group["lr"] * buf
    return p - group["lr"] * g / avg


def _adadelta(p, g, st, k, group):
    g = _grad(p, g, group)
    rho, eps = group["rho"], group["eps"]
    sq = st["square_avg"] = st["square_avg"] * rho + g * g * (1 - rho)
    delta = (st["acc_delta"] + eps).sqrt() / (sq + eps).sqrt() * g
    st["acc_delta"] = st["acc_delta"] * rho + delta * delta * (1 - rho)
    return p - group["lr"] * delta


def _adagrad_rmsprop(p, g, st, k, group):
    t = group["t"]
    st["sum"] = torch.where(k == 1, g * g, st["sum"] * (1 - t) + g * g * t)
    lr = group["eta"] * k ** (-0.5 + group["delta"])
    return p - lr * g / (st["sum"].sqrt() + 1)


def _zeros(p, group):
    return torch.zeros_like(p)


# family: (row function, {state key: initial value of the full tensor})
_FAMILIES: dict[str, tuple[RowFn, dict]] = {
    "Adam": (_adam, {"exp_avg": _zeros, "exp_avg_sq": _zeros, "max_exp_avg_sq": _zeros}),
    "AdamW": (
        lambda *a: _adam(*a, decoupled=True),
        {"exp_avg": _zeros, "exp_avg_sq": _zeros, "max_exp_avg_sq": _zeros},
    ),
    "PerParamClippedAdam": (  # the k-th step's lr is lr * lrd**k (not clipped_adam.ClippedAdam)
        lambda *a: _adam(*a, clipped=True),
        {"exp_avg": _zeros, "exp_avg_sq": _zeros},
    ),
    "SGD": (_sgd, {"momentum_buffer": _zeros}),
    "Adagrad": (
        _adagrad,
        {"sum": lambda p, group: torch.full_like(p, group.get("initial_accumulator_value", 0))},
    ),
    "RMSprop": (
        _rmsprop,
        {"square_avg": _zeros, "grad_avg": _zeros, "momentum_buffer": _zeros},
    ),
    "Adadelta": (_adadelta, {"square_avg": _zeros, "acc_delta": _zeros}),
    "AdagradRMSProp": (_adagrad_rmsprop, {"sum": _zeros}),
}


def supports_lazy(constructor: type) -> bool:
    """Whether ``constructor`` (a torch optimizer class) has a lazy row update."""
    return any(c.__name__ in _FAMILIES for c in constructor.__mro__)


def _family(optimizer: torch.optim.Optimizer) -> tuple[RowFn, dict]:
    for c in type(optimizer).__mro__:
        if c.__name__ in _FAMILIES:
            return _FAMILIES[c.__name__]
    raise TypeError(f"{type(optimizer).__name__} has no lazy row update")


def _row_shape(full: torch.Tensor, dim: int, n: int) -> list[int]:
    shape = [1] * full.dim()
    shape[dim] = n
    return shape


@torch.no_grad()
def update_rows(
    optimizer: torch.optim.Optimizer,
    group: dict,
    full: torch.Tensor,
    dim: int,
    index: torch.Tensor,
    grad: torch.Tensor,
) -> None:
    """Step rows ``index`` (along ``dim``) of ``full`` by their gradient ``grad``; only
    those rows' values, state and step counts change."""
    fn, keys = _family(optimizer)
    state = optimizer.state[full]
    n = full.shape[dim]
    steps = state.get("step")
    if steps is None or steps.dim() == 0:
        # none yet, or dense steps so far (torch's one count for all rows)
        start = 0.0 if steps is None else float(steps)
        if steps is None and "momentum_buffer" in state:
            start = 1.0  # torch's SGD keeps no count; its buffer means it has stepped
        steps = state["step"] = torch.full((n,), start, dtype=torch.float32, device=full.device)
    wanted = [key for key in keys if key in state or _needs(key, group)]
    for key in wanted:
        if key not in state or state[key] is None:
            state[key] = keys[key](full, group)
    k = steps.index_select(0, index) + 1
    steps.index_copy_(0, index, k)
    row_state = {key: state[key].index_select(dim, index) for key in wanted}
    p = full.index_select(dim, index)
    k = k.to(p.dtype).reshape(_row_shape(full, dim, len(index)))
    new = fn(p, grad, row_state, k, group)
    full.index_copy_(dim, index, new)
    for key in wanted:
        state[key].index_copy_(dim, index, row_state[key])


def _needs(key: str, group: dict) -> bool:
    if key == "max_exp_avg_sq":
        return bool(group.get("amsgrad"))
    if key == "grad_avg":
        return bool(group.get("centered"))
    if key == "momentum_buffer":
        return bool(group.get("momentum", 0))
    return True
