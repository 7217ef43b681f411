"""The param store (``pyro.params``): its names live in :mod:`.param_store`, Pyro's module
path, and are all importable from here."""

from . import param_store as _param_store

globals().update({k: v for k, v in vars(_param_store).items() if not k.startswith("__")})
