"""Faults of a one-process job: a locked checkpoint dir, resuming after a config change,
non-finite losses, a diverging learning rate, damaged checkpoints named by path, a full
disk under the checkpoint or TensorBoard dir, stale temporary files, predict's shapes.

Most run the CLI in this process (``cli.main(argv)``, the code path of ``distsvi``);
those about other processes or the file system's limits run real subprocesses.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from reliability_helpers import DEBUG, FAULTY, REPO, dirs, env, run_cli, scalars, small

from distsvi import cli

QUIET = ["run.progress=none"]


@pytest.fixture(autouse=True)
def fresh_fault_counter():
    """The faulty models count their calls: each test imports them afresh."""
    yield
    for name in [n for n in sys.modules if n.startswith("distsvi_user_faulty")]:
        del sys.modules[name]


def train(*args: str) -> int:
    return cli.main(["train", *args])


def checkpoints(root) -> list:
    return sorted((root / "ck").glob("step_*.pt"))


# -- the checkpoint dir lock -----------------------------------------------------------


def test_a_second_job_on_a_locked_dir_is_refused_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time; from distsvi.train.process import DirLock;"
                f"DirLock({str(tmp_path / 'ck')!r}).acquire(); print('held', flush=True);"
                "time.sleep(60)"
            ),
        ],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train(*small(5), *dirs(tmp_path), *QUIET) == 2
        err = capsys.readouterr().err
        import socket

        assert f"host {socket.gethostname()} pid {holder.pid}" in err
        assert "checkpoint.dir" in err and "another checkpoint.dir" in err
        assert not checkpoints(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock file is stale and the next job takes it over.
    assert (tmp_path / "ck" / ".lock").read_text().startswith("host ")
    assert train(*small(5), *dirs(tmp_path), *QUIET) == 0
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000005.pt"]
    assert f"pid {os.getpid()}" in (tmp_path / "ck" / ".lock").read_text()


# -- resuming after a config change ---------------------------------------------------


@pytest.mark.parametrize(
    "change, keys",
    [
        (["guide.name=AutoDelta"], ["guide.name: 'AutoNormal' -> 'AutoDelta'"]),
        (
            [
                "model.name=hierarchical",
                "data.name=synthetic_hierarchical",
                "data.options.num_points=500",
            ],
            ["model.name", "data.name", "data.options"],
        ),
        (["loss.name=TraceMeanField_ELBO"], ["loss.name"]),
        (["run.batch_size=8"], ["run.batch_size: 16 -> 8"]),
    ],
    ids=["guide", "model-and-data", "loss", "batch"],
)
def test_resume_after_an_inapplicable_change_is_refused(tmp_path, capsys, change, keys):
    assert train(*small(5), *dirs(tmp_path), *QUIET) == 0
    before = [p.read_bytes() for p in checkpoints(tmp_path)]
    capsys.readouterr()
    start = time.perf_counter()
    assert train(*small(10), *dirs(tmp_path), *QUIET, *change) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for key in keys:
        assert key in err
    assert "checkpoint.resume=never" in err and "new checkpoint.dir" in err
    assert [p.read_bytes() for p in checkpoints(tmp_path)] == before


def test_a_changed_feature_count_is_a_config_mismatch_not_a_traceback(tmp_path, capsys):
    job = [*small(5), f"model.name={FAULTY}:logistic", f"data.name={FAULTY}:fixed_rows", *QUIET]
    assert train(*job, *dirs(tmp_path)) == 0
    capsys.readouterr()
    # The same config, a data file edited in between: the shapes no longer fit.
    os.environ["FEATURES"] = "7"
    try:
        assert train(*job, *dirs(tmp_path)) == 2
    finally:
        del os.environ["FEATURES"]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (
        "does not fit this config" in err
        and "'AutoNormal.locs.w'" in err
        and "(5,)" in err
        and "(7,)" in err
    )
    assert "checkpoint.resume=never" in err and "new checkpoint.dir" in err
    # Given as an option, the feature count is a changed key.
    assert train(*job, *dirs(tmp_path), "data.options.features=7") == 2
    err = capsys.readouterr().err
    assert "data.options: {} -> {'features': 7}" in err and "checkpoint.resume=never" in err


def test_safe_changes_take_effect_and_are_announced_in_one_line(tmp_path, capsys):

    assert train(*small(10), *dirs(tmp_path), *QUIET, "run.log_every=1") == 0
    capsys.readouterr()
    assert train(*small(20), *dirs(tmp_path), *QUIET, "run.log_every=1", "optim.lr=0.01") == 0
    out = capsys.readouterr().out
    announced = [line for line in out.splitlines() if line.startswith("resuming with changed")]
    assert announced == [
        "resuming with changed settings: optim.lr 0.05 -> 0.01, run.steps 10 -> 20"
    ]
    lr = scalars(tmp_path / "tb")["optim/lr"]
    assert lr[10] == pytest.approx(0.05) and lr[11] == pytest.approx(0.01)
    assert lr[20] == pytest.approx(0.01)
    assert torch.load(checkpoints(tmp_path)[-1], weights_only=True)["step"] == 20


# -- non-finite losses ------------------------------------------------------------------


def test_a_few_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):

    monkeypatch.setenv("FAULT_STEP", "6")  # the autoguide's set-up calls the model once
    monkeypatch.setenv("FAULT_LEN", "3")
    job = [*small(12), f"model.name={FAULTY}:nan_steps", f"data.name={FAULTY}:fixed_rows"]
    assert train(*job, *dirs(tmp_path), *QUIET, "run.log_every=1") == 0
    skipped = scalars(tmp_path / "tb")["health/skipped_steps"]
    assert skipped[3] == 0 and skipped[12] == 3
    state = torch.load(checkpoints(tmp_path)[-1], weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in state["params"].values())


def test_non_finite_in_a_row_stops_naming_the_site_and_saves_no_nan(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAULT_STEP", "5")
    monkeypatch.setenv("FAULT_LEN", "0")
    job = [
        *small(40),
        "checkpoint.every=2",
        f"model.name={FAULTY}:nan_steps",
        f"data.name={FAULTY}:fixed_rows",
        "run.max_bad_steps=4",
    ]
    assert train(*job, *dirs(tmp_path), *QUIET) == 1
    err = capsys.readouterr().err
    final = err.strip().splitlines()[-1]
    assert "4 steps in a row (max_bad_steps=4)" in final
    assert "first non-finite log-prob: model site 'bad'" in final
    assert "Traceback" not in err
    assert checkpoints(tmp_path)
    for path in checkpoints(tmp_path):
        state = torch.load(path, weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in state["params"].values())


@pytest.mark.parametrize("config", ["debug", "hier_synthetic"])
def test_a_diverging_learning_rate_ends_with_the_message(tmp_path, capsys, config):
    job = [
        config,
        "run.steps=60",
        "run.val_every=1000",
        "checkpoint.every=5",
        "run.max_bad_steps=3",
        "optim.lr=1e6",
        "checkpoint.resume=never",
        "predict.num_samples=5",
    ]
    if config == "hier_synthetic":
        job += ["data.options.num_points=2000", "run.batch_size=64"]
    assert train(*job, *dirs(tmp_path), *QUIET) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Expected parameter" not in err, err
    final = err.strip().splitlines()[-1]
    assert "Lower optim.lr" in final or "Lower the learning rate" in final, final
    assert "non-finite" in final or "left its support" in final, final
    assert "site '" in final or "param '" in final, final
    for path in checkpoints(tmp_path):
        state = torch.load(path, weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in state["params"].values())


# -- damaged checkpoints given by path --------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    assert train(*small(4), *dirs(root), *QUIET) == 0
    return checkpoints(root)[-1]


def _damage(kind: str, good, path) -> None:
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(bytes(random.Random(kind).randrange(256) for _ in range(4000)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "objects":
        import datetime

        torch.save({"when": datetime.datetime(2020, 1, 1)}, path)
    elif kind == "wrong-keys":
        torch.save({"params": {"w": torch.ones(3)}}, path)


DAMAGE = {
    "truncated": "is truncated",
    "random": "is not a torch checkpoint file",
    "empty": "is empty",
    "objects": "holds Python objects other than tensors",
    "wrong-keys": "is not a distsvi checkpoint (it lacks format",
}


@pytest.mark.parametrize("command", ["eval", "predict", "resume"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_by_path_is_named(tmp_path, capsys, good_checkpoint, kind, command):
    bad = tmp_path / "bad.pt"
    _damage(kind, good_checkpoint, bad)
    if command == "resume":
        argv = ["train", *small(8), f"checkpoint.resume={bad}"]
    else:
        argv = [command, str(DEBUG), "--checkpoint", str(bad)]
        if command == "predict":
            argv += ["--out", str(tmp_path / "out.pt")]
    start = time.perf_counter()
    assert cli.main([*argv, *dirs(tmp_path / "run")]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(bad) in err and DAMAGE[kind] in err, err
    assert "weights_only" not in err
    assert not (tmp_path / "out.pt").exists()
    assert not list((tmp_path / "run").glob("ck/step_*.pt"))


def test_a_checkpoint_of_another_model_by_path_is_named(tmp_path, capsys, good_checkpoint):
    argv = [
        "eval",
        str(DEBUG),
        "--checkpoint",
        str(good_checkpoint),
        f"model.name={FAULTY}:logistic",
        f"data.name={FAULTY}:fixed_rows",
    ]
    assert cli.main([*argv, *dirs(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(good_checkpoint) in err and "does not fit this config" in err
    assert "(30,) in the checkpoint and (5,) here" in err


def test_a_damaged_checkpoint_in_a_real_process(tmp_path, good_checkpoint):
    bad = tmp_path / "bad.pt"
    _damage("truncated", good_checkpoint, bad)
    proc = run_cli(["eval", str(DEBUG), "--checkpoint", str(bad), *dirs(tmp_path)], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if str(bad) in line
    ]
    assert "is truncated" in proc.stderr and "Traceback" not in proc.stderr


# -- full disks (a file size limit stands for them) ------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_tensorboard_dir_warns_once_and_training_goes_on(tmp_path):
    """Checkpoints (13 KB) fit under the limit; the event file outgrows it."""
    argv = [*small(300), "run.log_every=1", "checkpoint.every=100", *dirs(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "distsvi.cli", "train", *argv],
        cwd=REPO,
        env=env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=_limit_file_size(40_000),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("cannot write TensorBoard events in") == 1, proc.stderr
    assert "set log.dir to another directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "ck" / "step_00000300.pt").is_file()


def test_a_full_checkpoint_dir_stops_with_a_message_and_no_tmp(tmp_path):
    argv = [
        *small(20),
        "checkpoint.every=10",
        "log.dir=" + str(tmp_path / "tb"),
        "checkpoint.dir=" + str(tmp_path / "ck"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "distsvi.cli", "train", *argv],
        cwd=REPO,
        env=env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=_limit_file_size(8_000),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot write checkpoint" in last and "step_00000010.pt" in last
    assert "free space" in last and "Traceback" not in proc.stderr
    assert not list((tmp_path / "ck").glob("*.tmp")) and not list((tmp_path / "ck").glob(".*.tmp"))


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    (tmp_path / "ck").mkdir()
    stale = tmp_path / "ck" / ".step_00000005.pt.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train(*small(3), *dirs(tmp_path), *QUIET) == 0
    assert not stale.exists()
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000003.pt"]


# -- predict's shapes -------------------------------------------------------------------


def test_predict_on_the_quickstart_gives_one_draw_per_sample(tmp_path, capsys):
    """``w`` (one value for all rows) is [S, 30], without a singleton dim for the rows."""
    job = ["quickstart", "run.steps=5", "checkpoint.every=0", *QUIET]
    assert train(*job, *dirs(tmp_path)) == 0
    out = tmp_path / "samples.pt"
    argv = [
        "predict",
        *job,
        "--checkpoint",
        str(checkpoints(tmp_path)[-1]),
        "--num-samples",
        "7",
        "--out",
        str(out),
        *dirs(tmp_path),
    ]
    assert cli.main(argv) == 0
    samples = torch.load(out, weights_only=True)["samples"]
    assert samples["w"].shape == (7, 30)
    assert samples["b"].shape == (7,)
    assert samples["obs"].shape == (7, 114)  # 20% of 569 rows held out
    assert "w (7, 30)" in capsys.readouterr().out
