"""Step-size calibration: a sweep of step sizes in one program, compared at equal simulated time.

SGLD's discretisation error biases λ̂ upward as the step size ε grows, and a large enough ε
diverges (Lau et al., arXiv:2308.12108; docs/mathematics.md §3.2, §3.5). :func:`calibrate` runs one chain
group per setting (step size, and optionally nβ and γ) in a single compiled program — the
chain runner takes one step size, nβ and γ per chain — checks each group's stability and
recommends the largest step size whose λ̂ agrees with the smaller ones.

Equal simulated time. Langevin dynamics relax on the time scale ``t = ε × steps``, whatever
ε: ε only sets the discretisation error. Given equal step counts, a small ε has had less
time, has not equilibrated and reads low — which looks like disagreement, or by chance
agreement, for the wrong reason. The groups here share one program and so one step count,
``num_steps``: the smallest step size's. Every group is read over the same simulated-time
window instead: burn-in up to ``T_b = burnin_fraction · T`` and draws over ``[T_b, T]``,
where ``T = num_steps · ε_min``; a group at ε reads its steps ``[T_b/ε, T/ε]``. Larger
step sizes reach T early; their later steps are not averaged but still count for
divergence — a longer stability test at no extra cost. Each (nβ, γ) setting has its own T
(its own smallest step size). The sweep costs ``groups × num_chains × num_steps`` steps.

Checks per group (its status):

- ``"diverged"``: a chain's loss became NaN/inf or ran away (:mod:`slt_jax.runner.divergence`)
  at any step of the program.
- ``"unstable"``: λ̂ is negative by more than 3 standard errors (w* is not a minimum, or
  the sampler is broken); the Metropolis acceptance of its Langevin proposals on the
  full-batch posterior is below 0.7 (plain SGLD on small data, where the check is cheap:
  :mod:`slt_jax.samplers.mala`); or its λ̂ draws trend within the window by more than the
  reference's (drifting away). A trend *shared* with the reference is slow equilibration,
  the same for every step size at equal simulated time; it does not disqualify.
- ``"biased"``: stable, but λ̂ differs from the smaller accepted step sizes.
- ``"ok"``: stable and agrees: ``|λ̂_ε − λ̂_ref| + z·se ≤ rtol·|λ̂_ref|``, where ``λ̂_ref``
  is the inverse-variance mean of the accepted smaller step sizes and ``se`` the standard
  error of the difference. The difference *plus* its error must fit in the tolerance, so a
  noisy group cannot pass by being noisy.
- ``"skipped"``: stable and agrees, but lies above a step size that failed.

The smallest stable step size is the reference (``"ok"``); walking up, the first group
that is not ``"ok"`` ends the run of candidates, and the recommendation is the largest
``"ok"`` step size.

Equilibration. Comparing at equal simulated time does not need the chains to have
equilibrated, but the estimate does. Every group ran the whole program, so the largest step
size that neither diverged nor drifted ran longest — ``num_steps · ε`` of simulated time,
``ε/ε_min`` times T — and its trace shows when λ̂ stops trending
(:func:`equilibration_time`; a biased group settles at a shifted level but on the same
clock). An estimate at the chosen ε* burns in for that long (at least T_b) and draws for
``T − T_b`` (:meth:`Calibration.schedule`). If λ̂ still trends at the end of that longest
run, the choice says so and :meth:`Calibration.recommended` warns: raise ``num_steps``.
``estimate_llc(step_size="auto")`` does not stop there: its own chains record from the first
step and their run doubles while λ̂ trends (:mod:`slt_jax.tuning.equilibration`), since at deep,
highly singular points λ̂ can sit on a plateau for a while and then climb.
"""

import itertools
import math
import time

import jax
import numpy as np

from slt_jax import settings, validation
from slt_jax.posterior import default_nbeta
from slt_jax.problem import make_problem
from slt_jax.runner import sharding
from slt_jax.samplers import get_kernel
from slt_jax.settings import Precision, RunSettings, SweepSettings
from slt_jax.tuning.calibration import Calibration
from slt_jax.tuning.choice import choose_step_size
from slt_jax.tuning.equilibration import equilibration_time
from slt_jax.tuning.grid import default_step_sizes
from slt_jax.tuning.groups import GroupRunner, pool

def _values(name, value, *, allow_zero=False) -> list[float]:
    """A number or a non-empty sequence of numbers, each positive (or ≥ 0), as floats."""
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not items:
        raise ValueError(f"{name} is an empty sequence")
    for item in items:
        validation.check_positive(name, item, allow_zero=allow_zero)
    return [float(v) for v in items]


