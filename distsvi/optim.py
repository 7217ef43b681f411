"""Optimizers with Pyro's interface over one torch optimizer.

``Adam({"lr": 0.01})`` behaves like ``pyro.optim.Adam``: it is called with the params of
a step and updates them; new params join lazily. Unlike Pyro there is one
``torch.optim`` optimizer for all params (params sharing the same options share one
param group, so foreach kernels batch them), not one optimizer per param. State is
saved keyed by param *name*, so it loads into a store whose params were created in
another order.

Options may be a dict or a callable ``name -> dict`` (per-param options, as in Pyro).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from .params import _PARAM_STORE


def _key(args: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in args.items()))


class PyroOptim:
    """Wrap a ``torch.optim.Optimizer`` class with Pyro's call and state interface.

    :param optim_constructor: a ``torch.optim.Optimizer`` subclass.
    :param optim_args: its options, or a callable ``param_name -> options``.
    :param clip_args: optional ``{"clip_norm": x}`` or ``{"clip_value": x}`` applied to each
        param's gradient before the step (as in Pyro).
    """

    def __init__(
        self,
        optim_constructor: type,
        optim_args: dict | Callable[[str], dict],
        clip_args: dict | None = None,
    ) -> None:
        if not (isinstance(optim_args, dict) or callable(optim_args)):
            raise TypeError(f"optim_args must be a dict or a callable name -> dict, got {optim_args!r}")
        self.pt_optim_constructor = optim_constructor
        self.pt_optim_args = optim_args
        self.pt_clip_args = clip_args or {}
        if self.pt_clip_args and set(self.pt_clip_args) - {"clip_norm", "clip_value", "norm_type"}:
            raise ValueError(f"clip_args takes clip_norm or clip_value, got {sorted(clip_args)}")
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: dict[str, torch.Tensor] = {}
        self._group_of: dict[tuple, dict] = {}
        self._pending: dict[str, dict] = {}

    # the step -----------------------------------------------------------------------
    def __call__(self, params: dict[str, torch.Tensor] | Iterable[torch.Tensor], *args, **kwargs):
        """Step the optimizer over ``params`` (``{name: unconstrained tensor}``)."""
        if not isinstance(params, dict):
            params = {_name_of(p): p for p in params}
        known = self._params
        for name, p in params.items():
            if known.get(name) is not p:
                self._add(name, p)
        if self.pt_clip_args:
            self._clip(params.values())
        self.optimizer.step(*args, **kwargs)

    def _clip(self, params: Iterable[torch.Tensor]) -> None:
        clip = self.pt_clip_args
        for p in params:
            if p.grad is None:
                continue
            if "clip_norm" in clip:
                torch.nn.utils.clip_grad_norm_(p, clip["clip_norm"], clip.get("norm_type", 2.0))
            if "clip_value" in clip:
                torch.nn.utils.clip_grad_value_(p, clip["clip_value"])

    def _args_for(self, name: str) -> dict:
        args = self.pt_optim_args
        if callable(args):
            args = args(name)
            if not isinstance(args, dict):
                raise TypeError(f"per-param optim callable returned {args!r} for param {name!r}; it must return a dict")
        return dict(args)

    def _add(self, name: str, p: torch.Tensor) -> None:
        old = self._params.get(name)
        if old is not None:
            # The param was re-created (store cleared, module reloaded): fresh state, as in Pyro.
            group = self._find_group(old)
            group["params"][[q is old for q in group["params"]].index(True)] = p
            self.optimizer.state.pop(old, None)
        else:
            args = self._args_for(name)
            key = _key(args)
            group = self._group_of.get(key)
            if group is not None:
                group["params"].append(p)
            elif self.optimizer is None:
                self.optimizer = self.pt_optim_constructor([p], **args)
                self._on_create(self.optimizer)
                self._group_of[key] = self.optimizer.param_groups[0]
            else:
                first = self.optimizer.param_groups[0]
                self.optimizer.add_param_group({"params": [p], **args})
                new = self.optimizer.param_groups[-1]
                for k, v in first.items():  # scheduler bookkeeping (initial_lr, max_lr, ...)
                    new.setdefault(k, v)
                self._group_of[key] = new
        self._params[name] = p
        pending = self._pending.pop(name, None)
        if pending is not None:
            self._load_one(name, p, pending)

    def _on_create(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def _find_group(self, p: torch.Tensor) -> dict:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("param not in optimizer")

    # state ----------------------------------------------------------------------------
    def get_state(self) -> dict:
        """``{param name: {"state": per-param state, "group": options}}``."""
        out = {}
        for name, p in self._params.items():
            group = self._find_group(p)
            state = self.optimizer.state.get(p, {})
            out[name] = {
                "state": {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()},
                "group": {k: v for k, v in group.items() if k != "params"},
            }
        for name, entry in self._pending.items():
            out.setdefault(name, entry)
        return out

    def set_state(self, state: dict) -> None:
        """Load :meth:`get_state` output; params not seen yet get their state on first use."""
        for name, entry in state.items():
            p = self._params.get(name)
            if p is None:
                self._pending[name] = entry
            else:
                self._load_one(name, p, entry)

    def _load_one(self, name: str, p: torch.Tensor, entry: dict) -> None:
        self.optimizer.state[p] = {
            k: (v.clone().to(p.device) if v.dim() else v.clone()) if torch.is_tensor(v) else v
            for k, v in entry["state"].items()
        }
        group = self._find_group(p)
        for k, v in entry["group"].items():
            group[k] = v

    def save(self, filename: str) -> None:
        """Write the optimizer state (by param name) to ``filename``."""
        torch.save(self.get_state(), filename)

    def load(self, filename: str, map_location: Any = None) -> None:
        """Read a file written by :meth:`save`."""
        self.set_state(torch.load(filename, map_location=map_location, weights_only=True))

    @property
    def lr(self) -> float | None:
        """The learning rate of the first param group (``None`` before the first step)."""
        if self.optimizer is None:
            args = self.pt_optim_args
            return args.get("lr") if isinstance(args, dict) else None
        return self.optimizer.param_groups[0]["lr"]


def _name_of(p: torch.Tensor) -> str:
    name = _PARAM_STORE.param_name(p)
    if name is None:
        raise ValueError("optimizer was given a tensor that is not in the param store")
    return name


class _ClippedAdamTorch(torch.optim.Optimizer):
    """Adam with element-wise gradient clipping and per-step learning-rate decay.

    At a param's k-th step the learning rate is ``lr * lrd**k`` (Pyro's ClippedAdam,
    where each param has its own optimizer), and its gradient is clamped to
    ``[-clip_norm, clip_norm]``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 clip_norm=10.0, lrd=1.0):
        if not lr > 0:
            raise ValueError(f"ClippedAdam lr must be > 0, got {lr}")
        if not clip_norm > 0:
            raise ValueError(f"ClippedAdam clip_norm must be > 0, got {clip_norm}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        clip_norm=clip_norm, lrd=lrd)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
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
                lr = group["lr"] * group["lrd"] ** k
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = lr * math.sqrt(1 - beta2**k) / (1 - beta1**k)
                p.addcdiv_(exp_avg, denom, value=-step_size)


def _factory(constructor: type, doc: str, **fixed: Any) -> Callable[..., PyroOptim]:
    def make(optim_args: dict | Callable[[str], dict], clip_args: dict | None = None) -> PyroOptim:
        if fixed and isinstance(optim_args, dict):
            optim_args = {**fixed, **optim_args}
        return PyroOptim(constructor, optim_args, clip_args)

    make.__doc__ = doc
    return make


Adam = _factory(torch.optim.Adam, "``torch.optim.Adam`` with Pyro's interface.")
AdamW = _factory(torch.optim.AdamW, "``torch.optim.AdamW`` with Pyro's interface.")
SGD = _factory(torch.optim.SGD, "``torch.optim.SGD`` with Pyro's interface.")
RMSprop = _factory(torch.optim.RMSprop, "``torch.optim.RMSprop`` with Pyro's interface.")
Adagrad = _factory(torch.optim.Adagrad, "``torch.optim.Adagrad`` with Pyro's interface.")
Adadelta = _factory(torch.optim.Adadelta, "``torch.optim.Adadelta`` with Pyro's interface.")
ClippedAdam = _factory(
    _ClippedAdamTorch,
    "Adam with element-wise gradient clipping (``clip_norm``) and learning-rate decay "
    "``lrd`` per step, as Pyro's ``ClippedAdam``.",
)


class PyroLRScheduler(PyroOptim):
    """An optimizer whose learning rate follows a ``torch.optim.lr_scheduler``.

    :param scheduler_constructor: a ``torch.optim.lr_scheduler`` class.
    :param optim_args: ``{"optimizer": torch.optim.X, "optim_args": {...}, **scheduler_kwargs}``,
        as in Pyro.

    Call :meth:`step` (with the metric for ``ReduceLROnPlateau``) to advance the schedule.
    """

    def __init__(self, scheduler_constructor: type, optim_args: dict, clip_args: dict | None = None):
        args = dict(optim_args)
        try:
            optimizer = args.pop("optimizer")
            inner = args.pop("optim_args")
        except KeyError as e:
            raise ValueError(
                f"scheduler args need {e.args[0]!r}: "
                "{'optimizer': torch.optim.Adam, 'optim_args': {'lr': 0.01}, ...}"
            ) from None
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            constructor = optimizer
        elif isinstance(optimizer, Callable) and getattr(optimizer, "__name__", "") == "make":
            raise TypeError("pass the torch optimizer class (torch.optim.Adam), not distsvi.optim.Adam")
        else:
            constructor = optimizer
        super().__init__(constructor, inner, clip_args)
        self.scheduler_constructor = scheduler_constructor
        self.kwargs = args
        self.scheduler = None
        self._pending_scheduler: dict | None = None

    def _on_create(self, optimizer: torch.optim.Optimizer) -> None:
        self.scheduler = self.scheduler_constructor(optimizer, **self.kwargs)
        if self._pending_scheduler is not None:
            self.scheduler.load_state_dict(self._pending_scheduler)
            self._pending_scheduler = None

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance the learning-rate schedule by one step (epoch)."""
        if self.scheduler is not None:
            self.scheduler.step(*args, **kwargs)

    def get_state(self) -> dict:
        state = {"params": super().get_state()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        elif self._pending_scheduler is not None:
            state["scheduler"] = self._pending_scheduler
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state["params"])
        sched = state.get("scheduler")
        if sched is not None:
            if self.scheduler is None:
                self._pending_scheduler = sched
            else:
                self.scheduler.load_state_dict(sched)


def _scheduler(cls: type) -> Callable[..., PyroLRScheduler]:
    def make(optim_args: dict, clip_args: dict | None = None) -> PyroLRScheduler:
        return PyroLRScheduler(cls, optim_args, clip_args)

    make.__doc__ = f"``torch.optim.lr_scheduler.{cls.__name__}`` with Pyro's interface."
    make.__name__ = cls.__name__
    return make


_SCHEDULERS = {
    name: cls
    for name, cls in vars(torch.optim.lr_scheduler).items()
    if isinstance(cls, type)
    and issubclass(cls, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))
    and not name.startswith("_")
    and name not in ("LRScheduler", "_LRScheduler")
}
globals().update({name: _scheduler(cls) for name, cls in _SCHEDULERS.items()})

__all__ = [
    "PyroOptim", "PyroLRScheduler", "Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adadelta",
    "ClippedAdam", *_SCHEDULERS,
]
