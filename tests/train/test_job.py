"""The training job in one process: TensorBoard events, resume, checkpoints that are
never half-written, predict, and the shipped models."""

from __future__ import annotations

import re
import time

import pytest
import torch
from train_helpers import (
    CONFIGS,
    REPO,
    assert_params_close,
    dirs,
    final_params,
    run_cli,
    scalars,
    text_tags,
)

from distsvi import cli
from distsvi.train import checkpoint
from distsvi.train.metrics import TAGS


def train(*args: str) -> None:
    assert cli.main(["train", *args]) == 0


def test_quickstart_readme_command(tmp_path):
    """Must show 1: the README's main command, to the end, in under 60 s on 2 cores."""
    start = time.perf_counter()
    proc = run_cli(["train", "configs/quickstart.yaml", *dirs(tmp_path)], timeout=120)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    accuracy = float(
        re.search(r"held-out accuracy of the posterior predictive mean: ([0-9.]+)", proc.stdout)[1]
    )
    assert accuracy >= 0.93
    assert wall < 60
    found = scalars(tmp_path / "tb")
    assert set(TAGS) <= set(found)
    val = found["loss/val"]
    assert val[max(val)] < val[min(val)]
    assert (tmp_path / "ck" / "config.yaml").is_file()
    assert "config/text_summary" in text_tags(tmp_path / "tb")


@pytest.mark.parametrize(
    "extra",
    [[], ["data.loader=dataloader", "schedule.name=exponential", "schedule.options.gamma=0.995"]],
    ids=["memory", "dataloader-schedule"],
)
def test_resume_repeats_the_uninterrupted_run(tmp_path, extra):
    """Must show 3, one process: 200 steps == 100 steps, then resume to 200 (AutoNormal)."""
    common = ["run.log_every=1", "run.val_every=40", "checkpoint.every=50", "run.progress=none"]
    config = str(CONFIGS / "quickstart.yaml")
    train(config, "run.steps=200", *common, *extra, *dirs(tmp_path / "a"))
    train(config, "run.steps=100", *common, *extra, *dirs(tmp_path / "b"))
    train(config, "run.steps=200", *common, *extra, *dirs(tmp_path / "b"))
    assert_params_close(final_params(tmp_path / "a" / "ck"), final_params(tmp_path / "b" / "ck"))
    a = scalars(tmp_path / "a" / "tb")
    b = scalars(tmp_path / "b" / "tb")
    for tag in ("loss/train", "optim/lr"):
        assert [a[tag][s] for s in range(101, 201)] == [b[tag][s] for s in range(101, 201)]


def test_checkpoint_content_loads_with_weights_only(tmp_path):
    train(str(CONFIGS / "debug.yaml"), *dirs(tmp_path))
    files = sorted((tmp_path / "ck").glob("step_*.pt"))
    assert [f.name for f in files] == ["step_00000015.pt", "step_00000020.pt"]  # keep: 2
    state = torch.load(files[-1], weights_only=True)
    assert state["step"] == 20 and state["world_size"] == 1 and state["seed"] == 0
    assert state["rng"]["torch"].dtype == torch.uint8 and state["rng"]["torch"].shape[0] == 1
    assert set(state["optim"]) == set(state["params"])  # optimizer state keyed by param name
    assert "name: debug" in state["config"]


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    """Must show 5: the newest file is cut short; the next start resumes from the one before."""
    base = [
        str(CONFIGS / "debug.yaml"),
        "checkpoint.keep=3",
        "checkpoint.resume=auto",
        *dirs(tmp_path),
    ]
    train(*base, "run.steps=15")
    newest = tmp_path / "ck" / "step_00000015.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(checkpoint.CheckpointWarning, match=re.escape(str(newest))):
        found = checkpoint.Checkpointer(tmp_path / "ck", 5, 3, True).latest()
    assert found[1].name == "step_00000010.pt"
    with pytest.warns(checkpoint.CheckpointWarning, match="step_00000015.pt"):
        train(*base, "run.steps=20")
    assert torch.load(tmp_path / "ck" / "step_00000015.pt", weights_only=True)["step"] == 15


