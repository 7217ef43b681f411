"""Where an autoguide starts: ``init_loc_fn`` strategies, as in ``pyro.infer.autoguide``.

A strategy is a function ``site -> value`` called once per latent site while the guide
runs the model to learn its structure; ``site`` is the model's message (``site["fn"]``
already broadcast over the plates around it). Strategies that take options return a
configured strategy when called without a site, e.g. ``init_to_median(num_samples=50)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.distributions import biject_to

from ...distributions import MaskedDistribution
from ...poutine.runtime import Messenger, _broadcast

InitFn = Callable[[dict], torch.Tensor]


def _inside_support(
    site: dict, strategy: str, fallback: InitFn | None, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()`` when it succeeds inside the site's support, else ``fallback(site)``."""
    try:
        value = compute().detach()
        if not torch.isnan(value).any() and site["fn"].support.check(value).all():
            return value
    except (RuntimeError, NotImplementedError, ValueError):
        pass
    if fallback is None:
        raise ValueError(
            f"{strategy} found no value inside the support of site {site['name']!r}; "
            f"give it a fallback, e.g. {strategy}(fallback=init_to_feasible)"
        )
    return fallback(site)


def init_to_feasible(site: dict | None = None) -> torch.Tensor | InitFn:
    """The point of the support that maps to zero in unconstrained space."""
    if site is None:
        return init_to_feasible
    value = site["fn"].sample().detach()
    t = biject_to(site["fn"].support)
    return t(torch.zeros_like(t.inv(value)))


def init_to_sample(site: dict | None = None) -> torch.Tensor | InitFn:
    """A draw from the prior."""
    if site is None:
        return init_to_sample
    return site["fn"].sample().detach()


def init_to_uniform(site: dict | None = None, radius: float = 2.0) -> torch.Tensor | InitFn:
    """A point drawn uniformly from ``(-radius, radius)`` in unconstrained space."""
    if site is None:
        return functools.partial(init_to_uniform, radius=radius)
    value = site["fn"].sample().detach()
    t = biject_to(site["fn"].support)
    u = t.inv(value)
    return t(torch.rand_like(u) * (2 * radius) - radius)


def _is_multivariate(fn: torch.distributions.Distribution) -> bool:
    while isinstance(fn, (torch.distributions.Independent, MaskedDistribution)):
        fn = fn.base_dist
    return any(size > 1 for size in fn.event_shape)


def init_to_median(
    site: dict | None = None, num_samples: int = 15, *, fallback: InitFn | None = init_to_feasible
) -> torch.Tensor | InitFn:
    """The elementwise median of ``num_samples`` prior draws; ``fallback`` when that fails.
    A multivariate distribution (whose median is undefined) starts at
    :func:`init_to_feasible`, as in Pyro."""
    if site is None:
        return functools.partial(init_to_median, num_samples=num_samples, fallback=fallback)
    fn = site["fn"]
    if _is_multivariate(fn):
        return init_to_feasible(site)
    return _inside_support(
        site, "init_to_median", fallback, lambda: fn.sample((num_samples,)).median(dim=0)[0]
    )


def init_to_mean(
    site: dict | None = None, *, fallback: InitFn | None = init_to_median
) -> torch.Tensor | InitFn:
    """The prior mean; ``fallback`` where it is undefined or outside the support."""
    if site is None:
        return functools.partial(init_to_mean, fallback=fallback)
    return _inside_support(site, "init_to_mean", fallback, lambda: site["fn"].mean)


def init_to_value(
    site: dict | None = None,
    values: dict | None = None,
    *,
    fallback: InitFn | None = init_to_uniform,
) -> torch.Tensor | InitFn:
    """The given ``values[name]`` where given, else ``fallback``."""
    values = {} if values is None else values
    if site is None:
        return functools.partial(init_to_value, values=values, fallback=fallback)
    if site["name"] in values:
        return torch.as_tensor(values[site["name"]])
    if fallback is None:
        raise ValueError(f"init_to_value: no value for site {site['name']!r}")
    return fallback(site)


class _InitToGenerated:
    """Calls ``generate()`` for a fresh strategy at the start of each model run (a run
    starts when a site name comes round again)."""

    def __init__(self, generate: Callable[[], InitFn]) -> None:
        self.generate = generate
        self._init: InitFn | None = None
        self._seen: set = set()

    def __call__(self, site: dict) -> torch.Tensor:
        if self._init is None or site["name"] in self._seen:
            self._init = self.generate()
            self._seen = set()
        self._seen.add(site["name"])
        return self._init(site)


def init_to_generated(
    site: dict | None = None, generate: Callable[[], InitFn] = lambda: init_to_uniform
) -> torch.Tensor | InitFn:
    """The strategy returned by ``generate()``, called once per run of the model (e.g. an
    ``init_to_value`` of freshly drawn values, so that each run starts elsewhere)."""
    init = _InitToGenerated(generate)
    return init if site is None else init(site)


class InitMessenger(Messenger):
    """Set every latent sample site's value by ``init_fn`` instead of sampling it."""

    def __init__(self, init_fn: InitFn) -> None:
        super().__init__(None)
        self.init_fn = init_fn

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["value"] is not None or msg["is_observed"]:
            return
        if msg["cond_indep_stack"]:
            _broadcast(msg)  # so that init_fn sees the plated shape
        try:
            with torch.no_grad():
                value = self.init_fn(msg)
        except NotImplementedError as e:
            raise ValueError(
                f"init_loc_fn cannot initialise site {msg['name']!r} (support "
                f"{msg['fn'].support}): {e}. Autoguides need continuous latents; hide discrete "
                "ones (poutine.block) and guide them by hand."
            ) from e
        shape = msg["fn"].batch_shape + msg["fn"].event_shape
        if value.shape != shape and len(value.shape) <= len(shape):
            try:
                value = value.expand(shape)
            except RuntimeError:
                pass
        if value.shape != shape:
            raise ValueError(
                f"init_loc_fn gave site {msg['name']!r} a value of shape {tuple(value.shape)}, "
                f"expected {tuple(shape)}"
            )
        msg["value"] = value
        msg["done"] = True


__all__ = [
    "InitMessenger",
    "init_to_feasible",
    "init_to_generated",
    "init_to_mean",
    "init_to_median",
    "init_to_sample",
    "init_to_uniform",
    "init_to_value",
]
