"""What an LLC estimate returns, and the one function that turns any sampler's draws into it.

Every sampler behind :func:`slt_jax.estimate_llc` — the SGLD family, a calibrated run with its
extensions, NUTS — hands :func:`summarize` the same :class:`Sampled` record; the summary
computes λ̂ per draw (Lau et al., arXiv:2308.12108; docs/mathematics.md §1), excludes and
reports diverged chains (never averaged in), attaches the diagnostics and records the settings.

Its length: the result type and :func:`summarize`, which builds it, are one contract for every
sampler.
"""

import dataclasses
import warnings
from typing import Any, NamedTuple

import numpy as np

from slt_jax import settings as settings_lib
from slt_jax import validation
from slt_jax.estimators.diagnostics import DEFAULT_RHAT_THRESHOLD, chain_diagnostics
from slt_jax.estimators.llc import escaped_chains, llc_draws, llc_interval, llc_statistics, llc_uncertainty
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

    def escaped(self) -> np.ndarray:
        """Which healthy chains slid away from w* (:func:`slt_jax.escaped_chains`), ``(chains,)``.

        They are part of ``llc_mean`` here; an LLC curve's row leaves them out and flags the step.
        """
        diverged = np.zeros(len(self.llc_per_chain), bool)
        diverged[self.diverged_chains] = True
        with np.errstate(invalid="ignore"):
            slid = escaped_chains(np.nan_to_num(self.llc_per_chain), np.nan_to_num(self.distance_trace),
                                  num_sampled=self.settings["num_sampled"],
                                  localization=self.settings["localization"])
        return slid & ~diverged

    def llc_interval(self, level: float = 0.95) -> tuple[float, float]:
        """``λ̂ ± t·llc_se``, t Student's quantile with healthy chains − 1 degrees of freedom."""
        dof = None if self.uncertainty is None else self.uncertainty.get("dof")
        return llc_interval(self.llc_mean, self.llc_se, dof, level)

    def __str__(self) -> str:
        """A short health summary: λ̂ ± se, the chains, R-hat and ESS with their verdicts, the
        calibration and equilibration of a ``step_size="auto"`` run, and the warnings raised.

        Verdicts: split R-hat above 1.01 is flagged (Vehtari et al., arXiv:1903.08008); the ESS
        of the λ̂ trace is low below 100 per healthy chain (their 400 for four chains), below
        which R-hat's own noise nears 0.01 and the MCSE is unreliable.
        """
        settings = self.settings
        chains = len(self.llc_per_chain)
        lines = [f"λ̂ = {self.llc_mean:.4g} ± {self.llc_se:.2g} (se; {chains} chains, nβ = {self.nbeta:.4g})"]
        draws = self.llc_trace.shape[1] if self.llc_trace.ndim == 2 else 0
        if settings:
            lines.append(f"  {settings.get('sampler')}, step size {_number(settings.get('step_size'))}, "
                         f"γ = {_number(settings.get('localization'))}, n = {self.n}; {draws} draws per chain "
                         f"after {settings.get('num_burnin')} burn-in steps")
        escaped = np.flatnonzero(self.escaped()) if settings.get("num_sampled") is not None else np.empty(0, int)
        healthy = chains - len(self.diverged_chains) - escaped.size
        status = f"  chains: {healthy} of {chains} healthy"
        if self.diverged_chains:
            status += (f"; diverged {self.diverged_chains} at steps {self.diverged_at} (excluded from λ̂)")
        if escaped.size:
            status += (f"; escaped {escaped.tolist()} (slid away from w*: λ̂ < −10 or ‖w − w*‖² above twice "
                       f"the localizer's; included in λ̂, a curve's row would leave them out)")
        lines.append(status)
        lines.append("  " + self._convergence())
        for name, value in (self.sampler_stats or {}).items():
            if name == "mala_acceptance":
                verdict = "ok" if value >= 0.7 else "low: the step size is too large"
                lines.append(f"  MALA acceptance {value:.2f} ({verdict}, ≥ 0.7)")
        calibration, equilibration = settings.get("calibration"), settings.get("equilibration")
        if calibration:
            tried = len(calibration.get("table") or ())
            lines.append(f"  calibration: step size {_number(calibration.get('step_size'))} chosen from {tried} "
                         f"— {calibration.get('reason')}")
        if equilibration:
            lines.append("  " + _equilibration_line(equilibration, settings.get("num_burnin")))
        for message in settings.get("warnings") or ():
            lines.append(f"  warning: {message}")
        return "\n".join(lines)

    def _convergence(self) -> str:
        """R-hat, ESS and MCSE of the λ̂ trace with their verdicts, on one line."""
        d = self.diagnostics
        if d is None:
            return "R-hat and ESS: not computed (no healthy chain, or fewer than 4 draws)"
        healthy = len(self.llc_per_chain) - len(self.diverged_chains)
        rhat = "R-hat not finite (constant trace?)" if not np.isfinite(d.rhat) else (
            f"R-hat {d.rhat:.3f} ({'FLAGGED: above' if d.rhat > RHAT_THRESHOLD else 'ok, ≤'} {RHAT_THRESHOLD})")
        needed = MIN_ESS_PER_CHAIN * max(healthy, 1)
        verdict = "ok, ≥" if d.ess >= needed else "LOW: below"
        ess = f"ESS {d.ess:.0f} ({verdict} {needed} = {MIN_ESS_PER_CHAIN} per chain)"
        return f"{rhat}; {ess}; MCSE {d.mcse:.2g}"

    def plot_traces(self, path=None, *, distance: bool = True, title: str | None = None):
        """Per-chain λ̂ traces against the sampler step: burn-in shaded, diverged chains in red,
        escaped chains dashed, λ̂ ± 2 s.e. as a band; ``‖w_t − w*‖²`` below when ``distance``.

        The traces hold the draws after burn-in only. For a ``step_size="auto"`` run the burn-in
        is the one read off the chains' own λ̂ trace (``settings["equilibration"]``).

        Args:
          path: optional PNG path.
          distance: add the panel of ``‖w_t − w*‖²`` (shows chains sliding away).
          title: optional title; default λ̂ ± se with the sampler and step size.

        Returns:
          The matplotlib ``Figure``.
        """
        from slt_jax.plots import plot_llc_traces  # matplotlib only when plotting

        settings = self.settings
        burnin = int(settings.get("num_burnin") or 0)
        spd = int(settings.get("steps_per_draw") or 1)
        steps = burnin + spd * np.arange(1, self.llc_trace.shape[1] + 1)
        label = f"burn-in: {burnin} steps (not recorded)"
        if settings.get("equilibration"):
            label = f"burn-in: {burnin} steps, read off the λ̂ trace (step_size='auto')"
        escaped = np.flatnonzero(self.escaped()) if settings.get("num_sampled") is not None else ()
        if title is None:
            title = (f"λ̂ = {self.llc_mean:.4g} ± {self.llc_se:.2g} ({settings.get('sampler', '')}, "
                     f"step size {_number(settings.get('step_size'))}, nβ = {self.nbeta:.4g})")
        return plot_llc_traces(self.llc_trace, steps=steps, burnin=burnin, llc_mean=self.llc_mean,
                               llc_se=self.llc_se, diverged=self.diverged_chains, escaped=escaped,
                               distance_trace=self.distance_trace if distance else None, burnin_label=label,
                               title=title, path=path)

    def to_arviz(self):
        """The draws as an ``arviz.InferenceData`` (``pip install "slt-jax[arviz]"``).

        ``posterior`` holds ``llc`` (the per-draw λ̂), ``loss`` (L_n estimates) and ``distance``
        (‖w_t − w*‖²), each with dims ``(chain, draw)``; ``sample_stats`` holds ``diverging``
        (True from the draw at which a chain diverged on); the posterior's attributes carry λ̂, its se, nβ,
        n, L_n(w*), the step size, the sampler and ``sampler_stats``. ArviZ's ``ess(...,
        method="mean")`` and ``rhat(..., method="split")`` are the estimators of
        :attr:`diagnostics` (its ESS on split chains).

        Raises:
          ImportError: naming the extra when ArviZ is not installed.
        """
        az = import_arviz()
        settings = self.settings
        burnin = int(settings.get("num_burnin") or 0)
        spd = int(settings.get("steps_per_draw") or 1)
        steps = burnin + spd * np.arange(1, self.llc_trace.shape[1] + 1)[None, :] - 1
        diverged_at = np.full(len(self.llc_per_chain), np.iinfo(np.int64).max)
        diverged_at[self.diverged_chains] = self.diverged_at
        diverging = (steps >= diverged_at[:, None]) | ~np.isfinite(self.llc_trace)
        attrs = {"inference_library": "slt_jax", "llc_mean": self.llc_mean, "llc_se": self.llc_se,
                 "nbeta": self.nbeta, "n": self.n, "init_loss": self.init_loss,
                 "step_size": float(settings.get("step_size") or np.nan), "sampler": str(settings.get("sampler")),
                 "num_burnin": burnin, "steps_per_draw": spd,
                 **{f"sampler_stats_{k}": v for k, v in (self.sampler_stats or {}).items()}}
        return az.from_dict(posterior={"llc": self.llc_trace, "loss": self.loss_trace,
                                       "distance": self.distance_trace},
                            sample_stats={"diverging": diverging}, posterior_attrs=attrs)


