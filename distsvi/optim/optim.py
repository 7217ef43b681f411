"""Optimizers with Pyro's interface over one torch optimizer.

``Adam({"lr": 0.01})`` behaves like ``pyro.optim.Adam``: it is called with the params of
a step and updates them; new params join lazily. Unlike Pyro there is one
``torch.optim`` optimizer for all params (params sharing the same options share one
param group, so foreach kernels batch them), not one optimizer per param. State is
saved in Pyro's layout, keyed by param *name* (``{name: that param's optimizer
state_dict}``), so it loads into a store whose params were created in another order, and
Pyro's saved states load here.

Options may be a dict or a callable ``name -> dict`` (per-param options, as in Pyro).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch

from ..params import _PARAM_STORE
from . import rows as _rows
from .adagrad_rmsprop import AdagradRMSProp as _AdagradRMSPropTorch
from .clipped_adam import PerParamClippedAdam

LOCAL_UPDATES = ("dense", "lazy")


def _key(args: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in args.items()))


# Options that say how torch runs a step, not what the step computes: saved as Pyro saves
# them (None) and not taken from a loaded state, so a state moves between devices, torch
# versions and Pyro.
_KERNEL_OPTIONS = ("foreach", "fused")


def _foreach_default(constructor: type, args: dict) -> dict:
    """``args`` with ``foreach=True`` unless the caller chose: torch picks foreach kernels on
    CUDA only, but on CPU too one foreach kernel per update term beats a Python loop over
    params (the same arithmetic, in the same order, per element)."""
    if (
        "foreach" in args
        or args.get("fused")
        or "foreach" not in inspect.signature(constructor).parameters
    ):
        return args
    return {**args, "foreach": True}


def _fastest(constructor: type, p: torch.Tensor, args: dict) -> torch.optim.Optimizer:
    """The torch optimizer over ``[p]`` on its fastest kernels, unless ``args`` choose.

    ``fused`` for Adam and AdamW where torch has the kernel for the param's device: one
    kernel per step for all params, where foreach runs one per update term. A model's
    params are mostly small tensors, so the per-kernel cost is the step's (measured on
    CPU: Adam over the four params of a 30-feature AutoNormal, 89 us fused against 271 us
    foreach). The arithmetic is the same; the fused kernel may round differently, by about
    one unit in the last place per step. Otherwise foreach (see :func:`_foreach_default`).
    """
    # Adam and AdamW only: their fused kernels cover what their other kernels do, where
    # fused SGD and Adagrad refuse sparse gradients that their default kernels take.
    adam_like = isinstance(constructor, type) and issubclass(
        constructor, (torch.optim.Adam, torch.optim.AdamW)
    )
    if adam_like and not ({"fused", "foreach", "differentiable"} & set(args)):
        try:
            optimizer = constructor([p], **args, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
            pass
        else:
            optimizer._fused_by_distsvi = True  # see PyroOptim.prefer_foreach
            return optimizer
    return constructor([p], **_foreach_default(constructor, args))


class _Cohort:
    """One torch optimizer (and, with a schedule, its scheduler) over params born together.

    Without a schedule there is one cohort for every param. With one, the rule is Pyro's,
    where each param has its own scheduler started when the param first appears: params
    that appear before the schedule is next stepped start their schedules together, so
    they share one optimizer and one scheduler here. A cohort is *open* until its schedule
    first steps (``closed`` False: newcomers join it) and *closed* after (a newcomer
    starts a new cohort). A param resumed from saved state joins the cohort that resumes
    its saved schedule (see ``PyroLRScheduler._resumed``).
    """

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.group_of: dict[tuple, dict] = {}
        self.scheduler: Any = None
        self.closed = False  # the schedule advanced since this cohort began: no newcomers

    def group_index(self, p: torch.Tensor) -> int:
        for i, group in enumerate(self.optimizer.param_groups):
            if any(q is p for q in group["params"]):
                return i
        raise KeyError("param not in optimizer")

    def find_group(self, p: torch.Tensor) -> dict:
        return self.optimizer.param_groups[self.group_index(p)]


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

    def prefer_foreach(self) -> None:
        """Step with foreach kernels where fused ones were picked by default, not asked for.

        For a step under ``torch.compile``: it turns foreach updates into one generated
        kernel, while the fused kernel stays an opaque call (measured on CPU, Adam over
        four small params: 77 us compiled foreach against 185 us compiled fused).
        """
        for cohort in self._cohorts:
            optimizer = cohort.optimizer
            if getattr(optimizer, "_fused_by_distsvi", False):
                for options in (optimizer.defaults, *optimizer.param_groups):
                    options.update(fused=None, foreach=True)
                optimizer._fused_by_distsvi = False

    @property
    def optim_objs(self) -> dict[torch.Tensor, ParamOptimizer]:
        """Pyro's ``{param tensor: its optimizer}``: here each value is a view of that param's
        share of the one torch optimizer (its group, its state, its ``state_dict``)."""
        return {p: ParamOptimizer(self, name) for name, p in self._params.items()}

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
                cohort.optimizer = _fastest(self.pt_optim_constructor, p, args)
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
    def get_state(self, leave_out: dict[str, Collection[str]] | None = None) -> dict:
        """Pyro's layout: ``{param name: that param's optimizer state_dict}``, i.e.
        ``{"state": {0: {...}}, "param_groups": [{options..., "params": [0]}]}``.

        :param leave_out: ``{param name: state keys}`` not to copy (a checkpoint writes
            those tensors of local params shard by shard, see :meth:`live_state`).
        """
        leave_out = leave_out or {}
        out = {name: self._param_entry(name, leave_out.get(name, ())) for name in self._params}
        for name, entry in self._pending.items():
            out.setdefault(name, entry)
        return out

    def set_state(self, state: dict) -> None:
        """Load :meth:`get_state` output (also Pyro's, and the earlier
        ``{name: {"state", "group"}}`` layout); params not seen yet get theirs on first use."""
        for name, entry in self._normalized(state).items():
            p = self._params.get(name)
            if p is None:
                self._pending[name] = entry
            else:
                self._load_one(name, p, entry)

    def _normalized(self, state: dict) -> dict:
        return {name: _pyro_entry(name, entry) for name, entry in state.items()}

    def live_state(self, name: str) -> dict:
        """The optimizer's own state of param ``name`` (not a copy; empty before its first
        step)."""
        p = self._params[name]
        return self._cohort_of[name].optimizer.state.get(p, {})

    def _param_entry(self, name: str, leave_out: Collection[str] = ()) -> dict:
        p = self._params[name]
        cohort = self._cohort_of[name]
        state = cohort.optimizer.state.get(p, {})
        if leave_out:
            state = {k: v for k, v in state.items() if k not in leave_out}
        options = {k: v for k, v in cohort.find_group(p).items() if k != "params"}
        for k in _KERNEL_OPTIONS:
            if k in options:
                options[k] = None  # Pyro's default: which kernels step is not state
        export = getattr(cohort.optimizer, "export_options", None)
        if export is not None:
            options = export(options, state)
        return {
            "state": {0: {k: _clone(v) for k, v in state.items()}} if state else {},
            "param_groups": [{**options, "params": [0]}],
        }

    def _load_one(self, name: str, p: torch.Tensor, entry: dict) -> None:
        cohort = self._cohort_of[name]
        saved = entry["state"].get(0, {})
        if saved:
            cohort.optimizer.state[p] = {
                k: _clone(v).to(p.device) if torch.is_tensor(v) and v.dim() else _clone(v)
                for k, v in saved.items()
            }
        options = {
            k: v
            for k, v in entry["param_groups"][0].items()
            if k != "params" and k not in _KERNEL_OPTIONS  # this process picks its kernels
        }
        restore = getattr(cohort.optimizer, "import_options", None)
        if restore is not None:
            options = restore(options, saved)
        cohort.find_group(p).update(options)

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


def _clone(v: Any) -> Any:
    return v.clone() if torch.is_tensor(v) else v


def _pyro_entry(name: str, entry: Any) -> dict:
    """One param's saved optimizer state in Pyro's layout (converting the earlier one)."""
    if not isinstance(entry, dict):
        raise TypeError(f"optimizer state of param {name!r} is {type(entry).__name__}, not a dict")
    if "param_groups" in entry and "state" in entry:
        return entry
    if "group" in entry and "state" in entry:  # written before the layout was Pyro's
        state, group = entry["state"], dict(entry["group"])
        if "lrd" in group and "lr" in group:  # ClippedAdam then saved its undecayed lr
            group["lr"] *= group["lrd"] ** int(state.get("step", 0))
        return {"state": {0: state} if state else {}, "param_groups": [{**group, "params": [0]}]}
    raise ValueError(
        f"optimizer state of param {name!r} has keys {sorted(entry)}; expected a torch "
        "optimizer state_dict ('state', 'param_groups'), as get_state() writes"
    )


def without_hyperparameters(state: dict) -> dict:
    """Saved optimizer state (any layout :meth:`PyroOptim.set_state` takes) whose options
    (lr, betas, ...) give way to the current ones: moments, step counts and schedules stay."""

    def strip(entry: dict) -> dict:
        return {**entry, "param_groups": [{"params": [0]}]}

    if set(state) == {"params", "cohorts"}:  # a schedule's state in the earlier layout
        state = schedule_entries(state)
    out = {}
    for name, entry in state.items():
        if isinstance(entry, dict) and "scheduler" in entry and "optimizer" in entry:
            out[name] = {**entry, "optimizer": strip(_pyro_entry(name, entry["optimizer"]))}
        else:
            out[name] = strip(_pyro_entry(name, entry))
    return out


# Scheduler state entries that hold one value per param group (torch's schedulers).
PER_GROUP_KEYS = frozenset(
    ("base_lrs", "_last_lr", "min_lrs", "lr_lambdas", "max_lrs", "base_momentums", "max_momentums")
)


def schedule_entries(state: dict) -> dict:
    """A schedule's state saved as ``{"params": ..., "cohorts": [...]}`` (the layout before
    Pyro's) as Pyro's ``{name: {"scheduler": ..., "optimizer": ...}}``."""
    params = {n: _pyro_entry(n, e) for n, e in state["params"].items()}
    out: dict[str, dict] = {}
    for cohort in state["cohorts"]:
        for name in cohort["names"]:
            if name in params:
                entry = params.pop(name)
                schedule = _one_group(cohort["scheduler"], entry["param_groups"][0])
                out[name] = {"scheduler": schedule, "optimizer": entry}
    out.update({n: {"scheduler": None, "optimizer": e} for n, e in params.items()})
    return out


def _one_group(schedule: dict, group: dict) -> dict:
    """A cohort's scheduler state cut down to the one group ``group`` (found by its lrs)."""
    lists = {k: v for k, v in schedule.items() if k in PER_GROUP_KEYS and isinstance(v, list)}
    width = max((len(v) for v in lists.values()), default=1)
    i = 0
    for j in range(width):
        base, last = schedule.get("base_lrs", []), schedule.get("_last_lr", [])
        if (j >= len(base) or base[j] == group.get("initial_lr")) and (
            j >= len(last) or last[j] == group.get("lr")
        ):
            i = j
            break
    return {**schedule, **{k: v[min(i, len(v) - 1) :][:1] for k, v in lists.items()}}


