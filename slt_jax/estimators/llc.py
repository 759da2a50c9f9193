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
