"""Convergence diagnostics of sampled traces: effective sample size, split R-hat, MCSE.

Thin wrappers over ``numpyro.diagnostics`` (Geyer's initial monotone sequence ESS, split
Gelman–Rubin R-hat) for a trace of one scalar statistic with axes ``(chains, draws)``,
typically the loss ``n·L_n`` at the sampled points. The wrappers validate their input with
clear errors and return plain floats, so results are JSON-ready.
"""

import math
from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike

from slt_jax.serialization import json_safe

# Vehtari, Gelman, Simpson, Carpenter, Bürkner (arXiv:1903.08008) recommend flagging split
# R-hat above 1.01, together with a total ESS above ~400: below that, R-hat's own sampling
# noise (about sqrt(2/(2C-1)) / (2·ESS per half-chain) for C chains) nears 0.01. We keep
# their threshold rather than the older 1.1 / 1.05 rules: a chain stuck in another basin
# biases λ̂ more than a spurious flag costs, and the ESS reported next to the flag says
# whether the flag can be trusted.
DEFAULT_RHAT_THRESHOLD = 1.01


class ChainDiagnostics(NamedTuple):
    """Convergence summary of one ``(chains, draws)`` trace.

    Attributes:
        ess: total effective sample size over all chains.
        ess_per_chain: effective sample size of each chain on its own, shape ``(chains,)``.
        rhat: split R-hat (``nan`` when the trace has no within-chain variance).
        mcse: Monte Carlo standard error of the overall mean.
        rhat_flagged: whether ``rhat`` exceeds the threshold, or is not finite.
    """

    ess: float
    ess_per_chain: np.ndarray
    rhat: float
    mcse: float
    rhat_flagged: bool

    def to_dict(self) -> dict:
        """JSON-safe view: Python floats and lists, non-finite numbers as ``None``.

        Returns:
            A dict with the same keys as the fields.
        """
        return json_safe(self._asdict())


def _numpyro():
    """``numpyro.diagnostics``, imported on first use (numpyro is not loaded with slt_jax)."""
    from numpyro import diagnostics

    return diagnostics


def preload() -> None:
    """Import ``numpyro.diagnostics`` now, if it is not yet.

    The import takes ~0.35 s (numpyro and the scipy modules it pulls in; 2 CPU cores), once per
    process. :func:`~slt_jax.runner.chains.run_chains` calls this right after dispatching its
    first chunk, so the import runs while the device samples instead of after it, where the
    ESS of the finished run would wait for it.
    """
    _numpyro()


def effective_sample_size(trace: ArrayLike) -> float:
    """Total effective sample size of a ``(chains, draws)`` trace.

    Uses numpyro's estimator (Geyer's initial monotone sequence on the autocorrelation
    pooled over chains, Stan's between-chain correction); one chain is allowed. Strongly
    anticorrelated draws (lag-1 autocorrelation below −½, e.g. an oscillating chain) make that
    estimator's integrated time negative; as Stan does, the time is kept at least
    ``1/log₁₀(N)``, so the ESS is at most ``N·log₁₀(N)`` for N draws in all.

    Args:
        trace: array of shape ``(chains, draws)`` with ``draws >= 2``, all finite.

    Returns:
        The ESS as a float; ``nan`` when every chain is constant.
    """
    x = _as_trace(trace, min_draws=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ess = float(_numpyro().effective_sample_size(x))
    bound = x.size * math.log10(x.size)
    return ess if np.isnan(ess) or 0 < ess <= bound else bound


def ess_per_chain(trace: ArrayLike) -> np.ndarray:
    """Effective sample size of each chain taken on its own.

    Args:
        trace: array of shape ``(chains, draws)`` with ``draws >= 2``, all finite.

    Returns:
        Array of shape ``(chains,)``; ``nan`` for a constant chain.
    """
    x = _as_trace(trace, min_draws=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.array(
            [float(_numpyro().effective_sample_size(chain[None])) for chain in x]
        )


def split_rhat(trace: ArrayLike) -> float:
    """Split R-hat (Gelman–Rubin on half-chains) of a ``(chains, draws)`` trace.

    Each chain is cut into its first and second half, so one chain suffices: a single
    chain still yields two halves to compare, which detects a trend (a chain still
    drifting from its start) but not a chain stuck in one basin for its whole length.
    Several chains started apart are needed to detect the latter. See Vehtari et al.
    (arXiv:1903.08008) for the split form.

    Args:
        trace: array of shape ``(chains, draws)`` with ``draws >= 4``, all finite.

    Returns:
        R-hat as a float (1 at convergence); ``nan`` when the trace has no within-chain
        variance.
    """
    x = _as_trace(trace, min_draws=4)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(_numpyro().split_gelman_rubin(x))


def mcse_mean(trace: ArrayLike) -> float:
    """Monte Carlo standard error of the mean over all chains and draws.

    ``sqrt(Var / ESS)``, with ``Var`` the sample variance of all draws pooled and ``ESS``
    from :func:`effective_sample_size`.

    Args:
        trace: array of shape ``(chains, draws)`` with ``draws >= 2``, all finite.

    Returns:
        The standard error as a float; ``nan`` when every chain is constant.
    """
    x = _as_trace(trace, min_draws=2)
    variance = np.var(x, ddof=1)
    return float(np.sqrt(variance / effective_sample_size(x)))


def chain_diagnostics(
    trace: ArrayLike, *, rhat_threshold: float = DEFAULT_RHAT_THRESHOLD
) -> ChainDiagnostics:
    """All convergence diagnostics of a ``(chains, draws)`` trace at once.

    Args:
        trace: array of shape ``(chains, draws)`` with ``draws >= 4``, all finite.
        rhat_threshold: R-hat above which (or a non-finite R-hat) the trace is flagged;
            default 1.01 after Vehtari et al. (arXiv:1903.08008).

    Returns:
        A :class:`ChainDiagnostics`.
    """
    if not rhat_threshold >= 1.0:
        raise ValueError(f"rhat_threshold must be >= 1, got {rhat_threshold!r}")
    x = _as_trace(trace, min_draws=4)
    rhat = split_rhat(x)
    return ChainDiagnostics(
        ess=effective_sample_size(x),
        ess_per_chain=ess_per_chain(x),
        rhat=rhat,
        mcse=mcse_mean(x),
        rhat_flagged=not rhat <= rhat_threshold,
    )


def _as_trace(trace: ArrayLike, *, min_draws: int) -> np.ndarray:
    """Validate a ``(chains, draws)`` trace and return it as a float64 host array."""
    x = np.asarray(trace, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"trace must have shape (chains, draws), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < min_draws:
        raise ValueError(
            f"trace needs at least 1 chain and {min_draws} draws, got shape {x.shape}"
        )
    num_bad = int(np.sum(~np.isfinite(x)))
    if num_bad:
        raise ValueError(f"trace has {num_bad} non-finite values (diverged chain?)")
    return x
