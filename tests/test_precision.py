"""Precision of estimate_llc: float32 by default, float64 on request (with x64), and bfloat16
model evaluation with float32 positions, gradients and losses.

One linear model serves every test, so each precision compiles one program:
``L(w) = ½·mean((x·w − y)²)`` with y = x·c, minimised at w* = c.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax

N, D = 512, 3
X = jax.random.normal(jax.random.key(42), (N, D))
SEEN = []  # (params dtype, batch dtype) each time JAX traces the loss


def loss_fn(w, batch):
    SEEN.append((w.dtype, batch["x"].dtype))
    residual = batch["x"] @ w - batch["y"]
    return 0.5 * jnp.mean(jnp.square(residual), dtype=jnp.float32)  # final reduction in float32


def data_at(center):
    return {"x": X, "y": X @ jnp.asarray(center, jnp.float32)}


def run(center, key, **kw):
    settings = dict(step_size=2e-4, localization=100.0, batch_size=128, num_chains=8, num_draws=1000,
                    num_burnin=300, progress=False) | kw
    return slt_jax.estimate_llc(loss_fn, jnp.asarray(center, jnp.float32), data_at(center), key, **settings)


def exact_estimand(gamma):
    """½·Σ nβh/(nβh + γ) for this quadratic loss (docs/mathematics.md §5.5, finite-γ estimand)."""
    h = np.linalg.eigvalsh(np.asarray(X.T @ X, np.float64) / N)
    nbeta = N / math.log(N)
    return 0.5 * np.sum(nbeta * h / (nbeta * h + gamma))


# Steps of 1e-14 move a coordinate by ~1e-7, below float32's resolution at 1000 (6e-5) but far
# above float64's: whether the chains move at all shows the positions' dtype.
TINY = dict(step_size=1e-14, num_draws=50, num_burnin=0)
FAR = np.full(D, 1000.0)


def test_float32_by_default_and_positions_in_float32():
    SEEN.clear()
    r = run(FAR, jax.random.key(0), **TINY)
    assert r.settings["dtype"] == "float32" and r.settings["compute_dtype"] is None
    assert SEEN and all(seen == (jnp.float32, jnp.float32) for seen in SEEN)
    assert np.all(r.distance_trace == 0.0)  # float32 cannot hold the moves


def test_float64_on_request_holds_tiny_moves():
    with jax.enable_x64(True):
        SEEN.clear()
        r = run(FAR, jax.random.key(0), dtype=jnp.float64, **TINY)
    assert r.settings["dtype"] == "float64"
    assert SEEN and all(w == jnp.float64 for w, _ in SEEN)
    assert np.all(r.distance_trace[:, -1] > 0.0)


def test_float64_without_x64_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype=float64 needs 64-bit JAX.*jax_enable_x64"):
        run(np.zeros(D), jax.random.key(0), dtype=jnp.float64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.bfloat16), "dtype=bfloat16 must be float32 or float64"),
    (dict(dtype="not a dtype"), "dtype='not a dtype' is not a dtype"),
    (dict(compute_dtype=jnp.int32), "compute_dtype=int32 must be a floating dtype"),
])
def test_bad_dtypes_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(np.zeros(D), jax.random.key(0), **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_evaluation_matches_the_exact_estimand(seed):
    SEEN.clear()
    r = run(np.zeros(D), jax.random.key(seed), compute_dtype=jnp.bfloat16)
    assert r.settings["compute_dtype"] == "bfloat16"
    assert all(seen == (jnp.bfloat16, jnp.bfloat16) for seen in SEEN)
    assert r.loss_trace.dtype == np.float64 and r.init_loss == 0.0
    exact = exact_estimand(100.0)
    # Tolerance: 4 standard errors (chain spread) plus a 2 % budget: ε(nβh+γ)/4 ≈ 0.9 %
    # discretisation bias and bfloat16 rounding of x and of the losses (2⁻⁸ relative each).
    assert abs(r.llc_mean - exact) < 4 * r.llc_se + 0.02 * exact, (r.llc_mean, r.llc_se, exact)
    assert r.llc_se < 0.1 * exact


def test_bfloat16_evaluation_keeps_float32_positions():
    # Moves of ~1e-4 per step at w* = 1: lost in bfloat16 (resolution 8e-3), kept in float32.
    r = run(np.ones(D), jax.random.key(0), compute_dtype=jnp.bfloat16, step_size=1e-8, num_draws=50,
            num_burnin=0)
    assert np.all(r.distance_trace[:, -1] > 1e-8)
