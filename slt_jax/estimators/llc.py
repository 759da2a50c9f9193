"""The local learning coefficient as a pure function of sampled loss traces.

Lau et al., arXiv:2308.12108: ``λ̂(w*) = nβ·(E_{w∼p}[L_n(w)] − L_n(w*))``, the expectation over
the localized tempered posterior estimated by the mean of the draws of each chain.
"""

import math
from typing import NamedTuple

import numpy as np


def llc_draws(batch_loss, init_loss, nbeta, center_loss=None) -> np.ndarray:
    """Per-draw λ̂ values, ``(chains, draws)``.

    Args:
      batch_loss: L_B(w_t) at each draw, ``(chains, draws)``.
      init_loss: L_n(w*), exact on the full dataset.
      nbeta: nβ.
      center_loss: L_B(w*) on the same batch as ``batch_loss``, or ``None``. When given, the
        draw is ``nβ·(L_B(w_t) − L_B(w*))``: the same expectation (the batch is uniform, so
        E[L_B(w*)] = L_n(w*)) with the batch-to-batch noise cancelled — a control variate.

    Returns:
      ``nβ·(L_B(w_t) − L_n(w*))``, or the control-variate form.
    """
    batch_loss = np.asarray(batch_loss, np.float64)
    reference = init_loss if center_loss is None else np.asarray(center_loss, np.float64)
    return nbeta * (batch_loss - reference)


class LLCStatistics(NamedTuple):
    """λ̂ summarised over the healthy chains.

    Attributes:
      llc_mean: mean of the per-chain λ̂ over healthy chains (NaN if none).
      llc_std: standard deviation of the per-chain λ̂ (ddof=1; NaN with < 2 healthy chains).
      llc_se: standard error of ``llc_mean``, ``llc_std / sqrt(#healthy)``: chains are
        independent, so this includes the autocorrelation within chains.
      llc_per_chain: per-chain λ̂ (every chain, diverged ones included, for inspection).
    """

    llc_mean: float
    llc_std: float
    llc_se: float
    llc_per_chain: np.ndarray


def llc_statistics(draws, healthy) -> LLCStatistics:
    """Summarise per-draw λ̂ values ``(chains, draws)``, averaging only the ``healthy`` chains."""
    draws = np.asarray(draws, np.float64)
    healthy = np.asarray(healthy, bool)
    per_chain = draws.mean(axis=1)
    good = per_chain[healthy]
    if good.size == 0:
        return LLCStatistics(float("nan"), float("nan"), float("nan"), per_chain)
    std = float(good.std(ddof=1)) if good.size > 1 else float("nan")
    return LLCStatistics(float(good.mean()), std, std / np.sqrt(good.size), per_chain)


