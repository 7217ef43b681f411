"""Effect handlers and traces: Pyro's site records and semantics.

Expected values follow Pyro 1.9.2's behaviour and are computed with torch directly.
"""

from __future__ import annotations

import math

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import poutine
from distsvi.distributions import constraints
from distsvi.poutine.runtime import am_i_wrapped

X = torch.tensor([0.5, -1.0, 2.0, 1.5])


def model(x=X):
    p = pyro.param("p", torch.tensor(0.5), constraint=constraints.positive)
    z = pyro.sample("z", dist.Normal(0.0, 1.0), infer={"tag": 1})
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(z, p), obs=x)
    return z


SITE_KEYS = {
    "type", "name", "fn", "args", "kwargs", "value", "is_observed", "infer", "scale", "mask",
    "cond_indep_stack",
}  # fmt: skip


def test_trace_site_keys_and_values():
    tr = poutine.trace(model).get_trace()
    for name in ("p", "z", "obs"):
        assert SITE_KEYS <= set(tr.nodes[name]), (name, set(tr.nodes[name]))
    z, obs, p = tr.nodes["z"], tr.nodes["obs"], tr.nodes["p"]
    assert z["type"] == "sample" and z["name"] == "z" and not z["is_observed"]
    assert isinstance(z["fn"], torch.distributions.Normal)
    assert z["infer"] == {"tag": 1}
    assert z["scale"] == 1.0 and z["mask"] is None and z["cond_indep_stack"] == ()
    assert obs["is_observed"] and obs["value"] is X
    assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
    frame = obs["cond_indep_stack"][0]
    assert (frame.dim, frame.size) == (-1, 4)
    assert p["type"] == "param"
    assert torch.equal(p["value"], torch.tensor(0.5))  # the constrained value
    assert list(tr.nodes)[:1] != ["z"] or "p" not in tr.nodes  # order is execution order
    sites = [n for n in tr.nodes if n in ("p", "z", "obs")]
    assert sites == ["p", "z", "obs"]


def test_compute_log_prob_and_log_prob_sum():
    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    z = tr.nodes["z"]["value"]
    want_z = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    want_obs = torch.distributions.Normal(z, 0.5).log_prob(X)
    torch.testing.assert_close(tr.nodes["z"]["log_prob"], want_z)
    torch.testing.assert_close(tr.nodes["obs"]["log_prob"], want_obs)
    torch.testing.assert_close(tr.nodes["obs"]["log_prob_sum"], want_obs.sum())
    torch.testing.assert_close(tr.log_prob_sum(), want_z + want_obs.sum())


def _sites(names):
    """Drop plate records: Pyro lists a plate as a sample site, distsvi as a subsample one."""
    return [n for n in names if n != "data"]


def test_node_lists():
    tr = poutine.trace(model).get_trace()
    assert _sites(tr.stochastic_nodes) == ["z"]
    assert tr.observation_nodes == ["obs"]
    assert tr.param_nodes == ["p"]


def test_trace_param_only():
    tr = poutine.trace(model, param_only=True).get_trace()
    assert [n for n, s in tr.nodes.items() if s["type"] in ("sample", "param")] == ["p"]


def test_trace_as_context_manager_and_decorator():
    with poutine.trace() as tr:
        model()
    assert {"p", "z", "obs"} <= set(tr.trace.nodes)

    @poutine.trace
    def wrapped():
        return pyro.sample("w", dist.Normal(0.0, 1.0))

    wrapped()
    assert "w" in wrapped.trace.nodes


def test_replay_takes_latent_values_not_observations():
    guide_tr = poutine.trace(model).get_trace()
    z = guide_tr.nodes["z"]["value"]
    tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(X + 1.0)
    assert tr.nodes["z"]["value"] is z
    assert torch.equal(tr.nodes["obs"]["value"], X + 1.0)  # observed data is never replayed


def test_replay_as_context_manager():
    guide_tr = poutine.trace(model).get_trace()
    with poutine.replay(trace=guide_tr):
        z = model()
    assert z is guide_tr.nodes["z"]["value"]


def two_site_model():
    pyro.param("a", torch.tensor(1.0))
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))


def _visible(handler_kwargs):
    tr = poutine.trace(poutine.block(two_site_model, **handler_kwargs)).get_trace()
    return sorted(n for n, s in tr.nodes.items() if s["type"] in ("sample", "param"))


