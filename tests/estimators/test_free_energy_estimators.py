"""Tests for slt_jax.estimators.free_energy on synthetic and closed-form E_β[nL_n] curves."""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from slt_jax.estimators.free_energy import (
    beta_ladder,
    llc_from_slope,
    llc_from_two_temperatures,
    llc_from_variance,
    thermodynamic_integration,
    wbic,
)

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier

SEEDS = (0, 1, 2)


# --- closed-form linear-Gaussian model --------------------------------------------------
# y = X w + σ ε with Gaussian NLL: n·L_n(w) = c + ½ (w − ŵ)ᵀ H (w − ŵ), H = XᵀX/σ²,
# ŵ the least-squares fit, c = n·L_n(ŵ). With prior φ = N(w*, I/γ) the tempered posterior
# ∝ φ·exp(−β·n·L_n) is Gaussian with precision P = γI + βH. In H's eigenbasis
# (eigenvalues h_i, δ_i = components of w* − ŵ, p_i = γ + β·h_i) the posterior offset from
# ŵ is μ_i = γ·δ_i/p_i, so with z_i ~ N(μ_i, 1/p_i) and n·L_n − c = ½ Σ h_i z_i²:
#   E_β[nL_n]   = c + Σ h_i/(2 p_i) + Σ h_i γ² δ_i² / (2 p_i²),
#   Var_β[nL_n] = Σ h_i²/(2 p_i²) + Σ h_i² γ² δ_i² / p_i³          (Var(z²) = 2s⁴ + 4μ²s²),
# and the Gaussian integral gives
#   F = −log ∫ φ exp(−nL_n) = c + ½ Σ log(1 + h_i/γ) + ½ Σ δ_i² γ h_i / (γ + h_i).


class LinearGaussian(NamedTuple):
    design: np.ndarray
    targets: np.ndarray
    noise_scale: float
    w_hat: np.ndarray
    w_star: np.ndarray
    gamma: float
    nloss_min: float
    curvatures: np.ndarray
    offsets: np.ndarray
    eigenvectors: np.ndarray


def _make_problem(seed, num_samples, dim, gamma):
    rng = np.random.default_rng(seed)
    # Column scales spread the Hessian eigenvalues over two decades, as in real models.
    scales = np.exp(rng.uniform(np.log(0.3), np.log(3.0), dim))
    design = rng.normal(size=(num_samples, dim)) * scales
    noise_scale = 0.5
    targets = design @ rng.normal(size=dim) + noise_scale * rng.normal(size=num_samples)
    w_hat = np.linalg.lstsq(design, targets, rcond=None)[0]
    hessian = design.T @ design / noise_scale**2
    curvatures, eigenvectors = np.linalg.eigh(hessian)
    # A trained point near ŵ: an offset of posterior size, so n(L_n(w*) − L_n(ŵ)) ~ χ²_d/2.
    w_star = w_hat + eigenvectors @ (rng.normal(size=dim) / np.sqrt(curvatures))
    problem = LinearGaussian(
        design, targets, noise_scale, w_hat, w_star, gamma, 0.0, curvatures,
        eigenvectors.T @ (w_star - w_hat), eigenvectors,
    )
    return problem._replace(nloss_min=float(_nloss(problem, w_hat[None])[0]))


def _nloss(problem, weights):
    """n·L_n at each row of ``weights``, straight from the data (Gaussian NLL in nats)."""
    residuals = problem.targets[:, None] - problem.design @ weights.T
    num_samples = problem.targets.shape[0]
    return np.sum(residuals**2, axis=0) / (2 * problem.noise_scale**2) + 0.5 * num_samples * (
        np.log(2 * np.pi * problem.noise_scale**2)
    )


def _moments(problem, beta):
    """Closed-form (E_β[nL_n], Var_β[nL_n]) for β of any shape."""
    h, delta, gamma = problem.curvatures, problem.offsets, problem.gamma
    p = gamma + np.asarray(beta, dtype=np.float64)[..., None] * h
    mean = problem.nloss_min + np.sum(h / (2 * p) + h * gamma**2 * delta**2 / (2 * p**2), -1)
    var = np.sum(h**2 / (2 * p**2) + h**2 * gamma**2 * delta**2 / p**3, -1)
    return mean, var


def _free_energy(problem):
    h, delta, gamma = problem.curvatures, problem.offsets, problem.gamma
    return problem.nloss_min + 0.5 * np.sum(np.log1p(h / gamma)) + 0.5 * np.sum(
        delta**2 * gamma * h / (gamma + h)
    )


