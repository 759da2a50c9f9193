"""A fixed step size, checked where its chains went: stability, the kernel's health, and trend.

``step_size="auto"`` chooses and re-checks its step (:mod:`slt_jax.tuning.auto`); a number given
by hand was, until this check, trusted blindly: on a small DLN a fixed ε = 2e-4 read λ̂ +75 %
above NUTS, and a step 30× below the calibrated one, run for 1,500 steps, read 46 % low — both
without a word. After a run at a fixed step, :func:`sample_checked` applies the calibration's own
tests to the chains it ran, at the cost of one curvature probe:

- **stability**: the kernel's rule ``ε ≤ limit/(4·(nβ·h + γ·G_max))`` at the chains' final
  positions (:func:`slt_jax.tuning.stiffness.stable_step_at_chains`, at most
  :data:`MAX_CHECKED_CHAINS` chains); above it, a ``CalibrationWarning`` names the stable step;
- **health**: the kernel's own test over the draws (SGNHT: kinetic temperature 1);
- **trend**: the draws' second half against their first, chain by chain
  (:func:`slt_jax.estimators.llc.halves_trend`, the test of :mod:`slt_jax.tuning.equilibration`):
  a difference beyond :data:`TREND_RTOL` of λ̂ *and* :data:`TREND_Z` standard errors (as a t
  quantile with chains − 1 degrees of freedom) means the run ended before λ̂ settled.

Each finding warns (:class:`~slt_jax.CalibrationWarning`) and the record lands in
``settings["step_check"]`` with its cost in seconds; ``check_step=False`` skips it all.
"""

import time
import warnings

import numpy as np

from slt_jax import keys
from slt_jax.errors import CalibrationWarning
from slt_jax.estimators.llc import halves_trend, llc_draws, t_equivalent
from slt_jax.results import Sampled
from slt_jax.runner import sharding
from slt_jax.runner.chains import run_chains, sampled_of, setup
from slt_jax.tuning.stiffness import stable_step_at_chains

# Chains whose curvature the check measures (an even spread of indices): its cost is then
# bounded whatever the chain count — 20 Hessian-vector products per chain on ≤ 4096 rows (Lanczos,
# :func:`slt_jax.curvature.top_eigenvalue`).
MAX_CHECKED_CHAINS = 8
# A trend counts when it is material (this fraction of λ̂) and significant (this many standard
# errors of the chain-paired difference, as a t quantile: _significance): the sweep's check_z and rtol.
TREND_RTOL, TREND_Z = 0.05, 3.0


def _significance(num_chains: int) -> float:
    """:data:`TREND_Z` normal standard errors as the same quantile of Student's t with ``chains − 1``
    degrees of freedom: the trend's se is the spread of that many chain-paired differences, and with
    2 chains (one degree of freedom) "3 se" was exceeded by one equilibrated quadratic in five."""
    if num_chains < 2:
        return TREND_Z
    return t_equivalent(TREND_Z, num_chains - 1)


def sample_checked(problem, kernel, run, key, *, step_size: float, progress=True) -> Sampled:
    """Run ``kernel`` at the fixed ``step_size`` with the shape of ``run``, then check it.

    Returns:
      A :class:`~slt_jax.results.Sampled` whose record holds ``step_check`` (``None`` with
      ``run.check_step`` off): ``stable_step``, ``stiffness``, ``limit``, ``max_preconditioner``,
      ``chains_measured``, ``stable`` (ε within the rule), ``health``, ``trend``, ``trend_se``,
      ``trend_significance`` (the se multiple the trend had to exceed),
      ``trending`` and ``seconds``.
    """
    config, inputs = setup(problem, kernel, run, step_size)
    state, draws = run_chains(key, config, inputs, num_chains=run.num_chains, num_burnin=run.num_burnin,
                              num_draws=run.num_draws, chunk_size=run.chunk_size, progress=progress)
    record = check_run(problem, kernel, state, draws, key, step_size=step_size) if run.check_step else None
    return sampled_of(state, draws, step_size, run)._replace(record={"step_check": record})


def check_run(problem, kernel, state, draws, key, *, step_size: float) -> dict:
    """The three checks of the module docstring on a finished run; warns for each finding."""
    start = time.perf_counter()
    center = None if draws.center_loss is None else np.asarray(draws.center_loss, np.float64)
    per_draw = llc_draws(np.asarray(draws.batch_loss, np.float64), problem.init_loss, problem.nbeta, center)
    healthy = (sharding.to_host(state.diverged_at) < 0) & np.all(np.isfinite(per_draw), axis=1)
    record = {"step_size": float(step_size), "stable_step": None, "stable": None, "health": None, "trend": None,
              "trend_se": None, "trending": False}
    if not healthy.any():  # the divergence report says what happened
        return {**record, "seconds": time.perf_counter() - start}
    rule = stable_step_at_chains(problem, kernel, state.kernel_state, healthy, keys.stream(key, keys.STEP_CHECK),
                                 max_chains=MAX_CHECKED_CHAINS)
    record.update({k: v for k, v in rule.items() if k != "seconds"})
    if rule["stable_step"] is not None:
        record["stable"] = bool(step_size <= rule["stable_step"])
        if not record["stable"]:
            warnings.warn(
                f"step_size={step_size:.3g} exceeds {kernel.name}'s stable step {rule['stable_step']:.3g} where the "
                f"chains ended (Hessian scale h = {rule['stiffness']:.4g}, rule ε ≤ limit/(4·(nβh + γ·G)) with limit "
                f"{rule['limit']:.3g}): λ̂ may read high (step-size bias). Use step_size={rule['stable_step']:.2g} or "
                f"smaller, or step_size='auto'", CalibrationWarning, stacklevel=3)
    stability = kernel.stability
    if stability.health is not None and draws.info is not None:
        info = type(draws.info)(*(np.asarray(x)[healthy] for x in draws.info))
        record["health"] = stability.health(info, TREND_RTOL, TREND_Z, compared=False)
        if record["health"] is not None:
            warnings.warn(f"{kernel.name} at step_size={step_size:.3g}: {record['health']}; λ̂ may read high. Run "
                          f"longer (num_burnin) or use step_size='auto'", CalibrationWarning, stacklevel=3)
    good = per_draw[healthy]
    if good.shape[1] >= 8:
        trend, trend_se = halves_trend(good)
        level = abs(float(good.mean()))
        # The test is of relaxation towards a minimum's posterior: where λ̂ is not significantly
        # positive (a saddle, chains sliding downhill) the trend is recorded but says nothing
        # about equilibration.
        at_minimum = good.mean() > TREND_Z * float(np.std(good.mean(axis=1), ddof=1) / np.sqrt(good.shape[0])) \
            if good.shape[0] > 1 else good.mean() > 0
        significance = _significance(good.shape[0])
        record.update(trend=trend, trend_se=trend_se, trend_significance=significance,
                      trending=bool(at_minimum and abs(trend) > TREND_RTOL * level
                                    and abs(trend) > significance * trend_se))
        if record["trending"]:
            warnings.warn(
                f"λ̂ still trends at the end of the run: its draws' second half differs from the first by {trend:+.4g} "
                f"(se {trend_se:.2g}, {trend / max(level, 1e-300):+.1%} of λ̂ = {good.mean():.4g}) at step_size="
                f"{step_size:.3g} after {good.shape[1]} recorded draws: the chains have not equilibrated and λ̂ "
                f"may read {'low' if trend > 0 else 'high'}. Raise num_burnin (simulated time ε × steps), or use "
                f"step_size='auto'", CalibrationWarning, stacklevel=3)
    return {**record, "seconds": time.perf_counter() - start}

