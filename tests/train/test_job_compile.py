"""run.compile: a compiled job takes the eager job's steps; auto compiles long runs only."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from train_helpers import CONFIGS, assert_params_close, dirs, final_params, run_launch

from distsvi import cli
from distsvi.train import load_config
from distsvi.train.config import COMPILE_AUTO_MIN_STEPS, compiles
from distsvi.train.errors import ConfigError

SHORT = ["run.progress=none", "run.log_every=5", "run.val_every=1000", "checkpoint.every=0"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "config, overrides",
    [
        ("quickstart.yaml", ["run.steps=12"]),
        ("hier_synthetic.yaml", ["run.steps=8", "data.options.num_points=20000"]),
        ("vae_digits.yaml", ["run.steps=8"]),
    ],
    ids=["quickstart", "hierarchical", "vae"],
)
def test_compiled_job_ends_with_the_eager_params(tmp_path, config, overrides):
    graphs = {}
    for mode in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        args = ["train", str(CONFIGS / config), *SHORT, *overrides, f"run.compile={mode}"]
        assert cli.main([*args, *dirs(tmp_path / mode)]) == 0
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["false"] == 0 and graphs["true"] > 0  # it did run compiled
    eager, compiled = (
        final_params(tmp_path / "false" / "ck"),
        final_params(tmp_path / "true" / "ck"),
    )
    assert_params_close(compiled, eager, atol=1e-5)


def test_compile_modes_and_the_auto_rule():
    run = load_config("quickstart", ["run.compile=auto"]).run
    assert not compiles(run, COMPILE_AUTO_MIN_STEPS - 1)
    assert compiles(run, COMPILE_AUTO_MIN_STEPS)
    assert compiles(load_config("quickstart", ["run.compile=true"]).run, 1)
    assert not compiles(load_config("quickstart").run, 10**9)  # off unless asked for


def test_a_bad_compile_mode_names_the_key():
    with pytest.raises(ConfigError, match="run.compile"):
        load_config("quickstart", ["run.compile=sometimes"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_job_on_two_ranks_ends_with_the_eager_params(tmp_path):
    """Under the launcher (2 Gloo ranks), resumed halfway: compiled == eager."""
    job = [str(CONFIGS / "quickstart.yaml"), *SHORT, "run.steps=12", "checkpoint.every=6"]
    for mode in ("false", "true"):
        for steps in (6, 12):  # the second run resumes from the first one's checkpoint
            proc = run_launch(
                [
                    "--nproc-per-node",
                    "2",
                    *job,
                    f"run.steps={steps}",
                    f"run.compile={mode}",
                    *dirs(tmp_path / mode),
                ],
                timeout=600,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eager, compiled = (
        final_params(tmp_path / "false" / "ck"),
        final_params(tmp_path / "true" / "ck"),
    )
    assert_params_close(compiled, eager, atol=1e-5)
