"""Pyro's primitive statements: ``sample``, ``param``, ``plate``, ``factor``, ...

Outside any handler a primitive is just a function call (``sample`` draws, ``param``
reads the store); inside handlers it builds one message and runs the stack.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.distributions import constraints

from . import distributions as dist
from .params import _PARAM_STORE, param_with_module_name
from .params import rows as _rows
from .poutine.runtime import _STACK, CondIndepStackFrame, Message, Messenger, _draw, apply_stack

_VALIDATION = {"enabled": True}


def enable_validation(is_validate: bool = True) -> None:
    """Turn on (default) or off distsvi's model checks and torch's argument validation."""
    _VALIDATION["enabled"] = bool(is_validate)
    torch.distributions.Distribution.set_default_validate_args(bool(is_validate))


def is_validation_enabled() -> bool:
    """Whether :func:`enable_validation` left the checks on."""
    return _VALIDATION["enabled"]


@contextlib.contextmanager
def validation_enabled(is_validate: bool = True) -> Iterator[None]:
    """Turn validation on (or off) inside a ``with`` block; the old setting comes back."""
    old_ours = _VALIDATION["enabled"]
    old_torch = torch.distributions.Distribution._validate_args
    try:
        enable_validation(is_validate)
        yield
    finally:
        _VALIDATION["enabled"] = old_ours
        torch.distributions.Distribution.set_default_validate_args(old_torch)


def new_message(
    kind: str,
    name: str,
    fn: Any,
    args: tuple,
    kwargs: dict,
    value: Any = None,
    infer: dict | None = None,
) -> Message:
    """A fresh message with Pyro's keys (see :class:`~distsvi.poutine.runtime.Message`)."""
    return {
        "type": kind,
        "name": name,
        "fn": fn,
        "args": args,
        "kwargs": kwargs,
        "value": value,
        "is_observed": kind == "sample" and value is not None,
        "infer": {} if infer is None else infer,
        "scale": 1.0,
        "mask": None,
        "cond_indep_stack": (),
        "done": False,
        "stop": False,
        "continuation": None,
    }


