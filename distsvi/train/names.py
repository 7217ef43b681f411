"""The built-in names a config may use, and what is known of the built-in datasets
without loading them (row counts, bytes per row). Torch-free: the config checks these
before torch loads; ``data.py``, ``models.py`` and ``job.py`` hold the objects."""

from __future__ import annotations

from typing import Any

from distsvi.train.errors import require

BUILTIN_MODELS = (
    "logistic_regression",
    "hierarchical",
    "vae",
    "gmm",
    "local_normal",
    "poisson_factorization",
)
BUILTIN_DATA = (
    "breast_cancer",
    "synthetic_hierarchical",
    "digits",
    "synthetic_gmm",
    "synthetic_local",
    "synthetic_counts",
)
AUTOGUIDES = (
    "AutoNormal",
    "AutoDelta",
    "AutoDiagonalNormal",
    "AutoMultivariateNormal",
    "AutoLowRankMultivariateNormal",
)
LOSSES = ("Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO")
OPTIMIZERS = ("Adam", "ClippedAdam", "SGD", "AdamW", "RMSprop", "Adagrad")
# schedule.name -> the torch.optim.lr_scheduler class
SCHEDULERS = {"exponential": "ExponentialLR", "step": "StepLR", "cosine": "CosineAnnealingLR"}
SCHEDULES = ("none", *SCHEDULERS)

_FIXED_ROWS = {"breast_cancer": 569, "digits": 1797}
_DEFAULT_POINTS = {
    "synthetic_hierarchical": 100_000,
    "synthetic_gmm": 3000,
    "synthetic_local": 10_000,
    "synthetic_counts": 100_000,
}


def builtin_num_rows(name: str, options: dict[str, Any]) -> int | None:
    """Rows of a built-in dataset, known without loading it (None for user loaders)."""
    if name in _FIXED_ROWS:
        return _FIXED_ROWS[name]
    if name in _DEFAULT_POINTS:
        num = options.get("num_points", _DEFAULT_POINTS[name])
        require(
            isinstance(num, int) and not isinstance(num, bool),
            "data.options.num_points",
            f"must be an integer, got {num!r}",
        )
        return num
    return None


def builtin_bytes(name: str, options: dict[str, Any], num_rows: int) -> int:
    """Peak host memory to load and split a built-in dataset, roughly: its tensors, the
    generator's temporaries and the train/validation copies (three times the data)."""
    if name == "synthetic_hierarchical":
        per_row = 4 + 8 + 4  # x float32, group int64, y float32
    elif name == "synthetic_gmm":
        dim = options.get("dim", 2)
        per_row = 8 + 4 * (dim if isinstance(dim, int) else 2)  # z int64, x float32
    elif name in ("synthetic_local", "synthetic_counts"):
        key, default = ("latent_dim", 10) if name == "synthetic_local" else ("num_genes", 200)
        width = options.get(key, default)
        per_row = 2 * 4 * (width if isinstance(width, int) else default)  # z/rates and x
    else:
        return 0  # small fixed datasets
    return 3 * per_row * num_rows
