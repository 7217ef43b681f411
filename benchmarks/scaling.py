"""Data-parallel scaling: distsvi against a hand-written torch DDP floor.

Usage::

    python benchmarks/scaling.py                       # the tables in the README
    python benchmarks/scaling.py --case amortized --sizes 512 --steps 50
    python benchmarks/scaling.py --case latency        # the quickstart's model and batch
    python benchmarks/scaling.py --case wide           # hidden width 2560, 9 buckets

Three cases (``--case``, all by default):

- ``amortized``: the model below, at the ``--sizes`` given;
- ``latency``: the quickstart's model and batch (Bayesian logistic regression, 30
  features, AutoNormal, 64 rows per rank): a step of a few hundred microseconds whose
  all-reduce carries a few hundred bytes, so what counts is fixed cost per step. The run
  also times a bare Gloo all-reduce of the same bytes; goal: the 2-rank step costs at
  most the 1-rank step plus twice that all-reduce;
- ``wide``: the amortized model with two more hidden layers of width 2560 in encoder and
  decoder, 105 MB of gradients: nine buckets at the default 25 MiB bucket size, four of
  them 26 MB (30 timed steps of a third of a second each).

The amortized model is compute-bound: an amortized MLP encoder (guide) and decoder (model), hidden
width 256, a 10-d local latent per datapoint and 100-d binary data, with the ELBO
estimated at the plate's subsample. Seven ways to train it, one thread per rank:

- ``plain SVI``: :class:`~distsvi.infer.SVI` in one process;
- ``DataParallelSVI``: at world size 1 (no process group: the overhead of the wrapper) and
  on 2 Gloo ranks;
- ``torch DDP``: the same model and estimator written in plain torch, wrapped in
  ``torch.nn.parallel.DistributedDataParallel``, on 1 and 2 ranks (the floor);
- ``hand-written, no DDP``: that model without the DDP wrapper, in one process. DDP at
  world size 1 still runs its reducer, so the summary also gives DDP's speed-up against
  this step, the one a user leaving a single process would compare with;
- ``DataParallelSVI, Gloo`` (2 ranks): ``shared_memory=False``, Gloo's TCP all-reduce in
  buckets (overlapping backward; a small bucket gathered), where the default averages
  the gradients of ranks on one machine through shared memory (see
  :mod:`distsvi.distributed.shm`).

The build machine is a shared virtual machine whose speed drifts by 10-40% over tens of
seconds (measured: the same SVI step took 7.9 ms and, a minute later, 5.0 ms in one
process). So the implementations of one world size run in the same processes, interleaved
in short blocks of ``--block`` steps (each block's first ``--warmup`` steps untimed), the
order rotating from block to block, until each has run ``--steps`` timed steps: a drift
then slows all of them alike. Every comparison that matters is between implementations
timed in the same processes: the world-size-1 overhead (DataParallelSVI against plain
SVI), and the ratio of the 2-rank speed-ups, ``(plain / DDP at 1 rank) * (DDP /
DataParallelSVI at 2 ranks)``. The speed-up column itself compares runs made at different
times, so it moves with the drift. Each figure is a mean step time over all timed steps
(datapoints/s counts the datapoints of all ranks); the summary also gives the ratios of
each fifth of the run, in order, to show their spread.
Each rank is pinned to a core of its own (:func:`distsvi.distributed.pin_to_cores`, what
``dist.pin_cpus=true`` does; ``--no-pin`` leaves placement to the OS) and calls
:func:`distsvi.distributed.tune_allocator`, as ``distsvi.distributed.init`` does on CPU
(``--no-tune-allocator`` to compare).
Goals: world-size-1 overhead at most 5%; distsvi's 2-rank speed-up at least that of DDP
on the same model and batch (distsvi/DDP >= 1.0) in every case. The summary gives that
ratio with each speed-up from the implementation's own 1-rank step, then from each one's
single-process step without a wrapper (DDP at world size 1 still runs its reducer), then
the 2-rank throughputs themselves (which no slow 1-rank step can flatter).
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
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

DATA_DIM, LATENT_DIM, HIDDEN = 100, 10, 256
WIDE, WIDE_LAYERS = 2560, 2  # extra hidden layers of the wide case, in encoder and decoder
LR = {"amortized": 1e-3, "wide": 1e-5}  # a small step keeps the wide net finite while timed
FEATURES, QUICKSTART_ROWS = 30, 455  # the quickstart: breast cancer's training rows


def make_data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.3), generator=g)


def _mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Softplus()]
    return nn.Sequential(*layers[:-1])


def _hidden(case: str) -> list[int]:
    return [HIDDEN] if case == "amortized" else [WIDE] * (WIDE_LAYERS + 1)


def encoder(case: str = "amortized") -> nn.Module:
    return _mlp([DATA_DIM, *_hidden(case), 2 * LATENT_DIM])


def decoder(case: str = "amortized") -> nn.Module:
    return _mlp([LATENT_DIM, *_hidden(case), DATA_DIM])


def quickstart_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized features and labels of the quickstart's shape (synthetic, no download)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(QUICKSTART_ROWS, FEATURES, generator=g)
    w = torch.randn(FEATURES, generator=g)
    return x, torch.bernoulli(torch.sigmoid(x @ w), generator=g)


def latency_distsvi_stepper(
    tag: str, parallel: bool, data: tuple, batch: int, shared_memory: bool | None = None
) -> Callable[[], float]:
    """The quickstart's model (the job's built-in logistic regression) and AutoNormal."""
    from distsvi.distributed import DataParallelSVI
    from distsvi.infer import SVI, Trace_ELBO
    from distsvi.infer.autoguide import AutoNormal
    from distsvi.optim import Adam
    from distsvi.train.models import LogisticRegression

    lr = LogisticRegression()
    model = lr.model
    guide = AutoNormal(model)
    guide._pyro_name = f"{tag}.AutoNormal"  # params of its own, beside the other stepper's
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    stepper = DataParallelSVI(svi, shared_memory=shared_memory) if parallel else svi
    x, y = data
    return lambda: stepper.step(x, y, size=x.shape[0], subsample_size=batch)


class HandWrittenLogistic(nn.Module):
    """The floor of the latency case: mean-field Normal over ``w`` and ``b`` (softplus
    scales, as AutoNormal), single-sample ELBO of the logistic regression, in plain torch."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(FEATURES + 1))
        self.raw_scale = nn.Parameter(torch.full((FEATURES + 1,), -2.25))
        self.scale = scale

    def forward(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal
        q = normal(self.loc, nn.functional.softplus(self.raw_scale))
        wb = q.rsample()
        logits = xb @ wb[:-1] + wb[-1]
        log_lik = -nn.functional.binary_cross_entropy_with_logits(logits, yb, reduction="sum")
        elbo = self.scale * log_lik + normal(0.0, 1.0).log_prob(wb).sum() - q.log_prob(wb).sum()
        return -elbo


def _wrap(module: nn.Module, ddp: bool) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module) if ddp else module


