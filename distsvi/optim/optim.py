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

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..params import _PARAM_STORE
from . import rows as _rows

LOCAL_UPDATES = ("dense", "lazy")


def _key(args: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in args.items()))


def _foreach_default(constructor: type, args: dict) -> dict:
    """``args`` with ``foreach=True`` unless the caller chose: torch picks foreach kernels on
    CUDA only, but on CPU too one foreach kernel per update term beats a Python loop over
    params (the same arithmetic, in the same order, per element)."""
    if "foreach" in args or "foreach" not in inspect.signature(constructor).parameters:
        return args
    return {**args, "foreach": True}


class _Cohort:
    """One torch optimizer (and, for schedulers, its scheduler) over params born together."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.group_of: dict[tuple, dict] = {}
        self.scheduler: Any = None
        self.stepped = False  # has the schedule advanced since this cohort began?

    def find_group(self, p: torch.Tensor) -> dict:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("param not in optimizer")


class PyroOptim:
    """Wrap a ``torch.optim.Optimizer`` class with Pyro's call and state interface.

    :param optim_constructor: a ``torch.optim.Optimizer`` subclass.
    :param optim_args: its options, or a callable ``param_name -> options``.
    :param clip_args: optional ``{"clip_norm": x}`` or ``{"clip_value": x}`` applied to each
        param's gradient before the step (as in Pyro).
    :param local_updates: how local params (one row per datapoint, read in a subsampled
        plate) are updated, given the rows of a step's batch: ``"dense"`` (default) steps
        every row, as Pyro does (an unvisited row still moves by its momentum);
        ``"lazy"`` steps only the visited rows, whose values, optimizer state and step
        counts (for bias corrections) advance only when they are in a batch, so each
        row behaves as its own optimizer stepped when visited, and a step costs its
        batch, not the data. For SGD without momentum and for Adagrad both give the same
        numbers; for Adam and other optimizers with momentum they differ.
    """

    def __init__(
        self,
        optim_constructor: type,
        optim_args: dict | Callable[[str], dict],
        clip_args: dict | None = None,
        local_updates: str = "dense",
    ) -> None:
        if not (isinstance(optim_args, dict) or callable(optim_args)):
            raise TypeError(
                f"optim_args must be a dict or a callable name -> dict, got {optim_args!r}"
            )
        if local_updates not in LOCAL_UPDATES:
            raise ValueError(f"local_updates must be 'dense' or 'lazy', got {local_updates!r}")
        if local_updates == "lazy" and not _rows.supports_lazy(optim_constructor):
            raise ValueError(
                f"local_updates='lazy' is not available for {optim_constructor.__name__}; "
                "use local_updates='dense' or one of distsvi.optim's optimizers"
            )
        self.local_updates = local_updates
        self.pt_optim_constructor = optim_constructor
        self.pt_optim_args = optim_args
        self.pt_clip_args = clip_args or {}
        if self.pt_clip_args and set(self.pt_clip_args) - {"clip_norm", "clip_value", "norm_type"}:
            raise ValueError(f"clip_args takes clip_norm or clip_value, got {sorted(clip_args)}")
        self._cohorts: list[_Cohort] = []
        self._cohort_of: dict[str, _Cohort] = {}
        self._params: dict[str, torch.Tensor] = {}
        self._pending: dict[str, dict] = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer (the first one, when a scheduler started several)."""
        return self._cohorts[0].optimizer if self._cohorts else None

    # the step -----------------------------------------------------------------------
    def __call__(
        self,
        params: dict[str, torch.Tensor] | Iterable[torch.Tensor],
        *args: Any,
        rows: list | None = None,
        **kwargs: Any,
    ) -> None:
        """Step the optimizer over ``params`` (``{name: unconstrained tensor}``).

        ``rows``: row gradients of local params (the ``RowGrad`` tuples of
        :mod:`distsvi.params.rows`, which SVI's step passes when ``local_updates`` is
        ``"lazy"``): only those rows of those params step.
        """
        if not isinstance(params, dict):
            params = {_name_of(p): p for p in params}
        known = self._params
        for name, p in params.items():
            if known.get(name) is not p:
                self._add(name, p)
        for rg in rows or ():
            if known.get(rg.name) is not rg.full:
                self._add(rg.name, rg.full)
        if self.pt_clip_args:
            self._clip(params.values())
            # a row gradient's norm is its param's (the other rows' gradients are zero)
            self._clip([_grad_view(rg.grad) for rg in rows or ()])
        for cohort in self._cohorts:
            cohort.optimizer.step(*args, **kwargs)
        for rg in rows or ():
            cohort = self._cohort_of[rg.name]
            group = cohort.find_group(rg.full)
            _rows.update_rows(cohort.optimizer, group, rg.full, rg.dim, rg.index, rg.grad)

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
            # As in Pyro: one argument gets nn.Module-style names ("net.0.weight"); two get
            # (module name, param name).
            if len(inspect.signature(args).parameters) >= 2:
                module, _, pname = name.rpartition("$$$")
                args = args(module or None, pname)
            else:
                args = args(name.replace("$$$", "."))
            if not isinstance(args, dict):
                raise TypeError(
                    f"per-param optim callable returned {args!r} for param {name!r}; "
                    "it must return a dict"
                )
        return dict(args)

    def _cohort_for(self, name: str) -> _Cohort:
        """Where a new param goes: without a schedule, always the one cohort."""
        if not self._cohorts:
            self._cohorts.append(_Cohort())
        return self._cohorts[-1]

    def _add(self, name: str, p: torch.Tensor) -> None:
        old = self._params.get(name)
        if old is not None:
            # The param was re-created (store cleared, module reloaded): fresh state, as in Pyro.
            cohort = self._cohort_of[name]
            group = cohort.find_group(old)
            group["params"][[q is old for q in group["params"]].index(True)] = p
            cohort.optimizer.state.pop(old, None)
        else:
            cohort = self._cohort_for(name)
            args = self._args_for(name)
            key = _key(args)
            group = cohort.group_of.get(key)
            if group is not None:
                group["params"].append(p)
            elif cohort.optimizer is None:
                cohort.optimizer = self.pt_optim_constructor(
                    [p], **_foreach_default(self.pt_optim_constructor, args)
                )
                cohort.group_of[key] = cohort.optimizer.param_groups[0]
                self._on_create(cohort)
            else:
                first = cohort.optimizer.param_groups[0]
                cohort.optimizer.add_param_group({"params": [p], **args})
                new = cohort.optimizer.param_groups[-1]
                for k, v in first.items():  # scheduler bookkeeping (initial_lr, max_lr, ...)
                    new.setdefault(k, v)
                cohort.group_of[key] = new
            self._cohort_of[name] = cohort
        self._params[name] = p
        pending = self._pending.pop(name, None)
        if pending is not None:
            self._load_one(name, p, pending)

    def _on_create(self, cohort: _Cohort) -> None:
        """Called once a cohort's torch optimizer exists (schedulers attach theirs here)."""

    # state ----------------------------------------------------------------------------
    def get_state(self) -> dict:
        """``{param name: {"state": per-param state, "group": options}}``."""
        out = {}
        for name, p in self._params.items():
            cohort = self._cohort_of[name]
            group = cohort.find_group(p)
            state = cohort.optimizer.state.get(p, {})
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
        cohort = self._cohort_of[name]
        cohort.optimizer.state[p] = {
            k: (v.clone().to(p.device) if v.dim() else v.clone()) if torch.is_tensor(v) else v
            for k, v in entry["state"].items()
        }
        group = cohort.find_group(p)
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


