"""Learning-rate schedules with Pyro's interface (``pyro.optim.lr_scheduler``)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from .optim import (
    PER_GROUP_KEYS,
    ParamOptimizer,
    PyroOptim,
    _Cohort,
    _pyro_entry,
    schedule_entries,
)


class PyroLRScheduler(PyroOptim):
    """An optimizer whose learning rate follows a ``torch.optim.lr_scheduler``.

    :param scheduler_constructor: a ``torch.optim.lr_scheduler`` class.
    :param optim_args: ``{"optimizer": torch.optim.X, "optim_args": {...}, **scheduler_kwargs}``,
        as in Pyro.
    :param local_updates: ``"dense"`` or ``"lazy"``, as for :class:`~distsvi.optim.PyroOptim`.

    Call :meth:`step` (with the metric for ``ReduceLROnPlateau``) to advance the schedule.
    As in Pyro, a param's schedule starts when the param first appears: params created
    together share one torch optimizer and scheduler; a param that appears after the
    schedule has advanced starts a new pair (see ``_Cohort``). ``get_state`` holds, per
    param, Pyro's ``{"scheduler": ..., "optimizer": ...}``; on loading, params whose saved
    schedules are equal (all but the per-group lists) resume in one cohort.
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
        self.pt_scheduler_constructor = self.scheduler_constructor = scheduler_constructor
        self.kwargs = args
        # A saved schedule (by _schedule_key) -> the cohort that resumes it: its params may
        # come back one by one, in any order, and must share that cohort again.
        self._resumed: dict[str, _Cohort] = {}

    @property
    def scheduler(self) -> Any:
        """The torch scheduler (the first one, when late params started several)."""
        return self._cohorts[0].scheduler if self._cohorts else None

    @property
    def optim_objs(self) -> dict[torch.Tensor, ParamScheduler]:
        """Pyro's ``{param tensor: its scheduler}``, as views of the shared schedulers."""
        return {p: ParamScheduler(self, name) for name, p in self._params.items()}

    def _cohort_for(self, name: str) -> _Cohort:
        schedule = (self._pending.get(name) or {}).get("scheduler")
        if schedule:
            key = _schedule_key(schedule)
            if key not in self._resumed:
                self._resumed[key] = _Cohort()
                self._cohorts.append(self._resumed[key])
            return self._resumed[key]
        if not self._cohorts or self._cohorts[-1].closed:
            self._cohorts.append(_Cohort())
        return self._cohorts[-1]

    def _on_create(self, cohort: _Cohort) -> None:
        cohort.scheduler = self.scheduler_constructor(cohort.optimizer, **self.kwargs)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance every learning-rate schedule by one step (epoch)."""
        for cohort in self._cohorts:
            if cohort.scheduler is not None:
                cohort.scheduler.step(*args, **kwargs)
                cohort.closed = True

    # state ----------------------------------------------------------------------------
    def get_state(self, leave_out: dict[str, Collection[str]] | None = None) -> dict:
        """Pyro's layout: ``{param name: {"scheduler": its scheduler's state_dict,
        "optimizer": its optimizer's state_dict}}`` (``leave_out`` as in
        :meth:`PyroOptim.get_state`)."""
        leave_out = leave_out or {}
        out = {
            name: {
                "scheduler": self._schedule_entry(name),
                "optimizer": self._param_entry(name, leave_out.get(name, ())),
            }
            for name in self._params
        }
        for name, entry in self._pending.items():
            out.setdefault(name, entry)
        return out

    def _normalized(self, state: dict) -> dict:
        if set(state) == {"params", "cohorts"}:
            return schedule_entries(state)
        out = {}
        for name, entry in state.items():
            if isinstance(entry, dict) and "scheduler" in entry and "optimizer" in entry:
                optimizer = _pyro_entry(name, entry["optimizer"])
                out[name] = {"scheduler": entry["scheduler"], "optimizer": optimizer}
            else:  # saved by an optimizer without a schedule
                out[name] = {"scheduler": None, "optimizer": _pyro_entry(name, entry)}
        return out

    def _schedule_entry(self, name: str) -> dict:
        """The state Pyro's scheduler of this one param would hold."""
        cohort = self._cohort_of[name]
        i = cohort.group_index(self._params[name])
        group = cohort.optimizer.param_groups[i]
        own = {"base_lrs": group.get("initial_lr", group["lr"]), "_last_lr": group["lr"]}
        state = cohort.scheduler.state_dict()
        for k, v in state.items():
            if k in PER_GROUP_KEYS and isinstance(v, list):
                state[k] = [v[i]] if i < len(v) else [own[k]] if k in own else v[-1:]
        return state

    def _load_one(self, name: str, p: torch.Tensor, entry: dict) -> None:
        super()._load_one(name, p, entry["optimizer"])
        saved = entry.get("scheduler")
        if not saved:
            return
        cohort = self._cohort_of[name]
        i = cohort.group_index(p)
        state = cohort.scheduler.state_dict()
        for k, v in saved.items():
            if k in PER_GROUP_KEYS and isinstance(v, list) and isinstance(state.get(k), list):
                merged = list(state[k])
                merged += v[-1:] * (i + 1 - len(merged))
                merged[i : i + 1] = v[:1]
                state[k] = merged
            else:
                state[k] = v
        cohort.scheduler.load_state_dict(state)
        cohort.closed = saved.get("last_epoch", 0) > 0


def _schedule_key(schedule: dict) -> str:
    return repr(sorted((k, v) for k, v in schedule.items() if k not in PER_GROUP_KEYS))


class ParamScheduler:
    """``scheduler.optim_objs[p]``: Pyro's per-param scheduler, as a view of the scheduler
    ``p`` shares with the params born with it."""

    def __init__(self, owner: PyroLRScheduler, name: str) -> None:
        self._owner, self._name = owner, name
        self.optimizer = ParamOptimizer(owner, name)

    @property
    def last_epoch(self) -> int:
        return self._owner._cohort_of[self._name].scheduler.last_epoch

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def state_dict(self) -> dict:
        return self._owner._schedule_entry(self._name)

    def __repr__(self) -> str:
        kind = type(self._owner._cohort_of[self._name].scheduler).__name__
        return f"<{kind} of param {self._name!r}>"


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

__all__ = ["PyroLRScheduler"]
__all__ += list(_SCHEDULERS)
