"""The cost of a step of a model with a latent per datapoint, as the data grows.

Run: ``python benchmarks/local_latents.py [--sizes 1e3,1e4,1e5,1e6,1e7] [--impls pyro,dense,lazy]``

The model: ``z_i ~ Normal(0, 1)`` in R^10 for each of N datapoints, ``x_i ~ Normal(z_i, 1)``,
an ``AutoNormal`` guide (so 2 x N x 10 local params), Adam, batch 256. Implementations:
Pyro 1.9.2 (when installed), distsvi with ``local_updates="dense"`` (Pyro's numbers: every
row steps) and with ``local_updates="lazy"`` (only the batch's rows step).

Each (implementation, N) runs in a fresh process (so that its peak memory is its own), on
one thread: a few warm-up steps, then steps until ``--seconds`` of CPU time have passed
(at least ``--min-steps``). Batches come from one shuffle
of the N rows per epoch, as from a data loader. Columns: the mean CPU milliseconds per step; the MB of
gradient the step hands to the optimizer (what a replicated data-parallel step all-reduces:
the full N rows for dense, the batch's rows for lazy); the process's peak resident memory.
With ``--ranks 2`` (run under ``torchrun``, one thread per rank) the implementations are
distsvi dense + ``local_params="replicated"`` (the plate draws each rank's batches from
all N rows, which every rank holds) and lazy + ``"sharded"`` (each rank holds only its
own block of the data and takes its batches from the block, as the job does); steps are
timed by the wall clock for about ``--seconds`` (at least ``--min-steps``), the MB column
is what ``DataParallelSVI.allreduce_bytes`` says a step all-reduces, and the memory column
is the mean peak over ranks. ``--ranks 1,2`` (the default) prints both tables in one run.
Goal: lazy at N = 1e7 costs at most 1.3x lazy at N = 1e3.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

DIM, BATCH, LR = 10, 256, 0.01
CLOCK = time.thread_time


CHUNK = 1 << 16


def make_data(n: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of the N x DIM data, without building the others: chunk ``c`` of
    ``CHUNK`` rows comes from a generator seeded with ``c``, so a rank's block is the same
    rows whatever the world size."""
    stop = n if stop is None else stop
    parts = []
    for c in range(start // CHUNK, (stop + CHUNK - 1) // CHUNK):
        g = torch.Generator().manual_seed(c)
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        chunk = torch.randn(hi - lo, DIM, generator=g) + 1.0
        parts.append(chunk[max(start, lo) - lo : min(stop, hi) - lo])
    return torch.cat(parts) if parts else torch.empty(0, DIM)


def build(impl: str, n: int):
    name = "pyro" if impl == "pyro" else "distsvi"
    pyro = importlib.import_module(name)
    dist = importlib.import_module(f"{name}.distributions")
    infer = importlib.import_module(f"{name}.infer")
    optim = importlib.import_module(f"{name}.optim")
    autoguide = importlib.import_module(f"{name}.infer.autoguide")

    def model(x, idx=None, start=0):
        # ``x`` holds rows ``start:start + len(x)`` (a rank's block when sharded)
        size = BATCH if idx is None else None  # None: the data-parallel shards draw
        with pyro.plate("data", n, subsample=idx, subsample_size=size) as rows:
            z = pyro.sample("z", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[rows - start])

    pyro.clear_param_store()
    guide = autoguide.AutoNormal(model)
    if impl == "pyro":
        opt = optim.Adam({"lr": LR})
    else:
        opt = optim.Adam({"lr": LR}, local_updates=impl)
    svi = infer.SVI(model, guide, opt, infer.Trace_ELBO())
    return svi


def grad_mb(impl: str, n: int) -> float:
    rows = n if impl in ("pyro", "dense") else BATCH
    return 2 * rows * DIM * 4 / 1e6


class Batches:
    """The batches of an epoch-wise shuffle, as a data loader (or distsvi's sharded plates)
    draws them: one permutation of N per epoch, not per step (a plate's own
    ``subsample_size`` draw permutes all N rows at every step, Pyro's rule)."""

    def __init__(self, n: int) -> None:
        self.n, self.perm, self.pos = n, torch.randperm(n), 0

    def next(self) -> torch.Tensor:
        if self.pos + BATCH > self.n:
            self.perm, self.pos = torch.randperm(self.n), 0
        self.pos += BATCH
        return self.perm[self.pos - BATCH : self.pos]


def one(impl: str, n: int, seconds: float, min_steps: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = make_data(n)
    svi = build(impl, n)
    batches = Batches(n)
    for _ in range(3):  # creates the params, warms caches
        svi.step(data, batches.next())
    times = []
    start = CLOCK()
    while len(times) < min_steps or CLOCK() - start < seconds:
        t0 = CLOCK()
        svi.step(data, batches.next())  # the amortized shuffle counts in the step
        times.append(CLOCK() - t0)
        if len(times) >= 2000:
            break
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "impl": impl,
        "n": n,
        "ms": 1e3 * statistics.mean(times),
        "steps": len(times),
        "grad_mb": grad_mb(impl, n),
        "rss_mb": peak_kb / 1024,
    }


def one_dp(impl: str, n: int, seconds: float, min_steps: int) -> dict | None:
    """One rank of a 2-rank run under torchrun: dense+replicated or lazy+sharded."""
    import distsvi.distributed as dd

    group = dd.init()
    dd.seed_rank(0, group)
    torch.set_num_threads(1)
    sharing = "sharded" if impl == "lazy" else "replicated"
    svi = build(impl, n)
    dp = dd.DataParallelSVI(svi, group, local_params=sharing)
    start, stop = 0, n
    if sharing == "sharded":
        # The rank trains only its own block of rows, so it holds only those rows of the
        # data and takes its batches from the block's walk (as the job does).
        own = dd.shard_indices(n, group.rank, group.world_size)
        start, stop = int(own[0]), int(own[-1]) + 1
        dp.shards.own_batches = True
    data = make_data(n, start, stop)

    def step() -> None:
        idx = dp.shards.take("data", n, BATCH) if sharing == "sharded" else None
        dp.step(data, idx, start=start)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    step()
    # The same count on every rank (each step is collective): enough for ``seconds``.
    probe = dd.reduce.all_reduce_scalars([time.perf_counter() - t0], group)[0]
    count = max(min_steps, min(2000, int(seconds * group.world_size / max(probe, 1e-6))))
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = dd.reduce.all_reduce_scalars(
        [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], group
    )[0]
    out = {
        "impl": impl,
        "n": n,
        "ms": 1e3 * statistics.mean(times),
        "steps": len(times),
        "grad_mb": dp.allreduce_bytes / 1e6,
        "rss_mb": peak / group.world_size,
    }
    dd.shutdown()
    return out if group.rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7")
    parser.add_argument("--impls", default="pyro,dense,lazy")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--ranks", default="1,2", help="1, 2 (under torchrun) or both")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--one-dp", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_dp:
        impl, n = args.one_dp
        r = one_dp(impl, int(float(n)), args.seconds, args.min_steps)
        if r is not None:
            print(json.dumps(r))
        return
    if args.one:
        impl, n = args.one
        print(json.dumps(one(impl, int(float(n)), args.seconds, args.min_steps)))
        return
    for ranks in [int(r) for r in args.ranks.split(",")]:
        table(args, ranks)


def table(args: argparse.Namespace, ranks: int) -> None:
    """Run every (implementation, N) at ``ranks`` ranks and print their table."""
    print(f"\n{ranks} rank(s):", flush=True)
    impls = args.impls.split(",")
    if "pyro" in impls and (importlib.util.find_spec("pyro") is None or ranks > 1):
        impls.remove("pyro")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        for impl in impls:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            launch += [f"--nproc-per-node={ranks}"]
            cmd = [
                *(launch if ranks > 1 else [sys.executable]),
                __file__,
                "--one-dp" if ranks > 1 else "--one",
                impl,
                str(n),
                "--seconds",
                str(args.seconds),
                "--min-steps",
                str(args.min_steps),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{impl} N={n:.0e}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl, n] = r
            print(
                f"{impl:>5} N={n:.0e}: {r['ms']:9.2f} ms/step ({r['steps']} steps), "
                f"grad {r['grad_mb']:8.2f} MB/step, peak RSS {r['rss_mb']:7.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    mb_label = "all-reduced" if ranks > 1 else "grad"
    print(
        "| N | "
        + " | ".join(f"{i} ms/step" for i in impls)
        + " | "
        + " | ".join(f"{i} {mb_label} MB/step" for i in impls)
        + " | "
        + " | ".join(f"{i} peak RSS MB" for i in impls)
        + " |"
    )
    print("|---" * (1 + 3 * len(impls)) + "|")
    for n in sizes:
        cells = [f"{n:.0e}"]
        for key, fmt in (("ms", "{:.1f}"), ("grad_mb", "{:.2f}"), ("rss_mb", "{:.0f}")):
            for impl in impls:
                r = results.get((impl, n))
                cells.append(fmt.format(r[key]) if r else "-")
        print("| " + " | ".join(cells) + " |")
    lazy = [results.get(("lazy", n)) for n in (sizes[0], sizes[-1])]
    if all(lazy):
        ratio = lazy[1]["ms"] / lazy[0]["ms"]
        print(
            f"\nlazy at N={sizes[-1]:.0e} / lazy at N={sizes[0]:.0e}: {ratio:.2f}x (goal <= 1.3x)"
        )


if __name__ == "__main__":
    main()
