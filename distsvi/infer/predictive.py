"""Predictive: samples from the prior or posterior predictive distribution, as Pyro's."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import primitives
from ..poutine import handlers as poutine
from ..poutine.trace_struct import Trace, plate_nesting


def _max_plate_nesting(model: Callable, args: tuple, kwargs: dict) -> tuple[int, Trace]:
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return plate_nesting(trace), trace


def _return_shapes(
    trace: Trace, nesting: int, num_samples: int, posterior_samples: dict, return_sites: Any
) -> dict[str, Any]:
    """``{site: output shape}`` of the sites to return (``None``: a non-tensor return)."""
    shapes: dict[str, Any] = {}
    for name in trace.stochastic_nodes + trace.observation_nodes:  # Pyro's order
        site = trace.nodes[name]
        pad = nesting - len(site["fn"].batch_shape)
        shape = (num_samples,) + (1,) * pad + tuple(site["value"].shape)
        if return_sites:
            if name in return_sites:
                shapes[name] = shape
        elif return_sites is None or name not in posterior_samples:
            shapes[name] = shape
    if return_sites and "_RETURN" in return_sites:
        value = trace.nodes["_RETURN"]["value"]
        shapes["_RETURN"] = (num_samples,) + value.shape if torch.is_tensor(value) else None
    return shapes


def _predictive_sequential(
    model: Callable,
    posterior_samples: dict,
    num_samples: int,
    shapes: dict,
    args: tuple,
    kwargs: dict,
) -> dict[str, Any]:
    collected = []
    for i in range(num_samples):
        sample_i = {k: v[i] for k, v in posterior_samples.items()}
        with torch.no_grad():
            tr = poutine.trace(poutine.condition(model, sample_i)).get_trace(*args, **kwargs)
        collected.append({k: tr.nodes[k]["value"] for k in shapes})
    return {
        k: torch.stack([c[k] for c in collected]).reshape(shape)
        if shape is not None
        else [c[k] for c in collected]
        for k, shape in shapes.items()
    }


def _predictive_vectorized(
    model: Callable,
    posterior_samples: dict,
    num_samples: int,
    nesting: int,
    shapes: dict,
    args: tuple,
    kwargs: dict,
) -> dict[str, Any]:
    reshaped = {}
    for name, value in posterior_samples.items():
        event_shape = value.shape[1:]
        pad = (1,) * max(nesting - len(event_shape), 0)
        reshaped[name] = value.reshape((num_samples,) + pad + event_shape)

    def vectorized(*a, **k):
        with primitives.plate("_num_predictive_samples", num_samples, dim=-nesting - 1):
            return model(*a, **k)

    with torch.no_grad():
        tr = poutine.trace(poutine.condition(vectorized, reshaped)).get_trace(*args, **kwargs)
    out = {}
    for name, shape in shapes.items():
        value = tr.nodes[name]["value"]
        if shape is None:
            out[name] = value
        elif value.numel() < math.prod(shape):
            out[name] = value.expand(shape)
        else:
            out[name] = value.reshape(shape)
    return out


def _predictive(
    model: Callable,
    posterior_samples: dict,
    num_samples: int,
    return_sites: Any,
    parallel: bool,
    args: tuple,
    kwargs: dict,
) -> dict[str, Any]:
    nesting, trace = _max_plate_nesting(model, args, kwargs)
    # Pyro traces the model a second time for the sites' shapes; doing the same keeps the
    # random stream, hence the samples for a given seed, equal to Pyro's.
    _, trace = _max_plate_nesting(model, args, kwargs)
    shapes = _return_shapes(trace, nesting, num_samples, posterior_samples, return_sites)
    if parallel:
        return _predictive_vectorized(
            model, posterior_samples, num_samples, nesting, shapes, args, kwargs
        )
    return _predictive_sequential(model, posterior_samples, num_samples, shapes, args, kwargs)


class Predictive:
    """Draw samples of a model's sites given posterior samples or a guide (or from the
    prior, given neither), with Pyro's output shapes: every returned site gets a leading
    ``num_samples`` dim, then ``1``'s up to the model's plate nesting, then its own shape.

    :param model: the model.
    :param posterior_samples: ``{site: tensor}`` with a leading sample dim; the model is
        conditioned on them.
    :param guide: a guide to draw the latents from (instead of ``posterior_samples``).
    :param num_samples: how many samples (inferred from ``posterior_samples`` if omitted).
    :param return_sites: the sites to return. By default: all sites when a guide is given,
        otherwise the sites not in ``posterior_samples``. ``"_RETURN"`` returns the model's
        return value.
    :param parallel: draw all samples in one vectorized pass (a plate of size
        ``num_samples``); the model must be vectorizable with plates.

    Example::

        predictive = Predictive(model, guide=guide, num_samples=1000)
        samples = predictive(x)        # {"obs": tensor of shape (1000, len(x)), ...}
    """

    def __init__(
        self,
        model: Callable,
        posterior_samples: dict | None = None,
        guide: Callable | None = None,
        num_samples: int | None = None,
        return_sites: list | tuple | set | None = (),
        parallel: bool = False,
    ) -> None:
        if posterior_samples is None and num_samples is None:
            raise ValueError("Predictive needs posterior_samples= or num_samples=")
        posterior_samples = {} if posterior_samples is None else posterior_samples
        for name, value in posterior_samples.items():
            n = value.shape[0]
            if num_samples is None:
                num_samples = n
            elif num_samples != n:
                warnings.warn(
                    f"posterior sample {name!r} has leading dim {n}, not num_samples="
                    f"{num_samples}; using {n}",
                    stacklevel=2,
                )
                num_samples = n
        if guide is not None and posterior_samples:
            raise ValueError("give Predictive posterior_samples= or guide=, not both")
        if return_sites is not None and not isinstance(return_sites, (list, tuple, set)):
            raise TypeError(f"return_sites must be a list, tuple or set, got {return_sites!r}")
        self.model = model
        self.posterior_samples = posterior_samples
        self.guide = guide
        self.num_samples = num_samples
        self.return_sites = return_sites
        self.parallel = parallel

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Samples of the return sites, ``{name: tensor}``, for the model's arguments."""
        return_sites = self.return_sites
        posterior_samples = self.posterior_samples
        if self.guide is not None:
            return_sites = return_sites or None  # with a guide, all sites by default
            posterior_samples = _predictive(
                self.guide, {}, self.num_samples, None, self.parallel, args, kwargs
            )
        return _predictive(
            self.model,
            posterior_samples,
            self.num_samples,
            return_sites,
            self.parallel,
            args,
            kwargs,
        )

    forward = __call__

    def get_samples(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Same as calling the object."""
        return self(*args, **kwargs)
