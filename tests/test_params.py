"""The param store: unconstrained storage, constrained values, state io (Pyro's semantics)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import biject_to, transform_to

import distsvi as pyro
from distsvi.distributions import constraints

INITS = {
    "real": (constraints.real, torch.tensor([0.5, -1.0])),
    "positive": (constraints.positive, torch.tensor([0.5, 2.0])),
    "simplex": (constraints.simplex, torch.tensor([0.2, 0.3, 0.5])),
    "lower_cholesky": (constraints.lower_cholesky, torch.tensor([[1.0, 0.0], [0.4, 0.7]])),
    "unit_interval": (constraints.unit_interval, torch.tensor(0.25)),
    "interval": (constraints.interval(-2.0, 3.5), torch.tensor([0.0, 3.0])),
    "greater_than": (constraints.greater_than(1.0), torch.tensor(4.0)),
}


def _make_all():
    for name, (c, init) in INITS.items():
        pyro.param(name, init.clone(), constraint=c)


def test_constrained_value_returned_unconstrained_stored():
    store = pyro.get_param_store()
    for name, (c, init) in INITS.items():
        value = pyro.param(name, init.clone(), constraint=c)
        torch.testing.assert_close(value, init)
        raw = dict(store.named_parameters())[name]
        assert raw.is_leaf and raw.requires_grad
        torch.testing.assert_close(raw.detach(), transform_to(c).inv(init))


def test_simplex_and_cholesky_unconstrained_shapes():
    _make_all()
    raw = dict(pyro.get_param_store().named_parameters())
    assert raw["simplex"].shape == (3,)  # transform_to(simplex) is a softmax, as in Pyro
    assert raw["lower_cholesky"].shape == (2, 2)


def test_gradient_flows_to_unconstrained():
    x = pyro.param("s", torch.tensor(2.0), constraint=constraints.positive)
    (3.0 * x).backward()
    raw = dict(pyro.get_param_store().named_parameters())["s"]
    assert raw.grad.item() == pytest.approx(6.0)  # d(3 exp(u))/du = 3 exp(u)


def test_init_only_used_once_and_callable_init():
    a = pyro.param("a", torch.tensor(1.0))
    b = pyro.param("a", torch.tensor(5.0))
    assert a.item() == b.item() == 1.0
    c = pyro.param("c", lambda: torch.ones(3), constraint=constraints.positive)
    assert torch.equal(c, torch.ones(3))
    assert pyro.param("a").item() == 1.0  # no init needed once it exists


def test_missing_param_without_init_is_an_error():
    with pytest.raises((KeyError, ValueError), match="nope"):
        pyro.param("nope")


@pytest.mark.parametrize(
    "constraint,init",
    [
        (constraints.positive, torch.tensor([1.0, -0.5])),
        (constraints.simplex, torch.tensor([0.5, 0.7])),
        (constraints.interval(0.0, 1.0), torch.tensor(1.5)),
        (constraints.lower_cholesky, torch.tensor([[1.0, 0.0], [0.3, -0.2]])),
    ],
)
def test_init_outside_constraint_is_refused_naming_the_param(constraint, init):
    with pytest.raises(ValueError, match="my_bad_param"):
        pyro.param("my_bad_param", init, constraint=constraint)
    assert "my_bad_param" not in pyro.get_param_store()


def test_dict_api():
    _make_all()
    store = pyro.get_param_store()
    assert list(store.keys()) == list(INITS)
    assert "positive" in store and "missing" not in store
    items = dict(store.items())
    for name, (c, init) in INITS.items():
        torch.testing.assert_close(items[name].detach(), init)  # items: constrained values
    torch.testing.assert_close(store.get_param("simplex").detach(), INITS["simplex"][1])
    new = store.get_param("fresh", torch.tensor(2.0), constraint=constraints.positive)
    assert new.item() == pytest.approx(2.0) and "fresh" in store
    del store["positive"]
    assert "positive" not in store
    assert "positive" not in dict(store.named_parameters())
    again = pyro.param("positive", torch.tensor(7.0), constraint=constraints.positive)
    assert again.item() == pytest.approx(7.0)  # recreated from the new init


def test_clear_param_store():
    _make_all()
    pyro.clear_param_store()
    assert len(list(pyro.get_param_store().keys())) == 0


def _snapshot():
    store = pyro.get_param_store()
    constrained = {k: v.detach().clone() for k, v in store.items()}
    raw = {k: v.detach().clone() for k, v in store.named_parameters()}
    return constrained, raw


def _assert_same(a, b):
    assert list(a[0]) == list(b[0])
    for name in a[0]:
        torch.testing.assert_close(a[0][name], b[0][name])
        torch.testing.assert_close(a[1][name], b[1][name])


def test_get_state_set_state_round_trip():
    _make_all()
    before = _snapshot()
    state = pyro.get_param_store().get_state()
    assert set(state["params"]) == set(INITS)
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    _assert_same(_snapshot(), before)
    raw = dict(pyro.get_param_store().named_parameters())
    assert all(p.is_leaf and p.requires_grad for p in raw.values())


@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu")])
def test_save_load_round_trip(tmp_path, map_location):
    _make_all()
    before = _snapshot()
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(str(path))
    pyro.clear_param_store()
    pyro.get_param_store().load(str(path), map_location=map_location)
    _assert_same(_snapshot(), before)
    # constraints survive: an update of the unconstrained value stays in the support
    raw = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for p in raw.values():
            p.add_(-3.0)
    for name, (c, _) in INITS.items():
        assert bool(c.check(pyro.param(name).detach()).all()), name


def test_saved_file_loads_with_weights_only(tmp_path):
    _make_all()
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(str(path))
    torch.load(str(path), weights_only=True)


def test_module_registers_params_with_pyro_names():
    net = torch.nn.Linear(3, 2)
    pyro.module("net", net)
    names = set(pyro.get_param_store().keys())
    assert names == {"net$$$weight", "net$$$bias"}
    raw = dict(pyro.get_param_store().named_parameters())
    assert raw["net$$$weight"] is net.weight or torch.equal(raw["net$$$weight"], net.weight)


def test_biject_to_and_transform_to_agree_on_positive():
    # The store uses transform_to, like Pyro; for these constraints it equals biject_to.
    pyro.param("p", torch.tensor(3.0), constraint=constraints.positive)
    raw = dict(pyro.get_param_store().named_parameters())["p"]
    torch.testing.assert_close(raw.detach(), biject_to(constraints.positive).inv(torch.tensor(3.0)))


def test_param_with_event_dim_is_subsampled_inside_a_subsampled_plate():
    """Pyro: inside a subsampled plate, a param's batch dims (left of ``event_dim``) are
    indexed by the plate's indices; without ``event_dim`` the param is returned whole."""
    idx = torch.tensor([4, 1])
    with pyro.plate("d", 6, subsample=idx):
        v = pyro.param("v", torch.arange(6.0), event_dim=0)
        w = pyro.param("w", torch.arange(12.0).reshape(6, 2), event_dim=1)
        whole = pyro.param("whole", torch.arange(6.0))
    assert torch.equal(v, torch.tensor([4.0, 1.0]))
    assert torch.equal(w, torch.tensor([[8.0, 9.0], [2.0, 3.0]]))
    assert whole.shape == (6,)
    assert dict(pyro.get_param_store().named_parameters())["v"].shape == (6,)


