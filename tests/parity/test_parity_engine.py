"""The engine's everyday surface against Pyro 1.9.2: each test runs one program under both
engines, from the same seed, and compares what comes out (values, shapes, trace node names
in order) or, for a program Pyro refuses, the error's type and that its message names the
site and the shapes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, both, isolated


def outcome(B, program):
    """``("ok", value)`` or ``("raise", error type name, message)`` of ``program(B)``, run
    from a fresh param store and seed 0."""
    B.pyro.clear_param_store()
    torch.manual_seed(0)
    try:
        with isolated(B):
            return ("ok", program(B))
    except Exception as e:  # the type is compared with Pyro's, below
        return ("raise", type(e).__name__, str(e))
    finally:
        B.pyro.clear_param_store()


def same_outcome(program, *must_name: str, raises: bool = False):
    """Run under both engines; return the two values, or (``raises``) check that Pyro raises,
    that we raise the same error type and that our message names each of ``must_name``."""
    want, got = (outcome(B, program) for B in both())
    assert (want[0] == "raise") == raises, f"Pyro: {want}"
    if raises:
        assert got[0] == "raise", f"Pyro raises {want[1]}: {want[2]}; distsvi returned {got}"
        assert got[1] == want[1], f"error type {got[1]} ({got[2]}) vs Pyro's {want[1]} ({want[2]})"
        for word in must_name:
            assert word in got[2], f"{word!r} not named in distsvi's message: {got[2]}"
        return None
    assert got[0] == "ok", f"distsvi raises {got[1]}: {got[2]}; Pyro returned {want[1]!r}"
    return want[1], got[1]


def trace_summary(trace):
    return [
        (n, s["type"], tuple(s["value"].shape) if torch.is_tensor(s.get("value")) else None)
        for n, s in trace.nodes.items()
    ]


# --- params --------------------------------------------------------------------------------


def test_param_from_expanded_tensor_is_stored_contiguous_and_steps():
    def program(B):
        def model():
            B.pyro.sample("x", B.dist.Normal(0.0, 1.0).expand([3]).to_event(1), obs=torch.ones(3))

        def guide():
            B.pyro.param("w", torch.tensor(0.5).expand(3))

        svi = B.infer.SVI(model, guide, B.optim.Adam({"lr": 0.1}), B.infer.Trace_ELBO())

        def model2():
            w = B.pyro.param("w", torch.tensor(0.5).expand(3))
            B.pyro.sample("x", B.dist.Normal(w, 1.0).to_event(1), obs=torch.ones(3))

        svi = B.infer.SVI(model2, guide, B.optim.Adam({"lr": 0.1}), B.infer.Trace_ELBO())
        losses = [svi.step() for _ in range(3)]
        w = B.pyro.param("w")
        return losses, w.detach().clone(), w.unconstrained().is_contiguous()

    (want_l, want_w, want_c), (got_l, got_w, got_c) = same_outcome(program)
    assert_close(got_l, want_l, "losses")
    assert_close(got_w, want_w, "w after 3 steps")
    assert got_c and want_c


def test_param_unconstrained_is_the_stored_leaf():
    def program(B):
        p = B.pyro.param("s", torch.tensor([0.5, 2.0]), constraint=B.constraints.positive)
        u = p.unconstrained()
        return u.detach().clone(), u.requires_grad, u.is_leaf

    want, got = same_outcome(program)
    assert_close(got[0], want[0], "unconstrained value")
    assert got[1:] == want[1:]


def test_param_store_scope():
    def program(B):
        B.pyro.param("outer", torch.tensor(1.0))
        store = B.pyro.get_param_store()
        with store.scope() as inner:
            B.pyro.param("inner", torch.tensor(2.0))
            inside = sorted(store.keys())
        after = sorted(store.keys())
        with store.scope(state=inner):
            again = sorted(store.keys()), float(B.pyro.param("inner"))
        return inside, after, again

    want, got = same_outcome(program)
    assert got == want


def test_param_store_scope_is_pyros_class():
    pyro_cls = importlib.import_module("pyro.params.param_store").ParamStoreDict
    ours = importlib.import_module("distsvi.params.param_store").ParamStoreDict
    assert hasattr(ours, "scope") and hasattr(pyro_cls, "scope")
    assert isinstance(importlib.import_module("distsvi").get_param_store(), ours)


def test_param_size_not_matching_its_plate_raises_naming_it():
    def program(B):
        with B.pyro.plate("p", 5):
            return B.pyro.param("x", torch.zeros(4), event_dim=0)

    assert same_outcome(program, "'x'", raises=True) is None


# --- handlers ------------------------------------------------------------------------------


def test_handler_object_decorates_each_function_separately():
    def program(B):
        def model():
            return B.pyro.sample("m", B.dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

        def guide():
            return B.pyro.sample("g", B.dist.Normal(1.0, 1.0), obs=torch.tensor(0.7))

        h = B.poutine.scale(scale=2.0)
        scaled_guide = h(guide)
        scaled_model = h(model)
        tr_m = B.poutine.trace(scaled_model).get_trace()
        tr_g = B.poutine.trace(scaled_guide).get_trace()
        p = B.pyro.plate("data", 3)
        in_plate = p(model)
        tr_p = B.poutine.trace(in_plate).get_trace()
        return (
            trace_summary(tr_m),
            float(tr_m.log_prob_sum()),
            trace_summary(tr_g),
            float(tr_g.log_prob_sum()),
            [f.name for f in tr_p.nodes["m"]["cond_indep_stack"]],
        )

    want, got = same_outcome(program)
    assert got == want


def test_handler_as_method_decorator():
    def program(B):
        class Model:
            def __init__(self):
                self.loc = torch.tensor(0.5)

            @B.poutine.scale(scale=3.0)
            def __call__(self, y):
                return B.pyro.sample("y", B.dist.Normal(self.loc, 1.0), obs=y)

        m = Model()
        tr = B.poutine.trace(m).get_trace(torch.tensor(1.0))
        return trace_summary(tr), float(tr.log_prob_sum()), tr.nodes["y"]["scale"]

    want, got = same_outcome(program)
    assert got == want


def test_block_hide_and_expose_together():
    def program(B):
        def model():
            for name in "abc":
                B.pyro.sample(name, B.dist.Normal(0.0, 1.0))

        results = []
        for kw in (
            {"hide": ["a"]},
            {"expose": ["b"]},
            {"hide": ["a"], "expose": ["b", "c"]},
            {"hide_types": ["sample"], "expose": ["c"]},
        ):
            tr = B.poutine.trace(B.poutine.block(model, **kw)).get_trace()
            results.append(list(tr.stochastic_nodes))
        return results

    want, got = same_outcome(program)
    assert got == want


def test_block_site_both_hidden_and_exposed_is_refused():
    """Pyro asserts; distsvi raises a ValueError naming the conflict (see the README)."""

    def program(B):
        def model():
            B.pyro.sample("a", B.dist.Normal(0.0, 1.0))

        return B.poutine.trace(B.poutine.block(model, hide=["a"], expose=["a"])).get_trace()

    want, got = (outcome(B, program) for B in both())
    assert want[:2] == ("raise", "AssertionError")
    assert got[:2] == ("raise", "ValueError") and "hidden and exposed" in got[2]


def test_get_mask_and_get_plates():
    def program(B):
        seen = []

        def model():
            seen.append(B.poutine.get_mask())
            get_plates = importlib.import_module(f"{B.name}.poutine.runtime").get_plates
            with B.poutine.mask(mask=torch.tensor([True, False, True])):
                seen.append(B.poutine.get_mask().tolist())
                with B.pyro.plate("outer", 3, dim=-2), B.pyro.plate("inner", 2):
                    plates = get_plates()
                    seen.append([(f.name, f.dim, f.size) for f in plates])
                    with B.poutine.mask(mask=False):
                        seen.append(B.poutine.get_mask())
            seen.append([f.name for f in get_plates()])

        model()
        return [m.tolist() if torch.is_tensor(m) else m for m in seen]

    want, got = same_outcome(program)
    assert got == want


def test_trace_param_only_keeps_param_nodes_only():
    def program(B):
        def guide():
            B.pyro.param("a", torch.tensor(1.0))
            B.pyro.sample("z", B.dist.Normal(B.pyro.param("b", torch.tensor(0.0)), 1.0))
            return 3

        tr = B.poutine.trace(guide, param_only=True).get_trace()
        full = B.poutine.trace(guide).get_trace()
        return list(tr.nodes), list(full.nodes), [s["type"] for s in tr.nodes.values()]

    want, got = same_outcome(program)
    assert got == want


def test_trace_graph_methods_and_format_shapes():
    def program(B):
        def model(y):
            loc = B.pyro.param("loc", torch.zeros(3))
            z = B.pyro.sample("z", B.dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            with B.pyro.plate("data", 3):
                B.pyro.sample("y", B.dist.Normal(loc + z.sum(), 1.0), obs=y)

        tr = B.poutine.trace(model).get_trace(torch.ones(3))
        tr.compute_log_prob()
        shapes = tr.format_shapes()
        # Pyro lists a plate's index site ("data") with the sample sites; distsvi gives it
        # type "subsample" (see the README), so it is left out of this comparison.
        stochastic = [n for n, _ in tr.iter_stochastic_nodes() if n != "data"]
        tr.add_edge("z", "y")
        order = tr.topological_sort()
        succ = sorted(tr.successors("z"))
        tr.remove_node("loc")
        return shapes, stochastic, order, succ, list(tr.nodes)

    want, got = same_outcome(program)
    shapes_w, *rest_w = want
    shapes_g, *rest_g = got
    assert rest_g == rest_w
    assert shapes_g == shapes_w, f"format_shapes:\n{shapes_g}\nvs Pyro's\n{shapes_w}"


# --- plates --------------------------------------------------------------------------------


def test_plate_stack_shapes_and_frames():
    def program(B):
        def model():
            with B.pyro.plate_stack("s", (2, 3)):
                return B.pyro.sample("x", B.dist.Normal(0.0, 1.0))

        tr = B.poutine.trace(model).get_trace()
        site = tr.nodes["x"]
        return tuple(site["value"].shape), [(f.name, f.dim, f.size) for f in site["cond_indep_stack"]]

    want, got = same_outcome(program)
    assert got == want


def test_plate_without_size():
    def program(B):
        with B.pyro.plate("data") as idx:
            x = B.pyro.sample("x", B.dist.Normal(0.0, 1.0))
        with B.pyro.plate("p", 4), B.pyro.plate("q", dim=-2) as idx2:
            y = B.pyro.sample("y", B.dist.Normal(torch.zeros(3, 1), 1.0))
        return tuple(x.shape), idx, tuple(y.shape), idx2

    want, got = same_outcome(program)
    assert got == want


def test_plate_subsample_list():
    def program(B):
        def model(y):
            with B.pyro.plate("data", 10, subsample=[1, 5, 7]) as idx:
                B.pyro.sample("y", B.dist.Normal(0.0, 1.0), obs=y[idx])
            return idx

        tr = B.poutine.trace(model).get_trace(torch.arange(10.0))
        tr.compute_log_prob()
        return list(tr.nodes["_RETURN"]["value"]), float(tr.log_prob_sum()), tr.nodes["y"]["scale"]

    want, got = same_outcome(program)
    assert got[0] == want[0] and got[2] == pytest.approx(want[2])
    assert_close(got[1], want[1], "scaled log_prob of a subsample given as a list")


def test_replayed_plate_with_other_subsample_size_raises_naming_it():
    def program(B):
        def guide():
            with B.pyro.plate("data", 10, subsample_size=3):
                B.pyro.sample("z", B.dist.Normal(0.0, 1.0))

        def model():
            with B.pyro.plate("data", 10, subsample_size=4):
                B.pyro.sample("z", B.dist.Normal(0.0, 1.0))

        gtr = B.poutine.trace(guide).get_trace()
        return trace_summary(B.poutine.trace(B.poutine.replay(model, trace=gtr)).get_trace())

    assert same_outcome(program, "'data'", raises=True) is None


# --- distributions and validation ----------------------------------------------------------


def test_has_rsample_():
    def program(B):
        d = B.dist.Normal(torch.zeros(2), 1.0)
        off = d.has_rsample_(False)
        on = B.dist.Gamma(2.0, 1.0).has_rsample_(True)
        return off is d, off.has_rsample, on.has_rsample, type(off).__name__

    want, got = same_outcome(program)
    assert got == want


def test_validation_enabled_context():
    def program(B):
        enabled = B.infer.is_validation_enabled
        states = [enabled()]
        with B.pyro.validation_enabled(False):
            states.append(enabled())
            with B.pyro.validation_enabled():
                states.append(enabled())
        states.append(enabled())
        return states

    want, got = same_outcome(program)
    assert got == want


def test_model_and_guide_shapes_disagree():
    def program(B):
        def model():
            B.pyro.sample("x", B.dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))

        def guide():
            B.pyro.sample("x", B.dist.Normal(torch.zeros(2, 1), 1.0).to_event(1))

        return B.infer.Trace_ELBO().loss(model, guide)

    assert same_outcome(program, "'x'", "(1, 2)", "(2, 1)", raises=True) is None


# --- losses --------------------------------------------------------------------------------


def _conjugate(B):
    def model(y):
        mu = B.pyro.sample("mu", B.dist.Normal(0.0, 1.0))
        with B.pyro.plate("data", len(y)):
            B.pyro.sample("y", B.dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        loc = B.pyro.param("loc", torch.tensor(0.3))
        scale = B.pyro.param("scale", torch.tensor(0.8), constraint=B.constraints.positive)
        B.pyro.sample("mu", B.dist.Normal(loc, scale))

    return model, guide


@pytest.mark.parametrize("loss", ["Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO"])
def test_losses_are_floats_and_differentiable_loss_a_tensor(loss):
    y = torch.tensor([0.5, 1.5, -0.2])

    def program(B):
        model, guide = _conjugate(B)
        elbo = getattr(B.infer, loss)()
        torch.manual_seed(1)
        a = elbo.loss(model, guide, y)
        torch.manual_seed(1)
        b = elbo.loss_and_grads(model, guide, y)
        grad = B.pyro.param("loc").unconstrained().grad.clone()
        torch.manual_seed(1)
        if loss == "TraceGraph_ELBO":  # Pyro's TraceGraph_ELBO has no differentiable_loss
            c = torch.as_tensor(b)
        else:
            c = elbo.differentiable_loss(model, guide, y)
        return (type(a).__name__, a), (type(b).__name__, b), grad, (torch.is_tensor(c), float(c))

    (wa, wb, wg, wc), (ga, gb, gg, gc) = same_outcome(program)
    assert ga[0] == wa[0] == "float" and gb[0] == wb[0] == "float"
    assert gc[0] and wc[0]
    assert_close([ga[1], gb[1], gc[1]], [wa[1], wb[1], wc[1]], f"{loss} values")
    assert_close(gg, wg, f"{loss} gradient")


@pytest.mark.parametrize(
    "jit,eager", [("JitTrace_ELBO", "Trace_ELBO"), ("JitTraceMeanField_ELBO", "TraceMeanField_ELBO"),
                  ("JitTraceGraph_ELBO", "TraceGraph_ELBO")]
)
def test_jit_losses_accepted_and_first_step_equal(jit, eager):
    """The Jit losses are accepted with Pyro's keywords; their first step is Pyro's eager
    number (later steps may draw differently: see the README)."""
    y = torch.tensor([0.5, 1.5, -0.2])

    def program(B):
        model, guide = _conjugate(B)
        elbo = getattr(B.infer, jit)(ignore_jit_warnings=True)
        svi = B.infer.SVI(model, guide, B.optim.Adam({"lr": 0.1}), elbo)
        return svi.step(y)

    def eager_program(B):
        model, guide = _conjugate(B)
        svi = B.infer.SVI(model, guide, B.optim.Adam({"lr": 0.1}), getattr(B.infer, eager)())
        return svi.step(y)

    want, _ = same_outcome(eager_program)
    _, got = same_outcome(program)
    assert isinstance(got, float)
    assert_close(got, want, f"{jit} first step")
