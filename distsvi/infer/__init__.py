"""Inference: SVI and its losses (``pyro.infer``'s names)."""

from . import autoguide
from ..primitives import enable_validation, is_validation_enabled
from .elbo import ELBO, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from .predictive import Predictive
from .svi import SVI
from .tracegraph_elbo import JitTraceGraph_ELBO, TraceGraph_ELBO

__all__ = [
    "ELBO",
    "SVI",
    "JitTraceGraph_ELBO",
    "JitTraceMeanField_ELBO",
    "JitTrace_ELBO",
    "Predictive",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "Trace_ELBO",
    "autoguide",
    "enable_validation",
    "is_validation_enabled",
]
