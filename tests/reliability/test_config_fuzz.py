"""Randomly mutated versions of every shipped config (types swapped, keys misspelt, values
negated, sections or keys dropped), seeded: each ends with exit 0 (it trains a couple of
steps) or exit 2 and one line, never a traceback. A mutant that is a valid config whose
training diverges (a learning rate of 1e30) ends as any diverging run does: exit 1 and
the one line naming the first non-finite param or site."""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import pytest
import yaml
from reliability_helpers import REPO

from distsvi import cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NUM_MUTANTS = 60
# Keys whose mutants would train for long or write outside the test's directories: the
# overrides below set them after the mutant file, so their mutations are masked instead.
TINY = {
    "run.steps": "2",
    "run.epochs": "0",
    "run.val_every": "1000",
    "run.log_every": "1000",
    "run.progress": "none",
    "checkpoint.every": "0",
    "predict.num_samples": "3",
}
SWAPS = ["abc", 7, -3.5, 0, [1, 2], {"x": 1}, None, True, "", 1e30]


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _leaves(v, f"{key}.") if isinstance(v, dict) and v else [key]
    return out


def _parent(tree: dict, key: str) -> tuple[dict, str]:
    *path, last = key.split(".")
    for p in path:
        tree = tree[p]
    return tree, last


def mutate(tree: dict, rng: random.Random) -> tuple[dict, list[str]]:
    """One to three mutations of ``tree``; returns the mutant and what was done."""
    tree = copy.deepcopy(tree)
    done = []
    for _ in range(rng.randint(1, 3)):
        leaves = _leaves(tree)
        if not leaves:
            break
        kind = rng.choice(["swap", "misspell", "negate", "drop-section", "drop-key"])
        key = rng.choice(leaves)
        parent, last = _parent(tree, key)
        if kind == "swap":
            parent[last] = rng.choice(SWAPS)
        elif kind == "misspell":
            i = rng.randrange(len(last) + 1)
            new = last[:i] + rng.choice("aeiouxz_") + last[i:]
            parent[new] = parent.pop(last)
        elif kind == "negate":
            value = parent[last]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                parent[last] = rng.choice([-1, 0])
            else:
                parent[last] = -value if value else -1
        elif kind == "drop-section":
            tree.pop(key.split(".")[0], None)
        else:
            parent.pop(last)
        done.append(f"{kind} {key}")
    return tree, done


def _mutants() -> list[tuple[Path, dict, list[str]]]:
    rng = random.Random(20240611)
    sources = {p: yaml.safe_load(p.read_text()) for p in CONFIGS}
    out = []
    for i in range(NUM_MUTANTS):
        path = CONFIGS[i % len(CONFIGS)]
        mutant, done = mutate(sources[path], rng)
        out.append((path, mutant, done))
    return out


MUTANTS = _mutants()


@pytest.mark.parametrize(
    "source, mutant, done",
    MUTANTS,
    ids=[f"{i:02d}-{p.stem}" for i, (p, _, _) in enumerate(MUTANTS)],
)
def test_a_mutated_config_trains_or_is_refused_in_one_line(tmp_path, capsys, source, mutant, done):
    path = tmp_path / "mutant.yaml"
    path.write_text(yaml.safe_dump(mutant))
    argv = [
        "train",
        str(path),
        f"checkpoint.dir={tmp_path / 'ck'}",
        f"log.dir={tmp_path / 'tb'}",
        *(f"{k}={v}" for k, v in TINY.items()),
    ]
    if "data" in mutant and str(mutant["data"].get("name", "")).startswith("synthetic"):
        argv.append("data.options.num_points=2000")  # small; refused where it is no option
    start = time.perf_counter()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "Traceback" not in err, f"{done}:\n{err}"
    assert code in (0, 1, 2), f"{done}: exit {code}\n{err}"
    if code == 1:
        last = err.strip().splitlines()[-1]
        assert "Lower optim.lr" in last or "Lower the learning rate" in last, f"{done}:\n{err}"
        assert "optim.lr" in done[-1] or any("optim" in d for d in done), f"{done}:\n{err}"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("distsvi: config error at "), (
            f"{done}:\n{err}"
        )
        assert elapsed < 5
        assert not list((tmp_path / "ck").glob("step_*.pt")), done
    elif code == 0:
        assert list((tmp_path / "ck").glob("step_*.pt")), done


def test_the_mutants_cover_every_kind_and_config():
    kinds = {d.split()[0] for _, _, done in MUTANTS for d in done}
    assert kinds == {"swap", "misspell", "negate", "drop-section", "drop-key"}
    assert {p for p, _, _ in MUTANTS} == set(CONFIGS)