def escaped_chains(llc_per_chain, distance_trace, *, num_sampled: int, localization: float,
                   escape_llc: float = 10.0, distance_factor: float = 2.0):
    """Which chains slid away from w* instead of sampling around it.

    A chain has escaped when either

    - its λ̂ is below ``−escape_llc`` (−10): at a local minimum every exact draw of
      ``nβ·(L(w_t) − L(w*))`` is ≥ 0, so a chain averaging 10 nats below w*'s tempered loss
      found a way down (minibatch noise in the control-variate draws averages out far below
      that); or
    - its mean ``‖w_t − w*‖²`` over the second half of its draws exceeds
      ``distance_factor·num_sampled/γ`` (2×). The localizer alone gives
      ``E‖w − w*‖² = num_sampled/γ``, and a loss that does not decrease along any ray from w*
      only shrinks it (the radial weight ``exp(−nβ·ΔL)`` is non-increasing, and the Gaussian
      radius is independent of the direction), so a chain twice as far out was pulled by lower
      loss.

    Args:
      llc_per_chain: λ̂ of each chain, shape ``(chains,)``.
      distance_trace: ``‖w_t − w*‖²`` per draw, shape ``(chains, draws)``.
      num_sampled: number of sampled parameters (those the mask leaves free).
      localization: γ; with γ = 0 only the λ̂ rule applies.
      escape_llc, distance_factor: the two rules' thresholds.

    Returns:
      Boolean array, shape ``(chains,)``.
    """
    llc_per_chain = np.asarray(llc_per_chain, np.float64)
    distance = np.asarray(distance_trace, np.float64)
    if distance.ndim != 2 or distance.shape[0] != llc_per_chain.shape[0]:
        raise ValueError(
            f"distance_trace must have shape (chains, draws) = ({llc_per_chain.shape[0]}, …), "
            f"got {distance.shape}"
        )
    slid = llc_per_chain < -escape_llc
    if localization > 0:
        late = distance[:, distance.shape[1] // 2:].mean(axis=1)
        slid |= late > distance_factor * num_sampled / localization
    return slid


def halves_trend(draws) -> tuple[float, float]:
    """How much λ̂ moved within a run: second-half minus first-half mean, taken chain by chain.

    The difference is formed per chain and averaged, with its standard error from the spread of
    the chains' differences, so chains that sit at different levels — the slow modes of
    singular posteriors — do not hide a shared climb (docs/mathematics.md §3.7). With a single
    chain the standard error comes from the halves' own spreads (ignoring autocorrelation).

    Args:
      draws: per-draw λ̂ of the healthy chains, ``(chains, draws)``, at least 2 draws.

    Returns:
      ``(difference, standard error)``.
    """
    draws = np.asarray(draws, np.float64)
    half = draws.shape[1] // 2
    first, second = draws[:, :half], draws[:, half:]
    paired = second.mean(axis=1) - first.mean(axis=1)
    if paired.size > 1:
        return float(paired.mean()), float(np.std(paired, ddof=1) / math.sqrt(paired.size))
    spread = lambda x: float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(paired.mean()), math.hypot(spread(first), spread(second))


# A trend counts toward the bias term only beyond this many of its own standard errors (the
# positive part of Δ² − (z·se_Δ)²): in equilibrium that adds about 4 % to the standard error on
# average, where z = 1 would add about 20 %.
BIAS_TREND_Z = 2.0


def llc_uncertainty(draws, chain_se: float, *, step_bias: dict | None = None, step_ratio: float = 1.0) -> dict:
    """The honest standard error of λ̂: the chains' spread, plus what the run cannot see in it.

    The spread of the per-chain means measures the sampling error — autocorrelation included —
    but not a bias every chain shares (docs/mathematics.md §1.4): all chains start at w* and
    share the same unfinished burn-in, and all run at the same step size. Each is estimated and
    added in quadrature; the total is never below ``chain_se``:

    - **burn-in**: the chain-paired halves difference Δ ± se_Δ of the draws
      (:func:`halves_trend`). A run still relaxing reads its mean at least Δ/2 below its second
      half, so the bias term is ``½·√max(0, Δ² − (2·se_Δ)²)`` — zero for a trend within two of its
      standard errors, |Δ|/2 for a clear one (a lower bound for a slow climb, whose remaining
      distance the window does not show);
    - **step size** (calibrated runs): the pick's bias b ± se_b, extrapolated linearly in ε from
      the sweep's comparison (:func:`slt_jax.tuning.choice.choose_step_size`), scaled by
      ``step_ratio`` (the final step over the picked one, after any halving), as ``√(b² + se_b²)``:
      the bias is known only to within se_b, and a long final run's small spread must not hide
      it (on the noisy 4-3-4 DLN three of the first eight seeds' runs reported se ≈ 0.02 at
      +4–5 % from NUTS when only the squared estimate √max(0, b² − se_b²) was added).

    Intervals use Student's t with ``chains − 1`` degrees of freedom (:func:`llc_interval`).

    Args:
      draws: per-draw λ̂ of the healthy chains, ``(chains, draws)``.
      chain_se: the standard error from the chains' spread (the MCSE with one chain).
      step_bias: the calibration's ``{"estimate", "se"}`` for the picked step, or ``None``.
      step_ratio: final step size over the picked one.

    Returns:
      ``{"total", "chains", "burnin_bias", "trend", "trend_se", "step_bias", "dof"}``.
    """
    draws = np.asarray(draws, np.float64)
    out = {"chains": float(chain_se), "burnin_bias": 0.0, "trend": None, "trend_se": None, "step_bias": 0.0,
           "dof": max(1, draws.shape[0] - 1) if draws.shape[0] > 1 else None}
    if draws.ndim == 2 and draws.shape[0] >= 1 and draws.shape[1] >= 8:
        trend, trend_se = halves_trend(draws)
        if np.isfinite(trend) and np.isfinite(trend_se):
            out.update(trend=trend, trend_se=trend_se,
                       burnin_bias=0.5 * math.sqrt(max(0.0, trend**2 - (BIAS_TREND_Z * trend_se) ** 2)))
    if step_bias is not None and step_bias.get("estimate") is not None:
        b, se = step_ratio * float(step_bias["estimate"]), step_ratio * float(step_bias["se"])
        out["step_bias"] = math.hypot(b, se)
    parts = [x for x in (chain_se, out["burnin_bias"], out["step_bias"]) if np.isfinite(x)]
    out["total"] = float(math.sqrt(sum(x**2 for x in parts))) if np.isfinite(chain_se) else float("nan")
    return out


def t_equivalent(z: float, dof: int) -> float:
    """``z`` normal standard errors as the same quantile of Student's t with ``dof`` degrees of freedom:
    the threshold for a statistic whose standard error is the spread of ``dof + 1`` values."""
    from scipy.special import ndtr, stdtrit  # here, not at import: scipy.stats would cost ~0.5 s to load

    return float(stdtrit(dof, ndtr(z)))


def llc_interval(mean: float, se: float, dof, level: float = 0.95) -> tuple[float, float]:
    """The two-sided ``level`` interval ``mean ± t·se``, t Student's quantile with ``dof``
    degrees of freedom (the normal's with ``dof=None``): with 8 chains t₀.₉₇₅ = 2.36, not 1.96."""
    from scipy.special import ndtri, stdtrit  # here, not at import (scipy.special loads in ~0.15 s)

    q = 0.5 + level / 2.0
    t = ndtri(q) if dof is None else stdtrit(dof, q)
    return float(mean - t * se), float(mean + t * se)
