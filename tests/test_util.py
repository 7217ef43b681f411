"""distsvi.util: the pyro.util helpers that scripts import."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import poutine, util

# What Pyro's examples/ and tutorial/ import from pyro.util (read from Pyro 1.9.2's repository).
EXAMPLES_IMPORT = [
    "ignore_experimental_warning",
    "ignore_jit_warnings",
    "set_rng_seed",
    "warn_if_nan",
]


@pytest.mark.parametrize("name", EXAMPLES_IMPORT)
def test_names_the_examples_import(name):
    assert callable(getattr(util, name))
    assert getattr(pyro.util, name) is getattr(util, name)  # reachable as pyro.util.X too


def test_set_rng_seed_repeats_torch_random_and_numpy():
    draws = []
    for _ in range(2):
        util.set_rng_seed(123)
        draws.append((torch.rand(3), random.random(), np.random.rand()))
    (t0, r0, n0), (t1, r1, n1) = draws
    assert torch.equal(t0, t1) and r0 == r1 and n0 == n1
    util.set_rng_seed(124)
    assert not torch.equal(torch.rand(3), t0)


def test_rng_state_round_trip():
    util.set_rng_seed(0)
    state = util.get_rng_state()
    first = (torch.rand(2), random.random(), np.random.rand())
    util.set_rng_state(state)
    again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_isnan_isinf_on_numbers_and_tensors():
    assert util.torch_isnan(float("nan")) and not util.torch_isnan(1.0)
    assert util.torch_isinf(-float("inf")) and not util.torch_isinf(3)
    assert bool(util.torch_isnan(torch.tensor([0.0, float("nan")])))
    assert not bool(util.torch_isnan(torch.tensor([0.0, float("inf")])))
    assert bool(util.torch_isinf(torch.tensor([0.0, float("inf")])))
    assert not bool(util.torch_isinf(torch.tensor([0.0, 1.0])))


def test_warn_if_nan_forward_and_backward():
    x = torch.tensor([1.0, 0.0], requires_grad=True)
    with pytest.warns(UserWarning, match="Encountered NaN: loss") as record:
        util.warn_if_nan(x.log() * 0.0, "loss")  # -inf * 0 is NaN
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = util.warn_if_nan(x * 1.0, "y")  # finite: no warning yet
    with pytest.warns(UserWarning, match="Encountered NaN: backward y"):
        (y.log() * 0.0).sum().backward()  # d/dy at y = 0 is 0 * inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert util.warn_if_nan(2.0) == 2.0


def test_warn_if_inf_respects_allowed_signs():
    x = torch.tensor([float("inf"), -float("inf")])
    with pytest.warns(UserWarning) as record:
        util.warn_if_inf(x, "v")
    assert [str(w.message) for w in record] == ["Encountered +inf: v", "Encountered -inf: v"]
    with pytest.warns(UserWarning) as record:
        util.warn_if_inf(x, allow_posinf=True)
    assert [str(w.message) for w in record] == ["Encountered -inf."]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        util.warn_if_inf(x, allow_posinf=True, allow_neginf=True)


def _site(model):
    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    return tr.nodes["x"]


def test_check_site_shape_accepts_a_site_that_fits_its_plates():
    def model():
        with pyro.plate("a", 3, dim=-2), pyro.plate("b", 4):
            pyro.sample("x", dist.Normal(0.0, 1.0))

    util.check_site_shape(_site(model), max_plate_nesting=2)
    with pytest.raises(ValueError, match="plate stack overflow.*at least 2"):
        util.check_site_shape(_site(model), max_plate_nesting=1)


def test_check_site_shape_names_the_site_and_the_fix():
    def model():
        with pyro.plate("b", 4):
            pyro.sample("x", dist.Normal(torch.zeros(3, 4), 1.0))  # a batch dim no plate owns

    with pytest.raises(ValueError, match=r"'x'.*expected \[4\], actual \[3, 4\].*to_event"):
        util.check_site_shape(_site(model), max_plate_nesting=2)


def test_check_site_shape_agrees_with_pyro():
    ppyro = pytest.importorskip("pyro")
    from pyro.util import check_site_shape as pyro_check

    def model(P, d, shape):
        with P.plate("b", 4):
            P.sample("x", d.Normal(torch.zeros(shape), 1.0))

    import pyro.distributions as pdist

    outcomes_seen = set()
    for shape in [(4,), (1,), (3, 4), (2, 1, 4), (5, 3, 4), (3, 1, 4)]:
        p_tr = ppyro.poutine.trace(model).get_trace(ppyro, pdist, shape)
        d_tr = poutine.trace(model).get_trace(pyro, dist, shape)
        outcomes = []
        for tr, check in ((p_tr, pyro_check), (d_tr, util.check_site_shape)):
            tr.compute_log_prob()
            try:
                check(tr.nodes["x"], 2)
                outcomes.append("ok")
            except ValueError:
                outcomes.append("error")
        assert outcomes[0] == outcomes[1], f"batch shape {shape}: Pyro {outcomes[0]}"
        outcomes_seen.add(outcomes[0])
    assert outcomes_seen == {"ok", "error"}


def test_optional_enters_only_when_asked():
    entered = []

    class Probe:
        def __enter__(self):
            entered.append(True)
            return "probe"

        def __exit__(self, *exc):
            return False

    with util.optional(Probe(), False) as got:
        assert got is None
    with util.optional(Probe(), True) as got:
        assert got == "probe"
    assert entered == [True]


def test_timed_measures_the_block():
    with util.timed() as t:
        sum(range(10000))
    assert t.elapsed > 0 and t.end >= t.start
    with pytest.raises(KeyError), util.timed():  # an error in the block is not swallowed
        raise KeyError("x")


def test_ignore_jit_warnings_silences_tracer_warnings_while_tracing():
    def fn(x):
        with util.ignore_jit_warnings():
            return x * float(x.sum())  # float() of a traced tensor warns

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        torch.jit.trace(fn, torch.ones(2))
    with pytest.warns(torch.jit.TracerWarning):
        torch.jit.trace(lambda x: x * float(x.sum()), torch.ones(2))


def test_experimental_warning_is_ignorable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with util.ignore_experimental_warning():
            warnings.warn("new", util.ExperimentalWarning, stacklevel=1)
    assert util.jit_iter(torch.arange(3)) == [torch.tensor(0), torch.tensor(1), torch.tensor(2)]
