"""``import distsvi as pyro`` ports: Pyro's public names exist under the same paths."""

from __future__ import annotations

import inspect

import pytest

import distsvi

SURFACE = {
    "": [
        "sample", "param", "plate", "factor", "deterministic", "module", "subsample",
        "get_param_store", "clear_param_store", "set_rng_seed", "enable_validation",
        "distributions", "infer", "optim", "poutine",
    ],
    "infer": ["SVI", "ELBO", "Trace_ELBO", "TraceMeanField_ELBO"],
    "optim": [
        "Adam", "ClippedAdam", "SGD", "AdamW", "RMSprop", "Adagrad", "PyroOptim",
        "PyroLRScheduler", "ExponentialLR", "StepLR", "OneCycleLR", "ReduceLROnPlateau",
    ],
    "poutine": [
        "trace", "replay", "block", "condition", "substitute", "scale", "mask", "seed", "Trace",
    ],
    "distributions": ["Delta", "Normal", "Bernoulli", "Independent", "constraints", "kl_divergence"],
}  # fmt: skip


def _module(root, path):
    return getattr(root, path) if path else root


@pytest.mark.parametrize("path", list(SURFACE))
def test_names_exist(path):
    mod = _module(distsvi, path)
    missing = [name for name in SURFACE[path] if not hasattr(mod, name)]
    assert not missing, f"distsvi.{path} lacks {missing}"


@pytest.mark.parametrize(
    "path,name",
    [("", "sample"), ("", "param"), ("", "plate"), ("infer", "SVI"), ("poutine", "block")],
)
def test_signatures_accept_pyros_keywords(path, name):
    """Every keyword of Pyro's signature is accepted (extra ones of ours are fine)."""
    pyro = pytest.importorskip("pyro")
    ours = inspect.signature(getattr(_module(distsvi, path), name))
    theirs = inspect.signature(getattr(_module(pyro, path), name))
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in ours.parameters.values())
    for pname, p in theirs.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        assert pname in ours.parameters or accepts_var_kw, f"{path}.{name} lacks {pname!r}"
