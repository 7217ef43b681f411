"""What ``run.compile`` buys on the shipped configs: eager vs compiled steps of the job.

Run: ``python benchmarks/compile_payoff.py [--steps 300] [--configs quickstart,vae_digits]``

For each config the job is built twice in this process (one thread), once eager and once
with ``run.compile=true``; the compiled job's first steps pay for the compile. The eager
and compiled jobs then step in alternating blocks (each with its own param store swapped
in), and the table gives steps per second, the compile time (the compiled job's first
steps beyond an eager step's time) and the run length that repays it, which is what
``run.compile=auto`` decides by (``distsvi.train.config.COMPILE_AUTO_MIN_STEPS``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch._dynamo.utils import counters

import distsvi
from distsvi import distributed
from distsvi.distributed.data import rank_seed
from distsvi.train import load_config
from distsvi.train.job import build_job

OVERRIDES = {
    "hier_synthetic": ["data.options.num_points=100000"],
}


def build(name: str, compile_: str, root: str):
    cfg = load_config(
        name,
        [
            f"run.compile={compile_}",
            "run.threads=1",
            f"checkpoint.dir={root}/ck",
            f"log.dir={root}/tb",
            *OVERRIDES.get(name, []),
        ],
    )
    distsvi.set_rng_seed(rank_seed(cfg.run.seed, 0))
    job = build_job(cfg, distributed.init())
    store = distsvi.get_param_store()
    return job, store


def swap(store, own: dict) -> dict:
    saved = {f: dict(getattr(store, f)) for f in ("_params", "_constraints", "_transforms")}
    for f, d in own.items():
        getattr(store, f).clear()
        getattr(store, f).update(d)
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per job")
    parser.add_argument("--block", type=int, default=20, help="steps per alternating block")
    parser.add_argument("--configs", default="quickstart,hier_synthetic,vae_digits")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| config | eager steps/s | compiled steps/s | compile s | repaid after steps |")
    print("|---|---:|---:|---:|---:|", flush=True)
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as root:
            jobs, stores = {}, {}
            for mode in ("false", "true"):
                distsvi.clear_param_store()
                job, store = build(name, mode, f"{root}/{mode}")
                jobs[mode] = job
                stores[mode] = {f: {} for f in ("_params", "_constraints", "_transforms")}
            times: dict[str, list[float]] = {"false": [], "true": []}
            first: dict[str, float] = {}
            counters.clear()
            for mode, job in jobs.items():  # first steps: params, and the compile
                saved = swap(store, stores[mode])
                t0 = time.perf_counter()
                for _ in range(3):
                    job.step()
                first[mode] = time.perf_counter() - t0
                stores[mode] = swap(store, saved)
            while min(len(v) for v in times.values()) < args.steps:
                for mode, job in jobs.items():
                    saved = swap(store, stores[mode])
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        job.step()
                        times[mode].append(time.perf_counter() - t0)
                    stores[mode] = swap(store, saved)
            eager, comp = (statistics.median(times[m]) for m in ("false", "true"))
            compile_s = first["true"] - first["false"]
            payoff = compile_s / (eager - comp) if eager > comp else float("inf")
            print(
                f"| {name} | {1 / eager:.0f} | {1 / comp:.0f} | {compile_s:.1f} | {payoff:,.0f} |"
                f" (graphs: {counters['stats']['unique_graphs']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