def latency_ddp_stepper(data: tuple, batch: int, ddp: bool = True) -> Callable[[], float]:
    x, y = data
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shard = torch.arange(rank, x.shape[0], world_size)
    model = _wrap(HandWrittenLogistic(world_size * len(shard) / batch), ddp)
    optim = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)  # as distsvi's
    g = torch.Generator().manual_seed(rank)

    def step() -> float:
        rows = shard[torch.randperm(len(shard), generator=g)[:batch]]
        loss = model(x[rows], y[rows])
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.item()

    return step


def allreduce_stepper(numel: int) -> Callable[[], float]:
    """A bare all-reduce of ``numel`` floats and its wait: the latency floor of a step."""
    buf = torch.zeros(numel)

    def step() -> float:
        dist.all_reduce(buf)
        return 0.0

    return step


def distsvi_stepper(
    tag: str,
    parallel: bool,
    x: torch.Tensor,
    batch: int,
    case: str = "amortized",
    shared_memory: bool | None = None,
) -> Callable[[], float]:
    """A step of distsvi's SVI on the model, with its own params (named after ``tag``)."""
    import distsvi as pyro
    import distsvi.distributions as D
    from distsvi.distributed import DataParallelSVI
    from distsvi.infer import SVI, Trace_ELBO
    from distsvi.optim import Adam

    enc, dec = encoder(case), decoder(case)
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

    svi = SVI(model, guide, Adam({"lr": LR[case]}), Trace_ELBO())
    stepper = DataParallelSVI(svi, shared_memory=shared_memory) if parallel else svi
    return lambda: stepper.step(x, batch)


class HandWrittenVAE(nn.Module):
    """The floor: the same model and single-sample ELBO estimator, in plain torch."""

    def __init__(self, scale: float, case: str = "amortized") -> None:
        super().__init__()
        self.enc, self.dec, self.scale = encoder(case), decoder(case), scale

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal
        loc, log_scale = self.enc(xb).chunk(2, -1)
        q = normal(loc, log_scale.exp())
        z = q.rsample()
        logits = self.dec(z)
        log_lik = -nn.functional.binary_cross_entropy_with_logits(logits, xb, reduction="none")
        elbo = log_lik.sum(-1) + normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        return -self.scale * elbo.sum()


