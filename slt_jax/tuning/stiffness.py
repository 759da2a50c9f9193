"""Does the step still fit where the chains went? A calibrated run, continued at smaller steps.

The calibration grid (:mod:`slt_jax.tuning.grid`) is placed with the Hessian scale h near w*,
and the sweep compares step sizes early, where deep singular points still hold every chain on
the Laplace plateau — so they agree for the wrong reason. Chains that then leave w* along its
flat directions can reach much stiffer ground: on the 8-layer DLN 61-86-49-29-30-14-68-62 of
``benchmarks/dln_accuracy.py`` h was 305 at w* and 1130–1440 at the chains after the climb,
ε·(nβh + γ) ≈ 3.2 against SGLD's linear stability limit 4, and λ̂ ran to +37 % of λ = 268.
:func:`run_with_step_checks` applies the grid's own rule ε ≤ 1/(nβh + γ) where the chains
are when a run ends, and continues the same chains at a halved step until it holds (there:
+1.2 %).
"""

import warnings
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from slt_jax import keys
from slt_jax.curvature import chain_stiffness
from slt_jax.errors import CalibrationWarning
from slt_jax.runner import sharding
from slt_jax.runner.chain import ChainInputs, RunConfig
from slt_jax.tuning.equilibration import Equilibrated, run_until_equilibrated
from slt_jax.tuning.grid import stable_step

# The check applies to the kernels whose step size is ε itself (no preconditioner).
STEP_CHECKED_KERNELS = ("sgld", "sgld_rademacher")


class StepChecked(NamedTuple):
    """A calibrated run and its stiffness checks (see :func:`run_with_step_checks`).

    Attributes:
      run: the last segment, whose draws are the estimate's.
      step_size: the step size that segment ran at.
      planned_steps: that segment's planned steps (its calibrated schedule).
      num_steps: the steps every chain ran over all segments.
      extensions: the doublings over all segments.
      plateau: whether any segment sat on the Laplace plateau.
      checks: one record per check — ``after_steps``, ``step_size``, ``stiffness`` (h),
        ``limit`` (1/(nβh + γ)), and the segment's ``steps``, ``extensions`` and ``plateau``.
    """

    run: Equilibrated
    step_size: float
    planned_steps: int
    num_steps: int
    extensions: int
    plateau: bool
    checks: list


def run_with_step_checks(key, config: RunConfig, inputs: ChainInputs, llc_of: Callable, *, step_size: float,
                         schedule: Callable, problem, max_step_reductions: int, num_chains: int, num_burnin: int,
                         num_draws: int, **equilibrate) -> StepChecked:
    """:func:`~slt_jax.equilibration.run_until_equilibrated`, then, while ε exceeds the grid's
    rule ``1/(nβh + γ)`` at the chains' positions (h the largest Hessian eigenvalue of the
    healthy chains, :func:`~slt_jax.curvature.chain_stiffness`), the same chains continue at ε
    halved as often as that takes, with the schedule for the new step, their burn-in and draws
    read afresh (at most ``max_step_reductions`` times; then a ``CalibrationWarning``).
    Kernels other than :data:`STEP_CHECKED_KERNELS` run once, unchecked.

    Args:
      key, config, inputs, llc_of: as for ``run_until_equilibrated``; ``inputs.step_size`` is
        ``step_size``.
      step_size: the calibrated ε.
      schedule: ``schedule(step_size) -> (num_burnin, num_draws)`` at least the caller's
        minimums (the calibration's simulated time at that step).
      problem: the :class:`~slt_jax.problem.Problem` (its loss, data, mask, nβ and γ give the
        Hessian at the chains and the rule).
      max_step_reductions: how often the step may be halved.
      num_chains, num_burnin, num_draws: as for ``run_until_equilibrated`` (the first segment).
      **equilibrate: the rest of ``run_until_equilibrated``'s settings.

    Returns:
      A :class:`StepChecked`.
    """
    state, start, checks, segments = None, 0, [], []
    checked = config.kernel.name in STEP_CHECKED_KERNELS
    while True:
        run = run_until_equilibrated(key, config, inputs, llc_of, num_chains=num_chains, num_burnin=num_burnin,
                                     num_draws=num_draws, state=state, start=start, **equilibrate)
        planned = num_burnin + num_draws * config.steps_per_draw
        state, start = run.state, start + run.num_steps
        equilibrate["chunk_size"] = run.chunk_size  # continuations reuse the compiled chunk
        segments.append(run)
        healthy = sharding.to_host(state.diverged_at) < 0
        if not checked or not healthy.any():
            break
        # Every chain is measured (one program whatever diverged); the healthy ones count.
        h = float(np.max(chain_stiffness(problem.user_loss_fn, state.kernel_state.position, problem.resident_data,
                                         keys.stream(key, keys.STIFFNESS, len(checks)),
                                         param_mask=problem.mask)[healthy]))
        nbeta, localization = problem.nbeta, problem.localization
        smaller = stable_step(step_size, h, nbeta=nbeta, localization=localization)
        checks.append({"after_steps": start, "step_size": step_size, "stiffness": h,
                       "limit": 1.0 / (nbeta * h + localization), "steps": run.num_steps,
                       "extensions": run.extensions, "plateau": run.plateau})
        if smaller == step_size:
            break
        if len(checks) > max_step_reductions:
            warnings.warn(f"the chains still sit where the Hessian's scale h = {h:.4g} calls for a step size "
                          f"below {smaller:.3g} after {max_step_reductions} reductions to {step_size:.3g}: "
                          f"λ̂ may read high (SGLD step bias); pass a smaller step_size", CalibrationWarning,
                          stacklevel=3)
            break
        step_size = smaller
        num_burnin, num_draws = schedule(step_size)
        inputs = inputs._replace(step_size=jnp.asarray(step_size, inputs.step_size.dtype))
    return StepChecked(run, step_size, planned, start, sum(r.extensions for r in segments),
                       any(r.plateau for r in segments), checks)
