"""The ``distsvi`` command: train, evaluate and sample from SVI jobs described by YAML.

Run one process (debugging)::

    distsvi train configs/quickstart.yaml
    distsvi train quickstart run.steps=500 optim.lr=0.003    # a config shipped in the package

Run 2 processes on this machine, or 2 nodes, under torchrun (see launch/README.md)::

    launch/distsvi-launch --nproc-per-node 2 configs/quickstart.yaml
    launch/distsvi-launch --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 configs/quickstart.yaml

Then::

    distsvi eval configs/quickstart.yaml --checkpoint runs/quickstart/checkpoints/step_00001500.pt
    distsvi predict configs/vae_digits.yaml --checkpoint PATH --num-samples 100 --out samples.pt
    distsvi config configs/quickstart.yaml run.steps=10     # print the resolved config

A config that cannot run (unknown key, wrong type, value out of range, missing model
file) exits with code 2 and one message naming the key, before anything starts. A run
that fails (the model raises, training diverges) exits with code 1 after one message,
tagged with the rank under torchrun; no rank waits for a failed peer.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from distsvi.train.config import TrainConfig, load_config, to_yaml
from distsvi.train.errors import ConfigError, RunFailed, first_line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distsvi",
        description="Train, evaluate and sample from SVI jobs described by YAML configs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "config", metavar="CONFIG", help="a YAML file, or a shipped config name (quickstart)"
        )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="dotted overrides, e.g. optim.lr=0.003",
        )
        return p

    add("train", "run the job (one process, or one rank under torchrun)")
    p = add("eval", "the full validation loss (negative ELBO) of a checkpoint")
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="checkpoint file to evaluate"
    )
    p = add("predict", "posterior predictive samples on the validation rows, saved with torch.save")
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="checkpoint file to sample from"
    )
    p.add_argument(
        "--num-samples", type=int, default=None, metavar="N", help="default: predict.num_samples"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the samples")
    add("config", "print the fully resolved config")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config, args.overrides)
    if args.command in ("eval", "predict") and not Path(args.checkpoint).is_file():
        raise ConfigError("--checkpoint", f"no file {args.checkpoint!r}")
    if args.command == "predict" and args.num_samples is not None and args.num_samples <= 0:
        raise ConfigError("--num-samples", f"must be > 0, got {args.num_samples}")
    return cfg


def run(args: argparse.Namespace, cfg: TrainConfig) -> int:
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    from distsvi.train import loop  # torch loads here, once the config is known good

    if args.command == "train":
        loop.train(cfg)
    elif args.command == "eval":
        loss = loop.evaluate(cfg, args.checkpoint)
        if loss is not None:
            print(f"loss/val {loss!r}")
    else:
        num = args.num_samples if args.num_samples is not None else cfg.predict.num_samples
        shapes = loop.predict(cfg, args.checkpoint, num, args.out)
        if shapes is not None:
            for site, shape in shapes.items():
                print(f"{site} {tuple(shape)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distsvi``; returns the exit code: 0, 2 for a config (or file) that
    cannot run, 1 for a run that failed."""
    parser = get_args_parser()
    # Overrides may also follow the options (eval CONFIG --checkpoint PATH KEY=VALUE).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    # Under torchrun, every rank says who it is: its message is the job's root cause.
    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    tag = f"rank {os.environ.get('RANK', '?')}: " if elastic else ""
    try:
        cfg = config_from_args(args)
        if elastic and args.command != "config":
            _join_launcher()
        return run(args, cfg)
    except (ConfigError, RunFailed) as e:
        _fail(f"{tag}{e}", e, elastic)
        return 2 if isinstance(e, ConfigError) else 1
    except Exception as e:  # noqa: BLE001 - a failure ends this rank at once, in one message
        if elastic and _peer_failed(e):
            # Not the root cause: another rank died and closed its connections.
            print(f"distsvi: {tag}stopping: another rank failed", file=sys.stderr, flush=True)
            return 1
        traceback.print_exc()  # the user's model or loader raised: show where
        _fail(f"{tag}{type(e).__name__}: {first_line(e)}", e, elastic)
        return 1


def _join_launcher() -> None:
    """Die with torchrun, and report errors the way it reads them (its error file)."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from distsvi.train.process import die_with_parent

    die_with_parent()
    get_error_handler().initialize()


def _fail(message: str, e: BaseException, elastic: bool) -> None:
    print(f"distsvi: {message}", file=sys.stderr, flush=True)
    if elastic:  # torchrun names this rank's error as the root cause of the job's failure
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)


def _peer_failed(e: BaseException) -> bool:
    """A collective failed because another rank died (Gloo sees its connection close; the
    shared-memory average sees its process gone)."""
    from distsvi.distributed.shm import PeerExited

    if isinstance(e, PeerExited):
        return True
    text = str(e)
    return any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


if __name__ == "__main__":
    code = main()
    if code != 0 and "TORCHELASTIC_RUN_ID" in os.environ:
        # A failed rank leaves at once: the interpreter's shutdown would first tear down
        # the process group and its threads (seconds on a loaded machine) while torchrun
        # waits for this exit to stop the other ranks. Its message is out and recorded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
