"""Early-warning indicators (Scheffer et al., Nature 461, 2009) on simulated series."""

import numpy as np
import pytest
from scipy import stats

from slt_jax.curves.early_warning import early_warning

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier

NUM_SURROGATES = 200  # p-value resolution 1/201, ample for a 0.05 level


def _fold_approach(seeds, num_samples=600, sample_dt=0.5, substeps=25, noise=0.003):
    """Saddle-node normal form dx = (r(t) + x²) dt + noise dW, sampled every ``sample_dt``.

    Starting at the stable branch x* = −√(−r), r(t) rises toward 0 so that the relaxation
    rate 2√(−r) falls linearly from 2 to 0.1: lag-1 autocorrelation exp(−rate · dt) rises
    from 0.37 to 0.95. Euler–Maruyama, vectorised over seeds.
    """
    rng = np.random.default_rng(seeds)
    dt = sample_dt / substeps
    total = num_samples * substeps
    rate = np.linspace(2.0, 0.1, total)
    increments = noise * np.sqrt(dt) * rng.normal(size=(total, len(seeds)))
    x = np.full(len(seeds), -1.0)
    samples = np.empty((len(seeds), num_samples))
    for i in range(total):
        x = x + (x * x - (rate[i] / 2) ** 2) * dt + increments[i]
        if i % substeps == substeps - 1:
            samples[:, i // substeps] = x
    return samples, rate[substeps - 1 :: substeps]


def _stationary_ar1(seed, num_samples=600, coefficient=0.7):
    rng = np.random.default_rng(seed)
    burn_in = 100
    shocks = rng.normal(size=num_samples + burn_in)
    x = np.zeros_like(shocks)
    for t in range(1, x.size):
        x[t] = coefficient * x[t - 1] + shocks[t]
    return x[burn_in:]


def test_fold_approach_shows_rising_autocorrelation_and_variance():
    seeds = list(range(10))
    series, rate = _fold_approach(seeds)
    # The simulation must stay on the stable branch (below the saddle at +rate/2).
    assert np.all(series < rate / 2)
    significant_ac = significant_variance = 0
    for seed, values in zip(seeds, series):
        result = early_warning(values, seed=seed, num_surrogates=NUM_SURROGATES)
        assert result.tau_autocorrelation > 0.5 and result.tau_variance > 0.5
        significant_ac += result.p_autocorrelation < 0.05
        significant_variance += result.p_variance < 0.05
    # Power at p < 0.05 measured over 100 seeds: 0.97 (AC1), 0.99 (variance). Allow the
    # number of misses exceeded with probability ≤ 1e-3 at a 0.05 miss rate.
    allowed_misses = int(stats.binom.isf(1e-3, len(seeds), 0.05))
    assert significant_ac >= len(seeds) - allowed_misses
    assert significant_variance >= len(seeds) - allowed_misses


def test_stationary_ar1_rarely_significant():
    num_seeds = 30
    false_ac = false_variance = 0
    for seed in range(num_seeds):
        result = early_warning(
            _stationary_ar1(100 + seed), seed=seed, num_surrogates=NUM_SURROGATES
        )
        false_ac += result.p_autocorrelation < 0.05
        false_variance += result.p_variance < 0.05
    # Under a stationary null each p-value is below 0.05 with probability ≤ 0.05; the
    # count of such seeds is Binomial(30, 0.05), exceeding this bound with prob. ≤ 1e-3.
    allowed = int(stats.binom.isf(1e-3, num_seeds, 0.05))
    assert false_ac <= allowed
    assert false_variance <= allowed


def test_rolling_indicators_and_tau_match_direct_computation():
    values = np.random.default_rng(0).normal(size=50).cumsum()
    window = 20
    result = early_warning(values, seed=0, window=window, detrend="linear", num_surrogates=10)
    np.testing.assert_array_equal(result.times, np.arange(window - 1, values.size))
    for k, t in enumerate(result.times):
        segment = result.residuals[t - window + 1 : t + 1]
        np.testing.assert_allclose(result.variance[k], np.var(segment, ddof=1), rtol=1e-9)
        direct = np.corrcoef(segment[:-1], segment[1:])[0, 1]
        np.testing.assert_allclose(result.autocorrelation[k], direct, rtol=1e-9)
    tau = stats.kendalltau(result.times, result.variance).statistic
    np.testing.assert_allclose(result.tau_variance, tau, rtol=1e-12)
    tau = stats.kendalltau(result.times, result.autocorrelation).statistic
    np.testing.assert_allclose(result.tau_autocorrelation, tau, rtol=1e-12)
    np.testing.assert_allclose(result.trend + result.residuals, values)


@pytest.mark.parametrize("detrend", ["gaussian", "linear", "none"])
def test_detrend_removes_what_it_promises(detrend):
    time = np.arange(200.0)
    values = 3.0 + 0.05 * time + np.random.default_rng(1).normal(size=200)
    result = early_warning(values, seed=0, detrend=detrend, num_surrogates=10)
    assert result.window == 100 and result.times.shape == (101,)
    if detrend == "none":
        np.testing.assert_allclose(result.trend, values.mean())
    else:
        # Local linear and global linear fits both reproduce a line: no slope is left.
        np.testing.assert_allclose(np.polyfit(time, result.residuals, 1)[0], 0.0, atol=1e-3)


def test_p_values_are_surrogate_fractions_and_reproducible():
    values = _stationary_ar1(7, num_samples=120)
    first = early_warning(values, seed=3, num_surrogates=99)
    second = early_warning(values, seed=3, num_surrogates=99)
    assert first.p_autocorrelation == second.p_autocorrelation
    for p in (first.p_variance, first.p_autocorrelation):
        assert 0 < p <= 1
        assert np.isclose(p * 100, round(p * 100))


@pytest.mark.parametrize(
    "values, kwargs, match",
    [
        (np.arange(5.0), {}, "values"),
        (np.ones((10, 2)), {}, "values"),
        (np.array([0.0, 1.0, np.inf, 2.0, 3.0, 4.0, 5.0]), {}, "values"),
        (np.ones(40), {}, "values"),
        (np.arange(40.0) % 3, {"window": 3}, "window"),
        (np.arange(40.0) % 3, {"window": 39}, "window"),
        (np.arange(40.0) % 3, {"window": 10.5}, "window"),
        (np.arange(40.0) % 3, {"detrend": "cubic"}, "detrend"),
        (np.arange(40.0) % 3, {"bandwidth": 0.5}, "bandwidth"),
        (np.arange(40.0) % 3, {"num_surrogates": 0}, "num_surrogates"),
    ],
)
def test_bad_input_names_the_argument(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        early_warning(values, seed=0, **kwargs)
