"""The local learning coefficient as a pure function of sampled loss traces.

Lau et al., arXiv:2308.12108: ``λ̂(w*) = nβ·(E_{w∼p}[L_n(w)] − L_n(w*))``, the expectation over
the localized tempered posterior estimated by the mean of the draws of each chain.
"""

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
