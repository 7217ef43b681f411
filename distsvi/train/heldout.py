"""Held-out rows of a model with per-datapoint latents.

A non-amortized guide (an autoguide) holds one row of params per *training* datapoint, so
it has nothing to say about a held-out row's latents. For those models the job scores a
held-out row the way a fitted factor model is usually scored: the global latents are
fixed at the guide's median, a fresh guide of the same kind is fitted to the held-out
rows' local latents alone (``REFIT_STEPS`` Adam steps at ``optim.lr`` on all of those rows
at once, so every row gets as many updates on one rank as on many, in a param store of its
own, from the same start every time), and the validation loss is the negative ELBO of
the held-out rows under it. The trained params, their optimizer state and the training
random stream are untouched. Amortized guides (``guide.name: model`` with an encoder)
score held-out rows directly, as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

import distsvi
from distsvi import optim, poutine
from distsvi.infer import SVI, Trace_ELBO
from distsvi.infer.autoguide import AutoGuide
from distsvi.poutine.runtime import Messenger

REFIT_STEPS = 200
Probe = tuple[tuple, dict[str, Any]]  # (args, kwargs) for the model on some training rows


def local_sites(model: Callable, guide: Callable, probe: Probe, plate: str = "data") -> tuple:
    """The model's latent sites inside ``plate`` when ``guide`` is an autoguide (whose
    params for them are per training datapoint); empty for any other guide.

    :param probe: ``(args, kwargs)`` for the model on a few training rows (see
        :meth:`distsvi.train.data.Split.head`).
    """
    if not isinstance(guide, AutoGuide):
        return ()
    args, kwargs = probe
    with torch.no_grad(), torch.random.fork_rng():
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    return tuple(
        name
        for name, site in tr.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and any(f.name == plate for f in site["cond_indep_stack"])
    )


class _drop_density(Messenger):
    """Leave the named sample sites out of the log-density (their values still flow)."""

    def __init__(self, fn: Callable, names: frozenset) -> None:
        super().__init__(fn)
        self.names = names

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] in self.names:
            msg["mask"] = torch.tensor(False)


@contextlib.contextmanager
def refitted(
    model: Callable,
    guide: AutoGuide,
    local: tuple,
    probe: Probe,
    rows: tuple,
    lr: float,
) -> Iterator[tuple[Callable, Callable]]:
    """A model with the globals fixed at ``guide``'s median and a guide fitted to the local
    latents of ``rows``, valid inside the block (their params live in a store of their own).

    :param probe: ``(args, kwargs)`` for the model on training rows this rank holds: the
        median is read there (the locals' values are dropped; only the globals are kept).
    """
    args, kwargs = probe
    with torch.no_grad():
        median = guide.median(*args, **kwargs)
    fixed = {k: v.detach() for k, v in median.items() if k not in local}
    model_rows = _drop_density(poutine.condition(model, data=fixed), frozenset(fixed))
    n = rows[0].shape[0]
    with distsvi.get_param_store().scope():
        guide_rows = type(guide)(model_rows)
        svi = SVI(model_rows, guide_rows, optim.Adam({"lr": lr}), Trace_ELBO())
        for _ in range(REFIT_STEPS):
            svi.step(*rows, size=n)
        yield model_rows, guide_rows


def heldout_loss(
    model: Callable, guide: AutoGuide, local: tuple, probe: Probe, rows: tuple, lr: float
) -> float:
    """The negative ELBO of ``rows`` (all of them, unscaled) after refitting their locals."""
    with refitted(model, guide, local, probe, rows, lr) as (m, g), torch.no_grad():
        return Trace_ELBO().loss(m, g, *rows, size=rows[0].shape[0])


def shard_rows(rows: tuple, rank: int, world_size: int) -> tuple:
    """This rank's contiguous block of ``rows`` (uneven blocks allowed)."""
    n = rows[0].shape[0]
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return tuple(t[lo:hi] for t in rows)