RHAT_THRESHOLD = DEFAULT_RHAT_THRESHOLD
MIN_ESS_PER_CHAIN = 100


def import_arviz():
    """``arviz``, or an ImportError that names the extra to install."""
    try:
        with warnings.catch_warnings():
            # ArviZ 0.2x announces its 1.0 refactor on import; the API used here is in both.
            warnings.simplefilter("ignore", FutureWarning)
            import arviz
    except ImportError as error:
        raise ImportError('to_arviz needs ArviZ: pip install "slt-jax[arviz]" (or pip install "arviz<1")') from error
    return arviz


def _number(value) -> str:
    return "?" if value is None else f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _equilibration_line(record: dict, burnin) -> str:
    """What a calibrated run did after the sweep, on one line."""
    state = "settled" if record.get("equilibrated") else "NOT settled (λ̂ still trending or moving)"
    text = (f"equilibration: {state} after {record.get('num_steps')} steps; burn-in read off the λ̂ trace: "
            f"{burnin} steps; {record.get('extensions', 0)} doubling(s) of the {record.get('planned_steps')}-step "
            f"schedule")
    if record.get("plateau"):
        text += "; sat on the Laplace plateau" + (" and still does" if record.get("still_at_plateau") else "")
    reductions = len({check["step_size"] for check in record.get("stiffness") or ()}) - 1
    if reductions > 0:
        text += f"; step size halved {reductions} time(s) where the chains met stiffer ground"
    return text


class Sampled(NamedTuple):
    """What a sampler run hands :func:`summarize`.

    Attributes:
      draws: the per-draw records (:class:`slt_jax.runner.chain.Draws`), ``(chains, draws)``.
      diverged_at: the step at which each chain diverged (−1 if it did not), ``(chains,)``.
      positions: the chains' final positions (a params pytree with a leading chain axis).
      step_size: the step size the draws were taken at.
      run: the run's settings as actually run (burn-in and draws after any extension).
      sampler_stats: statistics the sampler reports beyond its per-step info (or ``None``).
      record: extra settings to record (``calibration``, ``equilibration``).
      moments: the chains' observable moments (:class:`slt_jax.runner.observation.Moments`
        with a leading chain axis, on the host), or ``None``.
    """

    draws: Any
    diverged_at: np.ndarray
    positions: Any
    step_size: float
    run: settings_lib.RunSettings
    sampler_stats: dict | None = None
    record: dict | None = None
    moments: Any = None


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
