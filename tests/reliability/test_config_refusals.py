"""Configs and overrides that cannot run: each is refused with exit code 2 and one line
naming the key (or file) and the fix, in under 2 s, before anything is written.

Table-driven: one test id per case. Measured in this process (``cli.main(argv)``); a
handful run again as real ``distsvi`` processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import DEBUG, FAULTY, run_cli

from distsvi import cli


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\nname: bomb\n"


def _nested(depth: int) -> str:
    return "model:\n  options:\n    x: " + "[" * depth + "]" * depth + "\n"


# Whole files: (id, contents as text or bytes, the fix the message names)
FILES = [
    ("alias-bomb", _bomb(), "write the values out"),
    ("oversized", "name: big\n" + "# padding\n" * 120_000, "over the 1048576-byte limit"),
    ("non-utf8", b"name: caf\xe9\nmodel: {name: logistic_regression}\n", "save it as UTF-8"),
    ("non-utf8-bom-16", "name: x\n".encode("utf-16"), "save it as UTF-8"),
    ("deep-nesting", _nested(40), "nested deeper than 16 levels"),
    ("duplicate-top-key", "name: a\nrun: {steps: 5}\nrun: {steps: 6}\n", "appears twice"),
    ("duplicate-section-key", "run:\n  steps: 5\n  steps: 6\n", "appears twice"),
    ("empty", "", "distsvi config quickstart > job.yaml"),
    ("only-comments", "# nothing here\n\n", "distsvi config quickstart > job.yaml"),
    ("python-tag", "name: !!python/object/apply:os.system ['true']\n", "plain values only"),
    ("list-at-top", "- name\n- model\n", "see `distsvi config quickstart`"),
    ("bad-syntax", "run: {steps: 5\n", "fix that line"),
    ("tab-indent", "run:\n\tsteps: 5\n", "fix that line"),
    ("section-scalar", "run: 3\n", "must be a mapping of options"),
    ("unknown-section", "runn: {steps: 5}\n", "Key 'runn' not in 'TrainConfig'"),
]
FILE_KEYS = {  # the dotted key named instead of the file
    "duplicate-top-key": "run",
    "duplicate-section-key": "run.steps",
    "python-tag": "name",
    "section-scalar": "run",
    "unknown-section": "runn",
}

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# Overrides on the debug config: (id, overrides, key named, fix named)
OVERRIDES = [
    (
        "optim-options-typo",
        ["optim.options.betass=[0.9,0.99]"],
        "optim.options.betass",
        "did you mean 'betas'?",
    ),
    (
        "optim-options-foreign",
        ["optim.options.momentum=0.9"],
        "optim.options.momentum",
        "its options: betas, eps",
    ),
    ("optim-options-lr", ["optim.options.lr=0.1"], "optim.options.lr", "as optim.lr"),
    (
        "sgd-options-typo",
        ["optim.name=SGD", "optim.options.momentun=0.9"],
        "optim.options.momentun",
        "did you mean 'momentum'?",
    ),
    (
        "schedule-options-typo",
        ["schedule.name=exponential", "schedule.options.gama=0.9"],
        "schedule.options.gama",
        "did you mean 'gamma'?",
    ),
    (
        "cosine-without-T_max",
        ["schedule.name=cosine"],
        "schedule.options.T_max",
        "schedule.options.T_max=",
    ),
    (
        "step-without-step_size",
        ["schedule.name=step"],
        "schedule.options.step_size",
        "schedule.options.step_size=",
    ),
    (
        "schedule-options-without-schedule",
        ["schedule.options.gamma=0.9"],
        "schedule.options",
        "set schedule.name",
    ),
    (
        "clipped-adam-with-schedule",
        ["optim.name=ClippedAdam", "schedule.name=exponential", "schedule.options.gamma=0.9"],
        "schedule.name",
        "schedule.name: none",
    ),
    ("model-options-list", ["model.options=[1,2]"], "model.options", "mapping"),
    ("guide-options-list", ["guide.options=[1]"], "guide.options", "mapping"),
    ("data-options-list", ["data.options=[1]"], "data.options", "mapping"),
    (
        "model-options-typo",
        ["model.options.prior_scal=2.0"],
        "model.options.prior_scal",
        "did you mean 'prior_scale'?",
    ),
    (
        "guide-options-typo",
        ["guide.options.init_scal=0.1"],
        "guide.options.init_scal",
        "did you mean 'init_scale'?",
    ),
    (
        "data-options-typo",
        ["data.name=synthetic_gmm", "data.options.num_point=100"],
        "data.options.num_point",
        "did you mean 'num_points'?",
    ),
    ("device-cuda", ["run.device=cuda"], "run.device", "run.device=auto"),
    ("backend-nccl", ["dist.backend=nccl"], "dist.backend", "dist.backend=auto"),
    ("device-unknown", ["run.device=tpu"], "run.device", "auto, cpu, cuda"),
    ("timeout-huge", ["dist.timeout_s=1000000000"], "dist.timeout_s", "at most 604800"),
    ("timeout-zero", ["dist.timeout_s=0"], "dist.timeout_s", "must be > 0"),
    (
        "num-points-huge",
        [
            "model.name=hierarchical",
            "data.name=synthetic_hierarchical",
            "data.options.num_points=100000000000000",
        ],
        "data.options.num_points",
        "lower it",
    ),
    (
        "num-points-zero",
        ["data.name=synthetic_gmm", "model.name=gmm", "data.options.num_points=0"],
        "data.options.num_points",
        "must be > 0",
    ),
    (
        "model-wrong-signature",
        [f"model.name={FAULTY}:wrong_signature"],
        "model.name",
        "def model(*tensors, size",
    ),
    ("model-file-missing", ["model.name=no_such_file.py:model"], "model.name", "does not exist"),
    (
        "model-attr-missing",
        [f"model.name={FAULTY}:no_such_model"],
        "model.name",
        "has no attribute 'no_such_model'",
    ),
    ("model-not-a-target", ["model.name=logistic"], "model.name", "package.module:attr"),
    (
        "data-loader-missing",
        [f"data.name={FAULTY}:no_such_loader"],
        "data.name",
        "has no attribute",
    ),
    ("guide-unknown", ["guide.name=AutoNormalx"], "guide.name", "package.module:attr"),
    ("loss-unknown", ["loss.name=ELBO"], "loss.name", "Trace_ELBO"),
    ("optim-unknown", ["optim.name=Adamm"], "optim.name", "Adam, ClippedAdam"),
    ("lr-negative", ["optim.lr=-0.1"], "optim.lr", "must be > 0"),
    ("lr-infinite", ["optim.lr=inf"], "optim.lr", "must be finite"),
    (
        "per-param-lr-negative",
        ["optim.per_param={AutoNormal: {lr: -1}}"],
        "optim.per_param.AutoNormal.lr",
        "must be > 0",
    ),
    ("key-typo", ["run.stepz=5"], "run.stepz", "Did you mean"),
    ("wrong-type", ["run.steps=abc"], "run.steps", "config reference gives each key's type"),
    ("batch-too-large", ["run.batch_size=100000"], "run.batch_size", "must be <="),
    ("val-fraction", ["data.val_fraction=1.5"], "data.val_fraction", "[0, 1)"),
    ("keep-zero", ["checkpoint.keep=0"], "checkpoint.keep", "must be > 0"),
    (
        "resume-missing",
        ["checkpoint.resume=/no/such/step.pt"],
        "checkpoint.resume",
        "auto, never or an existing",
    ),
    ("seed-negative", ["run.seed=-1"], "run.seed", "[0, 2**63)"),
    ("no-steps", ["run.steps=0", "run.epochs=0"], "run.steps", "run.steps > 0 or run.epochs > 0"),
    ("override-without-equals", ["run.steps"], "run.steps", "key=value"),
    ("override-unknown-section", ["runs.steps=5"], "runs", "not in 'TrainConfig'"),
    ("section-overridden-by-scalar", ["run=3"], "run", "set its keys (e.g. run.steps=5)"),
    (
        "checkpoint-dir-is-file",
        ["checkpoint.dir={file}"],
        "checkpoint.dir",
        "is a file, not a directory",
    ),
    (
        "checkpoint-dir-under-file",
        ["checkpoint.dir={file}/ck"],
        "checkpoint.dir",
        "cannot be created",
    ),
    (
        "checkpoint-dir-unwritable",
        ["checkpoint.dir=/proc/distsvi/ck"],
        "checkpoint.dir",
        "name a directory you can write to",
    ),
    ("log-dir-is-file", ["log.dir={file}"], "log.dir", "is a file, not a directory"),
    (
        "log-dir-unwritable",
        ["log.dir=/proc/distsvi/tb"],
        "log.dir",
        "name a directory you can write to",
    ),
    ("name-empty", ["name=' '"], "name", "give the job a name"),
]
NEEDS_NO_CUDA = {"device-cuda", "backend-nccl"}


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Import torch and the engine once, so that each case measures the checks alone."""
    from distsvi.train.config import load_config

    load_config(DEBUG, ["run.steps=1"])


