"""Inference: SVI and its losses (``pyro.infer``'s names)."""

from .elbo import ELBO, Trace_ELBO, TraceMeanField_ELBO
from .svi import SVI

__all__ = ["ELBO", "SVI", "Trace_ELBO", "TraceMeanField_ELBO"]
