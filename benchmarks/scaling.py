"""Data-parallel scaling: distsvi against a hand-written torch DDP floor.

Usage::

    python benchmarks/scaling.py                       # the table in the README
    python benchmarks/scaling.py --sizes 512 --steps 50

The model is compute-bound: an amortized MLP encoder (guide) and decoder (model), hidden
width 256, a 10-d local latent per datapoint and 100-d binary data, with the ELBO
estimated at the plate's subsample. Five ways to train it, one thread per rank:

- ``plain SVI``: :class:`~distsvi.infer.SVI` in one process;
- ``DataParallelSVI``: at world size 1 (no process group: the overhead of the wrapper) and
  on 2 Gloo ranks;
- ``torch DDP``: the same model and estimator written in plain torch, wrapped in
  ``torch.nn.parallel.DistributedDataParallel``, on 1 and 2 ranks (the floor).

The build machine is shared, so the implementations of one world size run in the same
processes, in blocks of consecutive steps: ``--rounds`` blocks of each, the order rotating
from round to round, each block's first ``--warmup`` steps untimed. (Blocks rather than
alternate steps: on a virtual machine how fast a waiting core wakes depends on how it was
woken in the last few milliseconds, so one implementation's waits would bend the timings of
the other's.) Every comparison that matters is between blocks of the same round: the
world-size-1 overhead (DataParallelSVI against plain SVI), and the 2-rank speed-ups, whose
ratio is ``(plain / DDP at 1 rank) * (DDP / DataParallelSVI at 2 ranks)``. Each figure is a
mean step time (datapoints/s is datapoints over time; the wait in a collective is bimodal
here, which makes medians jump between runs). Throughput counts the datapoints of all
ranks. The table shows the median round of each figure, the summary every round's ratio.
Each rank is pinned to a core of its own (:func:`distsvi.distributed.pin_to_cores`, what
``dist.pin_cpus=true`` does; ``--no-pin`` leaves placement to the OS) and calls
:func:`distsvi.distributed.tune_allocator`, as ``distsvi.distributed.init`` does on CPU
(``--no-tune-allocator`` to compare).
Goals (issue 5): world-size-1 overhead at most 5%; distsvi's 2-rank speed-up at least 0.95
of DDP's on the same model and batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

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


def distsvi_stepper(tag: str, parallel: bool, x: torch.Tensor, batch: int) -> Callable[[], float]:
    """A step of distsvi's SVI on the model, with its own params (named after ``tag``)."""
    import distsvi as pyro
    import distsvi.distributions as D
    from distsvi.distributed import DataParallelSVI
    from distsvi.infer import SVI, Trace_ELBO
    from distsvi.optim import Adam

    enc, dec = encoder(), decoder()
    n = x.shape[0]

    def model(x, batch):
        pyro.module(f"{tag}.decoder", dec)
        with pyro.plate("data", n, subsample_size=batch) as idx:
            z = pyro.sample("z", D.Normal(torch.zeros(LATENT_DIM), 1.0).to_event(1))
            pyro.sample("obs", D.Bernoulli(logits=dec(z)).to_event(1), obs=x[idx])

    def guide(x, batch):
        pyro.module(f"{tag}.encoder", enc)
        with pyro.plate("data", n, subsample_size=batch) as idx:
            loc, log_scale = enc(x[idx]).chunk(2, -1)
            pyro.sample("z", D.Normal(loc, log_scale.exp()).to_event(1))

    svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    stepper = DataParallelSVI(svi) if parallel else svi
    return lambda: stepper.step(x, batch)


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


