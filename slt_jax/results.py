"""What an LLC estimate returns, and the one function that turns any sampler's draws into it.

Every sampler behind :func:`slt_jax.estimate_llc` — the SGLD family, a calibrated run with its
extensions, NUTS — hands :func:`summarize` the same :class:`Sampled` record; the summary
computes λ̂ per draw (Lau et al., arXiv:2308.12108; docs/mathematics.md §1), excludes and
reports diverged chains (never averaged in), attaches the diagnostics and records the settings.
"""

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from slt_jax import settings as settings_lib
from slt_jax import validation
from slt_jax.estimators.diagnostics import chain_diagnostics
from slt_jax.estimators.llc import llc_draws, llc_interval, llc_statistics, llc_uncertainty
from slt_jax.runner import divergence
from slt_jax.serialization import dump_json, json_safe


@dataclasses.dataclass(frozen=True)
class LLCResult:
    """The local learning coefficient at one point, with everything needed to trust or redo it.

    Attributes:
      llc_mean: λ̂, the mean of the per-chain estimates over chains that did not diverge.
      llc_std: spread (std, ddof=1) of the per-chain λ̂.
      llc_se: standard error of ``llc_mean``, honest: the chain spread / √chains (with one
        chain, the Monte Carlo standard error from the effective sample size), with the biases
        the spread cannot see — unfinished burn-in, the calibrated step's bias — added in
        quadrature (``uncertainty`` has the parts; never below the chain spread's value).
      llc_per_chain: λ̂ of each chain, ``(chains,)``, diverged chains included (NaN or huge).
      loss_trace: per-draw estimates of L_n(w_t), ``(chains, draws)``.
      llc_trace: per-draw λ̂ values ``nβ·(…)``, ``(chains, draws)``.
      distance_trace: ‖w_t − w*‖² per draw, ``(chains, draws)``.
      init_loss: L_n(w*), exact over the full (evaluation) dataset.
      nbeta: nβ used.
      n: number of samples in the gradient dataset.
      diverged_chains: indices of chains excluded as divergent.
      diverged_at: the step at which each of those chains diverged.
      plain: for the control-variate estimator, the plain minibatch estimate from the same
        draws ``{"llc_mean", "llc_se"}`` — to show what the control variate saved.
      diagnostics: ESS, split R-hat and MCSE of the λ̂ trace.
      settings: every setting that produced the result (JSON-ready).
      sampler_stats: what the sampler reported, or ``None``: the mean of each field of the
        kernel's per-step info over the draws of healthy chains (e.g. SGNHT's kinetic
        temperature), the MALA acceptance rate (``mala=True``), or NUTS's adapted step size,
        acceptance, divergent transitions and leapfrog steps.
      uncertainty: the parts of ``llc_se`` (:func:`slt_jax.estimators.llc.llc_uncertainty`):
        ``chains`` (the spread's), ``burnin_bias`` (from the draws' ``trend`` ± ``trend_se``),
        ``step_bias``, ``total`` and ``dof`` (healthy chains − 1, for :meth:`llc_interval`).
    """

    llc_mean: float
    llc_std: float
    llc_se: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    llc_trace: np.ndarray
    distance_trace: np.ndarray
    init_loss: float
    nbeta: float
    n: int
    diverged_chains: list
    diverged_at: list
    plain: dict | None
    diagnostics: Any
    settings: dict
    sampler_stats: dict | None = None
    uncertainty: dict | None = None

    def to_dict(self, traces: bool = False) -> dict:
        """A JSON-serialisable dict; traces (chains × draws arrays) only if ``traces``."""
        skip = () if traces else ("loss_trace", "llc_trace", "distance_trace")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return json_safe(out)

    def to_json(self, path=None, traces: bool = False) -> str:
        """Serialise with :meth:`to_dict`; also write to ``path`` if given."""
        return dump_json(self.to_dict(traces=traces), path)

    def llc_interval(self, level: float = 0.95) -> tuple[float, float]:
        """``λ̂ ± t·llc_se``, t Student's quantile with healthy chains − 1 degrees of freedom."""
        dof = None if self.uncertainty is None else self.uncertainty.get("dof")
        return llc_interval(self.llc_mean, self.llc_se, dof, level)

    def __str__(self) -> str:
        chains = len(self.llc_per_chain)
        s = f"λ̂ = {self.llc_mean:.4g} ± {self.llc_se:.2g} (se; {chains} chains, nβ = {self.nbeta:.4g})"
        if self.diverged_chains:
            s += f", {len(self.diverged_chains)} diverged chain(s) excluded: {self.diverged_chains}"
        return s


