"""A PyroModule as the job's model (its forward) and as its guide: trains, checkpoints
its params under their attribute paths, and resumes to the uninterrupted run's end."""

from __future__ import annotations

from train_helpers import REPO, assert_params_close, dirs, final_params, scalars

from distsvi import cli

GUIDE = """
import torch
import distsvi
import distsvi.distributions as dist
from distsvi.distributions import constraints
from distsvi.nn import PyroModule, PyroParam


class Guide(PyroModule):
    def __init__(self, init_scale=0.1):
        super().__init__()
        self.loc = PyroParam(torch.zeros(1, 5))
        self.scale = PyroParam(torch.full((1, 5), init_scale), constraint=constraints.positive)

    def forward(self, x, y=None, *, size, subsample_size=None, subsample=None):
        distsvi.sample("linear.weight", dist.Normal(self.loc, self.scale).to_event(2))
        distsvi.sample("linear.bias", dist.Normal(self.loc[0, :1], self.scale[0, :1]).to_event(1))
"""


def readme_model(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Your own model") :]
    (tmp_path / "my_model.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    (tmp_path / "my_guide.py").write_text(GUIDE)
    return [
        f"model.name={tmp_path / 'my_model.py'}:Logistic",
        f"data.name={tmp_path / 'my_model.py'}:load",
        "run.batch_size=32",
        "run.val_every=10",
        "checkpoint.every=10",
        "run.log_every=1",
        "run.progress=none",
        "optim.lr=0.05",
    ]


def train(*args: str) -> None:
    assert cli.main(["train", "debug", *args]) == 0


def test_pyromodule_model_resumes_to_the_uninterrupted_run(tmp_path):
    common = readme_model(tmp_path)
    train(*common, "run.steps=30", *dirs(tmp_path / "a"))
    train(*common, "run.steps=10", *dirs(tmp_path / "b"))
    train(*common, "run.steps=30", "checkpoint.resume=auto", *dirs(tmp_path / "b"))
    a, b = final_params(tmp_path / "a" / "ck"), final_params(tmp_path / "b" / "ck")
    assert "temperature" in a and "AutoNormal.locs.linear.weight" in a
    assert_params_close(a, b)
    la, lb = scalars(tmp_path / "a" / "tb"), scalars(tmp_path / "b" / "tb")
    assert [la["loss/train"][s] for s in range(11, 31)] == [
        lb["loss/train"][s] for s in range(11, 31)
    ]


def test_pyromodule_guide_class_with_options(tmp_path):
    common = readme_model(tmp_path)
    guide = [f"guide.name={tmp_path / 'my_guide.py'}:Guide", "guide.options.init_scale=0.2"]
    train(*common, *guide, "run.steps=10", *dirs(tmp_path / "c"))
    params = final_params(tmp_path / "c" / "ck")
    assert {"loc", "scale", "temperature"} <= set(params)