@pytest.mark.parametrize("beta", [0.0, 0.003, 1.0])
def test_closed_form_helper_matches_direct_sampling(beta):
    problem = _make_problem(seed=3, num_samples=2000, dim=4, gamma=10.0)
    h, q = problem.curvatures, problem.eigenvectors
    precision = problem.gamma + beta * h
    mean_w = problem.w_hat + q @ (problem.gamma * problem.offsets / precision)
    rng = np.random.default_rng(4)
    draws = mean_w + (rng.normal(size=(4000, 4)) / np.sqrt(precision)) @ q.T
    values = _nloss(problem, draws)
    expected_mean, expected_var = _moments(problem, beta)
    # iid draws, 5 standard errors each: the mean's se is s/√N, the sample variance's
    # relative se is √((m₄/s⁴ − 1)/N) with m₄ the fourth central moment.
    centred = values - values.mean()
    variance = np.mean(centred**2)
    mean_se = math.sqrt(variance / values.size)
    var_rel_se = math.sqrt((np.mean(centred**4) / variance**2 - 1) / values.size)
    assert abs(values.mean() - expected_mean) < 5 * mean_se
    assert abs(variance / expected_var - 1) < 5 * var_rel_se


def test_closed_form_free_energy_is_the_integral_of_the_curve():
    problem = _make_problem(seed=5, num_samples=5000, dim=5, gamma=1.0)
    breaks = np.sort(problem.gamma / problem.curvatures)
    integral, _ = integrate.quad(
        lambda b: _moments(problem, b)[0] - problem.nloss_min, 0.0, 1.0, points=breaks,
        limit=200, epsabs=1e-10, epsrel=1e-12,
    )
    assert integral + problem.nloss_min == pytest.approx(_free_energy(problem), abs=1e-6)


# --- beta_ladder ------------------------------------------------------------------------


def test_beta_ladder_is_geometric_from_beta_min_to_one():
    betas = beta_ladder(9, beta_min=1e-4)
    assert betas.shape == (9,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == 1.0
    np.testing.assert_allclose(np.diff(np.log(betas)), math.log(1e4) / 8)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_rungs": 2, "beta_min": 1e-3}, "num_rungs"),
     ({"num_rungs": 5.0, "beta_min": 1e-3}, "num_rungs"),
     ({"num_rungs": 5, "beta_min": 0.0}, "beta_min"),
     ({"num_rungs": 5, "beta_min": 1.0}, "beta_min")],
)
def test_beta_ladder_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        beta_ladder(**kwargs)


# --- thermodynamic integration ------------------------------------------------------------


def test_thermodynamic_integration_is_exact_for_a_constant_curve():
    betas = jnp.asarray(beta_ladder(7, beta_min=1e-3), dtype=jnp.float32)
    free_energy, se = thermodynamic_integration(betas, np.full(7, 1.2e6), jnp.zeros(7))
    assert free_energy == pytest.approx(1.2e6, rel=1e-14)
    assert se == 0.0


def _ladder_for(problem, max_spacing=0.6):
    """The ladder beta_ladder's docstring recommends: β_min = γ/(100 n h_max), odd, Δu ≤ 0.6."""
    beta_min = problem.gamma / (100 * problem.curvatures.max())
    num_rungs = math.ceil(math.log(1 / beta_min) / max_spacing) + 1
    num_rungs += 1 - num_rungs % 2
    return beta_ladder(num_rungs, beta_min=beta_min)


@pytest.mark.parametrize("use_prior", [False, True])
@pytest.mark.parametrize(
    ("num_samples", "dim", "gamma", "seed"),
    [(1000, 3, 1.0, 0), (1000, 12, 100.0, 1), (50_000, 3, 100.0, 2), (50_000, 12, 1.0, 3)],
)
def test_thermodynamic_integration_on_linear_gaussian(num_samples, dim, gamma, seed, use_prior):
    problem = _make_problem(seed, num_samples, dim, gamma)
    betas = _ladder_for(problem)
    means, variances = _moments(problem, betas)
    # Monte Carlo error of a realistic run: 1000 effective draws per rung.
    ses = np.sqrt(variances / 1000)
    prior_mean = float(_moments(problem, 0.0)[0]) if use_prior else None
    free_energy, se = thermodynamic_integration(betas, means, ses, prior_mean_nloss=prior_mean)
    exact = _free_energy(problem)
    # Claimed bound (free_energy.py): Simpson error ≈ λ·Δu⁴/180 with λ = Var_1[nL_n] (the
    # curve's slope in 1/β at β = 1), allowed a factor 2, plus the rectangle's β_1²·Var_0/2.
    spacing = math.log(betas[1] / betas[0])
    var_top, var_prior = _moments(problem, 1.0)[1], _moments(problem, 0.0)[1]
    bound = 2 * var_top * spacing**4 / 180 + betas[0] ** 2 * var_prior / 2
    assert abs(free_energy - exact) < bound
    # ... and the integration error is well below the Monte Carlo error.
    assert abs(free_energy - exact) < 0.1 * se


