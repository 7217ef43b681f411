"""Evidence lower bounds: :class:`Trace_ELBO` and :class:`TraceMeanField_ELBO`.

Each returns the *negative* ELBO (a loss to minimise), like Pyro. On the loss path
nothing calls ``.item()``: the loss stays a tensor until :meth:`SVI.step` returns it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from itertools import zip_longest
from typing import Any

import torch

from .. import primitives
from ..distributions import kl_divergence
from ..poutine import handlers as poutine
from ..poutine.trace_struct import Trace, check_site_shape, plate_nesting, scale_and_mask

# Set by SVI on the steps that may skip torch's argument checks of the model's and guide's
# distributions (see SVI's "Validation" note); an ELBO called by anything else checks all.
ARG_CHECKS = {"skip": False}


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


class ELBO:
    """Base class: how to draw (model, guide) trace pairs, particles and validation.

    :param num_particles: number of samples averaged per estimate.
    :param max_plate_nesting: bound on nested plates (needed by vectorized particles;
        guessed by a trial run when not given, as in Pyro).
    :param vectorize_particles: draw all particles in one pass, as a leftmost batch dim.
    :param retain_graph: passed to ``backward``.
    :param max_iarange_nesting: Pyro's old name of ``max_plate_nesting``.

    ``strict_enumeration_warning``, ``ignore_jit_warnings``, ``jit_options`` and
    ``tail_adaptive_beta`` are accepted so that Pyro code runs unchanged; they have no
    effect (there is no enumeration or JIT here).
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        max_iarange_nesting: float | None = None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
        retain_graph: bool | None = None,
        tail_adaptive_beta: float = -1.0,
    ) -> None:
        if max_iarange_nesting is not None:
            max_plate_nesting = max_iarange_nesting
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting
        self.vectorize_particles = vectorize_particles
        self.retain_graph = retain_graph
        if vectorize_particles and num_particles > 1:
            self.max_plate_nesting += 1  # room for the particle plate, as in Pyro
        self._checked: set = set()

    # traces --------------------------------------------------------------------------
    def _raw_traces(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace

    def _get_trace(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        dist_cls = torch.distributions.Distribution
        if ARG_CHECKS["skip"] and dist_cls._validate_args:
            # The distributions are built without checking their arguments; their values
            # are still checked against their supports when scored below (a distribution
            # built with the default reads it when used, so it validates again then).
            dist_cls._validate_args = False
            try:
                model_trace, guide_trace = self._raw_traces(model, guide, args, kwargs)
            finally:
                dist_cls._validate_args = True
        else:
            model_trace, guide_trace = self._raw_traces(model, guide, args, kwargs)
        validate = primitives.is_validation_enabled()
        key = (tuple(model_trace.nodes), tuple(guide_trace.nodes)) if validate else None
        if self._sums_suffice(guide_trace, key):
            guide_trace.compute_log_prob_sums()
            model_trace.compute_log_prob_sums()
        else:
            model_trace.compute_log_prob()
            guide_trace.compute_score_parts()
        if validate:
            self._validate(model_trace, guide_trace, key)
        return model_trace, guide_trace

    # Whether the loss reads only each site's log_prob_sum when every guide site is
    # reparameterised (then the traces skip the batch-shaped log_prob where they can).
    _reads_only_sums = False

    def _sums_suffice(self, guide_trace: Trace, key: tuple | None) -> bool:
        """Whether these traces need only their sites' ``log_prob_sum``: the loss reads
        nothing else, the site set has been validated (the shape checks read ``log_prob``),
        and every guide site is reparameterised."""
        if not self._reads_only_sums or (key is not None and key not in self._checked):
            return False
        return all(
            site["fn"].has_rsample
            for site in guide_trace.nodes.values()
            if site["type"] == "sample"
        )

    def _validate(self, model_trace: Trace, guide_trace: Trace, key: tuple) -> None:
        """Model/guide checks, run once per distinct set of sites (``key``)."""
        if key in self._checked:
            return
        model_latent = set(model_trace.stochastic_nodes)
        guide_latent = {
            n
            for n, s in guide_trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not s["infer"].get("is_auxiliary")
        }
        missing = model_latent - set(guide_trace.nodes)
        if missing:
            warnings.warn(
                f"Found vars in model but not guide: {sorted(missing)}. They are sampled from "
                "the prior and add no guide term; add them to the guide (or observe them).",
                stacklevel=4,
            )
        extra = guide_latent - model_latent - set(model_trace.observation_nodes)
        if extra:
            warnings.warn(
                f"Found non-auxiliary vars in guide but not model: {sorted(extra)}; mark them "
                "infer={'is_auxiliary': True} or add them to the model.",
                stacklevel=4,
            )
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and getattr(site["fn"], "_has_rsample", False) is None:
                raise ValueError(
                    f'guide site factor("{name}", ...) does not say whether it is '
                    "reparameterised: pass has_rsample=True if it comes from reparameterised "
                    "sampling, has_rsample=False otherwise"
                )
        # Pyro's order: guide/model disagreement first (in the model's site order), then
        # each site against its plates, so the same program fails with the same message.
        for name in model_trace.stochastic_nodes:
            guide_site = guide_trace.nodes.get(name)
            if guide_site is not None and guide_site["type"] == "sample":
                _check_shapes_agree(model_trace.nodes[name], guide_site, self.max_plate_nesting)
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, self.max_plate_nesting)
        if len(self._checked) >= 1024:  # site names that vary every step: stay bounded
            self._checked.clear()
        self._checked.add(key)

    def _guess_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        # Plates' index draws still reach the handlers outside: a rank's shard handler
        # fills them, so the trial run reads (and creates) only that rank's rows.
        with poutine.block(expose_types=("subsample",)):
            model_trace, guide_trace = self._raw_traces(model, guide, args, kwargs)
        self.max_plate_nesting = plate_nesting(model_trace, guide_trace)
        if self.vectorize_particles and self.num_particles > 1:
            self.max_plate_nesting += 1

    def _vectorized(self, fn: Callable) -> Callable:
        if self.num_particles == 1:
            return fn

        def wrapped(*args, **kwargs):
            dim = -int(self.max_plate_nesting)
            with primitives.plate("num_particles_vectorized", self.num_particles, dim=dim):
                return fn(*args, **kwargs)

        return wrapped

    def _get_traces(self, model, guide, args, kwargs) -> Iterator[tuple[Trace, Trace]]:
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            yield self._get_trace(self._vectorized(model), self._vectorized(guide), args, kwargs)
        else:
            for _ in range(self.num_particles):
                yield self._get_trace(model, guide, args, kwargs)

    # losses --------------------------------------------------------------------------
    def _differentiable_loss_particle(
        self, model_trace: Trace, guide_trace: Trace
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, surrogate_loss)`` of one particle; subclasses define it."""
        raise NotImplementedError

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The loss as a tensor whose value is the loss and whose gradient is the estimator's."""
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            particle_loss, particle_surrogate = self._differentiable_loss_particle(
                model_trace, guide_trace
            )
            loss = loss + particle_loss / self.num_particles
            surrogate = surrogate + particle_surrogate / self.num_particles
        if not isinstance(surrogate, torch.Tensor):
            return torch.as_tensor(loss)
        return loss + (surrogate - surrogate.detach())

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss estimate (negative ELBO) as a float; no gradients."""
        with torch.no_grad():
            total = 0.0
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                loss, _ = self._differentiable_loss_particle(model_trace, guide_trace)
                total = total + loss
            return float(total / self.num_particles)  # host sync: the caller wants a number

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Backpropagate the surrogate loss; return the loss estimate as a float (as Pyro)."""
        return float(self._loss_and_grads(model, guide, *args, **kwargs))  # host sync

    def _loss_and_grads(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """:meth:`loss_and_grads` returning the loss as a detached 0-dim tensor, with no host
        sync: what :class:`~distsvi.infer.SVI` steps with."""
        n = self.num_particles
        total = None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
            total = loss if total is None else total + loss
            if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
                # with one particle no division: every op on the hot path costs a kernel
                (surrogate if n == 1 else surrogate / n).backward(retain_graph=self.retain_graph)
        if n != 1:
            total = total / n
        return total if isinstance(total, torch.Tensor) else torch.tensor(total)


def _check_shapes_agree(model_site: dict, guide_site: dict, max_plate_nesting: float) -> None:
    """A guide value must have the model site's shape (up to broadcasting over dims left
    of the plates), or its log-densities would broadcast into a wrong ELBO."""
    name = model_site["name"]
    model_fn, guide_fn = model_site["fn"], guide_site["fn"]
    model_event = len(model_fn.event_shape)
    guide_event = len(guide_fn.event_shape)
    if model_event != guide_event:
        raise ValueError(
            f"Model and guide event_dims disagree at site {name!r}: {model_event} vs "
            f"{guide_event}; give the guide's distribution the model's event shape "
            f"{tuple(model_fn.event_shape)} (e.g. with .to_event(n))"
        )
    model_shape = tuple(model_fn.batch_shape + model_fn.event_shape)
    guide_shape = tuple(guide_fn.batch_shape + guide_fn.event_shape)
    if model_shape == guide_shape:
        return
    if max_plate_nesting != float("inf"):
        keep = int(max_plate_nesting) + model_event
        model_shape = model_shape[max(0, len(model_shape) - keep) :]
        guide_shape = guide_shape[max(0, len(guide_shape) - keep) :]
    if model_shape != guide_shape and any(
        m != g for m, g in zip_longest(reversed(model_shape), reversed(guide_shape), fillvalue=1)
    ):
        raise ValueError(
            f"Model and guide shapes disagree at site {name!r}: {model_shape} vs "
            f"{guide_shape} (model vs guide). Give the guide's distribution the model's shape: "
            "put it in the same plates, or reshape/.to_event() it"
        )


def _plate_frames(site: dict) -> frozenset:
    return frozenset(f for f in site["cond_indep_stack"] if f.dim is not None)


def _sum_to(terms: dict, target: frozenset) -> torch.Tensor | float:
    """Sum the per-plate terms down to the plates in ``target`` (Rao-Blackwellised cost)."""
    total = 0.0
    for frames, value in terms.items():
        for f in frames:
            if f not in target and value.dim() >= -f.dim and value.shape[f.dim] != 1:
                value = value.sum(f.dim, keepdim=True)
        while value.dim() and value.shape[0] == 1:
            value = value.squeeze(0)
        total = total + value
    return total


def _log_r_terms(model_trace: Trace, guide_trace: Trace) -> dict:
    """``log p - log q`` of each site, grouped by the plates it lives in (detached)."""
    terms: dict = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        term = site["log_prob"]
        if not site["is_observed"]:
            term = term - guide_trace.nodes[name]["log_prob"]
        frames = _plate_frames(site)
        term = term.detach()
        terms[frames] = terms[frames] + term if frames in terms else term
    return terms


class Trace_ELBO(ELBO):
    """The standard ELBO estimator: pathwise gradients for reparameterised sites,
    score-function terms (weighted by downstream ``log p - log q``) for the others.

    Example::

        svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    """

    _reads_only_sums = True

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                # starting from the first term saves a (0.0 + tensor) kernel
                elbo = site["log_prob_sum"] if _is_zero(elbo) else elbo + site["log_prob_sum"]
        nonreparam = []
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                lps = site["log_prob_sum"]
                if lps is not getattr(site["fn"], "_zero_sum", None):  # not a known zero
                    elbo = elbo - lps
                parts = site.get("score_parts")  # absent when only the sums were computed
                if parts is not None and not _is_zero(parts.score_function):
                    nonreparam.append(site)
        # For reparameterised sites the surrogate is the ELBO itself (one graph, not two);
        # a non-reparameterised site contributes its score term instead of its entropy.
        surrogate = elbo
        if nonreparam:
            log_r = _log_r_terms(model_trace, guide_trace)
            for site in nonreparam:
                weight = _sum_to(log_r, _plate_frames(site))
                score = site["score_parts"].score_function
                surrogate = surrogate + site["log_prob_sum"] + (weight * score).sum()
        return _detach(-elbo), -surrogate


class TraceMeanField_ELBO(ELBO):
    """ELBO with analytic KL(q || p) for each latent where torch has a closed form.

    Assumes a mean-field guide whose latents are fully reparameterised; sites without
    a closed-form KL fall back to the Monte-Carlo estimate.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None:
                raise ValueError(
                    f"TraceMeanField_ELBO: latent site {name!r} is in the model but not the "
                    "guide; add a sample site of that name to the guide"
                )
            if not guide_site["fn"].has_rsample:
                raise NotImplementedError(
                    f"TraceMeanField_ELBO needs reparameterised guide sites; {name!r} is not. "
                    "Use Trace_ELBO or TraceGraph_ELBO for discrete latents."
                )
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                elbo = (
                    elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
                )
                continue
            kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
            elbo = elbo - kl.sum()
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                # auxiliary guide sites enter as -log q
                elbo = elbo - guide_site["log_prob_sum"]
        return _detach(-elbo), -elbo


class JitTrace_ELBO(Trace_ELBO):
    """Pyro's JIT-compiled :class:`Trace_ELBO`: here :class:`~distsvi.infer.SVI` runs it
    through ``torch.compile`` (as ``SVI(..., compile=True)``); the numbers are Trace_ELBO's."""

    compile_step = True


class JitTraceMeanField_ELBO(TraceMeanField_ELBO):
    """Pyro's JIT-compiled :class:`TraceMeanField_ELBO`, run by ``SVI`` through
    ``torch.compile`` (as ``SVI(..., compile=True)``)."""

    compile_step = True