def calibrate(loss_fn, params, data, key, *, localization, step_sizes=None, nbeta=None, sampler="sgld",
              param_mask=None, mesh=None, devices=None, param_specs=None, sweep: SweepSettings | None = None,
              run: RunSettings | None = None, precision: Precision | None = None, progress: bool = True,
              **options) -> Calibration:
    """Sweep step sizes (and optionally nβ, γ) in one program and recommend a step size.

    Every group of ``num_chains`` chains starts at w* and samples the localized posterior
    ``∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` (Lau et al., arXiv:2308.12108) with its own step
    size; groups are compared over the same simulated-time window (module docstring), and
    the recommendation is the largest step size that is stable and whose λ̂ agrees with the
    smaller ones within ``rtol``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean per-sample loss.
      params: w*, a pytree of float arrays.
      data: pytree of arrays with a leading sample axis (n rows).
      key: JAX PRNG key (chain i of the program uses ``fold_in(key, i)``).
      localization: γ ≥ 0, or a sequence of values to sweep.
      step_sizes: the ε to try (shared by every (nβ, γ) setting); default a grid per
        setting from :func:`default_step_sizes`.
      nbeta: nβ, or a sequence to sweep; default ``n / log n``.
      sampler: an SGLD-family sampler name or :class:`~slt_jax.samplers.KernelFactory`.
      param_mask: sample only some parameters (see :func:`slt_jax.estimate_llc`).
      mesh, devices, param_specs: how the chains (and parameters) are split over devices (see
        :func:`slt_jax.estimate_llc`).
      sweep: the sweep's :class:`~slt_jax.settings.SweepSettings` (chains per step size,
        steps, window, agreement tolerance, Metropolis check, grid).
      run: :class:`~slt_jax.settings.RunSettings`; the sweep uses its ``batch_size``,
        ``chunk_size`` and ``divergence_threshold``.
      precision: :class:`~slt_jax.settings.Precision` (e.g. ``dtype=jnp.float64``).
      progress: show a progress bar.
      **options: fields of those settings as keywords (``num_chains``, ``num_steps``, ``rtol``,
        ``batch_size``, ``dtype``, …; a name in :class:`~slt_jax.settings.SweepSettings` refers
        to the sweep).

    Returns:
      A :class:`Calibration`.
    """
    sweep, run, precision = settings.resolve(options, (sweep, SweepSettings), (run, RunSettings),
                                             (precision, Precision))
    localizations = _values("localization", localization, allow_zero=True)
    n = validation.check_data(data)
    nbetas = [default_nbeta(n)] if nbeta is None else _values("nbeta", nbeta)
    if step_sizes is not None:
        step_sizes = sorted(_values("step_sizes", step_sizes))
        if len(set(step_sizes)) != len(step_sizes):
            raise ValueError(f"step_sizes has repeated values: {step_sizes}")
    validation.key_data(key)
    problem = make_problem(loss_fn, params, data, localization=localizations[0], nbeta=nbetas[0],
                           param_mask=param_mask, mesh=mesh, devices=devices, param_specs=param_specs,
                           precision=precision, run=run)
    return run_sweep(problem, get_kernel(sampler), run, sweep, key, nbetas=nbetas, localizations=localizations,
                     step_sizes=step_sizes, progress=progress)


