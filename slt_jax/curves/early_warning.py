"""Early-warning indicators of a critical transition in any scalar series (λ̂, loss, …).

Scheffer et al., *Early-warning signals for critical transitions* (Nature 461, 2009):
approaching a bifurcation, a system recovers ever more slowly from perturbations
(critical slowing down), so the variance and lag-1 autocorrelation of its fluctuations
rise. The recipe follows Dakos et al. (PLoS ONE 7, e41010, 2012): remove the slow trend,
compute both indicators in a rolling window, measure their trend with Kendall's τ against
time, and compare τ with its distribution under a stationary null.

The null is built from phase-randomised surrogates of the residuals (Theiler et al.,
Physica D 58, 1992): each keeps the residuals' power spectrum — hence their whole
autocorrelation function and variance — and draws the Fourier phases uniformly, which
makes the surrogate stationary. The p-value of an indicator is ``(1 + #{τ_surrogate ≥ τ})
/ (1 + num_surrogates)``: the fraction of surrogates trending at least as strongly, with
the observed series counted among them so that it is never zero.

Samples are taken as equally spaced in time; for checkpoints on a log grid the indicators
are per checkpoint.
"""

from typing import NamedTuple

import numpy as np

_DETRENDS = ("gaussian", "linear", "none")
_SURROGATE_CHUNK = 128
_DETREND_CHUNK_ELEMENTS = 1 << 21


class EarlyWarning(NamedTuple):
    """Rolling early-warning indicators and the significance of their trends.

    Attributes:
      window: rolling window length in samples.
      times: index of the last sample of each window, shape ``(m,)``, m = n − window + 1.
      variance: rolling variance of the residuals, shape ``(m,)``.
      autocorrelation: rolling lag-1 autocorrelation of the residuals, shape ``(m,)``.
      tau_variance: Kendall's τ of ``variance`` against ``times``.
      tau_autocorrelation: Kendall's τ of ``autocorrelation`` against ``times``.
      p_variance: one-sided surrogate p-value of ``tau_variance`` (small: rising).
      p_autocorrelation: one-sided surrogate p-value of ``tau_autocorrelation``.
      trend: the removed trend, shape ``(n,)``.
      residuals: ``values − trend``, shape ``(n,)``.
      num_surrogates: number of phase-randomised surrogates behind the p-values.
    """

    window: int
    times: np.ndarray
    variance: np.ndarray
    autocorrelation: np.ndarray
    tau_variance: float
    tau_autocorrelation: float
    p_variance: float
    p_autocorrelation: float
    trend: np.ndarray
    residuals: np.ndarray
    num_surrogates: int


