"""Row-sparse reads of local params (one row per datapoint).

A param with one row per datapoint, read inside a subsampled plate, needs only the batch's
rows. While an SVI step records rows (:func:`record_rows`), such a read takes those rows of
the *unconstrained* tensor, as a leaf of their own, and constrains just them: the forward
pass and the backward pass cost the batch, not the data, and no gradient of all N rows is
ever built. The step then hands each param's row gradient to the optimizer (which either
scatters it into a full gradient or updates only those rows, see ``local_updates``).

Exact for every transform that acts on each batch row by itself, which is every transform
whose domain and codomain have the same event dims and whose event dims lie right of the
plate's dim: all of torch's ``biject_to`` for params that respect their ``event_dim``.
Outside a recording step (``Predictive``, the param store, a compiled step) a read is dense,
as in Pyro.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch


class RowLeaf(NamedTuple):
    """The rows ``index`` (along ``dim``, counted from the left) of the store's leaf
    ``full``, read as the leaf ``rows`` of this step."""

    name: str
    full: torch.Tensor
    dim: int
    index: torch.Tensor
    rows: torch.Tensor


class RowRequest:
    """What the enclosing subsampled plates ask of a param read: ``(dim, index, size,
    plate name)`` per plate, ``dim`` negative (counted from the right, event dims
    included). ``done`` says whether the read already handed out only those rows."""

    __slots__ = ("done", "picks")

    def __init__(self) -> None:
        self.picks: list[tuple[int, torch.Tensor, int, str]] = []
        self.done = False


_RECORDS: list[dict] = []

# Sharded storage (set by the data-parallel layer): plate name -> (size, start, stop), the
# rows of that plate this process owns; a local param of such a plate holds only them.
_BLOCKS: dict[str, tuple[int, int, int]] = {}
_SHARDED: set[str] = set()  # names of the params stored as a block of rows
# Every local param (one row per datapoint of a subsampled plate), sharded or not:
# name -> (row dim counted from the left, plate size, first and end row stored).
_LOCAL: dict[str, tuple[int, int, int, int]] = {}


@contextlib.contextmanager
def owned_blocks(blocks: dict[str, tuple[int, int, int]]) -> Iterator[None]:
    """Within the block, local params of these plates are stored (and read) as this
    process's rows only: ``{plate name: (size, start, stop)}``."""
    old = dict(_BLOCKS)
    _BLOCKS.update(blocks)
    try:
        yield
    finally:
        _BLOCKS.clear()
        _BLOCKS.update(old)


def sharded_names() -> set[str]:
    """The params stored as a block of their rows (see :func:`owned_blocks`)."""
    return _SHARDED


def local_layout() -> dict[str, tuple[int, int, int, int]]:
    """This process's local params: ``{name: (row dim, plate size, first row, end row)}``,
    the rows ``[first, end)`` being those it stores (all of them unless sharded)."""
    return dict(_LOCAL)


def registry() -> tuple[set, dict]:
    """Copies of which params are local and which sharded (see :func:`restore_registry`)."""
    return set(_SHARDED), dict(_LOCAL)


def restore_registry(saved: tuple[set, dict]) -> None:
    """Put back what :func:`registry` returned (a param store scope ends)."""
    _SHARDED.clear()
    _SHARDED.update(saved[0])
    _LOCAL.clear()
    _LOCAL.update(saved[1])


def forget(name: str | None = None) -> None:
    """``name`` (or every param, for ``None``) left the param store."""
    if name is None:
        _SHARDED.clear()
        _LOCAL.clear()
        return
    """``name`` left the param store."""
    _SHARDED.discard(name)
    _LOCAL.pop(name, None)


def _block(pick) -> tuple[int, int, int] | None:
    block = _BLOCKS.get(pick[3])
    return block if block is not None and block[0] == pick[2] else None


def shard_init(name: str, init: torch.Tensor, request: RowRequest | None) -> torch.Tensor:
    """The rows of a new param's initial value that this process stores (all of them
    unless its plate's rows are sharded)."""
    if request is None or len(request.picks) != 1 or not torch.is_tensor(init):
        return init
    pick = request.picks[0]
    dim = pick[0]
    if init.dim() < -dim or init.shape[dim] != pick[2]:
        return init  # not one row per datapoint of the plate
    block = _block(pick)
    _LOCAL[name] = (init.dim() + dim, pick[2]) + ((0, pick[2]) if block is None else block[1:])
    if block is None:
        return init
    _SHARDED.add(name)
    return init.narrow(dim, block[1], block[2] - block[1]).clone()