class ParamOptimizer:
    """``optim.optim_objs[p]``: Pyro's per-param optimizer, as a view of ``p``'s share of the
    one torch optimizer. ``param_groups`` holds ``p``'s group, which other params with the
    same options share, so setting its ``lr`` sets theirs too."""

    def __init__(self, owner: PyroOptim, name: str) -> None:
        self._owner, self._name = owner, name

    @property
    def _param(self) -> torch.Tensor:
        return self._owner._params[self._name]

    @property
    def _torch(self) -> torch.optim.Optimizer:
        return self._owner._cohort_of[self._name].optimizer

    @property
    def param_groups(self) -> list[dict]:
        return [self._owner._cohort_of[self._name].find_group(self._param)]

    @property
    def state(self) -> dict:
        p = self._param
        return {p: self._torch.state[p]}  # torch's state is a defaultdict, as in Pyro

    @property
    def defaults(self) -> dict:
        return self._torch.defaults

    def state_dict(self) -> dict:
        return self._owner._param_entry(self._name)

    def load_state_dict(self, state_dict: dict) -> None:
        self._owner._load_one(self._name, self._param, _pyro_entry(self._name, state_dict))

    def __repr__(self) -> str:
        return f"<{type(self._torch).__name__} of param {self._name!r}>"


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
AdagradRMSProp = _factory(
    _AdagradRMSPropTorch,
    "Pyro's ``AdagradRMSProp`` (the ADVI step-size rule; options ``eta``, ``delta``, ``t``) "
    "with Pyro's interface.",
    "AdagradRMSProp",
)
ClippedAdam = _factory(
    PerParamClippedAdam,
    "Adam with element-wise gradient clipping (``clip_norm``) and learning-rate decay "
    "``lrd`` per step, as Pyro's ``ClippedAdam``.",
    "ClippedAdam",
)


__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "AdagradRMSProp",
    "Adam",
    "AdamW",
    "ClippedAdam",
    "PyroOptim",
    "RMSprop",
]