@pytest.mark.parametrize("rule", ["trapezoid in beta", "trapezoid in log beta"])
def test_simpler_rules_would_fail_the_accuracy_check(rule):
    """The accuracy check above can fail: plainer rules on the same ladder miss it."""
    problem = _make_problem(1, 1000, 12, 100.0)
    betas = _ladder_for(problem)
    means, variances = _moments(problem, betas)
    if rule == "trapezoid in beta":
        naive = integrate.trapezoid(means, betas)
    else:
        naive = integrate.trapezoid(means * betas, np.log(betas))
    naive += betas[0] * means[0]
    _, se = thermodynamic_integration(betas, means, np.sqrt(variances / 1000))
    assert abs(naive - _free_energy(problem)) > se


@pytest.mark.parametrize("seed", SEEDS)
def test_thermodynamic_integration_se_matches_noise_spread(seed):
    rng = np.random.default_rng(seed)
    betas = beta_ladder(15, beta_min=1e-5)
    means = 5e3 + 4.0 / (betas + 1e-3)
    ses = rng.uniform(0.5, 2.0, betas.shape) / betas**0.5
    prior_mean, prior_se = 5e3 + 4e3, 30.0
    clean, se = thermodynamic_integration(
        betas, means, ses, prior_mean_nloss=prior_mean, prior_mean_nloss_se=prior_se
    )
    num_reps = 2000
    noisy_means = means + ses * rng.normal(size=(num_reps, betas.size))
    noisy_prior = prior_mean + prior_se * rng.normal(size=num_reps)
    estimates = np.array([
        thermodynamic_integration(betas, m, ses, prior_mean_nloss=p, prior_mean_nloss_se=prior_se)[0]
        for m, p in zip(noisy_means, noisy_prior)
    ])
    z = (estimates - clean) / se
    # z is exactly N(0, 1) if se is right: sample mean se 1/√R, sample std se 1/√(2R).
    assert abs(z.mean()) < 4 / math.sqrt(num_reps)
    assert abs(z.std(ddof=1) - 1) < 4 / math.sqrt(2 * num_reps)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"betas": [0.1, 0.5, 0.9]}, "betas"),
     ({"betas": [0.5, 0.1, 1.0]}, "betas"),
     ({"betas": [0.0, 0.5, 1.0]}, "betas"),
     ({"mean_nloss": [1.0, np.nan, 2.0]}, "mean_nloss"),
     ({"mean_nloss": [1.0, 2.0]}, "mean_nloss"),
     ({"mean_nloss_se": [1.0, -1.0, 1.0]}, "mean_nloss_se"),
     ({"prior_mean_nloss": np.inf}, "prior_mean_nloss"),
     ({"prior_mean_nloss": 1.0, "prior_mean_nloss_se": -1.0}, "prior_mean_nloss_se")],
)
def test_thermodynamic_integration_rejects_bad_input(kwargs, name):
    args = {"betas": [0.01, 0.1, 1.0], "mean_nloss": [3.0, 2.0, 1.0],
            "mean_nloss_se": [0.1, 0.1, 0.1]} | kwargs
    with pytest.raises(ValueError, match=name):
        thermodynamic_integration(**args)


# --- WBIC ---------------------------------------------------------------------------------


def test_wbic_is_the_mean_at_beta_star():
    assert wbic(np.float32(12.5)) == 12.5
    with pytest.raises(ValueError, match="mean_nloss_at_beta_star"):
        wbic(float("nan"))


# --- λ from temperatures ------------------------------------------------------------------


def _wbic_grid(num_samples, num_rungs):
    """β*·(1 ± 1/√(2 log n)) around β* = 1/log n (docs/mathematics.md §4.5)."""
    log_n = math.log(num_samples)
    return np.linspace(1 - 1 / math.sqrt(2 * log_n), 1 + 1 / math.sqrt(2 * log_n), num_rungs) / log_n


