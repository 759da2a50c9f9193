"""``step_size="auto"``: calibrate, run until λ̂ has settled, check the step where the chains went.

The tuning layer's entry for :func:`slt_jax.estimate_llc` (after blackjax's
``window_adaptation``, which returns a record and parameters the algorithm then runs with):
the sweep (:mod:`~slt_jax.tuning.sweep`) picks a step size and a schedule; the chains record from
their first step and their run doubles while λ̂ trends or sits on the Laplace plateau
(:mod:`~slt_jax.tuning.equilibration`, :mod:`~slt_jax.tuning.plateau`); where the chains reach
stiffer ground than the grid was placed for, they continue at a smaller step
(:mod:`~slt_jax.tuning.stiffness`). The result is the draws to summarise, the step size they
were taken at, and the record of every decision (docs/calibration.md).
"""

import dataclasses
import math
import time
import warnings

import numpy as np

from slt_jax import keys
from slt_jax.errors import CalibrationWarning
from slt_jax.estimators.llc import llc_draws
from slt_jax.results import Sampled
from slt_jax.runner import sharding
from slt_jax.runner.chains import setup
from slt_jax.settings import AutoSettings, RunSettings
from slt_jax.tuning.equilibration import equilibration_warning
from slt_jax.tuning.plateau import plateau_check
from slt_jax.tuning.stiffness import run_with_step_checks
from slt_jax.tuning.calibration import Calibration
from slt_jax.tuning.sweep import run_sweep


def calibration_for(problem, kernel, run: RunSettings, auto: AutoSettings, key, step_size, *,
                    progress=True) -> Calibration:
    """``step_size`` itself if it is a :class:`Calibration`, else the sweep for ``problem`` with
    the key's calibration stream (``"auto"``)."""
    if isinstance(step_size, Calibration):
        return step_size
    return run_sweep(problem, kernel, run, auto.sweep, keys.stream(key, keys.CALIBRATION),
                     nbetas=[problem.nbeta], localizations=[problem.localization], progress=progress)


def _plateau_settles(localization: float, auto: AutoSettings):
    """``step_size ↦ steps`` after which a run still on the Laplace plateau has settled there:
    ``auto.plateau_settle_efolds`` e-folds of ``2/(εγ)``, the relaxation of a direction only the
    localizer confines (None without localization: no such scale)."""
    if not localization > 0 or auto.plateau_settle_efolds is None:
        return None
    return lambda step_size: math.ceil(auto.plateau_settle_efolds * 2.0 / (step_size * localization))


def sample_calibrated(problem, kernel, run: RunSettings, auto: AutoSettings, key, calibration: Calibration, *,
                      progress=True) -> Sampled:
    """Run chains at ``calibration``'s step size until λ̂ has settled, then check the step.

    Args:
      problem: the :class:`~slt_jax.problem.Problem`.
      kernel: the sampler's factory.
      run: the run's settings; ``num_burnin`` and ``num_draws`` are raised, if needed, to the
        simulated time over which the sweep validated the step size.
      auto: what the run may do (:class:`~slt_jax.settings.AutoSettings`).
      key: the estimate's root key (chains as in an uncalibrated run).
      calibration: the sweep's result.
      progress: show progress bars.

    Returns:
      A :class:`~slt_jax.results.Sampled` whose record holds ``calibration`` (the choice, why,
      the table) and ``equilibration`` (steps, doublings, the Laplace value, stiffness checks).
    """
    nbeta, localization = problem.nbeta, problem.localization
    # The sweep's probe may not have settled; the estimate's own chains decide below.
    step_size = calibration.recommended(nbeta, localization, warn=False)
    spd = run.steps_per_draw
    minimum = (run.num_burnin, run.num_draws)

    def schedule(eps):
        return tuple(map(max, minimum, calibration.schedule(eps, spd, nbeta, localization)))

    num_burnin, num_draws = schedule(step_size)
    config, inputs = setup(problem, kernel, run, step_size)

    def llc_of(draws, state):
        center = None if draws.center_loss is None else np.asarray(draws.center_loss, np.float64)
        per = llc_draws(np.asarray(draws.batch_loss, np.float64), problem.init_loss, nbeta, center)
        return per, (sharding.to_host(state.diverged_at) < 0) & np.all(np.isfinite(per), axis=1)

    laplace, plateau = None, None
    started = time.perf_counter()
    if auto.max_plateau_extension is not None and problem.mask is None and problem.eval_data is None:
        laplace, plateau = plateau_check(problem, auto, keys.stream(key, keys.LAPLACE))
    laplace_seconds, started = time.perf_counter() - started, time.perf_counter()
    checked = run_with_step_checks(
        key, config, inputs, llc_of, step_size=step_size, schedule=schedule, problem=problem,
        max_step_reductions=auto.max_step_reductions, num_chains=run.num_chains, num_burnin=num_burnin,
        num_draws=num_draws, max_extension=auto.max_extension, rtol=calibration.settings["rtol"],
        z=calibration.settings["z"], plateau=plateau, max_plateau_extension=auto.max_plateau_extension or 1.0,
        plateau_settles=_plateau_settles(problem.localization, auto), chunk_size=run.chunk_size, progress=progress)
    last = checked.run
    equilibration = {"equilibrated": last.equilibrated, "num_steps": checked.num_steps, "final_steps": last.num_steps,
                     "planned_steps": checked.planned_steps, "extensions": checked.extensions,
                     "max_extension": auto.max_extension, "max_plateau_extension": auto.max_plateau_extension,
                     "laplace": laplace, "plateau": checked.plateau, "still_at_plateau": last.still_at_plateau,
                     "plateau_settled": last.plateau_settled,
                     "stiffness": checked.checks, "laplace_seconds": laplace_seconds,
                     "seconds": time.perf_counter() - started}
    message = equilibration_warning(last, laplace=laplace, planned=checked.planned_steps,
                                    step_size=checked.step_size, max_extension=auto.max_extension,
                                    max_plateau_extension=auto.max_plateau_extension)
    if message is not None:
        warnings.warn(message, CalibrationWarning, stacklevel=3)
    ran = dataclasses.replace(run, num_burnin=last.num_burnin, num_draws=int(last.draws.batch_loss.shape[1]))
    record = {"calibration": calibration.summary(nbeta, localization), "equilibration": equilibration}
    return Sampled(last.draws, sharding.to_host(last.state.diverged_at), last.state.kernel_state.position,
                   checked.step_size, ran, record=record)