def _grad_view(grad: torch.Tensor) -> torch.Tensor:
    """A stand-in param (no storage of its own) whose ``grad`` is a row gradient, so that
    row gradients are clipped by the same code as whole ones."""
    view = grad.new_empty(()).expand(grad.shape)
    view.grad = grad
    return view


def _name_of(p: torch.Tensor) -> str:
    name = _PARAM_STORE.param_name(p)
    if name is None:
        raise ValueError(
            "optimizer was given a tensor that is not in the param store; create it with "
            "distsvi.param, or pass {name: tensor} for params kept elsewhere"
        )
    return name


class _ClippedAdamTorch(torch.optim.Optimizer):
    """Adam with element-wise gradient clipping and per-step learning-rate decay.

    At a param's k-th step the learning rate is ``lr * lrd**k`` (Pyro's ClippedAdam,
    where each param has its own optimizer), and its gradient is clamped to
    ``[-clip_norm, clip_norm]``. With ``centered_variance`` the second moment tracks
    ``(grad - exp_avg)**2``.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        clip_norm=10.0,
        lrd=1.0,
        centered_variance=False,
    ):
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
                dev = grad - exp_avg if group["centered_variance"] else grad
                exp_avg_sq.mul_(beta2).addcmul_(dev, dev, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = lr * math.sqrt(1 - beta2**k) / (1 - beta1**k)
                p.addcdiv_(exp_avg, denom, value=-step_size)


def _factory(constructor: type, doc: str, name: str | None = None) -> Callable[..., PyroOptim]:
    def make(
        optim_args: dict | Callable[[str], dict],
        clip_args: dict | None = None,
        local_updates: str = "dense",
    ) -> PyroOptim:
        return PyroOptim(constructor, optim_args, clip_args, local_updates)

    make.__doc__ = doc
    make.__name__ = make.__qualname__ = name or constructor.__name__
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
    "ClippedAdam",
)


class PyroLRScheduler(PyroOptim):
    """An optimizer whose learning rate follows a ``torch.optim.lr_scheduler``.

    :param scheduler_constructor: a ``torch.optim.lr_scheduler`` class.
    :param optim_args: ``{"optimizer": torch.optim.X, "optim_args": {...}, **scheduler_kwargs}``,
        as in Pyro.

    Call :meth:`step` (with the metric for ``ReduceLROnPlateau``) to advance the schedule.
    As in Pyro, a param's schedule starts when the param first appears: params created
    together share one torch optimizer and scheduler; a param that appears after the
    schedule has advanced starts a new pair.
    """

    def __init__(
        self,
        scheduler_constructor: type,
        optim_args: dict,
        clip_args: dict | None = None,
        local_updates: str = "dense",
    ) -> None:
        args = dict(optim_args)
        try:
            optimizer = args.pop("optimizer")
            inner = args.pop("optim_args")
        except KeyError as e:
            raise ValueError(
                f"scheduler args need {e.args[0]!r}: "
                "{'optimizer': torch.optim.Adam, 'optim_args': {'lr': 0.01}, ...}"
            ) from None
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"scheduler 'optimizer' must be a torch.optim.Optimizer class such as "
                f"torch.optim.Adam, got {optimizer!r}"
            )
        super().__init__(optimizer, inner, clip_args, local_updates)
        self.scheduler_constructor = scheduler_constructor
        self.kwargs = args
        self._saved_cohorts: list[dict] = []  # from set_state, not yet matched to params
        self._live_of_saved: dict[int, _Cohort] = {}

    @property
    def scheduler(self) -> Any:
        """The torch scheduler (the first one, when late params started several)."""
        return self._cohorts[0].scheduler if self._cohorts else None

    def _cohort_for(self, name: str) -> _Cohort:
        for i, saved in enumerate(self._saved_cohorts):
            if name in saved["names"]:
                if i not in self._live_of_saved:
                    self._cohorts.append(_Cohort())
                    self._live_of_saved[i] = self._cohorts[-1]
                return self._live_of_saved[i]
        if not self._cohorts or self._cohorts[-1].stepped:
            self._cohorts.append(_Cohort())
        return self._cohorts[-1]

    def _on_create(self, cohort: _Cohort) -> None:
        cohort.scheduler = self.scheduler_constructor(cohort.optimizer, **self.kwargs)
        for i, live in self._live_of_saved.items():
            if live is cohort:
                cohort.scheduler.load_state_dict(self._saved_cohorts[i]["scheduler"])
                cohort.stepped = self._saved_cohorts[i].get("stepped", True)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance every learning-rate schedule by one step (epoch)."""
        for cohort in self._cohorts:
            if cohort.scheduler is not None:
                cohort.scheduler.step(*args, **kwargs)
                cohort.stepped = True

    def get_state(self) -> dict:
        cohorts = [
            {
                "names": [n for n, c in self._cohort_of.items() if c is cohort],
                "scheduler": cohort.scheduler.state_dict(),
                "stepped": cohort.stepped,
            }
            for cohort in self._cohorts
            if cohort.scheduler is not None
        ]
        live = {n for c in cohorts for n in c["names"]}
        cohorts += [
            c
            for i, c in enumerate(self._saved_cohorts)
            if i not in self._live_of_saved and not live & set(c["names"])
        ]
        return {"params": super().get_state(), "cohorts": cohorts}

    def set_state(self, state: dict) -> None:
        super().set_state(state["params"])
        for saved in state.get("cohorts", []):
            live = {
                id(self._cohort_of[n]): self._cohort_of[n]
                for n in saved["names"]
                if n in self._cohort_of
            }
            if live:
                for cohort in live.values():
                    cohort.scheduler.load_state_dict(saved["scheduler"])
                    cohort.stepped = saved.get("stepped", True)
            else:
                self._saved_cohorts.append(saved)


def _scheduler(cls: type) -> Callable[..., PyroLRScheduler]:
    def make(
        optim_args: dict, clip_args: dict | None = None, local_updates: str = "dense"
    ) -> PyroLRScheduler:
        return PyroLRScheduler(cls, optim_args, clip_args, local_updates)

    make.__doc__ = f"``torch.optim.lr_scheduler.{cls.__name__}`` with Pyro's interface."
    make.__name__ = make.__qualname__ = cls.__name__
    return make


_SCHEDULERS = {
    name: cls
    for name, cls in vars(torch.optim.lr_scheduler).items()
    if isinstance(cls, type)
    and issubclass(
        cls, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    )
    and not name.startswith("_")
    and name not in ("LRScheduler", "_LRScheduler")
}
globals().update({name: _scheduler(cls) for name, cls in _SCHEDULERS.items()})

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "ClippedAdam",
    "PyroLRScheduler",
    "PyroOptim",
    "RMSprop",
]
__all__ += list(_SCHEDULERS)
