"""Data-parallel scaling: distsvi against a hand-written torch DDP floor.

Usage::

    python benchmarks/scaling.py                       # the table in the README
    python benchmarks/scaling.py --sizes 512 --steps 50

The model is compute-bound: an amortized MLP encoder (guide) and decoder (model), hidden
width 256, a 10-d local latent per datapoint and 100-d binary data, with the ELBO
estimated at the plate's subsample. Five ways to train it, each in fresh processes with
one thread per rank:

- ``plain SVI``: :class:`~distsvi.infer.SVI` in one process;
- ``DataParallelSVI``: at world size 1 (no process group: the overhead of the wrapper) and
  on 2 Gloo ranks;
- ``torch DDP``: the same model and estimator written in plain torch, wrapped in
  ``torch.nn.parallel.DistributedDataParallel``, on 1 and 2 ranks (the floor).

Each run times every step after a warm-up and takes the median; rows are run
``--repeats`` times, interleaved, and the fastest run is kept (the build machine is
shared, so the minimum is the least disturbed). Throughput counts the
datapoints of all ranks: ``ranks * batch / median step time``. The goals (DESIGN.md §6,
issue 5): world-size-1 overhead at most 5%, and distsvi's 2-rank speed-up at least 0.95 of
DDP's on the same model and batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

DATA_DIM, LATENT_DIM, HIDDEN = 100, 10, 256


def make_data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.3), generator=g)


def encoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(DATA_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 2 * LATENT_DIM)
    )


def decoder() -> nn.Module:
    return nn.Sequential(nn.Linear(LATENT_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, DATA_DIM))


def distsvi_steps(impl: str, x: torch.Tensor, batch: int, steps: int) -> list[float]:
    import distsvi as pyro
    import distsvi.distributions as D
    from distsvi.distributed import DataParallelSVI, init, seed_rank
    from distsvi.infer import SVI, Trace_ELBO
    from distsvi.optim import Adam

    group = init(backend="gloo")
    seed_rank(0, group)
    enc, dec = encoder(), decoder()
    n = x.shape[0]

    def model(x, batch):
        pyro.module("decoder", dec)
        with pyro.plate("data", n, subsample_size=batch) as idx:
            z = pyro.sample("z", D.Normal(torch.zeros(LATENT_DIM), 1.0).to_event(1))
            pyro.sample("obs", D.Bernoulli(logits=dec(z)).to_event(1), obs=x[idx])

    def guide(x, batch):
        pyro.module("encoder", enc)
        with pyro.plate("data", n, subsample_size=batch) as idx:
            loc, log_scale = enc(x[idx]).chunk(2, -1)
            pyro.sample("z", D.Normal(loc, log_scale.exp()).to_event(1))

    svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    stepper = svi if impl == "plain" else DataParallelSVI(svi, group)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        stepper.step(x, batch)
        times.append(time.perf_counter() - t)
    return times


class HandWrittenVAE(nn.Module):
    """The floor: the same model and single-sample ELBO estimator, in plain torch."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.enc, self.dec, self.scale = encoder(), decoder(), scale

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal
        loc, log_scale = self.enc(xb).chunk(2, -1)
        q = normal(loc, log_scale.exp())
        z = q.rsample()
        logits = self.dec(z)
        log_lik = -nn.functional.binary_cross_entropy_with_logits(logits, xb, reduction="none")
        elbo = log_lik.sum(-1) + normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        return -self.scale * elbo.sum()


def ddp_steps(x: torch.Tensor, batch: int, steps: int) -> list[float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    n = x.shape[0]
    shard = torch.randperm(n, generator=torch.Generator().manual_seed(0))[rank::world_size]
    model = nn.parallel.DistributedDataParallel(HandWrittenVAE(world_size * len(shard) / batch))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, position = [], 0
    for _ in range(steps):
        t = time.perf_counter()
        if position + batch > len(shard):
            position = 0
        xb = x[shard[position : position + batch]]
        position += batch
        loss = model(xb)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        loss.item()  # the float that distsvi's step returns
        times.append(time.perf_counter() - t)
    return times


def _rank(
    rank: int, world_size: int, port: int, impl: str, batch: int, steps: int, out: str
) -> None:
    torch.set_num_threads(1)
    x = make_data(max(32768, 2 * world_size * batch))
    if impl == "ddp" or world_size > 1:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    times = ddp_steps(x, batch, steps) if impl == "ddp" else distsvi_steps(impl, x, batch, steps)
    if rank == 0:
        torch.save(times, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(impl: str, world_size: int, batch: int, steps: int, warmup: int) -> float:
    """Median seconds per step on rank 0, after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(
            _rank,
            args=(world_size, _free_port(), impl, batch, steps + warmup, out),
            nprocs=world_size,
            start_method="spawn",
        )
        return statistics.median(torch.load(out)[warmup:])


ROWS = [
    ("plain SVI", "plain", 1),
    ("DataParallelSVI", "dp", 1),
    ("DataParallelSVI", "dp", 2),
    ("torch DDP (hand-written)", "ddp", 1),
    ("torch DDP (hand-written)", "ddp", 2),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="distsvi data-parallel scaling vs torch DDP")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 8192], help="datapoints per rank per step"
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[60, 12], help="timed steps for each size"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each row; the fastest median is kept"
    )
    args = parser.parse_args(argv)
    steps = dict(zip(args.sizes, args.steps + args.steps[-1:] * len(args.sizes)))

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, one thread per rank, median of timed steps, best of "
        f"{args.repeats} runs"
    )
    header = (
        f"{'implementation':<26}{'ranks':>6}{'batch/rank':>12}{'ms/step':>10}"
        f"{'datapoints/s':>14}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for batch in args.sizes:
        seconds = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load hits all rows alike
            for _, impl, world_size in ROWS:
                s = measure(impl, world_size, batch, steps[batch], args.warmup)
                seconds[impl, world_size] = min(s, seconds.get((impl, world_size), s))
        for label, impl, world_size in ROWS:
            s = seconds[impl, world_size]
            base = seconds.get(("plain", 1) if impl == "dp" else (impl, 1), s)
            speedup = (world_size * batch / s) / (batch / base)
            print(
                f"{label:<26}{world_size:>6}{batch:>12}{1e3 * s:>10.2f}"
                f"{world_size * batch / s:>14.0f}{speedup:>9.2f}x",
                flush=True,
            )
        overhead = seconds["dp", 1] / seconds["plain", 1] - 1
        ours = 2 * seconds["plain", 1] / seconds["dp", 2]
        floor = 2 * seconds["ddp", 1] / seconds["ddp", 2]
        summary.append(
            f"batch {batch}: world-size-1 overhead {100 * overhead:+.1f}% "
            f"(goal <= 5%); 2-rank speed-up distsvi {ours:.2f}x vs DDP {floor:.2f}x "
            f"= {ours / floor:.2f} of DDP's (goal >= 0.95)"
        )
        print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