def run_sweep(problem, kernel, run: RunSettings, sweep: SweepSettings, key, *, nbetas, localizations,
              step_sizes=None, progress=True) -> Calibration:
    """The sweep of :func:`calibrate` on a prepared :class:`~slt_jax.problem.Problem` (also what
    ``step_size="auto"`` runs): one chain group per (nβ, γ, ε), one compiled program; then, for
    every setting whose pick is not verified by two consecutive agreeing step sizes, one more
    step size below its smallest per round (equal simulated time: twice the steps at half the
    step), up to ``sweep.max_grid_extensions`` rounds."""
    sweep = sweep.for_kernel(kernel.sweep)
    n, num_chains, num_steps = problem.n, sweep.num_chains, sweep.num_steps
    key_grid, key_chains, key_mala = jax.random.split(key, 3)
    started = time.perf_counter()

    # Groups: for each (nβ, γ) setting, its step sizes in increasing order.
    setting_pairs = list(itertools.product(nbetas, localizations))
    groups = []  # (setting index, ε, nβ, γ)
    for s, (nb, gamma) in enumerate(setting_pairs):
        grid = step_sizes if step_sizes is not None else default_step_sizes(
            problem.user_loss_fn, problem.params, problem.resident_data, key_grid, nbeta=nb, localization=gamma,
            param_mask=problem.mask, num_points=sweep.grid_points, factor=sweep.grid_factor,
            skip=sweep.grid_skip, stability=kernel.stability)
        groups += [(s, float(eps), nb, gamma) for eps in grid]
    grid_seconds = time.perf_counter() - started
    total_time = [num_steps * min(g[1] for g in groups if g[0] == s) for s in range(len(setting_pairs))]
    window_start = [sweep.burnin_fraction * t for t in total_time]
    shortest = min((total_time[s] - window_start[s]) / eps for s, eps, _, _ in groups)
    if shortest < 2 * sweep.min_window_draws:
        raise ValueError(
            f"num_steps={num_steps} leaves the largest step size only {shortest:.0f} steps in its window "
            f"(simulated time [T_b, T] / ε): raise num_steps above "
            f"{math.ceil(num_steps * 2 * sweep.min_window_draws / shortest)} or narrow step_sizes")
    steps_per_draw = max(1, int(shortest // max(sweep.window_draws, sweep.min_window_draws)))

    mala = sweep.mala
    if mala is None:
        mala = (n * problem.num_sampled <= sweep.mala_budget and sharding.axis_size(problem.mesh, sharding.DATA) == 1
                and not problem.streamed)
    mala = bool(mala) and kernel.name == "sgld"
    if mala:
        problem.require_resident("the sweep's MALA check (mala=True)")
    groups_run = GroupRunner(problem, kernel, run, sweep, window_start, total_time, mala, progress)
    round_start = time.perf_counter()
    rows = groups_run(groups, num_steps, steps_per_draw, key_chains, key_mala)
    sweeps = [{"round": 0, "step_sizes": [g[1] for g in groups], "num_steps": num_steps,
               "chain_steps": len(groups) * num_chains * num_steps, "seconds": time.perf_counter() - round_start}]

    def verdict(s):
        """The rule on setting ``s``, every step size's runs (a grid point and its replicates)
        pooled chain by chain: ``(steps, pooled rows, choice)``."""
        steps = sorted({groups[g][1] for g in range(len(groups)) if groups[g][0] == s})
        pooled = [pool([rows[g] for g in range(len(groups)) if groups[g][0] == s and groups[g][1] == eps])
                  for eps in steps]
        column = lambda name: [r[name] for r in pooled]
        return steps, pooled, choose_step_size(
            steps, column("mean"), column("se"), trend=column("trend"), trend_se=column("trend_se"),
            mala_acceptance=column("mala"), diverged=column("diverged"), unhealthy=column("health"),
            rtol=sweep.rtol, z=sweep.z, check_z=sweep.check_z, min_mala_acceptance=sweep.min_mala_acceptance)

    # While a setting's pick is unverified, one more round of sweeps at the same simulated time T:
    # where its smallest stable step and the next one up differ by less than the tolerance and
    # only their standard error keeps them from agreeing, both are run again with as many new
    # chains as they have had (their runs are pooled); otherwise — a real difference, or nothing stable above or
    # at all — the grid extends down by one step, ε_min/f, run for T/ε_min·f steps.
    extensions = [0] * len(setting_pairs)
    for k in range(1, sweep.max_grid_extensions + 1):
        new = []
        for s in range(len(setting_pairs)):
            steps, pooled, choice = verdict(s)
            if choice.verified:
                continue
            extensions[s] += 1
            stable = [i for i, st in enumerate(choice.status) if st == "ok"]
            nxt = stable[0] + 1 if stable else None
            # Replicate only where noise is plausibly all that stands in the way — the pair's
            # difference within half the tolerance — and at most twice per pair; a larger
            # difference is bias, which more chains would only confirm: go down instead.
            replicated = sum(1 for w in sweeps[1:] if nxt is not None and nxt < len(steps)
                             and steps[stable[0]] in w["step_sizes"] and steps[nxt] in w["step_sizes"])
            noisy = (nxt is not None and nxt < len(steps) and choice.status[nxt] in ("ok", "biased")
                     and replicated < 2 and abs(pooled[nxt]["mean"] - pooled[stable[0]]["mean"])
                     <= 0.5 * sweep.rtol * abs(pooled[stable[0]]["mean"]))
            if noisy:
                # As many new chains as the pair's smaller step has had so far (at most 4 groups'
                # worth): the standard error of their difference shrinks by √2 per round or faster.
                runs = sum(1 for g in groups if g[0] == s and g[1] == steps[stable[0]])
                added = [steps[stable[0]], steps[nxt]] * min(runs, 4)
            else:
                # Down one grid factor — or, where the kernel predicts the step its health test needs
                # (SGNHT: the minibatch heat falls with ε), straight there (at most f³ below) together
                # with the step under it, so that one round can bring the pair that verifies.
                added = [steps[0] / sweep.grid_factor]
                predicted = pooled[0]["healthy_step"]
                if predicted is not None and predicted < added[0]:
                    top = max(predicted, steps[0] / sweep.grid_factor**3)
                    added = [top, top / sweep.grid_factor]
            new += [(s, eps, *setting_pairs[s]) for eps in added]
        if not new:
            break
        # One program per round: every new group runs as long as its smallest step needs (T/ε),
        # recording at the thinning that gives that step the grid's draw count.
        longest = max(total_time[g[0]] / g[1] for g in new)
        spd = max(1, round(steps_per_draw * longest / num_steps))
        round_start = time.perf_counter()
        rows += groups_run(new, math.ceil(longest), spd, jax.random.fold_in(key_chains, k),
                           jax.random.fold_in(key_mala, k))
        groups += new
        sweeps.append({"round": k, "step_sizes": [g[1] for g in new], "num_steps": math.ceil(longest),
                       "chain_steps": len(new) * num_chains * math.ceil(longest),
                       "seconds": time.perf_counter() - round_start})

    num_groups = len(groups)
    status, reason = [None] * num_groups, [None] * num_groups
    choices = []
    for s, (nb, gamma) in enumerate(setting_pairs):
        steps_s, _, verdict_s = verdict(s)
        members = [g for g in range(num_groups) if groups[g][0] == s]
        for g in members:
            status[g], reason[g] = verdict_s.status[steps_s.index(groups[g][1])], \
                verdict_s.reason[steps_s.index(groups[g][1])]
        chosen = verdict_s.step_size
        why = verdict_s.why
        if chosen is not None and not verdict_s.verified:
            budget = (f"after {extensions[s]} extension(s) of the grid down (max_grid_extensions="
                      f"{sweep.max_grid_extensions})")
            why = f"unverified: no two consecutive step sizes were stable and agreed {budget}; {why}"
            if sweep.on_unverified == "raise":
                chosen = None
        choice = {"nbeta": nb, "localization": gamma, "step_size": chosen, "reason": why,
                  "verified": verdict_s.verified, "pair": verdict_s.pair, "bias": verdict_s.bias,
                  "unverified_step_size": None if verdict_s.verified else verdict_s.step_size,
                  "extensions": extensions[s], "sweeps": [w for w in sweeps if any(
                      g[0] == s and g[1] in w["step_sizes"] for g in groups)],
                  "total_time": total_time[s], "window_start": window_start[s], "equilibration_time": None,
                  "equilibrated": False, "burnin_time": window_start[s]}
        if chosen is not None:
            # The longest-running group that neither diverged nor drifted: its whole run shows
            # when λ̂ settles (a biased group settles at a shifted level, on the same clock).
            probe = max((g for g in members if status[g] in ("ok", "biased", "skipped") and groups[g][1] >= chosen),
                        key=lambda g: groups[g][1])
            run_time = rows[probe]["run_time"]
            settle = equilibration_time(rows[probe]["trace"], rows[probe]["times"], rtol=sweep.rtol, z=sweep.z)
            choice["equilibration_probe"] = groups[probe][1]
            if settle is None:
                choice.update(burnin_time=max(window_start[s], run_time), reason=why + (
                    f"; but λ̂ still trends over the longest stable run (step size {groups[probe][1]:.3g}, "
                    f"{run_time:.3g} of simulated time): raise num_steps"))
            else:
                choice.update(equilibration_time=settle, equilibrated=True,
                              burnin_time=max(window_start[s], settle))
        choices.append(choice)

    return Calibration(
        step_sizes=np.array([g[1] for g in groups]), nbetas=np.array([g[2] for g in groups]),
        localizations=np.array([g[3] for g in groups]),
        llc_mean=np.array([r["mean"] for r in rows]), llc_se=np.array([r["se"] for r in rows]),
        llc_per_chain=np.stack([r["llc_per_chain"] for r in rows]),
        trend=np.array([r["trend"] for r in rows]), mala_acceptance=np.array([r["mala"] for r in rows]),
        diverged_chains=np.array([r["diverged"] for r in rows]),
        window_draws=np.array([r["window_draws"] for r in rows]),
        status=tuple(status), reason=tuple(reason), choices=tuple(choices),
        settings={**settings.to_dict(sweep), "mala": mala, "steps_per_draw": steps_per_draw,
                  "batch_size": problem.batch_size, "sampler": kernel.name, "n": n,
                  "num_sampled": problem.num_sampled, "default_grid": step_sizes is None,
                  "divergence_threshold": run.divergence_threshold, "dtype": str(problem.precision.dtype),
                  "sweeps": sweeps, "grid_seconds": grid_seconds, "seconds": time.perf_counter() - started},
    )
