"""Checkpoints of sharded local params in the job, on 2 real Gloo ranks: each rank writes
its own rows (torch.distributed.checkpoint), a resumed run repeats the uninterrupted one,
and a checkpoint resumes on another world size (2 ranks -> 1, 1 -> 2) with every row loaded
exactly."""

from __future__ import annotations

import math
import shutil

import ckpt_workers as w
import pytest
import torch
from dp_harness import ok, run_ranks

import distsvi
from distsvi.train import checkpoint, evaluate, load_config, train
from distsvi.train.job import build_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def union(per_rank: list[dict], name: str) -> torch.Tensor:
    """The full tensor of a local param from every rank's block (blocks are contiguous)."""
    blocks = sorted(
        ((r["params"][name]["rows"][2], r["params"][name]) for r in per_rank), key=lambda b: b[0]
    )
    dim = blocks[0][1]["rows"][0]
    return torch.cat([e["value"] for _, e in blocks], dim=dim)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ranks: 200 steps straight; 100 steps, then resumed to 200 (its step-100
    checkpoint copied aside first)."""
    root = tmp_path_factory.mktemp("sharded")
    straight = ok(run_ranks(w.train_rank, w.overrides(f"{root}/a", 200), timeout=240))
    first = ok(run_ranks(w.train_rank, w.overrides(f"{root}/b", 100), timeout=240))
    shutil.copytree(root / "b", root / "c")
    resumed = ok(run_ranks(w.train_rank, w.overrides(f"{root}/b", 200), timeout=240))
    return root, straight, first, resumed


def test_two_rank_resume_repeats_the_uninterrupted_run(runs):
    root, straight, first, resumed = runs
    for rank in range(2):
        a, b = straight[rank]["params"], resumed[rank]["params"]
        assert a.keys() == b.keys()
        local = [n for n, e in a.items() if e["rows"] is not None]
        assert local, "the guide has per-datapoint params"
        for name in a:
            assert a[name]["rows"] == b[name]["rows"]
            torch.testing.assert_close(b[name]["value"], a[name]["value"], rtol=0, atol=1e-6)
        # each rank stored only its half of the 1800 rows
        for name in local:
            dim, size, start, stop = a[name]["rows"]
            assert size == 1800 and stop - start == 900
            assert a[name]["value"].shape[dim] == 900
    files = sorted(p.name for p in (root / "b" / "ck").iterdir() if not p.name.startswith("."))
    assert "step_00000100.rows" in files and "step_00000200.rows" in files
    assert len(list((root / "b" / "ck" / "step_00000200.rows").glob("__*_0.distcp"))) == 2


def test_two_rank_checkpoint_resumes_on_one_process(runs):
    root, _, first, _ = runs
    args = w.overrides(f"{root}/c", 100)
    cfg = load_config("local_normal", args)
    job = build_job(cfg, distsvi.distributed.ProcessGroup())
    ckpt = checkpoint.Checkpointer(cfg.checkpoint.dir, 100, 5, True)
    with pytest.warns(UserWarning, match="written by 2 ranks"):
        assert checkpoint.restore(job, ckpt) == 100
    store = dict(distsvi.get_param_store().named_parameters())
    assert store.keys() == first[0]["params"].keys()
    for name, entry in first[0]["params"].items():
        want = union(first, name) if entry["rows"] is not None else entry["value"]
        assert torch.equal(store[name].detach(), want), name
    # and it trains on, in one process, from there
    results = train(load_config("local_normal", w.overrides(f"{root}/c", 130)))
    assert math.isfinite(results["loss/val"])


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    args = w.overrides(str(tmp_path), 100)
    train(load_config("local_normal", args))
    full = w.store_rows()
    one = w.restore_rank(distsvi.distributed.ProcessGroup(), args)  # 1 -> 1, for the state
    loaded = ok(run_ranks(w.restore_rank, args, timeout=240))
    for rank, got in enumerate(loaded):
        assert got["step"] == 100
        for name, entry in full.items():
            value = got["params"][name]["value"]
            if entry["rows"] is None:
                assert torch.equal(value, entry["value"]), name
                continue
            dim, size, start, stop = got["params"][name]["rows"]
            assert (size, stop - start) == (1800, 900)
            assert torch.equal(value, entry["value"].narrow(dim, start, stop - start)), name
            for key, state in got["optim"][name].items():
                whole = one["optim"][name][key]
                d = dim if whole.shape == entry["value"].shape else 0
                assert torch.equal(state, whole.narrow(d, start, stop - start)), (name, key)
    trained = ok(run_ranks(w.train_rank, w.overrides(str(tmp_path), 130), timeout=240))
    assert all(math.isfinite(r["results"]["loss/val"]) for r in trained)


def test_validation_of_a_sharded_checkpoint_is_the_same_on_one_and_two_ranks(runs):
    root = runs[0]
    args = w.overrides(f"{root}/a", 200)
    path = str(root / "a" / "ck" / "step_00000200.pt")
    two = ok(run_ranks(w.eval_rank, args, path, timeout=240))[0]
    one = evaluate(load_config("local_normal", args), path)
    # The refit and its one-sample ELBO draw their own noise on each rank (about 2% here):
    # equal up to Monte Carlo error, and the two ranks' blocks are summed once.
    assert one == pytest.approx(two, rel=0.06)


def test_each_rank_holds_only_its_block_of_training_rows():
    """Sharded local params on 2 ranks: a rank keeps its own block of the training table
    only, and trains exactly as it did with the whole table in memory (the same rows,
    taken from the walk and passed with their indices, instead of drawn by the plate)."""
    args = [*w.BASE, "run.steps=30"]
    r0, r1 = ok(run_ranks(w.block_rank, args, 30, timeout=240))
    n = r0["whole"]["rows"]
    assert n == 1800
    for rank, r in enumerate((r0, r1)):
        lo, hi = rank * n // 2, (rank + 1) * n // 2
        assert (r["block"]["rows"], r["block"]["offset"], r["block"]["num_train"]) == (
            hi - lo,
            lo,
            n,
        )
        assert r["block"]["losses"] == pytest.approx(r["whole"]["losses"], rel=1e-6)
        for name, entry in r["whole"]["params"].items():
            got = r["block"]["params"][name]
            assert got["rows"] == entry["rows"], name
            torch.testing.assert_close(got["value"], entry["value"], rtol=1e-6, atol=1e-6)
