"""User mistakes give one clear error (or, for a guide missing a latent, Pyro's warning)
that names the site."""

from __future__ import annotations

import warnings

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import poutine
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from distsvi.optim import Adam


def _svi_step(model, guide, *args, loss=None):
    return SVI(model, guide, Adam({"lr": 0.01}), loss or Trace_ELBO()).step(*args)


def _empty_guide(*args):
    pass


def test_sample_site_name_used_twice():
    def model():
        pyro.sample("twice", dist.Normal(0.0, 1.0))
        pyro.sample("twice", dist.Normal(0.0, 1.0))

    with pytest.raises((RuntimeError, ValueError), match="twice"):
        poutine.trace(model).get_trace()


def test_observed_site_name_used_twice_in_svi():
    def model():
        pyro.sample("obs_twice", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))
        pyro.sample("obs_twice", dist.Normal(0.0, 1.0), obs=torch.tensor(1.0))

    with pytest.raises((RuntimeError, ValueError), match="obs_twice"):
        _svi_step(model, _empty_guide)


def test_sample_site_reusing_a_param_name():
    def model():
        pyro.param("shared_name", torch.tensor(1.0))
        pyro.sample("shared_name", dist.Normal(0.0, 1.0))

    with pytest.raises((RuntimeError, ValueError), match="shared_name"):
        poutine.trace(model).get_trace()


def test_param_called_twice_is_fine():
    def model():
        a = pyro.param("a", torch.tensor(1.0))
        b = pyro.param("a", torch.tensor(1.0))
        return a, b

    tr = poutine.trace(model).get_trace()
    assert tr.nodes["a"]["type"] == "param"


def test_observation_not_broadcasting_with_its_distribution():
    def model():
        pyro.sample("bad_obs", dist.Normal(torch.zeros(3), 1.0).to_event(1), obs=torch.zeros(4))

    with pytest.raises((ValueError, RuntimeError), match="bad_obs"):
        _svi_step(model, _empty_guide)


def test_observation_not_fitting_its_plate():
    data = torch.zeros(7)

    def model():
        with pyro.plate("data", 5):
            pyro.sample("plate_obs", dist.Normal(0.0, 1.0), obs=data)

    with pytest.raises((ValueError, RuntimeError), match="plate_obs"):
        _svi_step(model, _empty_guide)


def test_full_data_observed_in_a_subsampled_plate():
    """The common slip: indexing the data with the plate's indices is forgotten."""
    data = torch.zeros(10)

    def model():
        with pyro.plate("data", 10, subsample_size=4):
            pyro.sample("full_obs", dist.Normal(0.0, 1.0), obs=data)

    with pytest.raises((ValueError, RuntimeError), match="full_obs"):
        _svi_step(model, _empty_guide)


def test_observation_with_extra_batch_dims_inside_a_plate():
    """Broadcasts numerically, but the log-prob has a dim no plate declares (Pyro refuses)."""
    data = torch.zeros(5, 2)

    def model():
        with pyro.plate("data", 5, dim=-1):
            pyro.sample("wide_obs", dist.Normal(0.0, 1.0), obs=data)

    with pytest.raises((ValueError, RuntimeError), match="wide_obs"):
        _svi_step(model, _empty_guide)