@pytest.mark.parametrize("seed", SEEDS)
def test_llc_from_slope_recovers_lambda_within_se(seed):
    rng = np.random.default_rng(seed)
    betas = _wbic_grid(10_000, 5)
    llc, nloss_min = 3.5, 1.0e4
    ses = rng.uniform(0.2, 1.0, betas.shape)
    means = nloss_min + llc / betas + ses * rng.normal(size=betas.shape)
    estimate, se = llc_from_slope(betas, means, ses)
    assert abs(estimate - llc) < 4 * se
    assert se < 0.5 * llc  # the check above is informative, not vacuous


@pytest.mark.parametrize("seed", SEEDS)
def test_llc_from_slope_se_matches_noise_spread(seed):
    rng = np.random.default_rng(seed)
    betas = _wbic_grid(10_000, 4)
    llc, nloss_min = 2.0, 500.0
    ses = rng.uniform(0.1, 0.5, betas.shape)
    num_reps = 4000
    noisy = nloss_min + llc / betas + ses * rng.normal(size=(num_reps, betas.size))
    estimates = np.array([llc_from_slope(betas, m, ses) for m in noisy])
    z = (estimates[:, 0] - llc) / estimates[:, 1]
    # Unbiased linear estimator with exact se: z ~ N(0, 1).
    assert abs(z.mean()) < 4 / math.sqrt(num_reps)
    assert abs(z.std(ddof=1) - 1) < 4 / math.sqrt(2 * num_reps)


@pytest.mark.parametrize("seed", SEEDS)
def test_llc_from_two_temperatures_se_matches_noise_spread(seed):
    rng = np.random.default_rng(seed)
    b1, b2 = 0.08, 0.12
    llc, nloss_min = 1.5, 300.0
    se1, se2 = rng.uniform(0.1, 0.5, 2)
    num_reps = 4000
    e1 = nloss_min + llc / b1 + se1 * rng.normal(size=num_reps)
    e2 = nloss_min + llc / b2 + se2 * rng.normal(size=num_reps)
    estimates = np.array([llc_from_two_temperatures(b1, x1, b2, x2, se1, se2)
                          for x1, x2 in zip(e1, e2)])
    z = (estimates[:, 0] - llc) / estimates[:, 1]
    assert abs(z.mean()) < 4 / math.sqrt(num_reps)
    assert abs(z.std(ddof=1) - 1) < 4 / math.sqrt(2 * num_reps)
    # Two rungs give the same answer as the weighted fit through them.
    np.testing.assert_allclose(
        llc_from_two_temperatures(b1, e1[0], b2, e2[0], se1, se2),
        llc_from_slope([b1, b2], [e1[0], e2[0]], [se1, se2]), rtol=1e-12,
    )


def test_variance_and_mean_estimates_agree_on_linear_gaussian():
    # Regular model at w* = ŵ, β ≫ γ/h: both estimate ½ Σ (βh/(γ+βh))^k ≈ d/2.
    problem = _make_problem(seed=6, num_samples=50_000, dim=6, gamma=1.0)
    problem = problem._replace(offsets=np.zeros(6))
    betas = _wbic_grid(50_000, 3)
    means, variances = _moments(problem, betas)
    from_variance = llc_from_variance(betas, variances)
    from_slope, _ = llc_from_slope(betas, means, np.ones(3))
    # Corrections are O(γ/(β h_min)) ≈ 1e-3 here.
    np.testing.assert_allclose(from_variance, 3.0, rtol=1e-2)
    assert from_slope == pytest.approx(3.0, rel=1e-2)
    assert llc_from_variance(0.5, 8.0) == 2.0


def test_llc_estimators_reject_bad_input():
    with pytest.raises(ValueError, match="mean_nloss_se"):
        llc_from_slope([0.1, 0.2], [1.0, 2.0], [0.1, 0.0])
    with pytest.raises(ValueError, match="betas"):
        llc_from_slope([0.1, 0.1], [1.0, 2.0], [0.1, 0.1])
    with pytest.raises(ValueError, match="beta1 and beta2"):
        llc_from_two_temperatures(0.1, 1.0, 0.1, 2.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="se2"):
        llc_from_two_temperatures(0.1, 1.0, 0.2, 2.0, 0.1, -0.1)
    with pytest.raises(ValueError, match="beta"):
        llc_from_variance(1.5, 1.0)
    with pytest.raises(ValueError, match="var_nloss"):
        llc_from_variance(0.5, -1.0)