@pytest.mark.parametrize(
    "kwargs,visible",
    [
        ({}, []),
        ({"hide": ["x"]}, ["a", "y"]),
        ({"expose": ["x"]}, ["x"]),
        ({"hide_types": ["param"]}, ["x", "y"]),
        ({"expose_types": ["param"]}, ["a"]),
        ({"hide_types": ["observe"]}, ["a", "x"]),
    ],
)
def test_block(kwargs, visible):
    assert _visible(kwargs) == visible


def test_block_as_context_manager():
    with poutine.trace() as tr, poutine.block(hide=["x"]):
        two_site_model()
    assert "x" not in tr.trace.nodes and "y" in tr.trace.nodes


def test_condition_makes_site_observed():
    cond = poutine.condition(model, data={"z": torch.tensor(0.25)})
    tr = poutine.trace(cond).get_trace()
    assert tr.nodes["z"]["is_observed"]
    assert torch.equal(tr.nodes["z"]["value"], torch.tensor(0.25))
    assert _sites(tr.stochastic_nodes) == []
    with poutine.condition(data={"z": torch.tensor(-1.0)}):
        assert model().item() == -1.0


def test_substitute_replaces_params_only():
    sub = poutine.substitute(model, data={"p": torch.tensor(2.0), "z": torch.tensor(9.0)})
    tr = poutine.trace(sub).get_trace()
    assert torch.equal(tr.nodes["p"]["value"], torch.tensor(2.0))
    assert torch.all(tr.nodes["obs"]["fn"].scale == 2.0)
    assert tr.nodes["z"]["value"].item() != 9.0  # Pyro's substitute leaves sample sites alone
    assert not tr.nodes["z"]["is_observed"]


def test_scale_handler():
    tr = poutine.trace(poutine.scale(model, scale=0.25)).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["z"]["scale"] == 0.25
    z = tr.nodes["z"]["value"]
    torch.testing.assert_close(
        tr.nodes["z"]["log_prob_sum"], 0.25 * torch.distributions.Normal(0.0, 1.0).log_prob(z)
    )
    with poutine.trace() as outer, poutine.scale(scale=2.0), poutine.scale(scale=3.0):
        pyro.sample("w", dist.Normal(0.0, 1.0))
    assert outer.trace.nodes["w"]["scale"] == 6.0


def test_scale_must_be_positive():
    with pytest.raises(ValueError):
        poutine.scale(model, scale=-1.0)


def test_mask_handler():
    m = torch.tensor([True, False, True, False])
    with poutine.trace() as outer, poutine.mask(mask=m):
        model()
    tr = outer.trace
    tr.compute_log_prob()
    assert torch.equal(tr.nodes["obs"]["mask"], m)
    z = tr.nodes["z"]["value"]
    want = torch.distributions.Normal(z, 0.5).log_prob(X) * m
    torch.testing.assert_close(tr.nodes["obs"]["log_prob"], want)
    torch.testing.assert_close(tr.nodes["obs"]["log_prob_sum"], want.sum())


def test_mask_false_zeroes_the_site():
    tr = poutine.trace(poutine.mask(model, mask=False)).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["obs"]["log_prob_sum"].item() == 0.0


def test_nested_masks_combine():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    with poutine.trace() as outer, poutine.mask(mask=a), poutine.mask(mask=b):
        model()
    assert torch.equal(outer.trace.nodes["obs"]["mask"], a & b)


def test_seed_reproduces_draws():
    def draws():
        return pyro.sample("u", dist.Normal(torch.zeros(3), 1.0)), torch.rand(2)

    first = poutine.seed(draws, rng_seed=11)()
    torch.manual_seed(123)  # the global state in between must not matter
    second = poutine.seed(draws, rng_seed=11)()
    other = poutine.seed(draws, rng_seed=12)()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    with poutine.seed(rng_seed=11):
        third = draws()
    assert torch.equal(first[0], third[0])


def test_set_rng_seed():
    pyro.set_rng_seed(5)
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.set_rng_seed(5)
    b = pyro.sample("a", dist.Normal(0.0, 1.0))
    assert a.item() == b.item()


