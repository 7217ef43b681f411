"""A record of one execution: an ordered dict of sites, and their log-densities."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from itertools import zip_longest
from typing import Any, NamedTuple

import torch


class ScoreParts(NamedTuple):
    """A site's log-density split for gradient estimation.

    ``score_function`` is the term whose gradient needs the score-function (REINFORCE)
    estimator (non-reparameterised sites); ``entropy_term`` is the pathwise one.
    """

    log_prob: torch.Tensor
    score_function: Any
    entropy_term: Any


def scale_and_mask(tensor: torch.Tensor, scale: Any = 1.0, mask: Any = None) -> torch.Tensor:
    """Multiply ``tensor`` by ``scale`` and zero it where ``mask`` is False."""
    if mask is None:
        if isinstance(scale, (int, float)) and scale == 1.0:
            return tensor
        return tensor * scale
    return torch.where(mask, tensor * scale, tensor.new_zeros(()))


def _site_log_prob(site: dict, what: str = "log_prob") -> torch.Tensor:
    try:
        return site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    except (ValueError, RuntimeError) as e:
        fn = site["fn"]
        value = site["value"]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"Error while computing {what} at site {site['name']!r}: "
            f"cannot compute log_prob of a value of shape {shape} "
            f"under {type(fn).__name__} with batch shape {tuple(fn.batch_shape)} and event shape "
            f"{tuple(fn.event_shape)} (plates: {[f.name for f in site['cond_indep_stack']]}). "
            "Make the observation broadcast with the distribution: index data with the plate's "
            f"indices, or use .to_event(n) for event dims. ({e})"
        ) from e


def _fill_log_prob(site: dict, what: str = "log_prob") -> torch.Tensor:
    """Set ``unscaled_log_prob``, ``log_prob`` (scaled and masked) and ``log_prob_sum``."""
    fn = site["fn"]
    zero = getattr(fn, "_zero_sum", None)
    if zero is not None and site["value"] is fn.v and site["mask"] is None:
        # a Delta at its own point with no log-density: zero, whatever the scale
        site["unscaled_log_prob"] = site["log_prob"] = fn.log_density
        site["log_prob_sum"] = zero
        return fn.log_density
    unscaled = _site_log_prob(site, what)
    lp = scale_and_mask(unscaled, site["scale"], site["mask"])
    site["unscaled_log_prob"] = unscaled
    site["log_prob"] = lp
    site["log_prob_sum"] = lp if lp.dim() == 0 else lp.sum()
    return lp


_INDEPENDENT_LOG_PROB = torch.distributions.Independent.log_prob


def _fill_log_prob_sum(site: dict) -> None:
    """Set only ``log_prob_sum`` where that is cheaper than the batch-shaped ``log_prob``.

    A site whose ``fn`` is an ``Independent`` (``.to_event(n)``), with a number for a
    scale and no mask, sums its base's log-density straight to a scalar and scales that:
    the per-datapoint sums over the event dims, and the scaling of each, are skipped (the
    same number up to float round-off). Any other site gets :func:`_fill_log_prob`.
    """
    fn, scale = site["fn"], site["scale"]
    if (
        site["mask"] is None
        and type(scale) in (int, float)
        and getattr(type(fn), "log_prob", None) is _INDEPENDENT_LOG_PROB
        and not site["args"]
        and not site["kwargs"]
        and getattr(fn, "_zero_sum", None) is None
    ):
        try:
            base = fn.base_dist.log_prob(site["value"])
        except (ValueError, RuntimeError):
            _fill_log_prob(site)  # raises the message that names the site
            return
        total = base.sum()
        site["log_prob_sum"] = total if scale == 1.0 else total * scale
        return
    _fill_log_prob(site)


class Trace:
    """The sites of one run of a model or guide, in execution order.

    ``nodes`` maps site names to their message dicts (keys as in Pyro: ``type``, ``name``,
    ``fn``, ``args``, ``kwargs``, ``value``, ``is_observed``, ``infer``, ``scale``, ``mask``,
    ``cond_indep_stack``, and after :meth:`compute_log_prob`, ``log_prob`` and
    ``log_prob_sum``).
    """

    def __init__(self, graph_type: str = "flat") -> None:
        self.nodes: OrderedDict[str, dict] = OrderedDict()
        self.graph_type = graph_type
        # Edges exist only when asked for (add_edge, or a "dense" graph on first query), so
        # recording a site costs no more than its record.
        self._succ: dict[str, set[str]] = {}
        self._pred: dict[str, set[str]] = {}
        self._dense_done = False

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def add_node(self, site_name: str, **kwargs: Any) -> None:
        """Add a site; a second site of the same name is an error (params may repeat)."""
        old = self.nodes.get(site_name)
        if old is not None:
            if old["type"] != kwargs["type"]:
                raise RuntimeError(
                    f"site name {site_name!r} is used by a {old['type']} site and a {kwargs['type']} "
                    "site; give each site its own name"
                )
            if kwargs["type"] != "param":
                raise RuntimeError(
                    f"Multiple {kwargs['type']} sites named {site_name!r}; every sample site needs a "
                    "unique name (inside a loop, add the index: f'x_{i}')"
                )
        self.nodes[site_name] = kwargs

    def copy(self) -> Trace:
        """A new trace with a shallow copy of each site (and the same edges)."""
        new = Trace(self.graph_type)
        new.nodes = OrderedDict((k, dict(v)) for k, v in self.nodes.items())
        new._succ = {k: set(v) for k, v in self._succ.items()}
        new._pred = {k: set(v) for k, v in self._pred.items()}
        new._dense_done = self._dense_done
        return new

    # the dependency graph -------------------------------------------------------------
    def _graph(self) -> None:
        """Fill in a dense graph's edges the first time they are read."""
        if self.graph_type != "dense" or self._dense_done:
            return
        self._dense_done = True
        samples = [(n, s) for n, s in self.nodes.items() if s["type"] == "sample"]
        for i, (name, site) in enumerate(samples):
            for past, past_site in samples[:i]:
                # another iteration of a shared sequential plate: independent
                if not any(
                    a.name == b.name and a.counter != b.counter
                    for a, b in zip(site["cond_indep_stack"], past_site["cond_indep_stack"])
                ):
                    self.add_edge(past, name)

    def add_edge(self, site1: str, site2: str) -> None:
        """Record that ``site2`` depends on ``site1`` (a missing site gets an empty record)."""
        for site in (site1, site2):
            if site not in self.nodes:
                self.nodes[site] = {"name": site, "type": None}
        self._succ.setdefault(site1, set()).add(site2)
        self._pred.setdefault(site2, set()).add(site1)

    def remove_node(self, site_name: str) -> None:
        """Delete a site and its edges."""
        self._graph()
        del self.nodes[site_name]
        for p in self._pred.pop(site_name, ()):
            self._succ[p].discard(site_name)
        for s in self._succ.pop(site_name, ()):
            self._pred[s].discard(site_name)

    def predecessors(self, site_name: str) -> set[str]:
        self._graph()
        return self._pred.setdefault(site_name, set())

    def successors(self, site_name: str) -> set[str]:
        self._graph()
        return self._succ.setdefault(site_name, set())

    @property
    def edges(self) -> Iterator[tuple[str, str]]:
        self._graph()
        for site in self.nodes:
            for succ in self._succ.get(site, ()):
                yield site, succ

    def _dfs(self, root: str, visited: set[str]) -> Iterator[str]:
        """The sites reachable from ``root`` and not in ``visited``, each after its
        successors (depth-first post-order); they are added to ``visited``."""
        if root in visited:
            return
        stack = [(root, iter(self._succ.get(root, ())))]
        on_stack = {root}
        while stack:
            site, children = stack[-1]
            child = next((c for c in children if c not in visited and c not in on_stack), None)
            if child is None:
                stack.pop()
                on_stack.discard(site)
                visited.add(site)
                yield site
            else:
                stack.append((child, iter(self._succ.get(child, ()))))
                on_stack.add(child)

    def topological_sort(self, reverse: bool = False) -> list[str]:
        """The site names with every site before the sites that depend on it (Pyro's order:
        depth-first post-order from each site in execution order, reversed)."""
        self._graph()
        visited: set[str] = set()
        order = [site for root in list(self.nodes) for site in self._dfs(root, visited)]
        return order if reverse else order[::-1]

    def detach_(self) -> None:
        """Detach every sample site's value from the autograd graph, in place."""
        for site in self.nodes.values():
            if site["type"] == "sample" and isinstance(site["value"], torch.Tensor):
                site["value"] = site["value"].detach()

    def compute_log_prob(
        self, site_filter: Callable[[str, dict], bool] = lambda n, s: True
    ) -> None:
        """Set ``log_prob`` (scaled and masked), ``unscaled_log_prob`` and ``log_prob_sum``."""
        for name, site in self.nodes.items():
            if site["type"] == "sample" and "log_prob" not in site and site_filter(name, site):
                _fill_log_prob(site)

    def compute_log_prob_sums(self) -> None:
        """Set ``log_prob_sum`` of every sample site, without ``log_prob`` where skipping it
        saves work (see :func:`_fill_log_prob_sum`): for an ELBO that reads only the sums."""
        for site in self.nodes.values():
            if site["type"] == "sample" and "log_prob_sum" not in site:
                _fill_log_prob_sum(site)

    def compute_score_parts(self) -> None:
        """Set ``score_parts`` (and ``log_prob``) of every sample site."""
        for site in self.nodes.values():
            if site["type"] == "sample" and "score_parts" not in site:
                lp = _fill_log_prob(site, "score_parts")
                if site["fn"].has_rsample:
                    site["score_parts"] = ScoreParts(lp, 0, lp)
                else:
                    # The score term is left unscaled: the cost it multiplies carries the scale.
                    site["score_parts"] = ScoreParts(lp, site["unscaled_log_prob"], 0)

    def log_prob_sum(
        self, site_filter: Callable[[str, dict], bool] = lambda n, s: True
    ) -> torch.Tensor | float:
        """The total (scaled) log-density of the sample sites that pass ``site_filter``."""
        total = 0.0
        for name, site in self.nodes.items():
            if site["type"] == "sample" and site_filter(name, site):
                if "log_prob_sum" not in site:
                    _fill_log_prob(site, "log_prob_sum")
                total = total + site["log_prob_sum"]
        return total

    @property
    def stochastic_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s["type"] == "sample" and not s["is_observed"]]

    @property
    def observation_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s["type"] == "sample" and s["is_observed"]]

    @property
    def param_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s["type"] == "param"]

    @property
    def reparameterized_nodes(self) -> list[str]:
        return [
            n
            for n, s in self.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and s["fn"].has_rsample
        ]

    @property
    def nonreparam_stochastic_nodes(self) -> list[str]:
        return [
            n
            for n, s in self.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not s["fn"].has_rsample
        ]

    def iter_stochastic_nodes(self) -> Iterator[tuple[str, dict]]:
        for name, site in self.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                yield name, site

    def format_shapes(self, title: str = "Trace Shapes:", last_site: str | None = None) -> str:
        """A table of the shapes at each site (params; sample sites' distribution batch |
        event shape, value and log_prob), in Pyro's layout, up to ``last_site``."""
        if not self.nodes:
            return title
        rows: list[tuple[list[str], list[str], list[str]]] = [([title], [], [])]

        def split(shape, event_dim):
            shape = [str(n) for n in shape]
            cut = len(shape) - event_dim
            return shape[:cut], shape[cut:]

        rows.append((["Param Sites:"], [], []))
        for name, site in self.nodes.items():
            if site["type"] == "param":
                rows.append(([name], [str(n) for n in site["value"].shape], []))
            if name == last_site:
                break
        rows.append((["Sample Sites:"], [], []))
        scored = any("log_prob" in s for s in self.nodes.values() if s["type"] == "sample")
        for name, site in self.nodes.items():
            if site["type"] == "subsample":  # Pyro's table shows a plate's indices as a site
                rows.append(([name + " dist"], ["|"], []))
                rows.append((["value"], [str(n) for n in site["value"].shape] + ["|"], []))
                if scored:
                    rows.append((["log_prob"], ["|"], []))
            if site["type"] == "sample":
                fn = site["fn"]
                batch = [str(n) for n in getattr(fn, "batch_shape", ())]
                event = [str(n) for n in getattr(fn, "event_shape", ())]
                rows.append(([name + " dist"], batch + ["|"], event))
                v_batch, v_event = split(getattr(site["value"], "shape", ()), len(event))
                rows.append((["value"], v_batch + ["|"], v_event))
                if "log_prob" in site:
                    lp = [str(n) for n in getattr(site["log_prob"], "shape", ())]
                    rows.append((["log_prob"], lp + ["|"], []))
            if name == last_site:
                break
        return _table(rows)


