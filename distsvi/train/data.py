"""Built-in datasets and the train/validation split.

A dataset is a tuple of tensors that share their first dimension (one row per datapoint);
the last tensor holds the observations. Unsupervised data (digits, the mixture) repeats
the tensor: ``(x, x)``, the first for the guide's encoder, the second to observe.
A user loader (``data.name: my_data.py:load``) returns such a tuple.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distsvi.train.errors import ConfigError, first_line, import_target
from distsvi.train.names import BUILTIN_DATA

if TYPE_CHECKING:
    from distsvi.train.config import DataConfig


def breast_cancer() -> tuple[Tensor, Tensor]:
    """scikit-learn's Wisconsin breast-cancer data (569 x 30, shipped with scikit-learn),
    features standardized; ``y = 1`` for benign."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.as_tensor(y, dtype=torch.float32)


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 x 64), pixels binarized at half intensity."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float32)
    x = (x > 8).float()
    return x, x


def synthetic_hierarchical(
    num_points: int = 100_000, num_groups: int = 100, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = alpha[g] + 0.5 x + 0.3 eps`` with ``alpha ~ Normal(1, 0.5)``: (x, group, y)."""
    gen = torch.Generator().manual_seed(seed)
    alpha = 1.0 + 0.5 * torch.randn(num_groups, generator=gen)
    group = torch.randint(num_groups, (num_points,), generator=gen)
    x = torch.randn(num_points, generator=gen)
    y = alpha[group] + 0.5 * x + 0.3 * torch.randn(num_points, generator=gen)
    return x, group, y


def synthetic_gmm(
    num_points: int = 3000, num_components: int = 3, dim: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Points from ``num_components`` unit Gaussians with centres spread on a circle of radius 4."""
    gen = torch.Generator().manual_seed(seed)
    angle = torch.arange(num_components) * (2 * torch.pi / num_components)
    centres = torch.zeros(num_components, dim)
    centres[:, 0], centres[:, 1 % dim] = 4 * angle.cos(), 4 * angle.sin()
    z = torch.randint(num_components, (num_points,), generator=gen)
    x = centres[z] + torch.randn(num_points, dim, generator=gen)
    return x, x


def synthetic_local(
    num_points: int = 10_000, latent_dim: int = 10, prior_scale: float = 1.0,
    noise_scale: float = 0.5, seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Draws from :class:`~distsvi.train.models.LocalNormal`'s prior: ``x_i = z_i + noise``."""
    gen = torch.Generator().manual_seed(seed)
    z = prior_scale * torch.randn(num_points, latent_dim, generator=gen)
    x = z + noise_scale * torch.randn(num_points, latent_dim, generator=gen)
    return x, x


def synthetic_counts(
    num_points: int = 100_000, num_genes: int = 200, num_factors: int = 8, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Counts ``y_ig ~ Poisson(exp(theta_i @ W_g + b_g))`` from random factors and loadings,
    ``b_g`` spread so that genes range from rare to common (like single-cell counts)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num_factors, num_genes, generator=gen) * num_factors**-0.5
    b = torch.linspace(-2.0, 2.0, num_genes)
    counts = torch.empty(num_points, num_genes)
    for start in range(0, num_points, 65536):  # bounded temporaries for large tables
        theta = torch.randn(min(65536, num_points - start), num_factors, generator=gen)
        rate = (theta @ w + b).exp()
        counts[start : start + theta.shape[0]] = torch.poisson(rate, generator=gen)
    return counts, counts


LOADERS = {
    "breast_cancer": breast_cancer,
    "digits": digits,
    "synthetic_hierarchical": synthetic_hierarchical,
    "synthetic_gmm": synthetic_gmm,
    "synthetic_local": synthetic_local,
    "synthetic_counts": synthetic_counts,
}
assert set(LOADERS) == set(BUILTIN_DATA)


@dataclass
class Split:
    """Training and validation rows; ``val_rows`` are row numbers into the loaded dataset.

    ``train`` may hold only a block of the training rows (a rank's own rows, see
    :meth:`keep_block`): training rows ``offset .. offset + len(train[0])`` of
    ``num_train``.
    """

    train: tuple[Tensor, ...]
    val: tuple[Tensor, ...]
    val_rows: Tensor
    offset: int = 0
    size: int | None = None  # all training rows, when ``train`` holds a block of them

    @property
    def num_train(self) -> int:
        return self.train[0].shape[0] if self.size is None else self.size

    @property
    def is_block(self) -> bool:
        return self.size is not None

    def keep_block(self, start: int, stop: int) -> None:
        """Keep training rows ``start .. stop`` only (copied, so the rest is freed)."""
        n = self.num_train
        self.train = _take(self.train, slice(start, stop))
        self.offset, self.size = start, n

    def rows(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The training rows ``idx`` (numbered among all training rows) of every tensor."""
        local = idx - self.offset if self.offset else idx
        return _take(self.train, local.to(self.train[0].device))

    def head(self, count: int, start: int | None = None) -> tuple[tuple[Tensor, ...], dict]:
        """``(args, kwargs)`` for the model on ``count`` rows from training row ``start``
        (default: the first row held here), given as a minibatch with its indices (a
        probe of the model that draws nothing)."""
        start = self.offset if start is None else start
        count = min(count, self.offset + self.train[0].shape[0] - start)
        idx = torch.arange(start, start + count, device=self.train[0].device)
        return self.rows(idx), {"size": self.num_train, "subsample": idx}

    @property
    def num_val(self) -> int:
        return self.val[0].shape[0]


def load_data(
    cfg: DataConfig, base_dir: Path = Path("."), seed_devices: Sequence[int] = ()
) -> Split:
    """Load the dataset, check it is a tuple of row-aligned tensors, split off validation.

    The loader runs under one data seed (``data.split_seed``) for torch, ``random`` and
    NumPy, the same on every rank, and the global random streams are left as they were:
    a loader that draws at random loads the same rows on every rank.
    """
    if cfg.name in LOADERS:
        loader = LOADERS[cfg.name]
    else:
        _, loader = import_target(cfg.name, "data.name", base_dir)
    try:
        with _seeded(cfg.split_seed, seed_devices):
            tensors = loader(**cfg.options)
    except TypeError as e:
        raise ConfigError(
            "data.options", f"{cfg.name} does not accept these options: {e}"
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's loader failed: one message naming it
        raise ConfigError(
            "data.name", f"{cfg.name} raised {type(e).__name__}: {first_line(e)}"
        ) from None
    if isinstance(tensors, Tensor) or not isinstance(tensors, (tuple, list)):
        raise ConfigError(
            "data.name",
            f"{cfg.name} must return a tuple of tensors, got {type(tensors).__name__}",
        )
    tensors = tuple(tensors)
    _check_tensors(cfg.name, tensors)
    n = tensors[0].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    num_val = round(n * cfg.val_fraction)
    val_rows, train_rows = perm[:num_val].sort().values, perm[num_val:].sort().values
    return Split(train=_take(tensors, train_rows), val=_take(tensors, val_rows), val_rows=val_rows)


def _take(tensors: tuple[Tensor, ...], rows: Tensor | slice) -> tuple[Tensor, ...]:
    """A copy of ``t[rows]`` of each tensor; a tensor given twice (inputs that are also
    the observations) is copied once, so a large table is not held twice."""
    taken: dict[int, Tensor] = {}
    for t in tensors:
        if id(t) not in taken:
            taken[id(t)] = t[rows].clone() if isinstance(rows, slice) else t[rows]
    return tuple(taken[id(t)] for t in tensors)


@contextlib.contextmanager
def _seeded(seed: int, devices: Sequence[int]) -> Iterator[None]:
    """Run a block with torch, ``random`` and NumPy seeded by ``seed``, then restore them."""
    numpy = sys.modules.get("numpy")
    py_state = random.getstate()
    np_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=list(devices)):
        torch.manual_seed(seed)
        random.seed(seed)
        if numpy is not None:
            numpy.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            if numpy is not None:
                numpy.random.set_state(np_state)


def _check_tensors(name: str, tensors: tuple[Any, ...]) -> None:
    if not tensors or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
        raise ConfigError(
            "data.name", f"{name} must return a tuple of tensors with a row dimension"
        )
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ConfigError(
            "data.name", f"{name} returned tensors with different row counts {sorted(sizes)}"
        )
