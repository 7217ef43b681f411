"""The param store's version counter: what the compiled SVI step keys its recompiles on."""

import torch

import distsvi as pyro
from distsvi.distributions import constraints


def test_version_moves_on_structure_changes_only():
    store = pyro.get_param_store()
    store.clear()
    v = store.version
    p = pyro.param("a", torch.ones(2), constraints.softplus_positive)
    assert store.version == v + 1
    pyro.param("a", torch.ones(2))  # existing: no change
    with torch.no_grad():
        store._params["a"].add_(1.0)  # an optimizer's in-place update
    assert store.version == v + 1
    store["a"] = p.detach() * 2  # replaced
    assert store.version == v + 2
    state = store.state_dict()
    assert state["constraints"]["a"] == "softplus_positive"
    del store["a"]
    assert store.version == v + 3
    store.set_state(state)
    assert store.version == v + 4
    assert store._constraints["a"] is constraints.softplus_positive
    store.clear()
    assert store.version == v + 5
