"""Tests for slt_jax.estimators.diagnostics on synthetic AR(1) traces."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import lfilter

from slt_jax.estimators.diagnostics import (
    DEFAULT_RHAT_THRESHOLD,
    chain_diagnostics,
    effective_sample_size,
    ess_per_chain,
    mcse_mean,
    split_rhat,
)

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier

SEEDS = tuple(range(8))


def _ar1(rng, phi, num_chains, num_draws, start=None):
    """Stationary AR(1) with unit marginal variance, x_t = φ x_{t−1} + √(1−φ²) ε_t.

    ``start`` (one value per chain) replaces the stationary first draw, to start chains apart.
    """
    innovations = rng.normal(size=(num_chains, num_draws)) * math.sqrt(1 - phi**2)
    innovations[:, 0] = rng.normal(size=num_chains) if start is None else start
    return lfilter([1.0], [1.0, -phi], innovations, axis=1)


def _ess_relative_se(phi, num_total):
    """Relative standard error of an autocorrelation-time estimate (Sokal 1997, eq. 3.19).

    var(τ̂)/τ² ≈ 2(2M + 1)/N for a summation window M; Geyer's initial sequence stops
    about where ρ_k = φ^k falls to the noise level 1/√N, which gives M.
    """
    window = math.ceil(math.log(1 / math.sqrt(num_total)) / math.log(phi))
    return math.sqrt(2 * (2 * window + 1) / num_total)


@pytest.mark.parametrize("phi", [0.5, 0.9])
def test_ess_of_ar1_matches_theory(phi):
    num_chains, num_draws = 4, 20_000
    num_total = num_chains * num_draws
    expected = num_total * (1 - phi) / (1 + phi)
    rel_se = _ess_relative_se(phi, num_total)
    ratios = np.array([
        effective_sample_size(_ar1(np.random.default_rng(s), phi, num_chains, num_draws))
        for s in SEEDS
    ]) / expected
    # Each seed within 4 relative se; their mean within 4 se of the mean (Sokal's se,
    # checked against 200 replicates while writing this: 0.044 vs 0.052 at φ = 0.9).
    assert np.all(np.abs(ratios - 1) < 4 * rel_se)
    assert abs(ratios.mean() - 1) < 4 * rel_se / math.sqrt(len(SEEDS))


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_ess_per_chain_of_ar1_matches_theory(seed):
    phi, num_chains, num_draws = 0.5, 3, 20_000
    per_chain = ess_per_chain(_ar1(np.random.default_rng(seed), phi, num_chains, num_draws))
    assert per_chain.shape == (num_chains,)
    expected = num_draws * (1 - phi) / (1 + phi)
    assert np.all(np.abs(per_chain / expected - 1) < 4 * _ess_relative_se(phi, num_draws))


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_anticorrelated_draws_keep_a_positive_bounded_ess(seed):
    """AR(1) with φ = −0.9 (an oscillating chain): numpyro's integrated time goes negative; the ESS is
    kept at Stan's bound N·log₁₀(N), so the MCSE stays a finite positive number, without a warning."""
    trace = _ar1(np.random.default_rng(seed), -0.9, 2, 40)
    bound = trace.size * math.log10(trace.size)
    with np.errstate(all="raise"):
        ess, mcse = effective_sample_size(trace), mcse_mean(trace)
    assert 0 < ess <= bound and math.isfinite(mcse) and mcse > 0


def test_single_chain_is_supported():
    trace = _ar1(np.random.default_rng(0), 0.5, 1, 5000)
    assert effective_sample_size(trace) == pytest.approx(ess_per_chain(trace)[0])
    assert abs(split_rhat(trace) - 1) < 0.02


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_mcse_matches_spread_of_means(seed):
    rng = np.random.default_rng(seed)
    phi, num_reps = 0.9, 1000
    z = np.array([
        trace.mean() / mcse_mean(trace) for trace in (_ar1(rng, phi, 4, 1000) for _ in range(num_reps))
    ])
    # The true mean is 0, so z = mean/MCSE. E[z²] ≈ E[ESŜ]/ESS: std(z) is 1 up to half the
    # ESS estimator's relative bias (allow 0.05, i.e. a 10 % bias; measured −0.5 %), plus
    # the sample std's own sampling se 1/√(2R). Ignoring autocorrelation would give √19.
    tolerance = 4 / math.sqrt(2 * num_reps) + 0.05
    assert abs(z.std() - 1) < tolerance