def test_writer_killed_between_write_and_rename(tmp_path, monkeypatch):
    """Must show 5: a crash before the rename leaves the previous checkpoint the newest."""
    base = [str(CONFIGS / "debug.yaml"), "checkpoint.resume=auto", *dirs(tmp_path)]
    train(*base, "run.steps=10")

    real_replace = checkpoint.os.replace

    def killed(src, dst):
        if str(dst).endswith(".pt"):
            raise KeyboardInterrupt("killed between write and rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train(*base, "run.steps=15")
    monkeypatch.undo()
    ck = tmp_path / "ck"
    assert not (ck / "step_00000015.pt").exists()
    assert not (ck / ".step_00000015.pt.tmp").exists()  # a failed save cleans its temporary file
    found = checkpoint.Checkpointer(ck, 5, 2, True).latest()
    assert found[0]["step"] == 10


def test_unloadable_only_checkpoint_starts_fresh_with_warning(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "step_00000005.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(checkpoint.CheckpointWarning, match="step_00000005.pt"):
        train(str(CONFIGS / "debug.yaml"), "run.steps=5", "checkpoint.resume=auto", *dirs(tmp_path))
    assert torch.load(ck / "step_00000005.pt", weights_only=True)["step"] == 5


def test_predict_vae_shapes(tmp_path, capsys):
    """Must show 6: samples of the shapes the README documents."""
    config = str(CONFIGS / "vae_digits.yaml")
    train(config, "run.steps=20", "run.progress=none", *dirs(tmp_path))
    ck = max((tmp_path / "ck").glob("step_*.pt"))
    out = tmp_path / "samples.pt"
    assert (
        cli.main(
            [
                "predict",
                config,
                "--checkpoint",
                str(ck),
                "--num-samples",
                "4",
                "--out",
                str(out),
                *dirs(tmp_path),
            ]
        )
        == 0
    )
    saved = torch.load(out, weights_only=True)
    assert saved["samples"]["z"].shape == (4, 359, 8)
    assert saved["samples"]["obs"].shape == (4, 359, 64)
    assert saved["rows"].shape == (359,)
    assert "obs (4, 359, 64)" in capsys.readouterr().out


def test_eval_matches_logged_validation_loss(tmp_path, capsys):
    config = str(CONFIGS / "debug.yaml")
    train(config, "guide.name=AutoDelta", *dirs(tmp_path))
    capsys.readouterr()
    ck = tmp_path / "ck" / "step_00000020.pt"
    assert (
        cli.main(["eval", config, "--checkpoint", str(ck), "guide.name=AutoDelta", *dirs(tmp_path)])
        == 0
    )
    value = float(capsys.readouterr().out.split()[-1])
    logged = scalars(tmp_path / "tb")["loss/val"][20]
    assert value == pytest.approx(logged, rel=1e-6)


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("gmm.yaml", ["run.steps=30"]),
        ("hier_synthetic.yaml", ["run.steps=5", "run.val_every=5", "predict.num_samples=2"]),
        (
            "quickstart.yaml",
            ["run.steps=30", "data.loader=dataloader", "guide.name=AutoDiagonalNormal"],
        ),
        (
            "quickstart.yaml",
            [
                "run.steps=30",
                "schedule.name=exponential",
                "schedule.options.gamma=0.99",
                "optim.clip_norm=5.0",
            ],
        ),
        ("quickstart.yaml", ["run.steps=0", "run.epochs=2"]),
    ],
    ids=["gmm-tracegraph", "hierarchical-1e6", "dataloader", "schedule-clip", "epochs"],
)
def test_shipped_models_run(tmp_path, config, overrides):
    train(
        str(CONFIGS / config), "run.progress=none", "run.log_every=5", *overrides, *dirs(tmp_path)
    )
    found = scalars(tmp_path / "tb")
    assert all(torch.isfinite(torch.tensor(list(found["loss/train"].values()))))
    if "run.epochs=2" in overrides:  # 455 training rows, 64 a step: 7 steps an epoch
        assert max(found["loss/train"]) == 14


def test_readme_own_model_example_runs(tmp_path):
    """The README's "Your own model" file and config, as written there."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Your own model") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    config = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert code.startswith("# my_model.py")
    (tmp_path / "my_model.py").write_text(code)
    (tmp_path / "job.yaml").write_text(config)
    train(str(tmp_path / "job.yaml"), "run.steps=50", "run.progress=none", *dirs(tmp_path / "out"))
    assert scalars(tmp_path / "out" / "tb")["loss/val"]


def test_grad_monitor_clips_and_skips_non_finite():
    from distsvi.train.job import GradMonitor

    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    monitor = GradMonitor(clip_norm=1.0)
    loss = torch.tensor(2.0)
    assert monitor(loss, {"p": p}) == 2.0  # the loss, as read at the step's one host sync
    assert float(monitor.grad_norm) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)
    p.grad = torch.tensor([float("nan"), 1.0, 0.0])
    assert monitor(loss, {"p": p}) is None
    assert monitor.skipped == 1


def test_per_param_options_by_name_prefix():
    from distsvi.train.config import load_config
    from distsvi.train.job import build_optim

    cfg = load_config("quickstart")
    cfg.optim.per_param = {"AutoNormal.scales": {"lr": 0.001}}
    optim, scheduler = build_optim(cfg)
    assert scheduler is None
    assert optim._args_for("AutoNormal.scales.w")["lr"] == 0.001
    assert optim._args_for("AutoNormal.locs.w")["lr"] == cfg.optim.lr


COUNTING_MODEL = '''
import torch
import distsvi
import distsvi.distributions as dist
from distsvi.train.models import rows


class Counting(torch.nn.Module):
    """Logistic regression whose module keeps a buffer: the number of model runs."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(30, 1)
        self.register_buffer("runs", torch.zeros(()))

    def model(self, x, y=None, *, size, subsample_size=None, subsample=None):
        distsvi.module("counting", self)
        self.runs += 1
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            x, y = rows(idx, subsample, x, y)
            distsvi.sample("obs", dist.Bernoulli(logits=self.linear(x).squeeze(-1)), obs=y)

    def guide(self, *args, **kwargs):
        pass
'''


def test_module_buffers_are_checkpointed_and_restored(tmp_path):
    (tmp_path / "counting.py").write_text(COUNTING_MODEL)
    job = [
        str(CONFIGS / "debug.yaml"),
        f"model.name={tmp_path / 'counting.py'}:Counting",
        "guide.name=model",
        "checkpoint.resume=auto",
        "run.progress=none",
    ]
    train(*job, "run.steps=20", *dirs(tmp_path / "a"))
    train(*job, "run.steps=10", *dirs(tmp_path / "b"))
    train(*job, "run.steps=20", *dirs(tmp_path / "b"))
    a = torch.load(tmp_path / "a" / "ck" / "step_00000020.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ck" / "step_00000020.pt", weights_only=True)
    assert a["buffers"]["runs"] > 20
    assert a["buffers"]["runs"] == b["buffers"]["runs"]
    assert_params_close(a["params"], b["params"])
