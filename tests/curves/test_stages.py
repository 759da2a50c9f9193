"""Stage detection (arXiv:2402.02364) on synthetic curves with known stage boundaries."""

import numpy as np
import pytest
from scipy import stats

from slt_jax.curves.stages import detect_stages

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier

STEPS = np.unique(np.round(np.logspace(1.5, 5.0, 200)))
X = np.log10(STEPS + 1.0)
# Heteroscedastic noise, larger late in training, as λ̂ standard errors often are.
SE = 0.05 + 0.1 * (X - X[0]) / (X[-1] - X[0])
TOLERANCE = 0.1  # decades


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def _staircase(x):
    return 2.0 + sum(3.0 * _sigmoid((x - centre) / 0.05) for centre in (2.0, 3.0, 4.0))


def _peak(x):
    return 1.0 + 3.0 * _sigmoid((x - 2.5) / 0.1) - 3.0 * _sigmoid((x - 3.5) / 0.1)


def _log_boundaries(stages):
    return np.log10(stages.boundaries + 1.0)


def _allowed_failures(num_seeds, rate):
    """Failures that ``num_seeds`` seeds exceed with probability ≤ 1e-3 at this rate."""
    return int(stats.binom.isf(1e-3, num_seeds, rate))


@pytest.mark.parametrize(
    "curve, critical_points, last_centre, width",
    [(_staircase, [2.5, 3.5], 4.0, 0.05), (_peak, [3.0], 3.5, 0.1)],
    ids=["staircase", "peak"],
)
def test_noise_free_boundaries_are_critical_points_and_plateau_onsets(
    curve, critical_points, last_centre, width
):
    stages = detect_stages(STEPS, curve(X), SE)
    found = _log_boundaries(stages)
    interior = found[(found > critical_points[0] - 0.3) & (found < critical_points[-1] + 0.3)]
    np.testing.assert_allclose(interior, critical_points, atol=TOLERANCE)
    # The final plateau starts where the smoothed slope drops below the threshold: after
    # the last sigmoid is 88 % done (2 widths) and within 4 standard deviations of the
    # smoothed slope bump (the kernel convolved with the sigmoid's derivative, whose
    # standard deviation is π·width/√3).
    bump_sd = np.hypot(stages.smoothing, np.pi * width / np.sqrt(3.0))
    assert last_centre + 2 * width < found[-1] < last_centre + 4 * bump_sd


def _noise(given_se):
    """Per-point noise: heteroscedastic when passed, constant when it must be estimated."""
    return SE if given_se else np.full(X.size, 0.1)


@pytest.mark.parametrize("curve", [_staircase, _peak], ids=["staircase", "peak"])
@pytest.mark.parametrize("given_se", [True, False], ids=["se", "estimated"])
def test_noisy_boundaries_match_noise_free_ones(curve, given_se):
    noise = _noise(given_se)
    reference = _log_boundaries(detect_stages(STEPS, curve(X), noise))
    num_seeds, alpha = 20, 0.01
    failures = 0
    for seed in range(num_seeds):
        noisy = curve(X) + noise * np.random.default_rng(seed).normal(size=X.size)
        stages = detect_stages(STEPS, noisy, noise if given_se else None, alpha=alpha)
        found = _log_boundaries(stages)
        failures += found.shape != reference.shape or np.abs(found - reference).max() > TOLERANCE
    # A seed fails through a spurious episode (probability ≤ alpha by the tube formula)
    # or a boundary outlier beyond ±0.1 decade (≈ 6 standard deviations of a boundary's
    # location; measured < 1 % over 300 seeds); bound the count at rate 2 · alpha.
    assert failures <= _allowed_failures(num_seeds, 2 * alpha)


@pytest.mark.parametrize("given_se", [True, False], ids=["se", "estimated"])
def test_flat_noisy_curve_has_no_boundaries(given_se):
    noise = _noise(given_se)
    num_seeds, alpha = 100, 0.05
    spurious = 0
    for seed in range(num_seeds):
        noisy = 1.0 + noise * np.random.default_rng(1000 + seed).normal(size=X.size)
        stages = detect_stages(STEPS, noisy, noise if given_se else None, alpha=alpha)
        spurious += stages.boundaries.size > 0
    # alpha bounds the probability of any significant slope on a trendless curve.
    assert spurious <= _allowed_failures(num_seeds, alpha)