def test_module_sees_every_change_to_the_module_tree():
    from distsvi import poutine

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    store = pyro.get_param_store()

    def sites():
        tr = poutine.trace(lambda: pyro.module("net", net)).get_trace()
        return {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "param"}

    first = sites()
    assert set(first) == {f"net$$${i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert sites().keys() == first.keys()  # a second call, from the kept walk

    net[2] = torch.nn.Linear(4, 2)  # a submodule replaced
    s = sites()
    assert s["net$$$2.weight"] is net[2].weight and store._params["net$$$2.weight"] is net[2].weight

    net[0].register_parameter("extra", torch.nn.Parameter(torch.ones(2)))  # one added
    assert "net$$$0.extra" in sites()

    net[0]._parameters["bias"] = torch.nn.Parameter(torch.zeros(4))  # bypassing the hooks
    assert sites()["net$$$0.bias"] is net[0].bias

    del net[0].extra  # one deleted
    assert "net$$$0.extra" not in sites()

    net.append(torch.nn.Linear(2, 1))  # a submodule added
    assert "net$$$3.weight" in sites()
    del net[3]  # and deleted
    assert "net$$$3.weight" not in sites()

    # the same module under another name
    tr = poutine.trace(lambda: pyro.module("other", net)).get_trace()
    assert "other$$$0.weight" in tr.nodes and "net$$$0.weight" not in tr.nodes


def test_a_module_is_not_kept_alive_once_the_store_lets_it_go():
    import gc
    import weakref

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    alive = weakref.ref(net)
    pyro.module("net", net)
    pyro.module("net", net)
    pyro.clear_param_store()
    del net
    gc.collect()
    assert alive() is None
