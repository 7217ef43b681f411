"""Stochastic variational inference: one gradient step of an ELBO at a time."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import primitives
from ..params import _PARAM_STORE
from ..params import rows as _rows
from ..poutine.runtime import Messenger
from . import elbo as _elbo

GradHook = Callable[[torch.Tensor, dict], "torch.Tensor | None"]


def _leaf(name: str, value: torch.Tensor) -> torch.Tensor:
    """The unconstrained tensor an optimizer updates for param site ``name``."""
    p = _PARAM_STORE._params.get(name)
    if p is None:
        # A param held by a module, not the store (distsvi.nn's module-local params).
        ref = getattr(value, "unconstrained", None)
        p = value if ref is None else ref()
    return p


class _ParamReads(Messenger):
    """The outermost handler of a step: ``{name: value}`` of every param it reads (the
    params-only trace Pyro's step takes, without building a trace of copied messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Any] = {}

    def postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "param":
            self.values[msg["name"]] = msg["value"]


class _Compiled(NamedTuple):
    loss_fn: Callable
    optim_step: Callable | None  # None: the eager optimizer
    params: dict[str, torch.Tensor]
    # The param store's version when compiled (see ParamStore.version): any other version
    # means params were created, replaced or loaded since, so step eagerly and recompile.
    store_version: int
    known: frozenset  # the store's names then


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
        (and after the cross-rank average, when there is one) with the 0-dim loss tensor
        and ``{name: unconstrained param}`` of this step; it may change gradients (clip
        them, say), and returning ``None`` skips the optimizer step.
    :param compile: ``True`` (or a dict of ``torch.compile`` options) to run steps through
        ``torch.compile`` once the params exist: the first step runs eagerly (params are
        created and the model is checked), later steps run the compiled loss (and the
        compiled optimizer step for torch's own optimizers without a scheduler, on foreach
        kernels; an optimizer given ``fused=True`` steps eagerly, its kernel uncompiled). A
        param created inside a compiled step is updated in that step by the eager optimizer,
        and the next step recompiles. Needs an ELBO loss. A compiled step reads local params
        densely (the whole tensor, then the batch's rows), as Pyro does.
    :param num_samples: Pyro's (for its deprecated ``run``); unused.
    :param num_steps: Pyro's (for its deprecated ``run``); unused.

    Local params, those with one row per datapoint read inside a subsampled plate
    (AutoNormal's and AutoDelta's locals, ``param(..., event_dim=...)`` in the plate), are
    read row-sparse by an eager step: the batch's rows of the unconstrained tensor become
    a leaf of their own and only they are constrained, so neither the forward nor the
    backward pass touches all N rows. The optimizer's ``local_updates`` then says what
    the rows' gradient does (``"dense"``: Pyro's full step; ``"lazy"``: only those rows
    step; see :class:`~distsvi.optim.PyroOptim`).

    A step's gradient path, in order (:meth:`step`, then :meth:`_apply`):

    1. backward: ``loss_and_grads`` (or the compiled loss) fills the gradients;
    2. local params' row gradients are split from the global params' (lazy updates) or
       scattered into full gradients (dense);
    3. ``reduce_grads(loss, grads)``, when set: the data-parallel layer's one bucketed
       all-reduce of the global gradients (:class:`~distsvi.distributed.DataParallelSVI`
       sets it); it returns the loss averaged over ranks, or ``None`` to skip the step on
       every rank;
    4. ``grad_hook(loss, grads)``, when set: clip and monitor (``None`` skips);
    5. the optimizer steps the global params and the local rows;
    6. gradients are set to ``None`` and the loss is read once, as a float.

    Validation: the first step checks everything. Later steps build the distributions
    without checking their arguments (their values are still checked against their
    supports when scored), as long as the param store holds the same params and the last
    loss was finite. A non-finite loss on such a step is redone with every check, so an
    invalid argument raises before any param moves; with a ``grad_hook`` or
    ``reduce_grads`` (which decide on non-finite steps themselves) the next step is the
    checked one.

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
        compile: bool | dict = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - {"num_chains"}  # Pyro's TracePosterior takes num_chains
        if unknown:
            raise TypeError(f"SVI got unexpected keyword arguments {sorted(unknown)}")
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
        # Stage 3 of the gradient path: the cross-rank average (see DataParallelSVI).
        self.reduce_grads: GradHook | None = None
        # Replicated local params on several ranks: rows are averaged as full gradients.
        self.dense_rows = False
        if hasattr(loss, "loss") and hasattr(loss, "loss_and_grads"):
            self.loss = loss.loss
            # The ELBO's tensor-returning path: the step's one host sync stays in _apply.
            self.loss_and_grads = loss_and_grads or getattr(
                loss, "_loss_and_grads", loss.loss_and_grads
            )
        elif callable(loss):
            self.loss = lambda *a, **k: float(loss(*a, **k))

            def _loss_and_grads(*a, **k):
                value = loss(*a, **k)
                value.backward()
                return value.detach()

            self.loss_and_grads = loss_and_grads or _loss_and_grads
        else:
            raise TypeError(f"loss must be an ELBO or a callable, got {loss!r}")
        if compile is False and getattr(loss, "compile_step", False):
            compile = True  # JitTrace_ELBO and friends: Pyro's JIT becomes torch.compile
        if compile and (loss_and_grads is not None or not hasattr(loss, "differentiable_loss")):
            raise ValueError("SVI(compile=True) needs an ELBO loss and no custom loss_and_grads")
        self._compile_options = ({} if compile is True else dict(compile)) if compile else None
        self._elbo = loss
        self._compiled: _Compiled | None = None
        # The store's version after the last step that ran with every check and ended
        # finite: while it holds, steps skip the distributions' argument checks.
        self._checked_version: int | None = None

    def step(self, *args: Any, **kwargs: Any) -> float:
        """Take one optimizer step on the loss; return the loss estimate (a float)."""
        compiled = self._compiled
        if compiled is not None and _PARAM_STORE.version == compiled.store_version:
            return self._step_compiled(args, kwargs)
        skip = (
            self._checked_version == _PARAM_STORE.version
            and torch.distributions.Distribution._validate_args
            and primitives.is_validation_enabled()
        )
        loss, params, record = self._backward(args, kwargs, skip)
        if skip and self.reduce_grads is None and self.grad_hook is None:
            # A bare step (a hook or the cross-rank average decides on non-finite steps
            # itself: the job skips them) reads its loss here instead of after the update.
            if not math.isfinite(float(loss)):
                # Redo the step with every check: an invalid argument then raises torch's
                # error here, before any param moves, as it would have with the checks on.
                for p in params.values():
                    p.grad = None
                loss, params, record = self._backward(args, kwargs, False)
                skip = False
        value = self._apply(loss, params, rows=_rows.row_grads(record) if record else None)
        # A full check again after a non-finite loss (e.g. a NaN param, caught at the next
        # step's construction) or once the store holds other params.
        if not math.isfinite(value):
            self._checked_version = None
        elif not skip:
            self._checked_version = _PARAM_STORE.version
        if self._compile_options is not None:
            self._prepare_compiled(params)  # after the step: the optimizer exists now
        return value

    def _backward(self, args: tuple, kwargs: dict, skip_arg_checks: bool) -> tuple:
        """Stage 1: the loss and its gradients; the step's params and local-row records."""
        old, _elbo.ARG_CHECKS["skip"] = _elbo.ARG_CHECKS["skip"], skip_arg_checks
        try:
            with _rows.record_rows() as record, _ParamReads() as reads:
                loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        finally:
            _elbo.ARG_CHECKS["skip"] = old
        if not isinstance(loss, torch.Tensor):  # a custom loss_and_grads returning a float
            loss = torch.tensor(loss)
        params = {name: _leaf(name, value) for name, value in reads.values.items()}
        return loss, params, record

    def _apply(
        self,
        loss: torch.Tensor,
        params: dict[str, torch.Tensor],
        optim_step=None,
        rows: dict[str, _rows.RowGrad] | None = None,
    ) -> float:
        """Stages 2 to 6 of the gradient path (see the class docstring).

        ``rows`` are the step's row gradients of local params (see
        :mod:`distsvi.params.rows`). An optimizer with ``local_updates="lazy"`` gets them
        as they are and updates only those rows; any other optimizer sees them scattered
        into full gradients, which is Pyro's step exactly. The reduce and hook stages see
        a row gradient as the gradient of a tensor of the rows' shape (norms and clipping
        are the same).
        """
        grads, local = params, None
        if rows:
            if self._lazy_rows():
                grads, local = self._split_rows(params, rows)
            else:
                for rg in rows.values():
                    _rows.scatter(rg)
        reported: torch.Tensor | float | None = loss
        if self.reduce_grads is not None:
            reported = self.reduce_grads(reported, grads)
        if reported is not None and self.grad_hook is not None:
            reported = self.grad_hook(reported, grads)
        if reported is not None:
            self._step_optim(optim_step or self.optim, params, grads, local)
            loss = reported
        for p in grads.values():
            p.grad = None
        for p in params.values():
            p.grad = None
        return float(loss)  # host sync: the one per step, as Pyro's step returns a float

    def _lazy_rows(self) -> bool:
        return getattr(self.optim, "local_updates", "dense") == "lazy" and not self.dense_rows

    @staticmethod
    def _split_rows(params: dict, rows: dict) -> tuple[dict, dict]:
        grads = {name: p for name, p in params.items() if name not in rows}
        local = {}
        for name, rg in rows.items():
            if rg.full.grad is not None:
                # Also read whole this step (outside its plate): every row takes this step.
                _rows.scatter(rg)
                grad, rg.full.grad = rg.full.grad, None
                index = torch.arange(rg.full.shape[0], device=grad.device)
                rg = _rows.RowGrad(name, rg.full, 0, index, grad)
            holder = torch.empty_like(rg.grad).requires_grad_(True)
            holder.grad = rg.grad
            grads[name] = holder
            local[name] = rg
        return grads, local

    @staticmethod
    def _step_optim(step, params: dict, grads: dict, local: dict | None) -> None:
        if not local:
            step(params)
            return
        dense = {name: p for name, p in params.items() if name not in local}
        # the hook may have replaced a holder's gradient (averaged, clipped)
        row_list = [rg._replace(grad=grads[name].grad) for name, rg in local.items()]
        step(dense, rows=row_list)

    def _prepare_compiled(self, params: dict[str, torch.Tensor]) -> None:
        # torch.compile's first use in a process turns torch.distributions' argument checks
        # off for the whole process; the user's setting is put back below.
        validate = torch.distributions.Distribution._validate_args
        try:
            self._compile(params)
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)

    def _compile(self, params: dict[str, torch.Tensor]) -> None:
        elbo, model, guide = self._elbo, self.model, self.guide
        loss_fn = torch.compile(
            lambda *a, **k: elbo.differentiable_loss(model, guide, *a, **k), **self._compile_options
        )
        optimizer = getattr(self.optim, "optimizer", None)
        optim_step = None
        # lr is a float in the param group: a scheduler would force a recompile per change.
        compilable = (
            optimizer is not None
            and type(optimizer).__module__.startswith("torch.optim")
            and not hasattr(self.optim, "scheduler_constructor")
            and not getattr(self.optim, "pt_clip_args", None)
        )
        prefer_foreach = getattr(self.optim, "prefer_foreach", None)
        if compilable and prefer_foreach is not None:
            prefer_foreach()  # compiled foreach beats the fused kernel distsvi picked for eager
        # A fused kernel the user asked for is one call already; it steps eagerly.
        if compilable and not any(group.get("fused") for group in optimizer.param_groups):
            compiled_opt = torch.compile(optimizer.step, **self._compile_options)
            optim_step = lambda _params: compiled_opt()
        self._compiled = _Compiled(
            loss_fn, optim_step, dict(params), _PARAM_STORE.version, frozenset(_PARAM_STORE.keys())
        )

    def _step_compiled(self, args: tuple, kwargs: dict) -> float:
        loss_fn, optim_step, params, store_version, known = self._compiled
        dist_cls = torch.distributions.Distribution
        validate = dist_cls._validate_args
        # The model was checked on the eager step; value checks would break the graph.
        dist_cls.set_default_validate_args(False)
        try:
            loss = loss_fn(*args, **kwargs)
        finally:
            dist_cls.set_default_validate_args(validate)
        loss.backward()
        if _PARAM_STORE.version != store_version:
            # A param was born inside this call: it steps now, as on the eager path, through
            # the eager optimizer (the compiled one does not hold it); the next step recompiles.
            store = _PARAM_STORE._params
            params = {**params, **{name: p for name, p in store.items() if name not in known}}
            optim_step = None
        return self._apply(loss.detach(), params, optim_step)

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The loss estimate with no gradient computed and no parameter changed."""
        # Local params are read row-sparse here too: the cost is the batch's.
        with torch.no_grad(), _rows.record_rows():
            return float(self.loss(self.model, self.guide, *args, **kwargs))
