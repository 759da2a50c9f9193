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

import dataclasses
import itertools
import math
import time
import warnings

import jax
import numpy as np

from slt_jax import settings, validation
from slt_jax.errors import CalibrationError, CalibrationWarning
from slt_jax.estimators.diagnostics import mcse_mean
from slt_jax.distributed import is_primary
from slt_jax.paths import local_path
from slt_jax.posterior import default_nbeta
from slt_jax.problem import make_problem
from slt_jax.serialization import dump_json, json_safe
from slt_jax.runner import sharding
from slt_jax.runner.chains import run_chains, setup
from slt_jax.samplers import get_kernel
from slt_jax.samplers.mala import mala_acceptance
from slt_jax.settings import Precision, RunSettings, SweepSettings
from slt_jax.tuning.choice import choose_step_size
from slt_jax.tuning.equilibration import equilibration_time
from slt_jax.tuning.grid import default_step_sizes

@dataclasses.dataclass(frozen=True)
class Calibration:
    """A step-size sweep: one row per chain group, and the recommended step size per setting.

    Attributes:
      step_sizes, nbetas, localizations: each group's ε, nβ, γ, shape ``(groups,)``.
      llc_mean: λ̂ of each group over its window (healthy chains), ``(groups,)``.
      llc_se: its standard error (the larger of the chain-spread and the ESS-based one).
      llc_per_chain: λ̂ of each chain, ``(groups, num_chains)``.
      trend: second-half minus first-half mean of the λ̂ draws in the window.
      mala_acceptance: Metropolis acceptance of the group's Langevin proposals (NaN where
        the check did not run).
      diverged_chains: diverged chains per group.
      window_draws: draws per chain in the group's window.
      status: one of :data:`slt_jax.step_choice.STATUSES` per group.
      reason: why, per group.
      choices: one dict per (nβ, γ) setting: ``nbeta``, ``localization``, ``step_size``
        (``None`` if nothing passed), ``reason``, ``total_time`` (T), ``window_start`` (T_b),
        ``equilibration_time`` (when λ̂ stopped trending at the chosen step size, ``None`` if
        it did not), ``equilibrated`` and ``burnin_time`` (what an estimate should burn in);
        and the evidence: ``verified`` (two consecutive steps agreed), the agreeing ``pair``,
        the pick's extrapolated ``bias`` (``estimate``, ``se``, ``bound``, ``kappa``),
        ``extensions`` (rounds run after the grid for this setting), ``sweeps`` (each round's
        step sizes, steps, chain-steps and seconds) and ``unverified_step_size``.
      settings: the sweep's settings (JSON-ready).
    """

    step_sizes: np.ndarray
    nbetas: np.ndarray
    localizations: np.ndarray
    llc_mean: np.ndarray
    llc_se: np.ndarray
    llc_per_chain: np.ndarray
    trend: np.ndarray
    mala_acceptance: np.ndarray
    diverged_chains: np.ndarray
    window_draws: np.ndarray
    status: tuple
    reason: tuple
    choices: tuple
    settings: dict

    def choice(self, nbeta=None, localization=None) -> dict:
        """The choice for one (nβ, γ) setting; either may be omitted when it was not swept."""
        found = [c for c in self.choices
                 if (nbeta is None or np.isclose(c["nbeta"], nbeta))
                 and (localization is None or np.isclose(c["localization"], localization))]
        if len(found) != 1:
            settings = [(c["nbeta"], c["localization"]) for c in self.choices]
            raise ValueError(f"nbeta={nbeta}, localization={localization} select {len(found)} of the swept "
                             f"(nbeta, localization) settings {settings}; name exactly one")
        return found[0]

    def recommended(self, nbeta=None, localization=None, *, warn: bool = True) -> float:
        """The recommended step size; raises :class:`CalibrationError` when none passed — also
        when no two consecutive step sizes agreed within the grid's extensions (unless the sweep
        ran with ``on_unverified="warn"``: then the smallest stable step, with a
        :class:`CalibrationWarning` whatever ``warn`` says).

        With ``warn`` (default) a choice whose λ̂ still trended at the end of the sweep warns
        (:class:`CalibrationWarning`); ``estimate_llc`` passes ``False``, since it judges
        equilibration on its own chains and warns itself.
        """
        choice = self.choice(nbeta, localization)
        if choice["step_size"] is None:
            raise CalibrationError(f"no step size passed calibration: {choice['reason']}\n{self}")
        if not choice.get("verified", True):
            warnings.warn(f"step size {choice['step_size']:.3g} is {choice['reason']}", CalibrationWarning,
                          stacklevel=2)
        if warn and not choice["equilibrated"]:
            warnings.warn(f"step size {choice['step_size']:.3g}: {choice['reason']}", CalibrationWarning,
                          stacklevel=2)
        return choice["step_size"]

    def schedule(self, step_size, steps_per_draw: int = 1, nbeta=None, localization=None) -> tuple[int, int]:
        """``(num_burnin, num_draws)`` that give ``step_size`` the simulated time the sweep used.

        Burn-in lasts the choice's ``burnin_time / ε`` steps (the later of T_b and the time
        λ̂ stopped trending at the chosen step size) and the draws span the sweep's window,
        ``(T − T_b) / ε`` steps.
        """
        choice = self.choice(nbeta, localization)
        num_burnin = math.ceil(choice["burnin_time"] / step_size)
        sampling = (choice["total_time"] - choice["window_start"]) / step_size
        return num_burnin, max(1, math.ceil(sampling / steps_per_draw))

    def summary(self, nbeta=None, localization=None) -> dict:
        """What an estimate records: the choice for one setting, why, and the whole table."""
        return json_safe({**self.choice(nbeta, localization), "table": self.table(), "settings": self.settings})

    def table(self) -> list[dict]:
        """One dict per group: step size, nβ, γ, λ̂, se, status, reason and the checks."""
        return [
            {"step_size": float(self.step_sizes[g]), "nbeta": float(self.nbetas[g]),
             "localization": float(self.localizations[g]), "llc_mean": float(self.llc_mean[g]),
             "llc_se": float(self.llc_se[g]), "trend": float(self.trend[g]),
             "mala_acceptance": float(self.mala_acceptance[g]),
             "diverged_chains": int(self.diverged_chains[g]), "window_draws": int(self.window_draws[g]),
             "status": self.status[g], "reason": self.reason[g]}
            for g in range(len(self.step_sizes))
        ]

    def to_dict(self) -> dict:
        """A JSON-ready summary: the table, the choices and the settings."""
        return json_safe({"table": self.table(), "choices": list(self.choices), "settings": self.settings})

    def to_json(self, path=None) -> str:
        """Serialise :meth:`to_dict`; also write it to ``path`` if given."""
        return dump_json(self.to_dict(), path)

    def plot(self, path=None, *, nbeta=None, localization=None, reference=None):
        """λ̂ ± 2·s.e. against step size for one (nβ, γ) setting, the choice starred.

        Groups with no healthy chain are left out; every point is labelled with its status.

        Args:
          path: optional PNG path.
          nbeta, localization: which setting (may be omitted when not swept).
          reference: optional known λ to draw as a line.

        Returns:
          The matplotlib ``Figure``.
        """
        choice = self.choice(nbeta, localization)
        rows = [g for g in range(len(self.step_sizes))
                if np.isclose(self.nbetas[g], choice["nbeta"])
                and np.isclose(self.localizations[g], choice["localization"])
                and np.isfinite(self.llc_mean[g])]
        if not rows:
            raise ValueError("no group of this setting has a finite λ̂ to plot (every chain diverged)")
        se = np.nan_to_num(self.llc_se[rows], nan=0.0, posinf=0.0)
        from slt_jax.plots import plot_llc_vs_step_size  # matplotlib only when plotting

        fig = plot_llc_vs_step_size(self.step_sizes[rows], self.llc_mean[rows], se,
                                    chosen=choice["step_size"], reference=reference)
        ax = fig.axes[0]
        for g in rows:
            ax.annotate(self.status[g], (self.step_sizes[g], self.llc_mean[g]), textcoords="offset points",
                        xytext=(4, -12), fontsize="x-small", color="0.3")
        ax.set_title(f"step-size calibration (nβ = {choice['nbeta']:.4g}, γ = {choice['localization']:.3g})",
                     fontsize="medium")
        if path is not None and is_primary():  # one writer in a multi-process run
            fig.savefig(local_path(path), format="png", dpi=120)
        return fig

    def __str__(self) -> str:
        lines = ["| step size | nβ | γ | λ̂ | se | MALA acc. | status |", "|---|---|---|---|---|---|---|"]
        for row in self.table():
            acc = "" if not np.isfinite(row["mala_acceptance"]) else f"{row['mala_acceptance']:.2f}"
            lines.append(f"| {row['step_size']:.3g} | {row['nbeta']:.4g} | {row['localization']:.3g} | "
                         f"{row['llc_mean']:.4g} | {row['llc_se']:.2g} | {acc} | {row['status']} |")
        for c in self.choices:
            step = "none" if c["step_size"] is None else f"{c['step_size']:.3g}"
            lines.append(f"\nnβ = {c['nbeta']:.4g}, γ = {c['localization']:.3g}: step size {step} — {c['reason']}")
        return "\n".join(lines)


