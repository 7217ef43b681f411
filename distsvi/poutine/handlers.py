"""Pyro's effect handlers, each a small :class:`~distsvi.poutine.runtime.Messenger`.

Every handler works three ways, as in Pyro::

    tr = poutine.trace(model).get_trace(data)     # wrap a callable
    with poutine.trace() as tr: model(data)        # context manager
    @poutine.scale(scale=0.5)                      # decorator
    def model(): ...
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .runtime import _STACK, Message, Messenger, get_plates
from .trace_struct import Trace


class trace(Messenger):
    """Record every site into a :class:`Trace` (``self.trace``).

    :param fn: the callable to trace.
    :param param_only: record ``param`` sites only.
    :param graph_type: ``"flat"`` or ``"dense"`` (kept for Pyro compatibility; the trace
        is in execution order, so a dense graph is implied by it).
    """

    def __init__(
        self, fn: Callable | None = None, graph_type: str | None = None, param_only: bool = False
    ) -> None:
        super().__init__(fn)
        if graph_type not in (None, "flat", "dense"):
            raise ValueError(f"graph_type must be 'flat' or 'dense', got {graph_type!r}")
        self.graph_type = graph_type or "flat"
        self.param_only = param_only
        self.trace = Trace(self.graph_type)

    def __enter__(self):
        self.trace = Trace(self.graph_type)
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        if self.graph_type == "dense":
            self.trace._graph()  # a dense trace is asked for its edges: build them now
        super().__exit__(*exc_info)

    def postprocess_message(self, msg: Message) -> None:
        if self.param_only and msg["type"] != "param":
            return
        name = msg["name"]
        nodes = self.trace.nodes
        if name in nodes:
            self.trace.add_node(name, **msg)  # raises for a reused sample-site name
        nodes[name] = msg.copy()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            return super().__call__(*args, **kwargs)
        record = not self.param_only  # a params-only trace holds params only, as in Pyro
        with self:
            if record:
                self.trace.add_node("_INPUT", name="_INPUT", type="args", args=args, kwargs=kwargs)
            ret = self.fn(*args, **kwargs)
            if record:
                self.trace.add_node("_RETURN", name="_RETURN", type="return", value=ret)
        return ret

    def get_trace(self, *args: Any, **kwargs: Any) -> Trace:
        """Run the wrapped callable and return its trace."""
        self(*args, **kwargs)
        return self.trace


class replay(Messenger):
    """Take the values of sample sites (and subsample indices) from a recorded trace.

    Observed sites keep their data. Plate indices that the model passes explicitly
    (``plate(..., subsample=idx)``) win over the recorded ones.

    :param fn: the callable to run.
    :param trace: the recorded trace (usually the guide's).
    :param params: ``{name: value}`` to use for param sites instead of the store's.
    """

    def __init__(
        self, fn: Callable | None = None, trace: Trace | None = None, params: dict | None = None
    ) -> None:
        super().__init__(fn)
        if trace is None and params is None:
            raise ValueError("replay needs a trace= or params=")
        self.trace = trace
        self.params = params

    def process_message(self, msg: Message) -> None:
        name = msg["name"]
        kind = msg["type"]
        if kind == "sample":
            if self.trace is None or msg["is_observed"]:
                return
            guide_site = self.trace.nodes.get(name)
            if guide_site is None:
                return
            if guide_site["type"] != "sample" or guide_site["is_observed"]:
                kind = "observed" if guide_site.get("is_observed") else guide_site["type"]
                raise RuntimeError(
                    f"site {name!r} must be a latent sample site in the replayed trace, but "
                    f"there it is {kind}; give the two sites different names"
                )
            msg["done"] = True
            msg["value"] = guide_site["value"]
            msg["infer"] = guide_site["infer"]
        elif kind == "subsample":
            if self.trace is None or msg["value"] is not None:
                return
            guide_site = self.trace.nodes.get(name)
            if guide_site is not None and guide_site["type"] == "subsample":
                msg["value"] = guide_site["value"]
                msg["scale"] = guide_site["scale"]
        elif kind == "param" and self.params is not None and name in self.params:
            msg["done"] = True
            msg["value"] = self.params[name]


class block(Messenger):
    """Hide sites from the handlers outside this one.

    With no arguments everything is hidden. ``hide``/``hide_types`` hide the listed
    names/types; ``expose``/``expose_types`` hide everything else; ``hide_fn``/``expose_fn``
    take a predicate on the message. Observed sample sites have the type ``"observe"`` here.

    :param fn: the callable to run.
    :param hide_fn: ``msg -> bool``: hide the sites for which it is true.
    :param expose_fn: ``msg -> bool``: hide the sites for which it is false.
    :param hide_all: hide every site not exposed (the default when nothing is listed).
    :param expose_all: hide nothing that is not listed in ``hide``/``hide_types``.
    :param hide: site names to hide.
    :param expose: site names to let through.
    :param hide_types: message types to hide (``"sample"``, ``"observe"``, ``"param"``).
    :param expose_types: message types to let through.
    """

    def __init__(
        self,
        fn: Callable | None = None,
        hide_fn: Callable[[Message], bool] | None = None,
        expose_fn: Callable[[Message], bool] | None = None,
        hide_all: bool = True,
        expose_all: bool = False,
        hide: Iterable[str] | None = None,
        expose: Iterable[str] | None = None,
        hide_types: Iterable[str] | None = None,
        expose_types: Iterable[str] | None = None,
    ) -> None:
        super().__init__(fn)
        if hide_fn is not None and expose_fn is not None:
            raise ValueError("block takes hide_fn= or expose_fn=, not both")
        both = sorted(set(hide or ()) & set(expose or ())) or sorted(
            set(hide_types or ()) & set(expose_types or ())
        )
        if both:
            raise ValueError(
                f"block: {', '.join(map(repr, both))} is both hidden and exposed; "
                "name each site or type in hide= or in expose=, not both"
            )
        if hide_fn is not None:
            self.hide_fn = hide_fn
        elif expose_fn is not None:
            self.hide_fn = lambda msg: not expose_fn(msg)
        else:
            # Pyro's rule: listing sites to hide exposes the rest, listing sites to expose
            # hides the rest, and with both lists the rest is hidden.
            if hide is not None or hide_types is not None or expose_all:
                hide_all = False
            if expose is not None or expose_types is not None:
                hide_all = True
            self._hide = set(hide or ())
            self._hide_types = set(hide_types or ())
            self._expose = set(expose or ())
            self._expose_types = set(expose_types or ())
            self._hide_all = hide_all
            self.hide_fn = self._default_hide

    def _default_hide(self, msg: Message) -> bool:
        kind = "observe" if msg["type"] == "sample" and msg["is_observed"] else msg["type"]
        if msg["name"] in self._hide or kind in self._hide_types:
            return True
        exposed = msg["name"] in self._expose or kind in self._expose_types
        return self._hide_all and not exposed

    def process_message(self, msg: Message) -> None:
        if self.hide_fn(msg):
            msg["stop"] = True


class condition(Messenger):
    """Observe sample sites at the given values: ``condition(model, data={"z": z})``.

    :param fn: the callable to run.
    :param data: ``{site name: value}``, or a trace whose sample values are used.
    """

    def __init__(self, fn: Callable | None = None, data: dict | Trace | None = None) -> None:
        super().__init__(fn)
        if data is None:
            raise ValueError("condition needs data= (a dict of site name -> value, or a Trace)")
        self.data = data

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "sample":
            return
        data = self.data
        if isinstance(data, Trace):
            site = data.nodes.get(msg["name"])
            if site is None or site["type"] != "sample":
                return
            value = site["value"]
        elif msg["name"] in data:
            value = data[msg["name"]]
        else:
            return
        msg["value"] = value
        msg["is_observed"] = True


class substitute(Messenger):
    """Replace the values of param sites by given ones.

    :param data: a dict of param name -> value.
    :param substitute_fn: ``fn(msg) -> value or None``, used when ``data`` is not given.
    """

    def __init__(
        self,
        fn: Callable | None = None,
        data: dict | None = None,
        substitute_fn: Callable[[Message], Any] | None = None,
    ) -> None:
        super().__init__(fn)
        if (data is None) == (substitute_fn is None):
            raise ValueError("substitute needs exactly one of data= or substitute_fn=")
        self.data = data
        self.substitute_fn = substitute_fn

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "param":
            return
        if self.data is not None:
            if msg["name"] not in self.data:
                return
            value = self.data[msg["name"]]
        else:
            value = self.substitute_fn(msg)
            if value is None:
                return
        msg["value"] = value
        msg["done"] = True


class scale(Messenger):
    """Multiply the log-density of every sample site inside by ``scale``.

    :param fn: the callable to run.
    :param scale: a positive number or tensor.
    """

    def __init__(self, fn: Callable | None = None, scale: float | torch.Tensor = 1.0) -> None:
        if isinstance(scale, (int, float)) and not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}; to drop terms use poutine.mask")
        super().__init__(fn)
        self.scale = scale

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample":
            msg["scale"] = self.scale * msg["scale"]


class mask(Messenger):
    """Drop the log-density of sample sites where ``mask`` is False.

    :param fn: the callable to run.
    :param mask: a bool, or a bool tensor that broadcasts with the sites' batch shapes.
    """

    def __init__(self, fn: Callable | None = None, mask: bool | torch.Tensor | None = None) -> None:
        if mask is None:
            raise ValueError("mask needs mask= (a bool or a bool tensor)")
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        super().__init__(fn)
        self.given = mask  # what get_mask() reports: a bool stays a bool
        self.mask = torch.tensor(mask) if isinstance(mask, bool) else mask

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample":
            msg["mask"] = self.mask if msg["mask"] is None else self.mask & msg["mask"]


def get_mask() -> bool | torch.Tensor | None:
    """The combined mask of the enclosing :class:`mask` handlers (``None`` outside any),
    e.g. to skip an expensive ``factor`` whose log-density would be masked out::

        if poutine.get_mask() is not False:
            pyro.factor("f", expensive())
    """
    result = None
    for handler in reversed(_STACK):
        if isinstance(handler, mask):
            result = handler.given if result is None else handler.given & result
    return result




class seed(Messenger):
    """Seed torch's, Python's and NumPy's generators on entry, so runs repeat exactly;
    the generators' outer states come back on exit.

    :param fn: the callable to run.
    :param rng_seed: the seed.
    """

    def __init__(self, fn: Callable | None = None, rng_seed: int | None = None) -> None:
        if not isinstance(rng_seed, int):
            raise TypeError(f"seed needs an int rng_seed, got {rng_seed!r}")
        super().__init__(fn)
        self.rng_seed = rng_seed

    def __enter__(self):
        self._outer_state = get_rng_state()
        set_rng_seed(self.rng_seed)
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        set_rng_state(self._outer_state)
        super().__exit__(*exc_info)


def get_rng_state() -> dict:
    """The states of torch's, Python's and (when installed) NumPy's generators."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    try:
        import numpy as np
    except ImportError:
        return state
    state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def set_rng_seed(rng_seed: int) -> None:
    """Seed torch, Python's ``random`` and (when installed) NumPy."""
    torch.manual_seed(rng_seed)
    random.seed(rng_seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(rng_seed)
