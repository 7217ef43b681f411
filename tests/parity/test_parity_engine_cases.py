"""Engine surface under Pyro 1.9.2 and distsvi: the same program in both, compared on values,
shapes, trace node names and order, and on the error type raised (whose message must name
the site). Each case is written once as ``case(B)`` against a backend namespace."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import backend, isolated


def both(case, *args):
    """``case(B, *args)`` under Pyro and distsvi, each from a fresh store and seed 0; an
    exception is returned as ``("raised", type name, message)``."""
    out = {}
    for name in ("pyro", "distsvi"):
        B = backend(name)
        B.pyro.clear_param_store()
        torch.manual_seed(0)
        with isolated(B):
            try:
                out[name] = case(B, *args)
            except Exception as e:  # compared across engines below
                out[name] = ("raised", type(e).__name__, str(e))
        B.pyro.clear_param_store()
    return out["distsvi"], out["pyro"]


def same(got, want):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, (got, want)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            same(g, w)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), (got, want)
        for k in want:
            same(got[k], want[k])
    elif isinstance(want, float):
        assert isinstance(got, float) and abs(got - want) <= 1e-6 * abs(want) + 1e-9, (got, want)
    else:
        assert got == want, (got, want)


def assert_both_raise(got, want, *names):
    assert want[0] == "raised", f"Pyro did not raise: {want}"
    assert got[0] == "raised", f"distsvi did not raise where Pyro raised {want[1]}: {got}"
    assert got[1] == want[1], f"distsvi raised {got[1]} ({got[2]}), Pyro {want[1]} ({want[2]})"
    for n in names:
        assert n in got[2], f"distsvi's message does not name {n!r}: {got[2]}"


# ------------------------------------------------------------------- params


def stride0_param(B):
    x = B.pyro.param("x", torch.zeros(1).expand(3))
    svi_params = dict(B.pyro.get_param_store().named_parameters())
    opt = torch.optim.SGD(list(svi_params.values()), lr=0.1)
    (x * torch.arange(3.0)).sum().backward()
    opt.step()  # in place: fails on a stride-0 view
    return x.stride(), B.pyro.param("x").detach().clone()


def test_param_from_an_expanded_tensor_is_a_contiguous_copy():
    same(*both(stride0_param))


def unconstrained_handle(B):
    p = B.pyro.param("s", torch.tensor([0.5, 2.0]), constraint=B.constraints.positive)
    u = p.unconstrained()
    return p.detach().clone(), u.detach().clone(), u.requires_grad, u.is_leaf


def test_param_unconstrained():
    same(*both(unconstrained_handle))


def store_scope(B):
    store = B.pyro.get_param_store()
    B.pyro.param("a", torch.ones(2))
    with store.scope() as inner:
        B.pyro.param("b", torch.zeros(3))
        inside = sorted(store.keys())
    after = sorted(store.keys())
    return inside, after, sorted(inner.keys()) if hasattr(inner, "keys") else sorted(inner["params"])


def test_param_store_scope():
    same(*both(store_scope))


def param_size_vs_plate(B):
    with B.pyro.plate("p", 5, subsample_size=2):
        B.pyro.param("w", torch.ones(4), event_dim=0)


def test_param_whose_size_mismatches_its_plate_raises_naming_it():
    assert_both_raise(*both(param_size_vs_plate), "w")


# ------------------------------------------------------------------- losses


def model_normal(B, data):
    loc = B.pyro.sample("loc", B.dist.Normal(0.0, 1.0))
    with B.pyro.plate("data", len(data)):
        B.pyro.sample("obs", B.dist.Normal(loc, 1.0), obs=data)


def guide_normal(B, data):
    m = B.pyro.param("m", torch.tensor(0.3))
    B.pyro.sample("loc", B.dist.Normal(m, 0.5))


def float_losses(B):
    data = torch.tensor([0.1, -0.4, 1.2])
    elbo = B.infer.Trace_ELBO()
    m, g = (lambda d: model_normal(B, d)), (lambda d: guide_normal(B, d))
    torch.manual_seed(1)
    a = elbo.loss(m, g, data)
    torch.manual_seed(1)
    b = elbo.loss_and_grads(m, g, data)
    torch.manual_seed(1)
    c = elbo.differentiable_loss(m, g, data)
    return a, b, type(c).__name__, c.requires_grad, c.detach()


def test_loss_and_loss_and_grads_return_floats():
    same(*both(float_losses))


def shapes_disagree(B):
    def model():
        B.pyro.sample("z", B.dist.Normal(torch.zeros(1, 2), 1.0).to_event(2))

    def guide():
        B.pyro.sample("z", B.dist.Normal(torch.zeros(2, 1), 1.0).to_event(2))

    B.infer.Trace_ELBO().loss(model, guide)


def test_model_and_guide_shapes_disagree_raises_naming_the_site():
    got, want = both(shapes_disagree)
    assert_both_raise(got, want, "'z'")
    assert "Model and guide shapes disagree" in got[2]


# ------------------------------------------------------------------- handlers


def fresh_wrapper(B):
    h = B.poutine.scale(scale=2.0)

    def guide():
        return B.pyro.sample("g", B.dist.Normal(0.0, 1.0))

    def model():
        return B.pyro.sample("m", B.dist.Normal(0.0, 1.0))

    g, m = h(guide), h(model)
    tr = B.poutine.trace(m).get_trace()
    site = tr.nodes["m"]
    return [n for n in tr.nodes], site["scale"], g is not m


def test_handler_decorates_each_function_with_its_own_wrapper():
    same(*both(fresh_wrapper))


def method_decorator(B):
    class Model:
        k = 3.0

        @B.poutine.scale(scale=0.5)
        def __call__(self, x):
            return B.pyro.sample("y", B.dist.Normal(self.k, 1.0), obs=x)

    tr = B.poutine.trace(Model()).get_trace(torch.tensor(1.0))
    return list(tr.nodes), tr.nodes["y"]["scale"], tr.log_prob_sum().detach()


def test_handler_as_method_decorator_binds_self():
    same(*both(method_decorator))


def param_only_trace(B):
    def guide():
        B.pyro.param("a", torch.ones(2))
        B.pyro.sample("z", B.dist.Normal(0.0, 1.0))
        B.pyro.param("b", torch.zeros(1))

    tr = B.poutine.trace(guide, param_only=True).get_trace()
    return list(tr.nodes), [tr.nodes[n]["type"] for n in tr.nodes]


def test_params_only_trace_has_params_only():
    same(*both(param_only_trace))


def block_hide_expose(B):
    def model():
        for n in ("a", "b", "c"):
            B.pyro.sample(n, B.dist.Normal(0.0, 1.0))

    out = []
    for kw in ({"hide": ["a"]}, {"expose": ["b", "c"]}, {"hide": ["a"], "expose": ["b"]}):
        tr = B.poutine.trace(B.poutine.block(model, **kw)).get_trace()
        out.append(list(tr.nodes))
    return out


def block_hide_and_expose_one_site(B):
    B.poutine.block(lambda: None, hide=["a"], expose=["a", "b"])


def test_block_hide_and_expose():
    same(*both(block_hide_expose))
    got, want = both(block_hide_and_expose_one_site)
    # Pyro asserts; distsvi says which site is both hidden and exposed
    assert want[:2] == ("raised", "AssertionError") and got[:2] == ("raised", "ValueError")
    assert "'a'" in got[2]


def runtime(B):
    return importlib.import_module(f"{B.name}.poutine.runtime")


def mask_and_plates(B):
    seen = []

    def model():
        seen.append(B.poutine.get_mask())
        with B.pyro.plate("outer", 3, dim=-2), B.pyro.plate("inner", 2):
            with B.poutine.mask(mask=torch.tensor([True, False])):
                seen.append(B.poutine.get_mask())
                seen.append([(f.name, f.dim, f.size) for f in runtime(B).get_plates()])
                B.pyro.sample("x", B.dist.Normal(0.0, 1.0))

    model()
    return seen


def test_get_mask_and_get_plates():
    same(*both(mask_and_plates))


def validation_context(B):
    def checks():  # validation on: a negative scale is refused at construction
        try:
            B.dist.Normal(0.0, -1.0)
            return False
        except ValueError:
            return True

    before = checks()
    with B.pyro.validation_enabled(False):
        inside = checks()
        with B.pyro.validation_enabled():
            nested = checks()
    return before, inside, nested, checks()


def test_validation_enabled_context():
    same(*both(validation_context))


# ------------------------------------------------------------------- plates


def plate_stack_trace(B):
    def model():
        with B.pyro.plate_stack("s", (3, 2)):
            B.pyro.sample("x", B.dist.Normal(0.0, 1.0))

    tr = B.poutine.trace(model).get_trace()
    site = tr.nodes["x"]
    frames = [(f.name, f.dim, f.size) for f in site["cond_indep_stack"]]
    return list(tr.nodes), site["value"].shape, sorted(frames)


def test_plate_stack():
    same(*both(plate_stack_trace))


def plate_sizes(B):
    out = []

    def model():
        with B.pyro.plate("a", dim=-1):  # no size: broadcast, as size -1
            out.append(B.pyro.sample("x", B.dist.Normal(torch.zeros(4), 1.0)).shape)
        with B.pyro.plate("b", 6, subsample=[5, 0]) as idx:
            out.append(torch.as_tensor(idx))
            out.append(B.pyro.sample("y", B.dist.Normal(0.0, 1.0)).shape)

    tr = B.poutine.trace(model).get_trace()
    frames = {n: [(f.name, f.size) for f in tr.nodes[n]["cond_indep_stack"]] for n in ("x", "y")}
    scale = tr.nodes["y"]["scale"]
    return out, frames, float(scale)


def test_plate_without_size_and_with_list_subsample():
    same(*both(plate_sizes))


def replay_subsample(B):
    def model(k):
        with B.pyro.plate("data", 10, subsample_size=k):
            B.pyro.sample("x", B.dist.Normal(0.0, 1.0))

    tr = B.poutine.trace(model).get_trace(3)
    B.poutine.replay(model, trace=tr)(4)


def test_replaying_a_plate_with_another_subsample_size_raises():
    assert_both_raise(*both(replay_subsample), "data")


# ------------------------------------------------------------------- distributions


def has_rsample_flag(B):
    d = B.dist.Normal(torch.zeros(2), 1.0)
    off = d.has_rsample_(False)
    return d.has_rsample, off.has_rsample, d.has_rsample_(True).has_rsample


def test_has_rsample_():
    same(*both(has_rsample_flag))


# ------------------------------------------------------------------- Trace structure


def graph(B):
    def model():
        a = B.pyro.sample("a", B.dist.Normal(0.0, 1.0))
        with B.pyro.plate("p", 3):
            b = B.pyro.sample("b", B.dist.Normal(a, 1.0))
            B.pyro.sample("c", B.dist.Normal(b, 1.0), obs=torch.zeros(3))

    tr = B.poutine.trace(model).get_trace()
    tr.compute_log_prob()
    # Pyro records a plate's indices as a "sample" site of a _Subsample distribution, so it
    # counts among the stochastic nodes; distsvi records them as a "subsample" site
    # (see the README), which format_shapes still lists as Pyro does.
    stochastic = [n for n in tr.stochastic_nodes if n != "p"]
    observed = list(tr.observation_nodes)
    tr.add_edge("a", "b")
    order = tr.topological_sort()
    succ = sorted(tr.successors("a"))
    shapes = tr.format_shapes()  # plates included, as Pyro lists them
    tr.remove_node("c")
    return stochastic, observed, order, succ, shapes, list(tr.nodes)


def test_trace_graph_methods_and_format_shapes():
    same(*both(graph))
