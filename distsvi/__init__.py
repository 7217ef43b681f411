"""distsvi: stochastic variational inference with Pyro's API, data-parallel on torch.

Port a Pyro model by changing imports::

    import distsvi as pyro
    import distsvi.distributions as dist
    from distsvi.infer import SVI, Trace_ELBO
    from distsvi.optim import Adam
"""

from . import distributions, infer, optim, poutine
from .params import clear_param_store, get_param_store
from .poutine.handlers import set_rng_seed
from .primitives import (
    deterministic,
    enable_validation,
    factor,
    is_validation_enabled,
    module,
    param,
    plate,
    sample,
    subsample,
)

__version__ = "0.1.0"

__all__ = [
    "clear_param_store", "deterministic", "distributions", "enable_validation", "factor",
    "get_param_store", "infer", "is_validation_enabled", "module", "optim", "param", "plate",
    "poutine", "sample", "set_rng_seed", "subsample",
]
