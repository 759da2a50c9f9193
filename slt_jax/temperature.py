"""``estimate_free_energy``: the local free energy and λ̂ from a ladder of temperatures.

One call samples the localized posterior ``∝ N(w; w*, I/γ)·exp(−β·n·L_n(w))`` at every rung
β of an inverse-temperature ladder in (0, 1] — all rungs and chains in one compiled program
(the chain runner takes a per-chain nβ = n·β and step size) — and turns the per-rung means
``E_β[n·L_n]`` into the free energy by thermodynamic integration, WBIC, and λ̂ from the mean
at β* = 1/log n, the slope against 1/β, two temperatures and the variance
(Watanabe arXiv:1208.6338; Lau et al. arXiv:2308.12108; docs/mathematics.md §4).
"""

import dataclasses
import math

import numpy as np

from slt_jax import keys, settings, validation
from slt_jax.curvature import full_batch_top_eigenvalue
from slt_jax.estimators import free_energy as fe
from slt_jax.estimators.diagnostics import chain_diagnostics
from slt_jax.problem import make_problem
from slt_jax.serialization import dump_json, json_safe
from slt_jax.runner import divergence as divergence_lib
from slt_jax.runner import sharding
from slt_jax.runner.chains import run_chains, setup
from slt_jax.samplers import get_kernel
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.tuning.auto import calibration_for
from slt_jax.tuning.calibration import Calibration

# ε·(nβ·h_max + γ) on every rung: the Langevin discretisation inflates the posterior variance
# along the stiffest direction by about a quarter of this (0.5 %), and that direction relaxes
# in about 2/0.02 = 100 steps.
DEFAULT_STEP_SCALE = 0.02
# Rung spacing in log β: Simpson's error ≈ λ·Δu⁴/180 ≈ 3.5e-4·λ at Δu = 0.5 (see beta_ladder).
MAX_LOG_SPACING = 0.5