class Sampled(NamedTuple):
    """What a sampler run hands :func:`summarize`.

    Attributes:
      draws: the per-draw records (:class:`slt_jax.runner.chains.Draws`), ``(chains, draws)``.
      diverged_at: the step at which each chain diverged (−1 if it did not), ``(chains,)``.
      positions: the chains' final positions (a params pytree with a leading chain axis).
      step_size: the step size the draws were taken at.
      run: the run's settings as actually run (burn-in and draws after any extension).
      sampler_stats: statistics the sampler reports beyond its per-step info (or ``None``).
      record: extra settings to record (``calibration``, ``equilibration``).
    """

    draws: Any
    diverged_at: np.ndarray
    positions: Any
    step_size: float
    run: settings_lib.RunSettings
    sampler_stats: dict | None = None
    record: dict | None = None


def summarize(problem, sampled: Sampled, *, sampler: str, key) -> LLCResult:
    """λ̂ and everything around it from one sampler run on ``problem``.

    Args:
      problem: the :class:`slt_jax.problem.Problem` the draws came from.
      sampled: the run's :class:`Sampled` record.
      sampler: the kernel's name (recorded).
      key: the root key of the estimate (recorded).

    Returns:
      An :class:`LLCResult`; diverged chains are excluded and reported by chain
      (:class:`~slt_jax.DivergenceWarning`, or an error with ``on_divergence="raise"``).
    """
    draws, run = sampled.draws, sampled.run
    batch_loss = np.asarray(draws.batch_loss, np.float64)
    center_loss = None if draws.center_loss is None else np.asarray(draws.center_loss, np.float64)
    per_draw = llc_draws(batch_loss, problem.init_loss, problem.nbeta, center_loss)
    diverged_at = np.asarray(sampled.diverged_at)
    healthy = (diverged_at < 0) & np.all(np.isfinite(per_draw), axis=1)
    stats = llc_statistics(per_draw, healthy)
    diagnostics = chain_diagnostics(per_draw[healthy]) if healthy.any() and per_draw.shape[1] >= 4 else None
    llc_se = stats.llc_se
    if not np.isfinite(llc_se) and diagnostics is not None:
        llc_se = float(diagnostics.mcse)
    calibration = (sampled.record or {}).get("calibration") or {}
    uncertainty = llc_uncertainty(per_draw[healthy], llc_se, step_bias=calibration.get("bias"),
                                  step_ratio=sampled.step_size / calibration["step_size"] if calibration else 1.0)
    plain = None
    if center_loss is not None:
        plain_stats = llc_statistics(llc_draws(batch_loss, problem.init_loss, problem.nbeta), healthy)
        plain = {"llc_mean": plain_stats.llc_mean, "llc_se": plain_stats.llc_se}
    loss_trace = batch_loss if center_loss is None else batch_loss - center_loss + problem.init_loss
    sampler_stats = {}
    if healthy.any() and draws.info is not None:
        sampler_stats = {name: float(np.mean(np.asarray(value)[healthy])) for name, value in draws.info._asdict().items()}
    sampler_stats.update(sampled.sampler_stats or {})
    diverged_chains = [int(i) for i in np.flatnonzero(~healthy)]
    diverged_steps = [int(diverged_at[i]) for i in diverged_chains]
    divergence.report(diverged_chains, diverged_steps, len(healthy), sampled.step_size, run.on_divergence)
    recorded = {**problem.record(), **settings_lib.to_dict(run), "batch_size": problem.batch_size,
                "divergence_threshold": problem.divergence_threshold(run), "step_size": sampled.step_size,
                "sampler": sampler, "key": validation.key_data(key), "calibration": None, "equilibration": None,
                "step_check": None,
                **(sampled.record or {})}
    return LLCResult(
        llc_mean=stats.llc_mean, llc_std=stats.llc_std, llc_se=uncertainty["total"], llc_per_chain=stats.llc_per_chain,
        loss_trace=loss_trace, llc_trace=per_draw, distance_trace=np.asarray(draws.distance, np.float64),
        init_loss=problem.init_loss, nbeta=problem.nbeta, n=problem.n, diverged_chains=diverged_chains,
        diverged_at=diverged_steps, plain=plain, diagnostics=diagnostics, settings=json_safe(recorded),
        sampler_stats=sampler_stats or None, uncertainty=json_safe(uncertainty),
    )