def test_irregular_checkpoints_with_step_zero():
    # Log- and linearly spaced checkpoints merged, plus initialisation, as in arXiv:2402.02364.
    steps = np.unique(np.concatenate([[0.0], STEPS[::2], np.linspace(2e3, 1e5, 150).round()]))
    x = np.log10(steps + 1.0)
    noisy = _staircase(x) + 0.05 * np.random.default_rng(0).normal(size=x.size)
    found = _log_boundaries(detect_stages(steps, noisy, np.full(x.size, 0.05)))
    interior = found[(found > 2.2) & (found < 3.8)]
    np.testing.assert_allclose(interior, [2.5, 3.5], atol=TOLERANCE)


def test_stages_outputs_and_helpers():
    stages = detect_stages(STEPS, _staircase(X), SE)
    n = STEPS.size
    for name in ("smoothed", "slope", "slope_se", "standard_errors"):
        assert getattr(stages, name).shape == (n,)
    np.testing.assert_allclose(stages.smoothed, _staircase(X), atol=0.5)
    assert np.all(np.diff(stages.boundaries) > 0)
    intervals = stages.intervals
    assert intervals.shape == (stages.boundaries.size + 1, 2)
    assert intervals[0, 0] == STEPS[0] and intervals[-1, 1] == STEPS[-1]
    np.testing.assert_array_equal(intervals[1:, 0], stages.boundaries)
    assert stages.stage_of(STEPS[0]) == 0
    assert stages.stage_of(STEPS[-1]) == stages.boundaries.size
    np.testing.assert_array_equal(
        stages.stage_of(stages.boundaries), np.arange(1, stages.boundaries.size + 1)
    )
    assert stages.plateaus.shape[1] == 2


def test_slope_of_a_line_in_log_step():
    stages = detect_stages(STEPS, 1.0 + 2.0 * X, SE)
    np.testing.assert_allclose(stages.slope, 2.0, rtol=1e-8)
    np.testing.assert_allclose(stages.smoothed, 1.0 + 2.0 * X, rtol=1e-8)


def test_underreported_standard_errors_are_scaled_up():
    noisy = 1.0 + 0.2 * np.random.default_rng(0).normal(size=X.size)
    stages = detect_stages(STEPS, noisy, np.full(X.size, 0.02))
    assert 0.15 < stages.standard_errors[0] < 0.25
    assert stages.boundaries.size == 0


@pytest.mark.parametrize(
    "steps, values, standard_errors, smoothing, match",
    [
        ([3.0, 1.0, 2.0], [0.0, 1.0, 2.0], None, 0.1, "steps"),
        ([1.0, 1.0, 2.0], [0.0, 1.0, 2.0], None, 0.1, "steps"),
        ([-1.0, 1.0, 2.0], [0.0, 1.0, 2.0], None, 0.1, "steps"),
        ([1.0, 2.0], [0.0, 1.0], None, 0.1, "steps"),
        ([1.0, 2.0, 3.0], [0.0, 1.0], None, 0.1, "values"),
        ([1.0, 2.0, 3.0], [0.0, np.nan, 2.0], None, 0.1, "values"),
        ([1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [1.0, 1.0], 0.1, "standard_errors"),
        ([1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], 0.1, "standard_errors"),
        ([1.0, 2.0, 3.0], [0.0, 1.0, 0.0], None, 0.0, "smoothing"),
        ([1.0, 2.0, 3.0], [0.0, 1.0, 0.0], None, -1.0, "smoothing"),
    ],
)
def test_bad_input_names_the_argument(steps, values, standard_errors, smoothing, match):
    with pytest.raises(ValueError, match=match):
        detect_stages(steps, values, standard_errors, smoothing=smoothing)


def test_bad_alpha_names_the_argument():
    with pytest.raises(ValueError, match="alpha"):
        detect_stages(STEPS, _staircase(X), SE, alpha=1.5)