def test_plate_yields_indices_and_scales_log_prob():
    data = torch.arange(10.0)
    with poutine.trace() as outer, pyro.plate("data", 10, subsample_size=4) as idx:
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=data[idx])
    assert idx.shape == (4,) and idx.dtype == torch.long
    assert len(set(idx.tolist())) == 4 and all(0 <= i < 10 for i in idx.tolist())
    site = outer.trace.nodes["x"]
    assert site["scale"] == pytest.approx(10 / 4)
    frame = site["cond_indep_stack"][0]
    assert frame.name == "data" and frame.size == 4 and frame.full_size == 10
    outer.trace.compute_log_prob()
    want = 2.5 * torch.distributions.Normal(0.0, 1.0).log_prob(data[idx]).sum()
    torch.testing.assert_close(site["log_prob_sum"], want)


def test_plate_full_yields_arange_and_broadcasts():
    with poutine.trace() as outer, pyro.plate("data", 5) as idx:
        pyro.sample("x", dist.Normal(0.0, 1.0))
    assert torch.equal(idx, torch.arange(5))
    site = outer.trace.nodes["x"]
    assert site["value"].shape == (5,) and site["fn"].batch_shape == (5,)
    assert site["scale"] == 1.0


def test_plate_explicit_subsample():
    idx = torch.tensor([7, 2, 5])
    with poutine.trace() as outer, pyro.plate("data", 10, subsample=idx) as got:
        pyro.sample("x", dist.Normal(0.0, 1.0))
    assert torch.equal(got, idx)
    assert outer.trace.nodes["x"]["scale"] == pytest.approx(10 / 3)
    assert outer.trace.nodes["x"]["value"].shape == (3,)


def test_nested_plates_dims_and_stack():
    with poutine.trace() as outer, pyro.plate("outer", 3, dim=-2), pyro.plate("inner", 4):
        pyro.sample("x", dist.Normal(0.0, 1.0))
    site = outer.trace.nodes["x"]
    assert site["value"].shape == (3, 4)
    assert {(f.name, f.dim, f.size) for f in site["cond_indep_stack"]} == {
        ("outer", -2, 3),
        ("inner", -1, 4),
    }


def test_plate_automatic_dims():
    with pyro.plate("a", 2), pyro.plate("b", 3):
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
    assert x.shape == (3, 2)  # inner plate gets the next free dim to the left


def test_plate_as_decorator_free_vectorised_use():
    plate = pyro.plate("data", 6)
    with plate as idx:
        assert len(idx) == 6
    with plate:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
    assert x.shape == (6,)


def test_handlers_compose_in_order():
    """The innermost handler sees a site first (condition inside trace sees the value)."""
    with poutine.trace() as outer, poutine.condition(data={"z": torch.tensor(1.5)}):
        model()
    assert outer.trace.nodes["z"]["is_observed"]
    assert outer.trace.nodes["z"]["value"].item() == 1.5


def test_deterministic_and_factor_sites():
    with poutine.trace() as outer:
        pyro.deterministic("d", torch.tensor(3.0))
        pyro.factor("f", torch.tensor(-2.0))
    tr = outer.trace
    tr.compute_log_prob()
    assert tr.nodes["d"]["value"].item() == 3.0 and tr.nodes["d"]["is_observed"]
    assert tr.nodes["d"]["log_prob_sum"].item() == 0.0
    assert tr.nodes["f"]["log_prob_sum"].item() == -2.0


def test_primitives_outside_handlers():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    assert z.shape == ()
    assert pyro.sample("o", dist.Normal(0.0, 1.0), obs=torch.tensor(2.0)).item() == 2.0
    assert math.isclose(pyro.param("q", torch.tensor(3.0)).item(), 3.0)


def test_seed_restores_the_outer_rng_state():
    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    with poutine.seed(rng_seed=5):
        pyro.sample("u", dist.Normal(0.0, 1.0))
    assert torch.equal(torch.rand(3), want)


def test_condition_on_a_trace():
    tr = poutine.trace(model).get_trace()
    cond = poutine.trace(poutine.condition(model, data=tr)).get_trace()
    assert cond.nodes["z"]["is_observed"]
    assert torch.equal(cond.nodes["z"]["value"], tr.nodes["z"]["value"])


def test_block_with_predicates():
    tr = poutine.trace(
        poutine.block(two_site_model, hide_fn=lambda msg: msg["name"] == "a")
    ).get_trace()
    assert sorted(n for n in tr.nodes if n in ("a", "x", "y")) == ["x", "y"]
    tr = poutine.trace(
        poutine.block(two_site_model, expose_fn=lambda msg: msg["name"] == "a")
    ).get_trace()
    assert [n for n in tr.nodes if n in ("a", "x", "y")] == ["a"]