class record_rows:
    """Within the block, row-sparse reads make row leaves; ``as`` gives ``{key: RowLeaf}``.

    A class rather than a generator context manager: it is entered on every step.
    """

    def __enter__(self) -> dict:
        self.record: dict = {}
        _RECORDS.append(self.record)
        return self.record

    def __exit__(self, *exc_info: Any) -> None:
        _RECORDS.remove(self.record)


def is_recording() -> bool:
    """Whether a step is recording row leaves now."""
    return bool(_RECORDS) and not torch.compiler.is_compiling()


def _row_safe(transform: Any, dim: int) -> bool:
    if transform is None:
        return True
    inner, outer = transform.domain.event_dim, transform.codomain.event_dim
    return inner == outer and -dim > outer


def read_rows(name: str, full: torch.Tensor, transform: Any, request: RowRequest) -> Any:
    """The constrained rows a plate asks for, from a row leaf, or ``None`` (read densely)."""
    if not is_recording() or len(request.picks) != 1:
        return None  # several subsampled dims at once: the dense read stays exact
    pick = request.picks[0]
    dim, index, size = pick[:3]
    block = _block(pick) if name in _SHARDED else None
    rows = size if block is None else block[2] - block[1]
    if full.dim() < -dim or full.shape[dim] != rows or not _row_safe(transform, dim):
        return None  # broadcasts, a wrong shape (the plate says so), or a mixing transform
    key = (name, dim % full.dim(), id(index))  # the plate's tensor, alive all step
    if index.dtype != torch.long:
        index = index.long()
    if block is not None:
        # this process's rows start at block[1]; the plate's indices are global
        index = index - block[1]
    record = _RECORDS[-1]
    d = key[1]
    leaf = record.get(key)
    if leaf is None or leaf.full is not full:
        record[("index",) + key] = request.picks[0][1]  # keeps the id unique this step
        rows = full.detach().index_select(d, index).requires_grad_(True)
        leaf = record[key] = RowLeaf(name, full, d, index, rows)
    request.done = True
    return leaf.rows if transform is None else transform(leaf.rows)


class RowGrad(NamedTuple):
    """One param's row gradient of a step: ``grad`` holds rows ``index`` along ``dim``
    (distinct indices) of the full gradient of ``full``."""

    name: str
    full: torch.Tensor
    dim: int
    index: torch.Tensor
    grad: torch.Tensor


def row_grads(record: dict) -> dict[str, RowGrad]:
    """The recorded leaves' gradients, one :class:`RowGrad` per param (several reads of
    one param, e.g. by several particles, are summed row by row)."""
    by_name: dict[str, list[RowLeaf]] = {}
    for leaf in record.values():
        if isinstance(leaf, RowLeaf) and leaf.rows.grad is not None:
            by_name.setdefault(leaf.name, []).append(leaf)
    out = {}
    for name, leaves in by_name.items():
        first = leaves[0]
        if len(leaves) == 1:
            out[name] = RowGrad(name, first.full, first.dim, first.index, first.rows.grad)
            continue
        if any(leaf.dim != first.dim or leaf.full is not first.full for leaf in leaves):
            out[name] = _dense(name, leaves)
            continue
        index = torch.cat([leaf.index for leaf in leaves])
        grads = torch.cat([leaf.rows.grad for leaf in leaves], dim=first.dim)
        unique, inverse = torch.unique(index, return_inverse=True)
        shape = list(grads.shape)
        shape[first.dim] = len(unique)
        grad = grads.new_zeros(shape).index_add_(first.dim, inverse, grads)
        out[name] = RowGrad(name, first.full, first.dim, unique, grad)
    return out


def _dense(name: str, leaves: list[RowLeaf]) -> RowGrad:
    full = leaves[0].full
    grad = torch.zeros_like(full)
    for leaf in leaves:
        grad.index_add_(leaf.dim, leaf.index, leaf.rows.grad)
    index = torch.arange(full.shape[0], device=full.device)
    return RowGrad(name, full, 0, index, grad)


def scatter(rg: RowGrad) -> None:
    """Add a row gradient into ``full.grad`` (what a dense step sees)."""
    full = rg.full
    if full.grad is None:
        full.grad = torch.zeros_like(full)
    full.grad.index_add_(rg.dim, rg.index, rg.grad)
