"""Data parallelism for SVI under ``torchrun``.

The same script runs as one process (no ``torchrun`` environment: world size 1, no
process group) or as one rank of a job::

    import distsvi
    from distsvi.distributed import DataParallelSVI, init, seed_rank, shutdown

    group = init()  # NCCL on GPUs, Gloo on CPUs
    seed_rank(0, group)  # Monte-Carlo noise differs per rank
    dp = DataParallelSVI(SVI(model, guide, optim, Trace_ELBO()), group)
    for step in range(num_steps):
        loss = dp.step(x, y)  # the loss averaged over ranks
    shutdown()

Run it with ``torchrun --standalone --nproc-per-node=2 train.py``.
"""

from .data import (
    DistributedLoader,
    ShardedPlates,
    epoch_permutation,
    rank_seed,
    seed_rank,
    shard_indices,
    shard_tensors,
)
from .process_group import (
    ProcessGroup,
    current,
    default_backend,
    init,
    pin_to_cores,
    shutdown,
    tune_allocator,
)
from .reduce import all_ranks, all_reduce_scalars, any_rank
from .svi import DataParallelSVI

__all__ = [
    "DataParallelSVI",
    "DistributedLoader",
    "ProcessGroup",
    "ShardedPlates",
    "all_ranks",
    "all_reduce_scalars",
    "any_rank",
    "current",
    "default_backend",
    "epoch_permutation",
    "init",
    "pin_to_cores",
    "rank_seed",
    "seed_rank",
    "shard_indices",
    "shard_tensors",
    "shutdown",
    "tune_allocator",
]