def ddp_stepper(
    x: torch.Tensor, batch: int, case: str = "amortized", ddp: bool = True
) -> Callable[[], float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shard = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    shard = shard[rank::world_size]
    model = _wrap(HandWrittenVAE(world_size * len(shard) / batch, case), ddp)
    optim = torch.optim.Adam(model.parameters(), lr=LR[case], fused=True)  # as distsvi's
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
    case: str,
    batch: int,
    steps: int,
    block: int,
    warmup: int,
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
    if case == "latency":
        data = quickstart_data()
        steppers = {
            "dp": latency_distsvi_stepper("dp", True, data, batch),
            "ddp": latency_ddp_stepper(data, batch),
        }
        if world_size == 1:
            steppers["plain"] = latency_distsvi_stepper("plain", False, data, batch)
            steppers["hand"] = latency_ddp_stepper(data, batch, ddp=False)
        else:  # the step's gradients (loc and scale of 31 values) and the 2-float trailer
            steppers["allreduce"] = allreduce_stepper(2 * (FEATURES + 1) + 2)
            steppers["dp_gloo"] = latency_distsvi_stepper("dpg", True, data, batch, False)
    else:
        x = make_data(max(8192 if case == "wide" else 32768, 2 * world_size * batch))
        steppers = {
            "dp": distsvi_stepper("dp", True, x, batch, case),
            "ddp": ddp_stepper(x, batch, case),
        }
        if world_size == 1:
            steppers["plain"] = distsvi_stepper("plain", False, x, batch, case)
            steppers["hand"] = ddp_stepper(x, batch, case, ddp=False)
        else:  # the default averages these gradients through shared memory
            steppers["dp_gloo"] = distsvi_stepper("dpg", True, x, batch, case, shared_memory=False)
    names = list(steppers)
    blocks = -(-steps // block)
    times: dict[str, list[float]] = {name: [] for name in names}  # s/step, one per block
    for b in range(blocks):
        for name in names[b % len(names) :] + names[: b % len(names)]:
            for _ in range(warmup):
                steppers[name]()
            t = time.perf_counter()
            for _ in range(block):
                steppers[name]()
            times[name].append((time.perf_counter() - t) / block)
    if rank == 0:
        torch.save(times, out)
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
    case: str,
    world_size: int,
    batch: int,
    steps: int,
    block: int,
    warmup: int,
    pin: bool,
    tune: bool,
) -> dict[str, list[float]]:
    """Seconds per step on rank 0 of each implementation at this world size, one figure
    per block, the blocks in the order they ran."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(
            _rank,
            args=(
                world_size,
                _free_port(),
                case,
                batch,
                steps,
                block,
                warmup,
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
    ("DataParallelSVI, Gloo", "dp_gloo", 2),
    ("hand-written, no DDP", "hand", 1),
    ("torch DDP (hand-written)", "ddp", 1),
    ("torch DDP (hand-written)", "ddp", 2),
]


def _fifths(xs: list[float]) -> list[float]:
    """Means of the five consecutive parts of ``xs`` (fewer if it is shorter)."""
    k = min(5, len(xs))
    return [statistics.fmean(xs[len(xs) * i // k : len(xs) * (i + 1) // k]) for i in range(k)]


def _goals(s: dict[tuple[str, int], float]) -> tuple[float, float]:
    """The world-size-1 overhead and distsvi's 2-rank speed-up over DDP's, from seconds per
    step; each factor is a ratio of implementations timed side by side."""
    overhead = s["dp", 1] / s["plain", 1] - 1
    return overhead, (s["plain", 1] / s["ddp", 1]) * (s["ddp", 2] / s["dp", 2])


CASES = {  # case: (batch sizes per rank, timed steps, block) for each size
    "amortized": None,  # from --sizes/--steps/--block
    "latency": ([64], [3000], [50]),
    "wide": ([128], [30], [2]),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="distsvi data-parallel scaling vs torch DDP")
    parser.add_argument(
        "--case",
        choices=[*CASES, "all"],
        default="all",
        help="which model (see the module docstring); all of them by default",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[512, 8192],
        help="amortized case: datapoints per rank per step",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[1000, 100],
        help="amortized case: timed steps of each implementation, for each size",
    )
    parser.add_argument(
        "--block",
        type=int,
        nargs="+",
        default=[20, 2],
        help="amortized case: timed steps of a block, for each size",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each block")
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

    def per_size(sizes: list[int], values: list[int], flag: str) -> dict[int, int]:
        if min(values) < 1:
            parser.error(f"{flag} must be >= 1, got {min(values)}")
        return dict(zip(sizes, values + values[-1:] * len(sizes)))

    pinned = "each rank pinned to a core" if args.pin and can_pin(2) else "ranks not pinned"
    tuned = "allocator tuned" if args.tune else "allocator untuned"
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one "
        f"thread per rank, {pinned}, {tuned}; mean step time, implementations interleaved "
        f"in blocks; load average {os.getloadavg()[0]:.1f} at start"
    )
    header = (
        f"{'case':<10}{'implementation':<26}{'ranks':>6}{'batch/rank':>12}{'ms/step':>10}"
        f"{'datapoints/s':>14}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for case in CASES if args.case == "all" else [args.case]:
        if CASES[case] is None:
            sizes, steps_, block_ = args.sizes, args.steps, args.block
        else:
            sizes, steps_, block_ = CASES[case]
        steps = per_size(sizes, steps_, "--steps")
        block = per_size(sizes, block_, "--block")
        for batch in sizes:
            summary += _run_case(case, batch, steps[batch], block[batch], args)
    print("\n".join(summary))


def _run_case(case: str, batch: int, steps: int, block: int, args: Any) -> list[str]:
    """Time one case at one batch size on 1 and 2 ranks; print its rows, return its summary."""
    times: dict[tuple[str, int], list[float]] = {}  # (impl, ranks): s/step per block
    for world_size in (1, 2):
        measured = measure(case, world_size, batch, steps, block, args.warmup, args.pin, args.tune)
        for impl, per_block in measured.items():
            times[impl, world_size] = per_block
    seconds = {key: statistics.fmean(ts) for key, ts in times.items()}
    for label, impl, world_size in ROWS:
        if (impl, world_size) not in seconds:
            continue
        s = seconds[impl, world_size]
        plain = seconds["plain", 1]
        base = {"dp": plain, "dp_gloo": plain, "hand": s}.get(impl) or seconds[impl, 1]
        print(
            f"{case:<10}{label:<26}{world_size:>6}{batch:>12}{1e3 * s:>10.2f}"
            f"{world_size * batch / s:>14.0f}{world_size * base / s:>9.2f}x"
        )
    if ("allreduce", 2) in seconds:
        s = seconds["allreduce", 2]
        print(f"{case:<10}{'bare all-reduce, same bytes':<26}{2:>6}{'':>12}{1e3 * s:>10.3f}")
    print(flush=True)
    parts = {key: _fifths(ts) for key, ts in times.items()}
    overhead, ratio = _goals(seconds)
    by_part = [_goals({key: p[i] for key, p in parts.items()}) for i in range(len(parts["dp", 1]))]
    ours = 2 * seconds["plain", 1] / seconds["dp", 2]
    floor = 2 * seconds["ddp", 1] / seconds["ddp", 2]
    lines = [
        f"{case}, batch {batch}: world-size-1 overhead {100 * overhead:+.1f}% (goal <= 5%; by "
        f"fifths {', '.join(f'{100 * o:+.1f}%' for o, _ in by_part)}); 2-rank "
        f"speed-up distsvi {ours:.2f}x vs DDP {floor:.2f}x; distsvi/DDP {ratio:.2f} "
        f"(goal >= 1.0; by fifths {', '.join(f'{r:.2f}' for _, r in by_part)})"
    ]
    # DDP at world size 1 still runs its reducer; against the step without it, the floor's
    # speed-up is the one a user switching from one process would see.
    hand_floor = 2 * seconds["hand", 1] / seconds["ddp", 2]
    ddp_cost = seconds["ddp", 1] / seconds["hand", 1] - 1
    lines.append(
        f"{case}, batch {batch}: DDP at 1 rank costs {100 * ddp_cost:+.1f}% over the same "
        f"step without DDP; against that step DDP's 2-rank speed-up is {hand_floor:.2f}x "
        f"and distsvi/DDP {ours / hand_floor:.2f}"
    )
    # The speed-ups reward a slow single-process step; the 2-rank steps themselves do not.
    lines.append(
        f"{case}, batch {batch}: at 2 ranks distsvi trains {seconds['ddp', 2] / seconds['dp', 2]:.2f}x "
        f"as many datapoints/s as DDP (same model, batch and ranks)"
    )
    if ("dp_gloo", 2) in seconds:
        lines.append(
            f"{case}, batch {batch}: distsvi's 2-rank step with Gloo's all-reduce instead of "
            f"its default takes {seconds['dp_gloo', 2] / seconds['dp', 2]:.2f}x as long"
        )
    if ("allreduce", 2) in seconds:
        extra = seconds["dp", 2] - seconds["dp", 1]
        lines.append(
            f"{case}, batch {batch}: the 2-rank step costs the 1-rank step + "
            f"{1e3 * extra:.3f} ms = {extra / seconds['allreduce', 2]:.1f} bare all-reduces "
            f"of its bytes ({1e3 * seconds['allreduce', 2]:.3f} ms; goal <= 2)"
        )
    return lines


if __name__ == "__main__":
    main()