@pytest.mark.parametrize("seed", SEEDS)
def test_split_rhat_of_iid_chains_is_one(seed):
    num_chains, num_draws = 4, 2000
    trace = np.random.default_rng(seed).normal(size=(num_chains, num_draws))
    # With M = 2C half-chains of N/2 draws, R̂² = 1 + (χ²_{M−1}/(M−1) − 1)/(N/2), so
    # sd(R̂) ≈ √(2/(M−1)) / N.
    halves = 2 * num_chains
    sd = math.sqrt(2 / (halves - 1)) / num_draws
    assert abs(split_rhat(trace) - 1) < 5 * sd
    assert not chain_diagnostics(trace).rhat_flagged


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_split_rhat_flags_a_stuck_chain(seed):
    trace = _ar1(np.random.default_rng(seed), 0.5, 4, 1000)
    trace[3] += 3.0  # one chain in another basin, 3 sd away
    rhat = split_rhat(trace)
    # Half-chain means {0 ×6, 3 ×2}: variance 1.93 vs unit within-variance, R̂ ≈ √2.93.
    assert rhat > 1.5
    assert chain_diagnostics(trace).rhat_flagged


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_split_rhat_flags_chains_started_apart(seed):
    # Relaxation time ~1/(1−φ) = 1000 draws, as long as the run: chains have not mixed.
    start = np.array([-5.0, -2.0, 2.0, 5.0])
    trace = _ar1(np.random.default_rng(seed), 0.999, 4, 1000, start=start)
    assert split_rhat(trace) > 1.5
    assert chain_diagnostics(trace).rhat_flagged


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_split_rhat_flags_a_single_drifting_chain(seed):
    # One chain still relaxing from 10 (time constant 100 draws): its halves disagree.
    trace = _ar1(np.random.default_rng(seed), 0.99, 1, 1000, start=np.array([10.0]))
    assert split_rhat(trace) > 1.1


def test_chain_diagnostics_fields_and_json():
    trace = jnp.asarray(_ar1(np.random.default_rng(0), 0.5, 4, 500))
    diagnostics = chain_diagnostics(trace)
    assert diagnostics.ess == pytest.approx(effective_sample_size(trace))
    np.testing.assert_allclose(diagnostics.ess_per_chain, ess_per_chain(trace))
    assert diagnostics.rhat == pytest.approx(split_rhat(trace))
    assert diagnostics.mcse == pytest.approx(mcse_mean(trace))
    as_dict = json.loads(json.dumps(diagnostics.to_dict(), allow_nan=False))
    assert set(as_dict) == {"ess", "ess_per_chain", "rhat", "mcse", "rhat_flagged"}
    assert len(as_dict["ess_per_chain"]) == 4
    assert DEFAULT_RHAT_THRESHOLD == 1.01


def test_constant_trace_gives_nan_flagged_and_json_nulls():
    diagnostics = chain_diagnostics(np.ones((2, 10)))
    assert math.isnan(diagnostics.ess) and math.isnan(diagnostics.rhat)
    assert diagnostics.rhat_flagged
    as_dict = json.loads(json.dumps(diagnostics.to_dict(), allow_nan=False))
    assert as_dict["ess"] is None and as_dict["ess_per_chain"] == [None, None]


def test_threshold_is_respected():
    trace = _ar1(np.random.default_rng(1), 0.5, 4, 1000)
    trace[3] += 0.3
    rhat = split_rhat(trace)
    assert chain_diagnostics(trace, rhat_threshold=rhat + 1e-6).rhat_flagged is False
    assert chain_diagnostics(trace, rhat_threshold=rhat - 1e-6).rhat_flagged is True


@pytest.mark.parametrize(
    ("trace", "function"),
    [(np.zeros(10), effective_sample_size),
     (np.zeros((2, 10, 3)), ess_per_chain),
     (np.zeros((2, 1)), effective_sample_size),
     (np.zeros((2, 3)), split_rhat),
     (np.zeros((0, 10)), mcse_mean),
     (np.array([[0.0, 1.0, np.nan, 2.0, 3.0]]), chain_diagnostics)],
)
def test_bad_traces_are_rejected(trace, function):
    with pytest.raises(ValueError, match="trace"):
        function(trace)


def test_threshold_below_one_is_rejected():
    with pytest.raises(ValueError, match="rhat_threshold"):
        chain_diagnostics(np.random.default_rng(0).normal(size=(2, 10)), rhat_threshold=0.99)