def early_warning(
    values,
    *,
    seed,
    window: int | None = None,
    detrend: str = "gaussian",
    bandwidth: float | None = None,
    num_surrogates: int = 1000,
) -> EarlyWarning:
    """Rolling variance and lag-1 autocorrelation, their Kendall-τ trends and p-values.

    Scheffer et al., Nature 461 (2009); procedure of Dakos et al., PLoS ONE 7 (2012);
    surrogates as in the module docstring.

    Args:
      values: the series, shape ``(n,)``, equally spaced in time, n ≥ 6.
      seed: randomness for the surrogates; anything ``numpy.random.default_rng`` accepts.
      window: rolling window in samples, 4 ≤ window ≤ n − 2; default ``n // 2``.
      detrend: ``"gaussian"`` (local linear regression with a Gaussian kernel),
        ``"linear"`` (least-squares line) or ``"none"`` (mean only).
      bandwidth: Gaussian kernel standard deviation in samples (≥ 1) for
        ``detrend="gaussian"``; default ``n / 10``.
      num_surrogates: number of phase-randomised surrogates (≥ 1).

    Returns:
      An ``EarlyWarning``.

    Raises:
      ValueError: naming the offending argument.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size < 6:
        raise ValueError(f"values must be a 1-D series of at least 6 samples, got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    n = values.size
    window = n // 2 if window is None else window
    if not isinstance(window, (int, np.integer)) or not 4 <= window <= n - 2:
        raise ValueError(f"window must be an integer in [4, {n - 2}] for {n} values, got {window}")
    if not isinstance(num_surrogates, (int, np.integer)) or num_surrogates < 1:
        raise ValueError(f"num_surrogates must be a positive integer, got {num_surrogates}")
    trend = _trend(values, detrend, bandwidth)
    residuals = values - trend

    variance, autocorrelation = _rolling_indicators(residuals[None, :], window)
    # Below this the residuals are rounding error of the trend: a constant window.
    if np.any(np.sqrt(np.maximum(variance, 0.0)) <= 1e-12 * np.abs(values).max()):
        raise ValueError("values minus their trend are constant over a window")
    times = np.arange(window - 1, n)
    tau_variance, tau_autocorrelation = _kendall_tau(variance)[0], _kendall_tau(autocorrelation)[0]

    rng = np.random.default_rng(seed)
    exceed_variance = exceed_autocorrelation = 0
    for start in range(0, num_surrogates, _SURROGATE_CHUNK):
        count = min(_SURROGATE_CHUNK, num_surrogates - start)
        null_variance, null_autocorrelation = _rolling_indicators(
            _phase_randomised(residuals, count, rng), window
        )
        exceed_variance += int(np.sum(_kendall_tau(null_variance) >= tau_variance))
        exceed_autocorrelation += int(
            np.sum(_kendall_tau(null_autocorrelation) >= tau_autocorrelation)
        )
    return EarlyWarning(
        window=int(window),
        times=times,
        variance=variance[0],
        autocorrelation=autocorrelation[0],
        tau_variance=float(tau_variance),
        tau_autocorrelation=float(tau_autocorrelation),
        p_variance=(1 + exceed_variance) / (1 + num_surrogates),
        p_autocorrelation=(1 + exceed_autocorrelation) / (1 + num_surrogates),
        trend=trend,
        residuals=residuals,
        num_surrogates=int(num_surrogates),
    )


def _trend(values, detrend, bandwidth):
    """The slow trend removed before the indicators are computed."""
    n = values.size
    time = np.arange(n, dtype=float)
    if detrend == "none":
        return np.full(n, values.mean())
    if detrend == "linear":
        return np.polyval(np.polyfit(time, values, 1), time)
    if detrend != "gaussian":
        raise ValueError(f"detrend must be one of {_DETRENDS}, got {detrend!r}")
    bandwidth = n / 10.0 if bandwidth is None else bandwidth
    if not np.isfinite(bandwidth) or bandwidth < 1:
        raise ValueError(f"bandwidth must be at least 1 sample, got {bandwidth}")
    trend = np.empty(n)
    rows = max(1, _DETREND_CHUNK_ELEMENTS // n)
    for start in range(0, n, rows):
        offset = time[None, :] - time[start : start + rows, None]
        weights = np.exp(-0.5 * (offset / bandwidth) ** 2)
        s0 = weights.sum(axis=1)
        s1 = (weights * offset).sum(axis=1)
        s2 = (weights * offset**2).sum(axis=1)
        weighted = weights @ values
        weighted_offset = (weights * offset) @ values
        trend[start : start + rows] = (s2 * weighted - s1 * weighted_offset) / (s0 * s2 - s1**2)
    return trend


def _rolling_indicators(series, window):
    """Rolling variance and lag-1 autocorrelation of each row of ``series``, windows ending at t."""

    def window_sums(x, length):
        cumulative = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, axis=-1)], -1)
        return cumulative[..., length:] - cumulative[..., :-length]

    def centred_products(a, b, length):
        return window_sums(a * b, length) - window_sums(a, length) * window_sums(b, length) / length

    variance = centred_products(series, series, window) / (window - 1)
    lead, lag = series[..., 1:], series[..., :-1]
    pairs = window - 1
    covariance = centred_products(lead, lag, pairs)
    scale = np.sqrt(centred_products(lead, lead, pairs) * centred_products(lag, lag, pairs))
    return variance, covariance / scale


def _kendall_tau(series):
    """Kendall's τ-b of each row of ``series`` against its (tie-free) index.

    Equals ``scipy.stats.kendalltau(np.arange(m), row).statistic``, vectorised over rows.
    """
    m = series.shape[-1]
    concordance = np.zeros(series.shape[:-1])
    tied = np.zeros(series.shape[:-1])
    for lag in range(1, m):
        difference = series[..., lag:] - series[..., :-lag]
        concordance += np.sign(difference).sum(axis=-1)
        tied += (difference == 0).sum(axis=-1)
    pairs = m * (m - 1) / 2
    return concordance / np.sqrt(pairs * (pairs - tied))


def _phase_randomised(residuals, count, rng):
    """``count`` surrogates with the power spectrum of ``residuals`` and uniform phases."""
    spectrum = np.fft.rfft(residuals)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(count, spectrum.size))
    phases[:, 0] = 0.0
    if residuals.size % 2 == 0:
        phases[:, -1] = 0.0  # the Nyquist coefficient of a real series is real
    return np.fft.irfft(np.abs(spectrum) * np.exp(1j * phases), n=residuals.size)