def ddp_stepper(x: torch.Tensor, batch: int) -> Callable[[], float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shard = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    shard = shard[rank::world_size]
    model = nn.parallel.DistributedDataParallel(HandWrittenVAE(world_size * len(shard) / batch))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    position = 0

    def step() -> float:
        nonlocal position
        if position + batch > len(shard):
            position = 0
        xb = x[shard[position : position + batch]]
        position += batch
        loss = model(xb)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.item()  # the float that distsvi's step returns

    return step


def _rank(
    rank: int,
    world_size: int,
    port: int,
    batch: int,
    steps: int,
    warmup: int,
    rounds: int,
    pin: bool,
    tune: bool,
    out: str,
):
    from distsvi.distributed import pin_to_cores, tune_allocator

    torch.set_num_threads(1)
    # Both for every implementation: they share the process.
    if tune:
        tune_allocator()
    if pin:
        pin_to_cores(rank, world_size)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # A group even at world size 1, for DDP; distsvi sees world size 1 and starts nothing.
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import distsvi

    distsvi.set_rng_seed(rank)
    x = make_data(max(32768, 2 * world_size * batch))
    steppers = {"dp": distsvi_stepper("dp", True, x, batch), "ddp": ddp_stepper(x, batch)}
    if world_size == 1:
        steppers["plain"] = distsvi_stepper("plain", False, x, batch)
    names = list(steppers)
    means: dict[str, list[float]] = {name: [] for name in names}  # one per round
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(warmup):
                steppers[name]()
            t = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            means[name].append((time.perf_counter() - t) / steps)
    if rank == 0:
        torch.save(means, out)
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_pin(world_size: int) -> bool:
    """Whether every rank can have a core of its own."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= world_size


def measure(
    world_size: int, batch: int, steps: int, warmup: int, rounds: int, pin: bool, tune: bool
) -> dict[str, list[float]]:
    """Mean seconds per step on rank 0 of each implementation at this world size, a
    figure per round."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(
            _rank,
            args=(
                world_size,
                _free_port(),
                batch,
                steps,
                warmup,
                rounds,
                pin and can_pin(world_size),
                tune,
                out,
            ),
            nprocs=world_size,
            start_method="spawn",
        )
        return torch.load(out)


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
        "--steps",
        type=int,
        nargs="+",
        default=[300, 30],
        help="timed steps of each block, for each size",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks of each implementation")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin each rank to a core"
    )
    parser.add_argument(
        "--no-tune-allocator",
        dest="tune",
        action="store_false",
        help="leave glibc's allocator as it is (see distsvi.distributed.tune_allocator)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    steps = dict(zip(args.sizes, args.steps + args.steps[-1:] * len(args.sizes)))

    pinned = "each rank pinned to a core" if args.pin and can_pin(2) else "ranks not pinned"
    tuned = "allocator tuned" if args.tune else "allocator untuned"
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one "
        f"thread per rank, {pinned}, {tuned}; mean step time, median of {args.rounds} rounds; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    header = (
        f"{'implementation':<26}{'ranks':>6}{'batch/rank':>12}{'ms/step':>10}"
        f"{'datapoints/s':>14}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for batch in args.sizes:
        rounds: list[dict] = [{} for _ in range(args.rounds)]  # {(impl, ranks): s/step}
        for world_size in (1, 2):
            times = measure(
                world_size, batch, steps[batch], args.warmup, args.rounds, args.pin, args.tune
            )
            for impl, per_round in times.items():
                for r, s in enumerate(per_round):
                    rounds[r][impl, world_size] = s
        seconds = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for label, impl, world_size in ROWS:
            s = seconds[impl, world_size]
            base = seconds["plain", 1] if impl == "dp" else seconds[impl, 1]
            speedup = world_size * base / s
            print(
                f"{label:<26}{world_size:>6}{batch:>12}{1e3 * s:>10.2f}"
                f"{world_size * batch / s:>14.0f}{speedup:>9.2f}x"
            )
        overheads = [r["dp", 1] / r["plain", 1] - 1 for r in rounds]
        ours = [2 * r["plain", 1] / r["dp", 2] for r in rounds]
        floor = [2 * r["ddp", 1] / r["ddp", 2] for r in rounds]
        ratios = [a / b for a, b in zip(ours, floor)]
        summary.append(
            f"batch {batch}: world-size-1 overhead {100 * statistics.median(overheads):+.1f}% "
            f"(goal <= 5%); 2-rank speed-up distsvi {statistics.median(ours):.2f}x vs DDP "
            f"{statistics.median(floor):.2f}x; distsvi/DDP {statistics.median(ratios):.2f} "
            f"(goal >= 0.95), rounds: {', '.join(f'{r:.2f}' for r in ratios)}"
        )
        print(flush=True)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
