"""Malformed configs and overrides are refused with exit code 2, naming the key, fast,
before anything is written."""

from __future__ import annotations

import time

import pytest
from train_helpers import CONFIGS, run_cli

from distsvi import cli
from distsvi.train.config import ConfigError, load_config

BASE = (CONFIGS / "debug.yaml").read_text()

# (id, extra YAML appended to a copy of debug.yaml or None, overrides, key the message names)
CASES = [
    ("unknown-top", "bogus: 1\n", [], "bogus"),
    ("unknown-model", None, ["model.colour=red"], "model.colour"),
    ("unknown-guide", None, ["guide.init=3"], "guide.init"),
    ("unknown-data", None, ["data.shuffle_buffer=3"], "data.shuffle_buffer"),
    ("unknown-loss", None, ["loss.particles=3"], "loss.particles"),
    ("unknown-optim", None, ["optim.momentum=0.9"], "optim.momentum"),
    ("unknown-schedule", "schedule:\n  gamma: 0.5\n", [], "schedule.gamma"),
    ("unknown-run", None, ["run.stepz=10"], "run.stepz"),
    ("unknown-checkpoint", None, ["checkpoint.path=x"], "checkpoint.path"),
    ("unknown-log", None, ["log.level=3"], "log.level"),
    ("unknown-dist", None, ["dist.world=2"], "dist.world"),
    ("bad-shared-memory", None, ["dist.shared_memory=sometimes"], "dist.shared_memory"),
    ("type-steps", None, ["run.steps=abc"], "run.steps"),
    ("type-lr-yaml", None, ["optim.lr=fast"], "optim.lr"),
    ("type-section", "predict: [1, 2]\n", [], "predict"),
    ("negative-lr", None, ["optim.lr=-0.1"], "optim.lr"),
    ("zero-batch", None, ["run.batch_size=0"], "run.batch_size"),
    ("negative-steps", None, ["run.steps=-5"], "run.steps"),
    ("batch-larger-than-data", None, ["run.batch_size=10000"], "run.batch_size"),
    ("zero-keep", None, ["checkpoint.keep=0"], "checkpoint.keep"),
    ("val-fraction", None, ["data.val_fraction=1.5"], "data.val_fraction"),
    ("bad-optimizer", None, ["optim.name=Adamm"], "optim.name"),
    ("override-no-equals", None, ["run.steps"], "run.steps"),
    ("unknown-model-option", None, ["model.options.colour=red"], "model.options"),
    ("unknown-data-option", None, ["data.options.rows=5"], "data.options"),
    ("unknown-guide-option", None, ["guide.options.init_scal=0.1"], "guide.options"),
    ("missing-model-file", None, ["model.name=no_such_file.py:model"], "model.name"),
    ("model-does-not-import", None, ["model.name={broken}:model"], "model.name"),
    (
        "python-object-tag",
        "guide:\n  name: !!python/object/apply:os.system ['echo hi']\n",
        [],
        "guide.name",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_is_refused(case, tmp_path, capsys):
    _, extra, overrides, key = case
    broken = tmp_path / "broken.py"
    broken.write_text("def model(:\n")
    config = tmp_path / "job.yaml"
    text = BASE
    if extra is not None:  # replace a section rather than repeat its key
        section = extra.split(":")[0]
        if f"\n{section}:" in "\n" + text:
            text = _drop_section(text, section)
        text += extra
    config.write_text(text)
    overrides = [o.format(broken=broken) for o in overrides]
    out = tmp_path / "out"
    argv = [
        "train",
        str(config),
        f"checkpoint.dir={out / 'ck'}",
        f"log.dir={out / 'tb'}",
        *overrides,
    ]
    start = time.perf_counter()
    rc = cli.main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"config error at {key}" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert elapsed < 2.0
    assert not out.exists(), "nothing may be written for a refused config"


def _drop_section(text: str, section: str) -> str:
    lines, out, skipping = text.splitlines(keepends=True), [], False
    for line in lines:
        if line.startswith(f"{section}:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "".join(out)


def test_refused_in_a_fresh_process(tmp_path):
    start = time.perf_counter()
    proc = run_cli(
        ["train", "quickstart", "run.stepz=1", f"checkpoint.dir={tmp_path / 'ck'}"], timeout=60
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "run.stepz" in proc.stderr and "Did you mean" in proc.stderr
    assert not (tmp_path / "ck").exists()
    assert elapsed < 2.0  # the config is refused before torch is imported


def test_embedded_config_matches_repository_copy():
    from distsvi.train.config import EMBEDDED_CONFIGS

    shipped = sorted(p.name for p in EMBEDDED_CONFIGS.glob("*.yaml"))
    assert shipped == sorted(p.name for p in CONFIGS.glob("*.yaml"))
    for name in shipped:
        assert (EMBEDDED_CONFIGS / name).read_text() == (CONFIGS / name).read_text(), name


def test_every_shipped_config_loads():
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(path)
        assert cfg.name == path.stem or path.stem == "quickstart"


def test_shipped_name_resolves_and_unknown_name_lists_them():
    assert load_config("quickstart").name == "quickstart"
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_config")


def test_config_command_prints_resolved_yaml(capsys):
    assert cli.main(["config", "quickstart", "run.steps=7", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    resolved = load_config("quickstart", ["run.steps=7", "optim.lr=1e-3"])
    assert resolved.run.steps == 7 and resolved.optim.lr == 1e-3
    assert "steps: 7" in out and "lr: 0.001" in out


def test_interpolation_resolves():
    cfg = load_config(CONFIGS / "hier_synthetic.yaml", ["data.options.num_groups=7"])
    assert cfg.model.options["num_groups"] == 7