def test_handler_stack_is_clean_after_an_exception():
    def broken():
        pyro.sample("ok", dist.Normal(0.0, 1.0))
        raise KeyError("boom")

    with pytest.raises(KeyError), poutine.trace(), poutine.scale(scale=2.0):
        broken()
    with pytest.raises(KeyError):
        poutine.trace(poutine.block(broken)).get_trace()
    assert not am_i_wrapped()
    assert pyro.sample("after", dist.Normal(0.0, 1.0), obs=torch.tensor(1.0)).item() == 1.0


def test_return_and_input_nodes():
    tr = poutine.trace(model).get_trace(X)
    assert tr.nodes["_RETURN"]["value"] is tr.nodes["z"]["value"]
    assert tr.nodes["_INPUT"]["args"] == (X,)


def test_log_prob_sum_with_site_filter():
    tr = poutine.trace(model).get_trace()
    z = tr.nodes["z"]["value"]
    got = tr.log_prob_sum(lambda name, site: name == "z")
    torch.testing.assert_close(got, torch.distributions.Normal(0.0, 1.0).log_prob(z))


def test_scale_with_a_tensor():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    tr = poutine.trace(poutine.scale(model, scale=s)).get_trace()
    tr.compute_log_prob()
    z = tr.nodes["z"]["value"]
    want = (torch.distributions.Normal(z, 0.5).log_prob(X) * s).sum()
    torch.testing.assert_close(tr.nodes["obs"]["log_prob_sum"], want)


def test_trace_inside_plate_records_frames_outermost_first():
    with poutine.trace() as outer, pyro.plate("a", 2, dim=-2), pyro.plate("b", 3, dim=-1):
        pyro.sample("x", dist.Normal(0.0, 1.0))
    assert [f.name for f in outer.trace.nodes["x"]["cond_indep_stack"]] == ["a", "b"]


def test_subsample_primitive_indexes_data_inside_a_subsampled_plate():
    data = torch.arange(20.0).reshape(10, 2)
    idx = torch.tensor([3, 0, 7])
    with pyro.plate("d", 10, subsample=idx, dim=-1):
        got = pyro.subsample(data[:, 0], event_dim=0)
        got2 = pyro.subsample(data, event_dim=1)
    assert torch.equal(got, data[idx, 0])
    assert torch.equal(got2, data[idx])


def test_subsample_primitive_leaves_data_without_the_plate_dim_and_refuses_a_wrong_size():
    idx = torch.tensor([1, 2])
    with pyro.plate("rows", 5, subsample=idx, dim=-2):
        short = torch.arange(3.0)  # no dim -2: broadcasts over the plate, as in Pyro
        assert torch.equal(pyro.subsample(short, event_dim=0), short)
        with pytest.raises(ValueError, match="plate\\('rows', 5, dim=-2\\).*pass the full data"):
            pyro.subsample(torch.zeros(4, 3), event_dim=0)


def test_plate_reentered_and_name_reused_sequentially():
    plate = pyro.plate("data", 4)
    with poutine.trace() as outer:
        with plate:
            pyro.sample("a", dist.Normal(0.0, 1.0))
        with plate:
            pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4):
            pyro.sample("c", dist.Normal(0.0, 1.0))
    for name in "abc":
        assert outer.trace.nodes[name]["value"].shape == (4,)
        assert [f.name for f in outer.trace.nodes[name]["cond_indep_stack"]] == ["data"]


def test_messenger_hook_order_and_stop():
    """Pyro's apply_stack: process innermost first (until ``stop``), then postprocess from
    the outermost visited handler inwards."""
    from distsvi.poutine.runtime import Messenger

    log = []

    class Tag(Messenger):
        def __init__(self, tag, stop=False):
            super().__init__()
            self.tag, self.stop = tag, stop

        def process_message(self, msg):
            log.append(("process", self.tag))
            if self.stop:
                msg["stop"] = True

        def postprocess_message(self, msg):
            log.append(("post", self.tag))

    with Tag("outer"), Tag("middle", stop=True), Tag("inner"):
        pyro.sample("x", dist.Normal(0.0, 1.0))
    assert log == [
        ("process", "inner"),
        ("process", "middle"),
        ("post", "middle"),
        ("post", "inner"),
    ]