@dataclasses.dataclass(frozen=True)
class FreeEnergyResult:
    """Free energy, WBIC and temperature-based λ̂ at one point, with the per-rung curve.

    All losses are ``n·L_n`` in nats (``loss_fn`` must be the per-sample negative
    log-likelihood); β is the inverse temperature in (0, 1], nβ = n·β.

    Attributes:
      betas: the rungs, increasing, ending at 1, shape ``(K,)``.
      mean_nloss: ``E_β[n·L_n]`` per rung.
      mean_nloss_se: its standard error: the larger of the spread of per-chain means / √chains
        and the ESS-based Monte Carlo standard error.
      var_nloss: ``Var_β[n·L_n]`` per rung over all draws (exact only for full-batch losses).
      step_sizes: the step size used on each rung.
      free_energy: ``F = −log ∫ N(w; w*, I/γ)·exp(−n·L_n(w)) dw`` by thermodynamic integration.
      free_energy_se: its standard error.
      wbic: ``E_{β*}[n·L_n]`` at β* = 1/log n.
      wbic_se: its standard error.
      beta_star: 1/log n.
      llc_mean: ``β*·(E_{β*}[n·L_n] − n·L_n(w*))``, the estimand of :func:`slt_jax.estimate_llc`.
      llc_mean_se: its standard error.
      llc_slope: slope of ``E_β[n·L_n]`` against 1/β over ``β*·(1 ± 1/√(2 log n))`` and β*.
      llc_slope_se: its standard error.
      llc_two_temperatures: the same from the two outer rungs of that grid.
      llc_two_temperatures_se: its standard error.
      llc_variance: ``β*²·Var_{β*}[n·L_n]`` (multiplicity-1 consistency check); ``None``
        unless the loss was measured full batch (minibatch noise inflates the variance).
      init_nloss: ``n·L_n(w*)``.
      curvature: the largest Hessian eigenvalue of ``L_n`` at w* (Lanczos) that
        scaled the step sizes and the default ladder.
      n: number of samples.
      diverged_chains: indices of excluded chains (rung = index // chains per rung).
      diagnostics: ESS / split R-hat / MCSE of ``n·L_n`` per rung.
      settings: every setting that produced the result (JSON-ready).
    """

    betas: np.ndarray
    mean_nloss: np.ndarray
    mean_nloss_se: np.ndarray
    var_nloss: np.ndarray
    step_sizes: np.ndarray
    free_energy: float
    free_energy_se: float
    wbic: float
    wbic_se: float
    beta_star: float
    llc_mean: float
    llc_mean_se: float
    llc_slope: float
    llc_slope_se: float
    llc_two_temperatures: float
    llc_two_temperatures_se: float
    llc_variance: float | None
    init_nloss: float
    curvature: float
    n: int
    diverged_chains: list
    diagnostics: list
    settings: dict

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return json_safe({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def to_json(self, path=None) -> str:
        """Serialise with :meth:`to_dict`; also write to ``path`` if given."""
        return dump_json(self.to_dict(), path)

    def __str__(self) -> str:
        return (
            f"F = {self.free_energy:.6g} ± {self.free_energy_se:.2g}, WBIC = {self.wbic:.6g} ± "
            f"{self.wbic_se:.2g} (nats; {len(self.betas)} rungs, n = {self.n}); λ̂ = {self.llc_mean:.4g} ± "
            f"{self.llc_mean_se:.2g} (mean at β*), {self.llc_slope:.4g} ± {self.llc_slope_se:.2g} (slope)"
        )


def _wbic_grid(n: int) -> np.ndarray:
    """β*·(1 − δ, 1, 1 + δ) with β* = 1/log n, δ = 1/√(2 log n) (docs/mathematics.md §4.5), capped at 1."""
    beta_star = 1.0 / math.log(n)
    delta = 1.0 / math.sqrt(2.0 * math.log(n))
    return np.minimum(beta_star * np.array([1.0 - delta, 1.0, 1.0 + delta]), 1.0)


def _default_ladder(n: int, localization: float, curvature: float) -> np.ndarray:
    """Geometric rungs from the prior plateau, ``β_min = γ/(100·n·h_max)``, to 1."""
    beta_min = 1e-2 if curvature <= 0 else min(1e-2, localization / (100.0 * n * curvature))
    num_rungs = 2 * math.ceil(math.log(1.0 / beta_min) / (2 * MAX_LOG_SPACING)) + 1
    return fe.beta_ladder(num_rungs, beta_min=beta_min)


def _check_betas(betas) -> np.ndarray:
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size < 3 or not np.all(np.isfinite(b)):
        raise ValueError(f"betas must be a 1-D array of at least 3 finite inverse temperatures, got {betas!r}")
    if not (np.all(np.diff(b) > 0) and b[0] > 0 and b[-1] == 1.0):
        raise ValueError(f"betas must increase strictly within (0, 1] and end at 1, got {b}")
    return b


def estimate_free_energy(loss_fn, params, data, key, *, localization: float, betas=None, step_size=None,
                         sampler="sgld", param_mask=None, mesh=None, devices=None, param_specs=None,
                         run: RunSettings | None = None,
                         auto: AutoSettings | None = None, precision: Precision | None = None,
                         progress: bool = True, **options) -> FreeEnergyResult:
    """Sample a ladder of temperatures at ``params`` and return the local free energy and λ̂.

    Rung β samples ``∝ N(w; w*, I/γ)·exp(−n·β·L_n(w))`` with ``num_chains`` chains; every rung
    and chain runs in one compiled program. The step size on rung β is
    ``step_size·(n·h + γ)/(n·β·h + γ)``, h the largest Hessian eigenvalue of ``L_n`` at w*,
    so every rung takes steps of the same size relative to its posterior width (which runs
    from γ^{-1/2} at β → 0 to (n·h)^{-1/2} at β = 1; docs/mathematics.md §4.3).

    ``loss_fn`` must return the mean per-sample negative log-likelihood in nats: free
    energies and WBIC depend on the loss's scale and offset (λ̂ does not).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, mean per-sample NLL in nats.
      params: the point w* (a pytree of float arrays).
      data: a pytree of arrays with a leading sample axis of length n.
      key: JAX PRNG key; chain i (rung ``i // num_chains``) uses ``fold_in(key, i)``.
      localization: γ > 0: the localizer ``N(w*, I/γ)`` is the normalised prior of the
        thermodynamic integral.
      betas: increasing inverse temperatures in (0, 1] ending at 1. Default: geometric from
        ``β_min = min(0.01, γ/(100·n·h))`` (the prior plateau) with log-spacing ≤ 0.5, so the
        quadrature error (≈ λ·Δu⁴/180) is far below the Monte Carlo error. The rungs
        ``β*·(1 ± 1/√(2 log n))`` and β* = 1/log n (for WBIC and the λ̂ estimates) are always
        added.
      step_size: ε at β = 1 (scaled per rung as above); default ``0.02/(n·h + γ)``; ``"auto"`` to
        calibrate it at β = 1 with :func:`slt_jax.calibrate`'s sweep (recorded in
        ``settings["calibration"]``), or a :class:`~slt_jax.Calibration` made at nβ = n.
      sampler: a kernel name (``"sgld"``, ``"sgld_rademacher"``, ``"rmsprop_sgld"``, ``"sgnht"``)
        or factory.
      param_mask: sample only some parameters (see ``estimate_llc``); the free energy is
        then that of the sampled coordinates.
      mesh, devices, param_specs: where the chains run (as in ``estimate_llc``); rungs × chains are split
        over the ``"chains"`` axis.
      run: :class:`~slt_jax.settings.RunSettings`: ``num_chains`` is per rung; the default
        ``loss_estimator`` here is ``"full_batch"`` (exact ``L_n`` at each draw, needed for
        ``var_nloss``); the divergence threshold defaults per rung as in ``estimate_llc``.
      auto: :class:`~slt_jax.settings.AutoSettings` (its sweep serves ``step_size="auto"``).
      precision: :class:`~slt_jax.settings.Precision`.
      progress: show a progress bar.
      **options: fields of those settings as keywords (``num_chains``, ``num_draws``, …).

    Returns:
      A :class:`FreeEnergyResult`.
    """
    run, auto, precision = settings.resolve(options, (run or RunSettings(loss_estimator="full_batch"), RunSettings),
                                            (auto, AutoSettings), (precision, Precision))
    validation.key_data(key)
    run.require_draws(4, "each rung's diagnostics need them")
    n = validation.check_data(data)
    if n < 3:
        raise ValueError(f"data has n={n} rows; the temperature β* = 1/log n needs n >= 3")
    calibrated = isinstance(step_size, Calibration) or step_size == "auto"
    if step_size is not None and not calibrated:
        validation.check_positive("step_size", step_size)
    user_betas = None if betas is None else _check_betas(betas)
    kernel = get_kernel(sampler)
    problem = make_problem(loss_fn, params, data, localization=localization, nbeta=float(n), param_mask=param_mask,
                           mesh=mesh, devices=devices, param_specs=param_specs, precision=precision, run=run,
                           allow_zero_localization=False)
    init_loss = problem.init_loss
    curvature = full_batch_top_eigenvalue(problem.user_loss_fn, problem.params, problem.resident_data,
                                          keys.stream(key, keys.CURVATURE), mask=problem.mask,
                                          batch_size=problem.batch_size)
    calibration = None
    if calibrated:
        calibration = calibration_for(problem, kernel, run, auto, key, step_size, progress=progress)
        step_size = calibration.recommended(problem.nbeta, localization)
    elif step_size is None:
        if not curvature > 0:
            raise ValueError("the Hessian of L_n vanishes at params, so no default step size can be derived: "
                             "pass step_size (ε at β = 1)")
        step_size = DEFAULT_STEP_SCALE / (n * curvature + localization)
    ladder = _default_ladder(n, localization, curvature) if user_betas is None else user_betas
    grid = _wbic_grid(n)
    all_betas = np.unique(np.concatenate([ladder, grid]))
    rung_steps = step_size * (n * curvature + localization) / (n * all_betas * curvature + localization)
    num_rungs, num_chains, num_draws = all_betas.size, run.num_chains, run.num_draws
    total = num_rungs * num_chains

    nbetas = np.repeat(n * all_betas, num_chains)
    ladder_run = dataclasses.replace(run, num_chains=total)
    config, inputs = setup(problem, kernel, ladder_run, np.repeat(rung_steps, num_chains), nbeta=nbetas,
                           threshold=np.array([problem.divergence_threshold(run, nb) for nb in nbetas]))
    state, draws = run_chains(key, config, inputs, num_chains=total, num_burnin=run.num_burnin,
                              num_draws=num_draws, chunk_size=run.chunk_size, progress=progress)

    batch_loss = np.asarray(draws.batch_loss, np.float64)
    offset = init_loss if draws.center_loss is None else np.asarray(draws.center_loss, np.float64)
    excess = (n * (batch_loss - offset)).reshape(num_rungs, num_chains, num_draws)
    diverged_at = sharding.to_host(state.diverged_at)
    diverged = (diverged_at >= 0) | ~np.all(np.isfinite(excess.reshape(total, -1)), axis=1)
    healthy = ~diverged.reshape(num_rungs, num_chains)
    diverged_chains = [int(i) for i in np.flatnonzero(diverged)]
    divergence_lib.report(diverged_chains, [int(diverged_at[i]) for i in diverged_chains], total, step_size,
                          run.on_divergence)

    init_nloss = n * init_loss
    means, ses, variances, diagnostics = [], [], [], []
    for r in range(num_rungs):
        good = excess[r][healthy[r]]
        if good.shape[0] == 0:
            raise ValueError(f"every chain of the rung beta={all_betas[r]:.3g} diverged: lower step_size")
        rung = chain_diagnostics(good)
        chain_means = good.mean(axis=1)
        means.append(init_nloss + chain_means.mean())
        # Each estimate can understate the error — the chain spread with few chains, the
        # ESS-based MCSE when chains have not mixed — so a rung reports the larger.
        spread = chain_means.std(ddof=1) / math.sqrt(good.shape[0]) if good.shape[0] > 1 else 0.0
        ses.append(max(spread, rung.mcse))
        variances.append(good.var(ddof=1))
        diagnostics.append(rung)
    means, ses, variances = np.array(means), np.array(ses), np.array(variances)

    free_energy, free_energy_se = fe.thermodynamic_integration(all_betas, means, ses)
    at = {float(b): int(np.flatnonzero(all_betas == b)[0]) for b in grid}
    low, star, high = (at[float(b)] for b in grid)
    beta_star = float(all_betas[star])
    slope, slope_se = fe.llc_from_slope(all_betas[[low, star, high]], means[[low, star, high]],
                                        np.maximum(ses[[low, star, high]], np.finfo(float).tiny))
    two, two_se = fe.llc_from_two_temperatures(all_betas[low], means[low], all_betas[high], means[high],
                                               ses[low], ses[high])
    full_batch = run.loss_estimator == "full_batch"
    llc_variance = fe.llc_from_variance(beta_star, variances[star]) if full_batch else None

    recorded = {**problem.record(), **settings.to_dict(run), "step_size": step_size, "sampler": kernel.name,
                "betas": "default" if user_betas is None else user_betas, "key": validation.key_data(key),
                "calibration": None if calibration is None else calibration.summary(problem.nbeta, localization)}
    recorded.pop("nbeta")
    return FreeEnergyResult(
        betas=all_betas, mean_nloss=means, mean_nloss_se=ses, var_nloss=variances, step_sizes=rung_steps,
        free_energy=free_energy, free_energy_se=free_energy_se, wbic=fe.wbic(means[star]),
        wbic_se=float(ses[star]), beta_star=beta_star,
        llc_mean=beta_star * (means[star] - init_nloss), llc_mean_se=beta_star * float(ses[star]),
        llc_slope=slope, llc_slope_se=slope_se, llc_two_temperatures=two, llc_two_temperatures_se=two_se,
        llc_variance=llc_variance, init_nloss=init_nloss, curvature=curvature, n=n,
        diverged_chains=diverged_chains, diagnostics=diagnostics, settings=json_safe(recorded),
    )
