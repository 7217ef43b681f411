"""The effect-handler stack: messages, :class:`Messenger` and :func:`apply_stack`.

Every primitive statement (``sample``, ``param``, a plate's subsample draw) builds one
message dict and hands it to :func:`apply_stack`, which lets each active handler look at
it and change it:

1. handlers are visited innermost first (the most recently entered one), each calling
   ``process_message(msg)``; a handler that sets ``msg["stop"]`` hides the message from
   the handlers outside it;
2. if no handler set a value (``msg["value"] is None`` and not ``msg["done"]``), the
   default behaviour runs: plates broadcast the distribution and it is sampled;
3. handlers are visited again, from the outermost one visited inward, calling
   ``postprocess_message(msg)`` now that the value exists (this is where ``trace`` records);
4. ``msg["continuation"]``, if any, is called.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from typing import Any, NamedTuple, TypedDict

import torch

_STACK: list[Messenger] = []


class CondIndepStackFrame(NamedTuple):
    """One plate around a site: ``size`` is the subsample size, ``full_size`` the plate's."""

    name: str
    dim: int | None
    size: int
    counter: int
    full_size: int | None = None

    @property
    def vectorized(self) -> bool:
        return self.dim is not None


class Message(TypedDict, total=False):
    """The record of one site as it travels through the handlers.

    :key type: ``"sample"``, ``"param"`` or ``"subsample"`` (a plate drawing its indices).
    :key name: the site's name, unique within a trace (params may repeat).
    :key fn: the distribution (sample), the param-store getter (param).
    :key args, kwargs: what ``fn`` is called with.
    :key value: the site's value; set by a handler or, failing that, by sampling ``fn``.
    :key is_observed: ``True`` when the value is data (``obs=``/``condition``).
    :key infer: per-site inference options (``{"baseline": ...}``, ``{"is_auxiliary": True}``).
    :key scale: multiplier of the site's log-density (plates and ``poutine.scale``).
    :key mask: ``None`` or a bool tensor; ``False`` drops that element's log-density.
    :key cond_indep_stack: the plates around the site, outermost first.
    :key done: a handler has fixed the value; do not sample.
    :key stop: outer handlers do not see this message.
    :key continuation: called with the message at the very end.
    """

    type: str
    name: str
    fn: Any
    args: tuple
    kwargs: dict
    value: Any
    is_observed: bool
    infer: dict
    scale: Any
    mask: Any
    cond_indep_stack: tuple
    done: bool
    stop: bool
    continuation: Callable[[Message], None] | None


def get_plates() -> tuple:
    """The ``CondIndepStackFrame`` of each enclosing plate, outermost first (at
    Pyro's path, ``poutine.runtime.get_plates``)."""
    return tuple(
        frame for handler in _STACK if (frame := getattr(handler, "_frame", None)) is not None
    )


def am_i_wrapped() -> bool:
    """``True`` when any handler is active (otherwise primitives take their fast path)."""
    return bool(_STACK)


class Messenger:
    """Base class of all handlers.

    A messenger is a context manager (``with handler: ...``) and, given a callable,
    a wrapper (``handler(fn)(*args)``) that enters itself around each call.
    Subclasses override :meth:`process_message` and/or :meth:`postprocess_message`.
    """

    def __init__(self, fn: Callable | None = None) -> None:
        self.fn = fn

    def __enter__(self):
        _STACK.append(self)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if _STACK and _STACK[-1] is self:
            _STACK.pop()
        else:
            # On an exception inner handlers may not have exited: drop them with us.
            del _STACK[_STACK.index(self) :]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            # ``handler(...)(fn)`` style: each function decorated gets a wrapper of its own,
            # so one handler object can decorate several functions (as in Pyro).
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return self._wrap(args[0])
            raise ValueError(
                f"{type(self).__name__} was called with no function to wrap; pass it, "
                f"{type(self).__name__}(fn, ...), or use the handler as a context manager"
            )
        with self:
            return self.fn(*args, **kwargs)

    def _wrap(self, fn: Callable) -> Messenger:
        wrapper = copy.copy(self)
        wrapper.fn = fn
        functools.update_wrapper(wrapper, fn, updated=())
        return wrapper

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # A handler decorating a method binds like a function: ``obj.method(x)`` runs
        # ``fn(obj, x)`` inside the handler.
        if obj is None or self.fn is None:
            return self
        return self._wrap(types.MethodType(self.fn, obj))

    def process_message(self, msg: Message) -> None:
        pass

    def postprocess_message(self, msg: Message) -> None:
        pass


def _broadcast(msg: Message) -> None:
    """Expand the distribution's batch shape over the plates around the site."""
    fn = msg["fn"]
    actual = fn.batch_shape
    target = list(actual)
    for frame in msg["cond_indep_stack"]:
        if frame.dim is None or frame.size == -1:
            continue
        if -frame.dim > len(target):
            target = [1] * (-frame.dim - len(target)) + target
        have = target[frame.dim]
        if have != 1 and have != frame.size:
            raise ValueError(
                f"Shape mismatch inside plate({frame.name!r}) at site {msg['name']!r}: "
                f"the distribution has size {have} at dim {frame.dim}, the plate has size "
                f"{frame.size}. Give the site a batch of the plate's (sub)sample size, e.g. "
                "index the data with the plate's indices."
            )
        target[frame.dim] = frame.size
    if tuple(target) != tuple(actual):
        expanded = fn.expand(torch.Size(target))
        if expanded.has_rsample != fn.has_rsample:  # torch's expand drops has_rsample_()
            expanded.has_rsample_(fn.has_rsample)
        if "_validate_args" not in fn.__dict__:
            # torch's expand copies the default of the moment; keep following the default
            expanded.__dict__.pop("_validate_args", None)
        msg["fn"] = expanded


def _draw(fn: Any) -> torch.Tensor:
    return fn.rsample() if fn.has_rsample else fn.sample()


def default_process_message(msg: Message) -> None:
    """Plates broadcast a sample site's distribution; an unset value is drawn from it."""
    if msg["type"] == "sample":
        if msg["cond_indep_stack"]:
            _broadcast(msg)
        if msg["value"] is None and not msg["done"]:
            msg["value"] = _draw(msg["fn"])
    elif msg["value"] is None and not msg["done"]:
        msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
    msg["done"] = True


def apply_stack(msg: Message) -> Message:
    """Run ``msg`` through the handler stack (see the module docstring for the order)."""
    stack = _STACK
    pointer = 0
    for handler in reversed(stack):
        pointer += 1
        handler.process_message(msg)
        if msg["stop"]:
            break
    default_process_message(msg)
    for handler in stack[len(stack) - pointer :]:
        handler.postprocess_message(msg)
    if msg["continuation"] is not None:
        msg["continuation"](msg)
    return msg