def _refused(capsys, argv: list[str], root: Path) -> str:
    start = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert elapsed < 2, f"{elapsed:.2f} s"
    assert len(err.splitlines()) == 1, err
    assert err.startswith("distsvi: config error at "), err
    assert not any((root / d).exists() for d in ("ck", "tb")), "something was written"
    return err


def _dirs(root: Path) -> list[str]:
    return [f"checkpoint.dir={root / 'ck'}", f"log.dir={root / 'tb'}"]


@pytest.mark.parametrize("case, content, fix", FILES, ids=[c[0] for c in FILES])
def test_a_malformed_file_is_refused(tmp_path, capsys, case, content, fix):
    path = tmp_path / "job.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    err = _refused(capsys, ["train", str(path), *_dirs(tmp_path)], tmp_path)
    assert f"at {FILE_KEYS.get(case, str(path))}:" in err, err
    assert fix in err, err


@pytest.mark.parametrize("case, overrides, key, fix", OVERRIDES, ids=[c[0] for c in OVERRIDES])
def test_a_malformed_override_is_refused(tmp_path, capsys, case, overrides, key, fix):
    if case in NEEDS_NO_CUDA and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    overrides = [o.replace("{file}", str(file)) for o in overrides]
    argv = ["train", str(DEBUG), *_dirs(tmp_path), *overrides]
    err = _refused(capsys, argv, tmp_path)
    assert f"at {key}:" in err, err
    assert fix in err, err


def test_at_least_forty_cases():
    assert len(FILES) + len(OVERRIDES) >= 40


@pytest.mark.parametrize(
    "args, key",
    [
        (["optim.options.betass=[0.9,0.99]"], "optim.options.betass"),
        (["schedule.name=cosine"], "schedule.options.T_max"),
        (["dist.timeout_s=1000000000"], "dist.timeout_s"),
    ],
    ids=["optim-options-typo", "cosine-without-T_max", "timeout-huge"],
)
def test_refused_in_a_real_process(tmp_path, args, key):
    proc = run_cli(["train", str(DEBUG), *_dirs(tmp_path), *args], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"config error at {key}:" in lines[0], proc.stderr
    assert not (tmp_path / "ck").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("content", [_bomb(), _nested(40)], ids=["alias-bomb", "deep-nesting"])
def test_hostile_yaml_in_a_real_process(tmp_path, content):
    """The alias bomb and deep nesting, refused by the launcher before any worker starts."""
    from reliability_helpers import run_launch

    path = tmp_path / "job.yaml"
    path.write_text(content)
    start = time.monotonic()
    proc = run_launch(["--nproc-per-node", "2", str(path)], timeout=120)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60