def sample(
    name: str,
    fn: torch.distributions.Distribution,
    *args: Any,
    obs: torch.Tensor | None = None,
    obs_mask: torch.Tensor | None = None,
    infer: dict | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """A random variable ``name`` with distribution ``fn``; observed when ``obs`` is given.

    :param name: the site's name, unique within one run of the model.
    :param fn: any :class:`torch.distributions.Distribution`.
    :param obs: observed data; the site then contributes ``log p(obs)`` to the model.
    :param obs_mask: bool tensor: only where True is ``obs`` observed (the rest is
        sampled as a latent ``name + "_unobserved"`` and merged).
    :param infer: per-site inference options, e.g. ``{"baseline": {...}}``.
    :returns: the site's value.
    """
    if not _STACK:
        return obs if obs is not None else _draw(fn)
    if obs_mask is not None:
        return _masked_observe(name, fn, obs, obs_mask, infer, args, kwargs)
    msg = new_message("sample", name, fn, args, kwargs, obs, infer)
    apply_stack(msg)
    return msg["value"]


def _masked_observe(name, fn, obs, obs_mask, infer, args, kwargs):
    if obs is None:
        raise ValueError(f"sample site {name!r}: obs_mask= needs obs=")
    if obs_mask.dtype != torch.bool:
        raise ValueError(f"sample site {name!r}: obs_mask must be a bool tensor")
    observed = sample(f"{name}_observed", fn.mask(obs_mask), obs=obs, infer=infer)
    latent = sample(f"{name}_unobserved", fn.mask(~obs_mask), infer=infer)
    shape = obs_mask.shape + (1,) * len(fn.event_shape)
    value = torch.where(obs_mask.reshape(shape), observed, latent)
    return deterministic(name, value, event_dim=len(fn.event_shape))


def param(
    name: str,
    init_tensor: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    constraint: constraints.Constraint = constraints.real,
    event_dim: int | None = None,
) -> torch.Tensor:
    """A learnable tensor, kept unconstrained in the param store.

    :param name: the param's name (the same name returns the same param).
    :param init_tensor: initial *constrained* value, or a callable returning it; used
        only when the param does not exist yet.
    :param constraint: the support of the param (a ``torch.distributions.constraints``).
    :param event_dim: how many rightmost dims are event dims (for subsampled params).
    :returns: the constrained value.
    """
    if not _STACK:
        return _PARAM_STORE.get_param(name, init_tensor, constraint, event_dim)
    args = (name, init_tensor, constraint)
    msg = new_message("param", name, _PARAM_STORE.get_param, args, {"event_dim": event_dim})
    apply_stack(msg)
    return msg["value"]


def _param_rows(
    name: str,
    init_tensor: torch.Tensor | Callable[[], torch.Tensor] | None,
    constraint: constraints.Constraint,
    picks: list[tuple[int, torch.Tensor, int, str]],
) -> tuple[torch.Tensor, bool]:
    """``param(name, ...)`` for a reader that selects a subsample's rows itself (the
    autoguides' locals): ``picks`` are ``(dim, indices, full size, plate name)``. Returns the value and
    whether it already is just those rows (an SVI step's row-sparse read)."""
    if not _STACK or not picks or not _rows.is_recording():
        return param(name, init_tensor, constraint), False
    request = _rows.RowRequest()
    request.picks.extend(picks)
    args = (name, init_tensor, constraint)
    kwargs = {"event_dim": None, "rows": request}
    msg = new_message("param", name, _PARAM_STORE.get_param, args, kwargs)
    apply_stack(msg)
    return msg["value"], request.done


def factor(name: str, log_factor: torch.Tensor, *, has_rsample: bool | None = None) -> None:
    """Add ``log_factor`` to the model's log-density (an observed ``Unit`` site).

    :param name: the site's name.
    :param log_factor: the term to add; its shape is the site's batch shape.
    :param has_rsample: in a guide, whether ``log_factor`` comes from reparameterised
        sampling (it must be said there; a model may leave it out).
    """
    unit = _Unit(log_factor, has_rsample=has_rsample)
    sample(name, unit, obs=unit.v, infer={"is_auxiliary": True})


def deterministic(name: str, value: torch.Tensor, event_dim: int | None = None) -> torch.Tensor:
    """Record ``value`` in traces as site ``name`` (an observed Delta, no density).

    :param name: the site's name.
    :param value: the value to record.
    :param event_dim: how many rightmost dims of ``value`` are event dims (default: all).
    :returns: ``value``.
    """
    event_dim = value.dim() if event_dim is None else event_dim
    return sample(
        name,
        dist.Delta(value, event_dim=event_dim).mask(False),
        obs=value,
        infer={"_deterministic": True},
    )


class _Unit(dist.Delta):
    """A site whose log-density is a given tensor (what ``factor`` records)."""

    def __init__(self, log_factor: torch.Tensor, has_rsample: bool | None = None) -> None:
        log_factor = torch.as_tensor(log_factor)
        super().__init__(log_factor.new_zeros(log_factor.shape + (0,)), log_factor, event_dim=1)
        self._has_rsample = has_rsample  # None: not said (fine in a model, an error in a guide)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return self._has_rsample is not False

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return _Unit(self.log_density.expand(batch_shape), self._has_rsample)

    def log_prob(self, x):
        return self.log_density


def module(
    name: str, nn_module: torch.nn.Module, update_module_params: bool = False
) -> torch.nn.Module:
    """Register the parameters of ``nn_module`` in the param store as ``name$$$param``.

    The store then holds the module's own parameter tensors, so optimizing the store
    trains the module. A param already in the store (e.g. loaded from a checkpoint)
    is copied into the module first.

    :param name: the prefix of the params' names.
    :param nn_module: the module to register.
    :param update_module_params: Pyro's switch for copying stored values into the module;
        here they always are, so it has no effect.
    :returns: the module.
    """
    store = _PARAM_STORE
    if store._modules.get(name) is not nn_module:
        store._modules[name] = nn_module
    for pname, full, p in _module_params(name, nn_module):
        if not p.requires_grad:
            if nn_module.training:
                warnings.warn(
                    f"module {name!r}: {pname} was not registered in the param store "
                    "because requires_grad=False. You can silence this warning by calling "
                    "my_module.train(False)",
                    stacklevel=2,
                )
            continue
        stored = store._params.get(full)
        if stored is not None and stored is not p:
            with torch.no_grad():
                p.copy_(stored)
            del store[full]
        param(full, p)
    return nn_module


# A model calls ``module`` every step, and walking the module tree for its named
# parameters costs more than the messages it sends. The walk is kept per module with a
# snapshot of the tree (every submodule's parameter and child dicts, by identity) that is
# checked on each call, so adding, replacing or deleting a parameter or submodule by any
# route is seen at the next call. The snapshot names the root as ``None``: a value that
# held its own weak key would keep the module alive for good.
_MODULE_WALKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tree_snapshot(root: torch.nn.Module) -> list[tuple[Any, tuple, tuple]]:
    return [
        (None if m is root else m, tuple(m._parameters.items()), tuple(m._modules.items()))
        for m in root.modules()
    ]


def _tree_unchanged(root: torch.nn.Module, snapshot: list[tuple[Any, tuple, tuple]]) -> bool:
    for m, params, children in snapshot:
        m = root if m is None else m
        own, kids = m._parameters, m._modules
        if len(own) != len(params) or len(kids) != len(children):
            return False
        for k, v in params:
            if own.get(k) is not v:
                return False
        for k, v in children:
            if kids.get(k) is not v:
                return False
    return True


def _module_params(name: str, nn_module: torch.nn.Module) -> list[tuple[str, str, Any]]:
    """``(param name, store name, param)`` for each of the module's parameters."""
    compiling = torch.compiler.is_compiling()
    if not compiling:
        hit = _MODULE_WALKS.get(nn_module)
        if hit is not None and hit[0] == name and _tree_unchanged(nn_module, hit[1]):
            return hit[2]
    walk = [(n, param_with_module_name(name, n), p) for n, p in nn_module.named_parameters()]
    if not compiling:
        _MODULE_WALKS[nn_module] = (name, _tree_snapshot(nn_module), walk)
    return walk


_ALLOCATED_DIMS: list[int] = []
_ARANGE: dict[tuple[int, Any], tuple[torch.Tensor, int]] = {}
_ARANGE_MAX = 1 << 16


def _all_indices(size: int, device: Any) -> torch.Tensor:
    """``arange(size)``: a plate that is not subsampled announces all of its indices at
    every entry, and a model opens such plates every step. Small ones are kept and reused
    while nobody has written to them (their version counter is unchanged); none is kept
    inside inference mode (such a tensor cannot be an index saved for backward) or while
    compiling (the graph makes its own)."""
    if torch.compiler.is_compiling() or size > _ARANGE_MAX or torch.is_inference_mode_enabled():
        return torch.arange(size, device=device)
    key = (size, device)
    hit = _ARANGE.get(key)
    if hit is None or hit[1] != hit[0]._version:
        if len(_ARANGE) >= 64:  # plates whose size varies from call to call: stay bounded
            _ARANGE.clear()
        t = torch.arange(size, device=device)
        hit = _ARANGE[key] = (t, t._version)
    return hit[0]


def _allocate_dim(name: str, dim: int | None) -> int:
    if dim is None:
        dim = -1
        while dim in _ALLOCATED_DIMS:
            dim -= 1
    elif dim >= 0:
        raise ValueError(
            f"plate {name!r}: dim must be negative (counted from the right), got {dim}"
        )
    elif dim in _ALLOCATED_DIMS:
        raise ValueError(
            f"plate {name!r} wants dim={dim}, but an enclosing plate already uses that dim. "
            f"Give one of them another dim, e.g. dim={min(_ALLOCATED_DIMS) - 1}."
        )
    _ALLOCATED_DIMS.append(dim)
    return dim


class _PlateFrame(Messenger):
    """Puts ``self._frame`` on every sample site inside and scales its log-density."""

    _frame: CondIndepStackFrame | None
    _scale: float

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample":
            msg["cond_indep_stack"] = (self._frame,) + msg["cond_indep_stack"]
            if self._scale != 1.0:
                msg["scale"] = self._scale * msg["scale"]


class _SequentialPlate(_PlateFrame):
    """One iteration of a sequential plate."""

    def __init__(self, frame: CondIndepStackFrame, scale: float) -> None:
        super().__init__(None)
        self._frame = frame
        self._scale = scale


class plate(_PlateFrame):
    """A conditionally independent batch of size ``size``, optionally subsampled.

    ``with plate("data", N, subsample_size=B) as idx:`` draws ``B`` indices (``idx``),
    gives every sample site inside a batch dim of size ``B`` at ``dim`` and scales its
    log-density by ``N / B``, so the model's log-density is unbiased for all ``N`` points.

    :param name: the plate's name (unique in the model).
    :param size: the full size ``N``.
    :param subsample_size: the minibatch size ``B``; indices are drawn afresh each entry
        (a guide's draw is replayed into the model).
    :param subsample: explicit indices (e.g. from a DataLoader); they win over any draw.
    :param dim: the batch dim (negative); by default the rightmost free one.
    :param use_cuda: Pyro's older spelling of ``device="cuda"``.
    :param device: where the drawn indices live.
    """

    def __init__(
        self,
        name: str,
        size: int | None = None,
        subsample_size: int | None = None,
        subsample: torch.Tensor | None = None,
        dim: int | None = None,
        use_cuda: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(None)
        if use_cuda and device is None:
            device = "cuda"
        self._given = subsample  # what ``with`` yields, as in Pyro (a list stays a list)
        if subsample is not None:
            subsample = torch.as_tensor(subsample)
            if subsample.dim() != 1:
                raise ValueError(f"plate {name!r}: subsample must be a 1-d index tensor")
            if size is None:
                size = len(subsample)
            if subsample_size is not None and subsample_size != len(subsample):
                raise ValueError(
                    f"plate {name!r}: subsample_size={subsample_size} but len(subsample)="
                    f"{len(subsample)}; give one of them"
                )
        if size is None and subsample_size is not None:
            raise ValueError(f"plate {name!r}: subsample_size={subsample_size} needs a size")
        if subsample_size is not None and not 0 < subsample_size:
            raise ValueError(f"plate {name!r}: subsample_size must be > 0, got {subsample_size}")
        self.name = name
        self._subsample = subsample
        self._declared = subsample_size
        self._user_dim = dim
        self.dim: int | None = None
        self.device = device
        self._frame: CondIndepStackFrame | None = None
        self._scale = 1.0
        self._subsampled = False
        if size is None:
            # No size: the plate only names a batch dim, whatever its size at each site
            # (Pyro's size -1); there are no indices to draw.
            self.size = self.subsample_size = -1
            self.indices: torch.Tensor | None = None
            return
        self.size = int(size)
        self.subsample_size = int(subsample_size) if subsample_size is not None else self.size
        # Drawn once, at construction, as in Pyro: re-entering the same plate object
        # reuses its indices.
        self.indices = self._draw_indices()

    def _draw_indices(self) -> torch.Tensor:
        if _STACK:
            # Every plate announces its indices, full ones too, so that a guide's draw is
            # replayed into a model plate declared without subsample_size (as in Pyro).
            kwargs = {"size": self.size, "subsample_size": self.subsample_size}
            msg = new_message("subsample", self.name, self._randperm, (), kwargs, self._subsample)
            msg["scale"] = None  # a handler may set the plate's scale (rank shards do)
            apply_stack(msg)
            idx, scale = msg["value"], msg["scale"]
            if scale is None and self._declared is not None and len(idx) != self._declared:
                # The indices came from elsewhere (a guide's plate, replayed): they must be
                # as many as this plate declares.
                raise ValueError(
                    f"plate {self.name!r}: subsample_size does not match len(subsample), "
                    f"{self._declared} vs {len(idx)}. Did you accidentally use different "
                    "subsample_size in the model and guide?"
                )
        elif self._subsample is not None:
            idx, scale = self._subsample, None
        else:
            idx, scale = self._randperm(self.size, self.subsample_size), None
        n = len(idx)
        self.subsample_size = n
        self._subsampled = n < self.size or self._subsample is not None or scale is not None
        self._scale = scale if scale is not None else self.size / n
        return idx

    def _randperm(self, size: int, subsample_size: int) -> torch.Tensor:
        if subsample_size >= size:
            return _all_indices(size, self.device)  # no draw: the RNG is untouched
        return torch.randperm(size, device=self.device)[:subsample_size]

    def __enter__(self) -> torch.Tensor | None:
        idx = self.indices
        self.dim = _allocate_dim(self.name, self._user_dim)
        n = -1 if idx is None else len(idx)
        self._frame = CondIndepStackFrame(self.name, self.dim, n, 0, self.size)
        super().__enter__()
        if self._given is not None and idx is self._subsample:
            return self._given
        return idx

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        _ALLOCATED_DIMS.remove(self.dim)
        super().__exit__(exc_type, exc_value, traceback)

    def __iter__(self):
        """Sequential plate: yields indices one at a time (no batch dim)."""
        scale = self._scale
        for counter, i in enumerate(self.indices.tolist()):
            frame = CondIndepStackFrame(self.name, None, 1, counter, self.size)
            with _SequentialPlate(frame, scale):
                yield i

    def process_message(self, msg: Message) -> None:
        super().process_message(msg)
        if (
            msg["type"] == "param"
            and self._subsampled
            and msg["kwargs"].get("event_dim") is not None
            and msg["value"] is None
            and _rows.is_recording()
        ):
            # An SVI step: ask the store for this subsample's rows only (read before the
            # constraint, as a leaf of their own), so that the step costs the batch.
            request = msg["kwargs"].get("rows")
            if request is None:
                request = _rows.RowRequest()
                msg["kwargs"] = {**msg["kwargs"], "rows": request}
            request.picks.append(
                (self.dim - msg["kwargs"]["event_dim"], self.indices, self.size, self.name)
            )

    def postprocess_message(self, msg: Message) -> None:
        # A param declared with event_dim inside a subsampled plate has full-size batch
        # dims: hand out only the rows of this subsample (Pyro's rule).
        if msg["type"] != "param" or msg["kwargs"]["event_dim"] is None or self.size == -1:
            return
        request = msg["kwargs"].get("rows")
        if request is not None and request.done:
            return  # the store handed out this subsample's rows already
        event_dim = msg["kwargs"]["event_dim"]
        dim = self.dim - event_dim
        value = msg["value"]
        if value.dim() < -dim or value.shape[dim] == 1:
            return  # broadcasts over the plate
        if value.shape[dim] != self.size and (self._subsampled or is_validation_enabled()):
            raise ValueError(
                f"Inside pyro.plate({self.name!r}, {self.size}, dim={self.dim}) invalid shape "
                f"of pyro.param({msg['name']!r}, ..., event_dim={event_dim}): "
                f"{tuple(value.shape)}; its dim {dim} must be 1 or the plate's full size "
                f"{self.size} (or fix event_dim)"
            )
        if self._subsampled:
            msg["value"] = value.index_select(dim, self.indices)


@contextlib.contextmanager
def plate_stack(prefix: str, sizes: Sequence[int], rightmost_dim: int = -1) -> Iterator[None]:
    """Nested plates ``prefix_0, prefix_1, ...`` of the given ``sizes`` (outermost first) at
    the contiguous dims ``rightmost_dim - len(sizes) + 1 .. rightmost_dim``."""
    if rightmost_dim >= 0:
        raise ValueError(f"plate_stack: rightmost_dim must be negative, got {rightmost_dim}")
    with contextlib.ExitStack() as stack:
        for i, size in enumerate(reversed(sizes)):
            stack.enter_context(plate(f"{prefix}_{i}", size, dim=rightmost_dim - i))
        yield


def subsample(data: torch.Tensor, event_dim: int = 0) -> torch.Tensor:
    """Index ``data`` by the indices of the active subsampled plates (Pyro's helper).

    :param data: a batch of data, at each plate's full size in that plate's dim.
    :param event_dim: how many rightmost dims of ``data`` are event dims.
    :returns: ``data`` restricted to the current subsample.
    """
    for handler in reversed(_STACK):
        if not (isinstance(handler, plate) and handler._subsampled):
            continue
        dim = handler.dim - event_dim
        if data.dim() < -dim or data.size(dim) == 1:
            continue  # broadcasts over this plate
        if data.size(dim) != handler.size:
            if is_validation_enabled():
                raise ValueError(
                    f"subsample(..., event_dim={event_dim}) inside plate({handler.name!r}, "
                    f"{handler.size}, dim={handler.dim}): data of shape {tuple(data.shape)} "
                    f"has size {data.size(dim)} at dim {dim}; pass the full data (size "
                    f"{handler.size} there), or fix event_dim"
                )
            continue
        data = data.index_select(dim, handler.indices)
    return data