def _values(name, value, *, allow_zero=False) -> list[float]:
    """A number or a non-empty sequence of numbers, each positive (or ≥ 0), as floats."""
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not items:
        raise ValueError(f"{name} is an empty sequence")
    for item in items:
        validation.check_positive(name, item, allow_zero=allow_zero)
    return [float(v) for v in items]


def _se(draws) -> float:
    """Standard error of the mean of ``draws`` ``(chains, draws)``: the larger of the
    chain-spread estimate and numpyro's ESS-based MCSE (either alone is optimistic with few
    chains or short windows)."""
    chains = draws.shape[0]
    spread = float(np.std(draws.mean(axis=1), ddof=1) / math.sqrt(chains)) if chains > 1 else 0.0
    mcse = mcse_mean(draws) if draws.shape[1] >= 4 else float("nan")
    return max(spread, mcse) if np.isfinite(mcse) else spread


def _pool(rows) -> dict:
    """One step size's runs (a grid point and its replicates with new chains) as one group:
    λ̂ over all their healthy chains, its standard error the larger of the chain spread's and the
    runs' own (combined), the trend from all chains' half-means."""
    if len(rows) == 1:
        return rows[0]
    means = np.concatenate([r["chain_means"] for r in rows])
    first = np.concatenate([r["halves"][0] for r in rows])
    second = np.concatenate([r["halves"][1] for r in rows])
    own = [r["se"] for r in rows if np.isfinite(r["se"]) and r["se"] > 0]
    combined = float(1.0 / math.sqrt(sum(1.0 / se**2 for se in own))) if own else float("nan")
    spread = lambda x: float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    rates = [(r["mala"], r["chain_means"].size) for r in rows if np.isfinite(r["mala"])]
    health = [r["health"] for r in rows if r["health"]]
    if means.size == 0:
        return {**rows[0], "diverged": sum(r["diverged"] for r in rows)}
    return {"mean": float(means.mean()), "se": max(x for x in (spread(means), combined) if np.isfinite(x)),
            "trend": float(second.mean() - first.mean()), "trend_se": math.hypot(spread(first), spread(second)),
            "mala": float(sum(m * c for m, c in rates) / sum(c for _, c in rates)) if rates else float("nan"),
            "diverged": sum(r["diverged"] for r in rows), "health": health[0] if health else None}


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
            stability=kernel.stability)
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
    steps_per_draw = max(1, int(shortest // sweep.min_window_draws))

    mala = sweep.mala
    if mala is None:
        mala = (n * problem.num_sampled <= sweep.mala_budget and sharding.axis_size(problem.mesh, sharding.DATA) == 1
                and not problem.streamed)
    mala = bool(mala) and kernel.name == "sgld"
    if mala:
        problem.require_resident("the sweep's MALA check (mala=True)")
    groups_run = _GroupRunner(problem, kernel, run, sweep, window_start, total_time, mala, progress)
    round_start = time.perf_counter()
    rows = groups_run(groups, num_steps, steps_per_draw, key_chains, key_mala)
    sweeps = [{"round": 0, "step_sizes": [g[1] for g in groups], "num_steps": num_steps,
               "chain_steps": len(groups) * num_chains * num_steps, "seconds": time.perf_counter() - round_start}]

    def verdict(s):
        """The rule on setting ``s``, every step size's runs (a grid point and its replicates)
        pooled chain by chain: ``(steps, pooled rows, choice)``."""
        steps = sorted({groups[g][1] for g in range(len(groups)) if groups[g][0] == s})
        pooled = [_pool([rows[g] for g in range(len(groups)) if groups[g][0] == s and groups[g][1] == eps])
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
                added = [steps[0] / sweep.grid_factor]
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


class _GroupRunner:
    """Runs chain groups ``(setting, ε, nβ, γ)`` in one program and summarises each over its
    setting's window [T_b, T] of simulated time (the sweep and each of its extensions)."""

    def __init__(self, problem, kernel, run, sweep, window_start, total_time, mala, progress):
        self.problem, self.kernel, self.run, self.sweep = problem, kernel, run, sweep
        self.window_start, self.total_time, self.mala, self.progress = window_start, total_time, mala, progress

    def __call__(self, groups, num_steps, steps_per_draw, key_chains, key_mala) -> list[dict]:
        problem, num_chains = self.problem, self.sweep.num_chains
        num_groups = len(groups)
        per_chain = lambda values: np.repeat(np.asarray(values, np.float64), num_chains)
        thresholds = [problem.divergence_threshold(self.run, nb) for _, _, nb, _ in groups]
        sweep_run = dataclasses.replace(self.run, num_chains=num_groups * num_chains, steps_per_draw=steps_per_draw,
                                        loss_estimator="control_variate")
        config, inputs = setup(problem, self.kernel, sweep_run, per_chain([g[1] for g in groups]),
                               nbeta=per_chain([g[2] for g in groups]),
                               localization=per_chain([g[3] for g in groups]), threshold=per_chain(thresholds))
        state, draws = run_chains(key_chains, config, inputs, num_chains=num_groups * num_chains, num_burnin=0,
                                  num_draws=math.ceil(num_steps / steps_per_draw), chunk_size=self.run.chunk_size,
                                  progress=self.progress)
        llc_all = (np.asarray(draws.batch_loss, np.float64) - np.asarray(draws.center_loss, np.float64))
        llc_all = llc_all * np.repeat([g[2] for g in groups], num_chains)[:, None]
        draw_steps = steps_per_draw - 1 + steps_per_draw * np.arange(llc_all.shape[1])
        diverged_at = sharding.to_host(state.diverged_at).reshape(num_groups, num_chains)
        positions = sharding.to_host(state.kernel_state.position) if self.mala else None
        health = self.kernel.stability.health

        rows = []
        for g, (s, eps, nb, gamma) in enumerate(groups):
            chains = slice(g * num_chains, (g + 1) * num_chains)
            window = (draw_steps * eps >= self.window_start[s]) & (draw_steps * eps <= self.total_time[s])
            llc = llc_all[chains][:, window]
            healthy = (diverged_at[g] < 0) & np.all(np.isfinite(llc_all[chains]), axis=1)
            with np.errstate(all="ignore"):  # diverged chains: inf or NaN, reported as such
                per_chain_mean = llc.mean(axis=1)
            row = {"llc_per_chain": per_chain_mean, "diverged": int(np.sum(~healthy)),
                   "window_draws": int(window.sum()), "mean": float("nan"), "se": float("nan"),
                   "trend": float("nan"), "trend_se": float("nan"), "mala": float("nan"), "health": None,
                   "trace": llc_all[chains][healthy], "times": draw_steps * eps, "run_time": num_steps * eps,
                   "chain_means": np.zeros(0), "halves": (np.zeros(0), np.zeros(0))}
            if healthy.any():
                good = llc[healthy]
                half = good.shape[1] // 2
                row.update(mean=float(good.mean()), se=_se(good),
                           trend=float(good[:, half:].mean() - good[:, :half].mean()),
                           trend_se=math.hypot(_se(good[:, :half]), _se(good[:, half:])),
                           chain_means=good.mean(axis=1), halves=(good[:, :half].mean(axis=1),
                                                                   good[:, half:].mean(axis=1)))
                if health is not None and draws.info is not None:
                    info = type(draws.info)(*(np.asarray(x)[chains][healthy][:, window] for x in draws.info))
                    row["health"] = health(info, self.sweep.rtol, self.sweep.check_z)
                if self.mala:
                    chain_positions = jax.tree.map(lambda x: x[chains], positions)
                    posterior = problem.posterior(nb, gamma)
                    # One block of n rows: within the n·d budget, and a much smaller program. Every
                    # chain of the group is checked (one program for any number of diverged ones);
                    # only the healthy ones count.
                    rates = mala_acceptance(problem.loss_fn, problem.data, posterior, chain_positions,
                                            jax.random.fold_in(key_mala, g), step_size=eps, num_steps=16,
                                            batch_size=problem.n)
                    row["mala"] = float(np.mean(rates[healthy]))
            rows.append(row)
        return rows
