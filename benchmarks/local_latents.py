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


def make_data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, DIM, generator=g) + 1.0


def build(impl: str, n: int):
    name = "pyro" if impl == "pyro" else "distsvi"
    pyro = importlib.import_module(name)
    dist = importlib.import_module(f"{name}.distributions")
    infer = importlib.import_module(f"{name}.infer")
    optim = importlib.import_module(f"{name}.optim")
    autoguide = importlib.import_module(f"{name}.infer.autoguide")

    def model(x, idx):
        with pyro.plate("data", n, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7")
    parser.add_argument("--impls", default="pyro,dense,lazy")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, n = args.one
        print(json.dumps(one(impl, int(float(n)), args.seconds, args.min_steps)))
        return
    impls = args.impls.split(",")
    if "pyro" in impls and importlib.util.find_spec("pyro") is None:
        impls.remove("pyro")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        for impl in impls:
            cmd = [
                sys.executable,
                __file__,
                "--one",
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
    print()
    print(
        "| N | "
        + " | ".join(f"{i} ms/step" for i in impls)
        + " | "
        + " | ".join(f"{i} grad MB/step" for i in impls)
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
