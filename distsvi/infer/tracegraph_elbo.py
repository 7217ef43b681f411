"""TraceGraph_ELBO: the score-function estimator with Rao-Blackwellisation and baselines.

For every guide site ``s`` that is not reparameterised, the gradient term is
``grad log q(s) * (cost(s) - baseline(s))`` where ``cost(s)`` holds only the terms of
``log p - log q`` that can depend on ``s``: those of the sites *downstream* of ``s``.
The dependency graph is the dense one (each site may depend on every site before it, in
the guide's order for guide terms and the model's order for model terms) cut by plates:
within a vectorized plate element ``i`` only sees element ``i``, and iterations of a
sequential plate do not see each other. Costs are then summed down to the plates of ``s``.
(Pyro 1.9 finds dependencies by tracking values instead; the two agree whenever each
later site in ``s``'s plates uses ``s``, and otherwise the dense graph keeps a few more
terms: an estimator with the same mean and at most that variance.)

Baselines are given per site, as in Pyro::

    sample("z", dist.Bernoulli(p), infer={"baseline": {"use_decaying_avg_baseline": True,
                                                       "baseline_beta": 0.95}})

``nn_baseline`` (a module, registered with :func:`distsvi.module` so that it trains) with
``nn_baseline_input``, or a fixed ``baseline_value``, are fit by an extra squared-error
term ``(cost - baseline)**2`` added to the loss being differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..poutine.trace_struct import Trace
from .elbo import ELBO, _detach, _is_zero, _plate_frames, _sum_to

_BASELINE_KEYS = frozenset(
    (
        "nn_baseline",
        "nn_baseline_input",
        "use_decaying_avg_baseline",
        "baseline_beta",
        "baseline_value",
    )
)


def _baseline_options(site: dict) -> tuple:
    options = site["infer"].get("baseline")
    if not options:
        return None, None, False, 0.9, None
    unknown = set(options) - _BASELINE_KEYS
    if unknown:
        raise ValueError(
            f"site {site['name']!r}: unrecognized baseline options {sorted(unknown)}; "
            f"the options are {sorted(_BASELINE_KEYS)}"
        )
    nn_baseline = options.get("nn_baseline")
    value = options.get("baseline_value")
    if nn_baseline is not None and value is not None:
        raise ValueError(f"site {site['name']!r}: give nn_baseline or baseline_value, not both")
    return (
        nn_baseline,
        options.get("nn_baseline_input"),
        options.get("use_decaying_avg_baseline", False),
        options.get("baseline_beta", 0.9),
        value,
    )


def _sequential(site: dict) -> dict:
    return {f.name: f.counter for f in site["cond_indep_stack"] if f.dim is None}


def _independent(seq: dict, site: dict) -> bool:
    """Whether ``site`` lies in another iteration of one of the sequential plates ``seq``."""
    for f in site["cond_indep_stack"]:
        if f.dim is None and f.name in seq and seq[f.name] != f.counter:
            return True
    return False


def _add(terms: dict, site: dict, value: torch.Tensor) -> None:
    frames = _plate_frames(site)
    terms[frames] = terms[frames] + value if frames in terms else value


class TraceGraph_ELBO(ELBO):
    """ELBO whose score-function terms see only downstream costs, with optional baselines.

    Takes :class:`~distsvi.infer.elbo.ELBO`'s arguments (``num_particles``,
    ``vectorize_particles``, ``max_plate_nesting``, ...). Decaying-average baselines keep
    their running averages on this object, one per site.

    Example::

        svi = SVI(model, guide, Adam({"lr": 0.01}), TraceGraph_ELBO())
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._avg_cost: dict[str, torch.Tensor] = {}

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss estimate as a float; no gradients, and baselines are left as they are."""
        with torch.no_grad():
            total = 0.0
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                total = total + model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            return -float(total / self.num_particles)  # host sync: the caller wants a number

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace):
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
        surrogate = elbo
        non_reparam = []
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            elbo = elbo - site["log_prob_sum"]
            _, score, entropy = site["score_parts"]
            if not _is_zero(entropy):
                surrogate = surrogate - entropy.sum()
            if not _is_zero(score):
                non_reparam.append(name)
        baseline_loss = 0.0
        if non_reparam:
            costs = _downstream_costs(model_trace, guide_trace, non_reparam)
            for name in non_reparam:
                site = guide_trace.nodes[name]
                cost = costs[name]
                baseline, loss_term = self._baseline(site, cost)
                if baseline is not None:
                    cost = cost - baseline
                    baseline_loss = baseline_loss + loss_term
                surrogate = surrogate + (site["score_parts"].score_function * cost.detach()).sum()
        return _detach(-elbo), -surrogate + baseline_loss

    def _baseline(self, site: dict, cost: torch.Tensor) -> tuple[Any, Any]:
        """``(baseline or None, squared-error loss term)`` for one site (Pyro's rules)."""
        nn_baseline, nn_input, use_avg, beta, value = _baseline_options(site)
        if nn_baseline is None and value is None and not use_avg:
            return None, 0.0
        name = site["name"]
        cost = torch.as_tensor(cost)
        baseline: Any = 0.0
        if use_avg:
            old = self._avg_cost.get(name)
            if old is None or old.shape != cost.shape:
                old = torch.zeros_like(cost)  # first use, or the subsample size changed
            self._avg_cost[name] = (1 - beta) * cost.detach() + beta * old
            baseline = baseline + old
        fit = nn_baseline is not None or value is not None
        if fit:
            baseline = baseline + (
                nn_baseline(nn_input.detach()) if nn_baseline is not None else value
            )
        if torch.as_tensor(baseline).shape != cost.shape:
            raise ValueError(
                f"baseline at site {name!r} has shape {tuple(torch.as_tensor(baseline).shape)}, "
                f"expected the shape of its downstream cost {tuple(cost.shape)}"
            )
        return baseline, (cost.detach() - baseline).pow(2).sum() if fit else 0.0


def _downstream_costs(model_trace: Trace, guide_trace: Trace, non_reparam: list) -> dict:
    """``cost(s)`` for each name ``s`` in ``non_reparam``, summed to ``s``'s plates."""
    guide_sites = [(n, s) for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
    model_sites = [(n, s) for n, s in model_trace.nodes.items() if s["type"] == "sample"]
    guide_pos = {n: i for i, (n, _) in enumerate(guide_sites)}
    model_pos = {n: i for i, (n, _) in enumerate(model_sites)}
    costs = {}
    for name in non_reparam:
        site = guide_trace.nodes[name]
        seq = _sequential(site)
        terms: dict = {}
        first_model = len(model_sites)
        for n, s in guide_sites[guide_pos[name] :]:
            if seq and _independent(seq, s):
                continue
            _add(terms, s, -s["log_prob"].detach())
            if n in model_pos:
                first_model = min(first_model, model_pos[n])
        for _, s in model_sites[first_model:]:
            if seq and _independent(seq, s):
                continue
            _add(terms, s, s["log_prob"].detach())
        costs[name] = _sum_to(terms, _plate_frames(site))
    return costs


class JitTraceGraph_ELBO(TraceGraph_ELBO):
    """Pyro's JIT-compiled :class:`TraceGraph_ELBO`, run by ``SVI`` through
    ``torch.compile`` (as ``SVI(..., compile=True)``)."""

    compile_step = True
