"""Inference: SVI and its losses (``pyro.infer``'s names)."""

from .elbo import ELBO, Trace_ELBO, TraceMeanField_ELBO
from .svi import SVI
from .tracegraph_elbo import TraceGraph_ELBO

__all__ = ["ELBO", "SVI", "TraceGraph_ELBO", "TraceMeanField_ELBO", "Trace_ELBO"]
