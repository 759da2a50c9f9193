"""Model adapters: a plain function, a flax nnx module and a flax linen module each become a
pure (loss_fn, params) pair in one call, with the loss the model itself computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import slt_jax
from slt_jax.models import from_function, from_linen, from_nnx, gaussian_nll


@pytest.fixture(scope="module")
def batch():
    kx, ky = jax.random.split(jax.random.key(0))
    return {"x": jax.random.normal(kx, (32, 3)), "y": jax.random.normal(ky, (32, 2))}


def test_from_function_matches_manual_loss(batch):
    apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    loss_fn, p = from_function(apply_fn, params, loss="gaussian_nll")
    pred = apply_fn(params, batch["x"])
    manual = jnp.mean(0.5 * jnp.sum((pred - batch["y"]) ** 2, axis=1) + jnp.log(2 * jnp.pi))
    np.testing.assert_allclose(loss_fn(p, batch), manual, rtol=1e-6)


def test_from_nnx_is_pure_and_matches_the_module(batch):
    model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    expected = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    loss_fn, params = from_nnx(model, loss="mse")
    assert isinstance(params, dict)
    np.testing.assert_allclose(loss_fn(params, batch), expected, rtol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_allclose(jax.jit(loss_fn)(zero, batch), jnp.mean(batch["y"] ** 2), rtol=1e-6)
    # The module's own parameters were not touched by evaluating at other parameters.
    np.testing.assert_allclose(jnp.mean((model(batch["x"]) - batch["y"]) ** 2), expected, rtol=1e-6)


def test_from_linen_samples_params_and_keeps_other_collections(batch):
    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(2)(jnp.tanh(linen.Dense(8)(x)))

    module = MLP()
    variables = module.init(jax.random.key(0), batch["x"])
    loss_fn, params = from_linen(module, variables, loss=gaussian_nll(0.5))
    pred = module.apply(variables, batch["x"])
    manual = jnp.mean(gaussian_nll(0.5)(pred, batch["y"]))
    np.testing.assert_allclose(loss_fn(params, batch), manual, rtol=1e-6)
    with pytest.raises(ValueError, match="no 'params' collection"):
        from_linen(module, {"batch_stats": {}})


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="loss='hinge'"):
        from_function(lambda p, x: x, {}, loss="hinge")


def test_adapted_model_runs_through_estimate_llc(batch):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    loss_fn, params = from_nnx(model, loss="gaussian_nll")
    r = slt_jax.estimate_llc(loss_fn, params, batch, jax.random.key(0), step_size=1e-4,
                             localization=10.0, num_chains=2, num_draws=50, num_burnin=10,
                             batch_size=16, progress=False)
    assert np.isfinite(r.llc_mean) and r.settings["num_params"] == 8
