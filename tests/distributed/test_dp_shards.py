"""Shards, seeds, the plate-sharding handler and the loader, one process (no collectives
are needed to check what each rank would draw)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import distsvi as pyro
from distsvi.distributed import (
    DistributedLoader,
    ProcessGroup,
    ShardedPlates,
    epoch_permutation,
    init,
    rank_seed,
    shard_indices,
    shard_tensors,
)
from distsvi.distributed.reduce import bucket_indices


@pytest.mark.parametrize("size", [10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("seed", [None, 4])
def test_shards_are_disjoint_and_cover(size, world_size, seed):
    shards = [shard_indices(size, r, world_size, seed) for r in range(world_size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_permutation_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 2))
    assert not torch.equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 3))
    assert not torch.equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 2, 2))


def test_rank_seeds():
    assert rank_seed(123, 0) == 123  # world size 1 draws what a plain run draws
    seeds = {rank_seed(123, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**32 for s in seeds)


def test_shard_tensors():
    x, y = torch.arange(10.0), torch.arange(10) * 2
    parts = [shard_tensors(x, y, group=ProcessGroup(r, 3)) for r in range(3)]
    assert torch.cat([p[0] for p in parts]).tolist() == x.tolist()
    assert all(torch.equal(p[0].long() * 2, p[1]) for p in parts)


def _draws(group, steps, size=101, batch=10, plates=("data",), **plate_kwargs):
    out = []
    sharded = ShardedPlates(group, plates, seed=1)
    with sharded:
        for _ in range(steps):
            sharded.next_step()
            p = pyro.plate("data", size, subsample_size=batch, **plate_kwargs)
            if "data" in plates:
                again = pyro.plate("data", size, subsample_size=batch, **plate_kwargs)
                assert torch.equal(p.indices, again.indices), "one draw per step"
            out.append((p.indices, p._scale))
    return out, sharded


def test_plates_draw_disjoint_shards_with_unbiased_scale():
    (r0, _), (r1, _) = (_draws(ProcessGroup(r, 2), 12) for r in range(2))
    epoch_of = []
    for (i0, s0), (i1, s1) in zip(r0, r1):
        assert len(i0) == len(i1) == 10
        assert not set(i0.tolist()) & set(i1.tolist())
        assert s0 == 2 * 51 / 10 and s1 == 2 * 50 / 10  # W * |S_r| / B
        epoch_of.append(torch.cat([i0, i1]))
    first_epoch = torch.cat(epoch_of[:5]).tolist()  # (101 // 2) // 10 = 5 steps an epoch
    assert len(set(first_epoch)) == 100
    perm1 = epoch_permutation(101, 1, 1)
    assert torch.equal(r0[5][0], perm1[0::2][:10]) and torch.equal(r1[5][0], perm1[1::2][:10])


def test_unsharded_and_explicit_plates_are_left_alone():
    (draws, _) = _draws(ProcessGroup(0, 2), 1, plates=("other",))
    assert draws[0][1] == 101 / 10
    with ShardedPlates(ProcessGroup(1, 2), ["data"]):
        p = pyro.plate("data", 100, subsample=torch.tensor([3, 4, 5, 6]))
    assert p.indices.tolist() == [3, 4, 5, 6] and p._scale == 25.0


def test_evaluation_takes_the_whole_contiguous_shard():
    for rank in range(2):
        sharded = ShardedPlates(ProcessGroup(rank, 2), ["data"])
        sharded.training = False
        with sharded:
            p = pyro.plate("data", 11, subsample_size=3)
        assert torch.equal(p.indices, shard_indices(11, rank, 2)) and p._scale == 2.0


def test_data_position_resumes_from_state_dict():
    group = ProcessGroup(1, 2)
    _, sharded = _draws(group, 7)
    state = sharded.state_dict()
    uninterrupted, _ = _draws(group, 9)
    resumed = ShardedPlates(group, ["data"])
    resumed.load_state_dict(state)
    got = []
    with resumed:
        for _ in range(2):
            resumed.next_step()
            got.append(pyro.plate("data", 101, subsample_size=10).indices)
    assert torch.equal(got[0], uninterrupted[7][0]) and torch.equal(got[1], uninterrupted[8][0])


def test_subsample_larger_than_a_shard_is_refused():
    with pytest.raises(ValueError, match="plate 'data'.*shard has only 5"):
        _draws(ProcessGroup(0, 2), 1, size=10, batch=6)


def test_loader_gives_disjoint_batches_with_indices_and_advances_epochs():
    data = TensorDataset(torch.arange(40.0) * 10)
    loaders = [DistributedLoader(data, 4, ProcessGroup(r, 2), seed=3) for r in range(2)]
    epochs = []
    for _ in range(2):
        seen = []
        for loader in loaders:
            assert len(loader) == 5
            for idx, (x,) in loader:
                assert torch.equal(x, idx.to(x.dtype) * 10)
                seen += idx.tolist()
        assert sorted(seen) == list(range(40))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert loaders[0].state_dict() == {"epoch": 2}


def test_buckets_split_by_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64)]
    assert bucket_indices(ts, cap_bytes=80) == [[0, 1], [2], [3]]
    assert bucket_indices(ts, cap_bytes=10**6) == [[0, 1, 2], [3]]


def test_init_without_torchrun_environment_is_world_size_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    group = init(backend="gloo")
    assert (group.rank, group.world_size, group.backend, group.is_main) == (0, 1, None, True)
    assert not torch.distributed.is_initialized()


def test_init_explains_a_broken_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init(backend="gloo")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        init(backend="gloo")
