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

import time
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import keys
from slt_jax.curvature import chain_stiffness
from slt_jax.errors import CalibrationWarning
from slt_jax.runner import sharding
from slt_jax.runner.chain import ChainInputs, RunConfig
from slt_jax.tuning.equilibration import Equilibrated, run_until_equilibrated
from slt_jax.tuning.grid import stable_step



def stable_step_at_chains(problem, kernel, kernel_state, healthy, key, *, max_chains: int | None = None) -> dict:
    """The kernel's rule ``ε ≤ limit/(4·(nβ·h + γ·G_max))`` where the chains are.

    h is the largest eigenvalue of ``G^½·∇²L_B·G^½`` at each chain's position
    (:func:`~slt_jax.curvature.chain_stiffness`: Lanczos on a probe batch of up to 4096
    rows), G the chain's own preconditioner from its state (RMSProp-SGLD's ``1/(√V + eps)``; 1
    for SGLD and SGNHT), ``limit`` the kernel's stability limit given its state (SGNHT:
    ``4 − 2ζ`` with the chain's friction ζ; :class:`~slt_jax.samplers.base.Stability`). The
    stable step is the smallest over the healthy chains measured.

    Args:
      problem: the :class:`~slt_jax.problem.Problem`.
      kernel: the sampler's factory.
      kernel_state: the chains' kernel state (leading chain axis).
      healthy: which chains count, ``(chains,)``.
      key: PRNG key of the probe batch and the Lanczos start.
      max_chains: measure at most this many chains (all by default).

    Returns:
      A record: ``stable_step``, ``stiffness`` (h of the chain that sets it), ``limit`` (its
      stability limit), ``max_preconditioner`` (its G_max), ``chains_measured`` and ``seconds``.
    """
    start = time.perf_counter()
    stability = kernel.stability
    num_chains = healthy.shape[0]
    preconditioner = None if stability.preconditioner is None else stability.preconditioner(kernel_state)
    h = chain_stiffness(problem.user_loss_fn, kernel_state.position, problem.resident_data, key, param_mask=problem.mask,
                        preconditioner=preconditioner, max_chains=max_chains)
    limits = stability.limits(kernel_state, num_chains)
    if preconditioner is None:
        g_max = np.ones(num_chains)
    else:
        mask = problem.posterior().sampled()
        g_max = np.max(np.stack([np.max(np.where(np.asarray(m) != 0, np.asarray(g), -np.inf).reshape(num_chains, -1),
                                        axis=1)
                                 for g, m in zip(jax.tree.leaves(preconditioner), jax.tree.leaves(mask))]), axis=0)
    steps = limits / (4.0 * (problem.nbeta * h + problem.localization * g_max))
    counted = np.flatnonzero(np.asarray(healthy) & np.isfinite(steps))
    if counted.size == 0:
        return {"stable_step": None, "stiffness": None, "limit": None, "max_preconditioner": None,
                "chains_measured": int(np.isfinite(h).sum()), "seconds": time.perf_counter() - start}
    worst = counted[np.argmin(steps[counted])]
    return {"stable_step": float(steps[worst]), "stiffness": float(h[worst]), "limit": float(limits[worst]),
            "max_preconditioner": float(g_max[worst]), "chains_measured": int(np.isfinite(h).sum()),
            "seconds": time.perf_counter() - start}


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
        ``limit`` (the kernel's rule there, 1/(nβh + γ) for SGLD), ``stability_limit``,
        ``max_preconditioner``, ``seconds``, and the segment's ``steps``, ``extensions`` and
        ``plateau``.
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
                         num_draws: int, plateau_settles: Callable | None = None, **equilibrate) -> StepChecked:
    """:func:`~slt_jax.equilibration.run_until_equilibrated`, then, while ε exceeds the kernel's
    rule at the chains' positions (:func:`stable_step_at_chains`: ``1/(nβh + γ)`` for SGLD, h the
    largest Hessian eigenvalue of the healthy chains; preconditioned for RMSProp-SGLD, with the
    thermostat's limit for SGNHT), the same chains continue at ε halved as often as that takes,
    with the schedule for the new step, their burn-in and draws read afresh (at most
    ``max_step_reductions`` times; then a ``CalibrationWarning``). Every SGLD-family kernel is
    checked.

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
      plateau_settles: ``plateau_settles(step_size) -> steps`` for ``run_until_equilibrated``'s
        ``plateau_settles_after`` at each segment's step size (or ``None``).
      **equilibrate: the rest of ``run_until_equilibrated``'s settings.

    Returns:
      A :class:`StepChecked`.
    """
    state, start, checks, segments = None, 0, [], []
    while True:
        settles = None if plateau_settles is None else plateau_settles(step_size)
        run = run_until_equilibrated(key, config, inputs, llc_of, num_chains=num_chains, num_burnin=num_burnin,
                                     num_draws=num_draws, state=state, start=start, plateau_settles_after=settles,
                                     **equilibrate)
        planned = num_burnin + num_draws * config.steps_per_draw
        state, start = run.state, start + run.num_steps
        equilibrate["chunk_size"] = run.chunk_size  # continuations reuse the compiled chunk
        segments.append(run)
        healthy = sharding.to_host(state.diverged_at) < 0
        if not healthy.any():
            break
        # Every chain is measured (one program whatever diverged); the healthy ones count.
        rule = stable_step_at_chains(problem, config.kernel, state.kernel_state, healthy,
                                     keys.stream(key, keys.STIFFNESS, len(checks)))
        if rule["stable_step"] is None:
            break
        h = rule["stiffness"]
        smaller = stable_step(step_size, h, nbeta=problem.nbeta, localization=problem.localization,
                              limit=rule["stable_step"])
        checks.append({"after_steps": start, "step_size": step_size, "stiffness": h, "limit": rule["stable_step"],
                       "stability_limit": rule["limit"], "max_preconditioner": rule["max_preconditioner"],
                       "seconds": rule["seconds"], "steps": run.num_steps, "extensions": run.extensions,
                       "plateau": run.plateau})
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
