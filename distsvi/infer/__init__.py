"""Inference: SVI and its losses (``pyro.infer``'s names)."""

from . import autoguide
from .elbo import ELBO, Trace_ELBO, TraceMeanField_ELBO
from .predictive import Predictive
from .svi import SVI
from .tracegraph_elbo import TraceGraph_ELBO

__all__ = [
    "ELBO",
    "SVI",
    "Predictive",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "Trace_ELBO",
    "autoguide",
]
