"""estimate_free_energy on Bayesian linear regression, whose local free energy is in closed form
(slt_jax.groundtruth.linear_gaussian_*): thermodynamic integration, WBIC and the temperature-based
λ̂ estimates against their exact finite-n, finite-γ values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import groundtruth as gt
from slt_jax.estimators.free_energy import llc_from_slope
from slt_jax.models.adapters import gaussian_nll
from slt_jax.temperature import DEFAULT_STEP_SCALE, estimate_free_energy

N, D, SIGMA, GAMMA = 100, 2, 1.0, 1.0
# SGLD at ε·(nβh + γ) = 0.02 inflates the posterior variance by ≈ 0.5 % and the bootstrap
# minibatch (batch = n, drawn with replacement) by ≈ 0.5 %·β more, so every E_β[nL_n] − nL_n(w*)
# may be biased up to 1 %: the tolerances below are 3 standard errors plus that budget.
BIAS = 0.01
_nll = gaussian_nll(SIGMA)


def loss_fn(w, batch):
    """Mean Gaussian negative log-likelihood in nats of y ≈ x·w."""
    return jnp.mean(_nll((batch["x"] @ w)[:, None], batch["y"][:, None]))


@pytest.fixture(scope="module", params=[0, 1], ids=lambda s: f"seed{s}")
def fit(request):
    seed = request.param
    kx, kw, ke = jax.random.split(jax.random.key(100 + seed), 3)
    x = jax.random.normal(kx, (N, D))
    y = x @ jax.random.normal(kw, (D,)) + SIGMA * jax.random.normal(ke, (N,))
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w_hat = np.linalg.lstsq(x64, y64, rcond=None)[0].astype(np.float32)  # the empirical minimiser
    result = estimate_free_energy(loss_fn, jnp.asarray(w_hat), {"x": x, "y": y}, jax.random.key(seed),
                                  localization=GAMMA, batch_size=N, num_chains=12, num_draws=1000,
                                  steps_per_draw=2, num_burnin=300, progress=False)
    exact = dict(sigma=SIGMA, center=w_hat.astype(np.float64), localization=GAMMA)

    def mean_nloss(beta):
        return gt.linear_gaussian_mean_nloss(x64, y64, beta=beta, **exact)

    return result, gt.linear_gaussian_free_energy(x64, y64, **exact), mean_nloss, (x64, y64, exact)


def test_thermodynamic_integration_matches_the_closed_form_free_energy(fit):
    r, free_energy, _, _ = fit
    excess = free_energy - r.init_nloss  # the part the sampler has to get right (≈ 4.5 nats)
    assert abs(r.free_energy - free_energy) < 3 * r.free_energy_se + BIAS * excess, (
        r.free_energy, r.free_energy_se, free_energy)
    assert r.free_energy_se < 0.05 * excess


def test_every_rung_and_wbic_match_the_closed_form_mean(fit):
    r, _, mean_nloss, _ = fit
    exact = np.array([mean_nloss(b) for b in r.betas])
    z = (r.mean_nloss - exact) / (r.mean_nloss_se + BIAS * (exact - r.init_nloss))
    assert np.mean(np.abs(z) < 3) >= 0.9 and np.all(np.abs(z) < 5), np.round(z, 2)
    star = mean_nloss(r.beta_star)
    assert r.wbic == pytest.approx(r.mean_nloss[list(r.betas).index(r.beta_star)])
    assert abs(r.wbic - star) < 3 * r.wbic_se + BIAS * (star - r.init_nloss)


def test_mean_and_slope_llc_give_the_finite_gamma_value_near_d_over_2(fit):
    r, _, mean_nloss, _ = fit
    beta_star = 1 / math.log(N)
    assert r.beta_star == pytest.approx(beta_star)
    exact_mean = beta_star * (mean_nloss(beta_star) - r.init_nloss)
    assert exact_mean == pytest.approx(D / 2, rel=0.06)  # ½Σ β*a/(γ + β*a) with β*a ≈ 22
    assert abs(r.llc_mean - exact_mean) < 3 * r.llc_mean_se + BIAS * exact_mean
    # The slope is fitted to three rungs around β*; its exact value is the same fit to the
    # closed-form curve (the curve bends in 1/β, so this is not exactly d/2 either).
    grid = beta_star * np.array([1 - 1 / math.sqrt(2 * math.log(N)), 1, 1 + 1 / math.sqrt(2 * math.log(N))])
    at = [int(np.argmin(np.abs(r.betas - b))) for b in grid]
    np.testing.assert_allclose(r.betas[at], grid, rtol=1e-12)
    exact_slope = llc_from_slope(grid, [mean_nloss(b) for b in grid], r.mean_nloss_se[at])[0]
    assert exact_slope == pytest.approx(D / 2, rel=0.15)
    assert abs(r.llc_slope - exact_slope) < 3 * r.llc_slope_se + 2 * BIAS * exact_slope
    exact_two = (mean_nloss(grid[0]) - mean_nloss(grid[2])) / (1 / grid[0] - 1 / grid[2])
    assert abs(r.llc_two_temperatures - exact_two) < 3 * r.llc_two_temperatures_se + 2 * BIAS * exact_two


def test_variance_consistency_check(fit):
    r, _, _, (x, y, exact) = fit
    star = list(r.betas).index(r.beta_star)
    truth = r.beta_star**2 * gt.linear_gaussian_var_nloss(x, y, beta=r.beta_star, **exact)
    # A sample variance of a χ²-like statistic (excess kurtosis 6/(d/2) = 6) from ESS draws has
    # a relative standard error of √(8/ESS).
    rel = 3 * math.sqrt(8 / r.diagnostics[star].ess) + BIAS
    assert r.llc_variance == pytest.approx(truth, rel=rel)
    assert r.llc_variance == pytest.approx(r.llc_mean, rel=rel + 0.1)  # multiplicity 1: both ≈ λ


def test_ladder_spans_the_prior_plateau_and_steps_follow_the_posterior_width(fit):
    r, _, _, _ = fit
    assert np.all(np.diff(r.betas) > 0) and r.betas[-1] == 1.0
    assert r.betas[0] <= GAMMA / (100 * N * r.curvature) * (1 + 1e-9)
    assert np.max(np.diff(np.log(r.betas))) <= 0.5 + 1e-9
    # ε_k·(n·β_k·h + γ) is the same on every rung: equal steps relative to the posterior width.
    np.testing.assert_allclose(r.step_sizes * (N * r.betas * r.curvature + GAMMA), DEFAULT_STEP_SCALE, rtol=1e-6)
    assert r.curvature == pytest.approx(np.linalg.eigvalsh(fit[3][0].T @ fit[3][0] / N).max(), rel=1e-3)
    assert r.diverged_chains == [] and len(r.diagnostics) == len(r.betas)
    d = r.to_dict()
    assert d["settings"]["loss_estimator"] == "full_batch" and len(d["betas"]) == len(r.betas)
    assert "F =" in str(r)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(localization=0.0), "localization"),
        (dict(betas=[0.1, 0.5, 0.9]), "betas"),
        (dict(betas=[0.5, 0.1, 1.0]), "betas"),
        (dict(num_draws=2), "num_draws"),
        (dict(loss_estimator="exact"), "loss_estimator"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    data = {"x": jnp.ones((10, D)), "y": jnp.ones(10)}
    settings = dict(localization=GAMMA, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        estimate_free_energy(loss_fn, jnp.zeros(D), data, jax.random.key(0), **settings)


def test_bad_key_is_named():
    data = {"x": jnp.ones((10, D)), "y": jnp.ones(10)}
    with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
        estimate_free_energy(loss_fn, jnp.zeros(D), data, 0, localization=GAMMA, progress=False)