def test_guide_missing_a_latent_site_warns_naming_it():
    def model():
        pyro.sample("present", dist.Normal(0.0, 1.0))
        pyro.sample("forgotten_latent", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("present", dist.Normal(loc, 1.0))

    with pytest.warns(UserWarning, match="forgotten_latent"):
        _svi_step(model, guide)


def test_guide_missing_a_latent_site_warns_under_mean_field_elbo():
    def model():
        pyro.sample("mf_forgotten", dist.Normal(0.0, 1.0))

    def step():
        try:
            _svi_step(model, _empty_guide, loss=TraceMeanField_ELBO())
        except (KeyError, ValueError, RuntimeError):
            pass  # Pyro then fails on the missing guide site (KeyError); either is fine

    with pytest.warns(UserWarning, match="mf_forgotten"):
        step()


def test_matching_model_and_guide_do_not_warn():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _svi_step(model, guide)


def test_plate_dim_conflict():
    def model():
        with pyro.plate("outer_plate", 3, dim=-1), pyro.plate("inner_plate", 4, dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="inner_plate|outer_plate"):
        model()


def test_param_init_outside_constraint_in_svi():
    def model():
        s = pyro.param("neg_scale", torch.tensor(-1.0), constraint=constraints.positive)
        pyro.sample("y", dist.Normal(0.0, s), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="neg_scale"):
        _svi_step(model, _empty_guide)


def test_mean_field_elbo_refuses_a_non_reparameterised_guide():
    """Pyro raises NotImplementedError: TraceMeanField_ELBO needs a fully reparameterised guide."""

    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        pyro.sample("coin", dist.Bernoulli(p))

    with pytest.raises(NotImplementedError):
        _svi_step(model, guide, loss=TraceMeanField_ELBO())


def test_guide_site_missing_from_model_warns():
    """Pyro warns about a non-auxiliary guide site that the model lacks."""

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
        pyro.sample("stray_guide_site", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="stray_guide_site"):
        _svi_step(model, guide)


def test_plates_deeper_than_max_plate_nesting():
    def model():
        with pyro.plate("a", 3, dim=-2), pyro.plate("b", 4, dim=-1):
            pyro.sample("deep_obs", dist.Normal(0.0, 1.0), obs=torch.zeros(3, 4))

    with pytest.raises(ValueError, match="deep_obs"):
        Trace_ELBO(max_plate_nesting=1).loss(model, _empty_guide)


def test_batched_latent_outside_any_plate():
    """Pyro refuses a latent whose batch dims no plate declares (validation is on by default)."""

    def model():
        pyro.sample("unplated", dist.Normal(torch.zeros(3), 1.0))

    def guide():
        pyro.sample("unplated", dist.Normal(torch.zeros(3), 1.0))

    with pytest.raises(ValueError, match="unplated"):
        Trace_ELBO(max_plate_nesting=1).loss(model, guide)


def test_guide_forgetting_to_event():
    """Pyro refuses a guide whose site has other event dims than the model's site."""

    def model():
        pyro.sample("weights", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        pyro.sample("weights", dist.Normal(loc, 1.0))

    with pytest.raises(ValueError, match="weights"):
        _svi_step(model, guide)


def test_guide_and_model_shapes_disagree():
    def model():
        with pyro.plate("data", 4):
            pyro.sample("local", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", 4):
            pyro.sample("local", dist.Normal(loc.sum(), 1.0).expand([4, 3]).to_event(1))

    with pytest.raises(ValueError, match="local"):
        _svi_step(model, guide)


@pytest.fixture
def validation_off():
    pyro.enable_validation(False)
    yield
    pyro.enable_validation(True)


def test_enable_validation_false_silences_model_guide_checks(validation_off):
    """Pyro runs its model/guide checks only while validation is enabled."""

    def model():
        pyro.sample("unchecked_latent", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    def guide():
        pyro.param("loc", torch.tensor(0.0))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _svi_step(model, guide)


def test_enable_validation_toggles_distribution_arg_checks(validation_off):
    dist.Normal(0.0, -1.0)  # no check while validation is off
    pyro.enable_validation(True)
    with pytest.raises(ValueError):
        dist.Normal(0.0, -1.0)


def test_factor_in_guide_needs_has_rsample():
    """Pyro refuses a guide factor that does not say whether it is reparameterised."""

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        z = pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.5)), 1.0))
        pyro.factor("unspecified_factor", -(z**2))

    with pytest.raises(ValueError, match="unspecified_factor"):
        _svi_step(model, guide)


def test_param_reusing_a_sample_site_name():
    def model():
        pyro.sample("clash_name", dist.Normal(0.0, 1.0))
        pyro.param("clash_name", torch.tensor(1.0))

    with pytest.raises((RuntimeError, ValueError), match="clash_name"):
        poutine.trace(model).get_trace()