def plate_nesting(*traces: Trace) -> int:
    """How many vectorized plate dims the sample sites of ``traces`` reach (Pyro's guess of
    ``max_plate_nesting``)."""
    dims = [
        f.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.dim is not None
    ]
    return -min(dims) if dims else 0


def check_site_shape(site: dict, max_plate_nesting: float) -> None:
    """Raise if a site's log_prob has dims that no plate declares (Pyro's rule)."""
    actual = list(site["log_prob"].shape)
    expected: list[int | None] = []
    for f in site["cond_indep_stack"]:
        if f.dim is None:
            continue
        if len(expected) < -f.dim:
            expected = [None] * (-f.dim - len(expected)) + expected
        expected[f.dim] = f.size
    expected_ = [-1 if e is None else e for e in expected]
    if len(expected_) > max_plate_nesting:
        raise ValueError(
            f"at site {site['name']!r}: {len(expected_)} nested plates, but "
            f"max_plate_nesting={max_plate_nesting}; raise max_plate_nesting"
        )
    if max_plate_nesting < len(actual):
        actual = actual[len(actual) - int(max_plate_nesting) :]
    for a, e in zip_longest(reversed(actual), reversed(expected_), fillvalue=1):
        if e != -1 and e != a:
            raise ValueError(
                f"at site {site['name']!r}, invalid log_prob shape: expected {expected_} from "
                f"the plates around it, got {actual}. Fixes: enclose the batched tensor in a "
                "`with plate(...)` context, `.to_event(...)` the distribution, or check that "
                "the observation has the plate's (sub)sample size."
            )


def _table(rows: list[tuple[list[str], list[str], list[str]]]) -> str:
    """Three groups of cells per row: the first two right-aligned, the last left-aligned,
    every column as wide as its widest cell."""
    widths = [max(len(row[g]) for row in rows) for g in range(3)]
    grid = []
    for row in rows:
        cells = []
        for g, group in enumerate(row):
            pad = [""] * (widths[g] - len(group))
            cells += group + pad if g == 2 else pad + group
        grid.append(cells)
    col = [max(len(r[j]) for r in grid) for j in range(len(grid[0]))]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(r, col)) for r in grid)
