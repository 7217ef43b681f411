"""Data-parallel logistic regression: one script for one process or one rank of a job.

Usage::

    python dp_script.py                                      # world size 1
    python dp_script.py --plain                              # plain SVI, to compare
    torchrun --standalone --nproc-per-node=2 dp_script.py    # 2 ranks

Rank 0 prints one line: the world size, the last step's loss (averaged over ranks), the
full-data loss, and a digest of the params.
"""

from __future__ import annotations

import argparse
import hashlib

import dp_models as m

import distsvi as pyro
from distsvi.distributed import DataParallelSVI, init, seed_rank, shutdown
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="plain SVI, no DataParallelSVI")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="datapoints per rank per step")
    args = parser.parse_args(argv)

    group = init()
    seed_rank(0, group)
    x, y = m.make_logistic(n=1024)
    svi = SVI(m.logistic_model, m.logistic_normal_guide, Adam({"lr": 0.05}), Trace_ELBO())
    stepper = svi if args.plain else DataParallelSVI(svi, group)
    for _ in range(args.steps):
        loss = stepper.step(x, y, batch=args.batch)
    full = stepper.evaluate_loss(x, y)
    digest = hashlib.sha256()
    for name, p in sorted(pyro.get_param_store().named_parameters()):
        digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    if group.is_main:
        print(
            f"world_size={group.world_size} loss={loss:.6f} full_loss={full:.3f} "
            f"params={digest.hexdigest()[:16]}",
            flush=True,
        )
    shutdown()


if __name__ == "__main__":
    main()
