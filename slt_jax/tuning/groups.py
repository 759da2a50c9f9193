"""A step-size sweep's chain groups: run in one program, each summarised over its window.

:class:`GroupRunner` runs groups ``(setting, ε, nβ, γ)`` of chains as one compiled program (the
chain runner takes one step size, nβ and γ per chain) and reads each over its setting's window
``[T_b, T]`` of simulated time: λ̂, its standard error, its trend between the window's halves,
the kernel's health and, for plain SGLD on small data, the Metropolis acceptance of its
proposals. :func:`pool` joins a grid point's runs (the point and its replicates). The rule that
turns these rows into a choice is :mod:`slt_jax.tuning.choice`; the sweep that plans the groups
is :mod:`slt_jax.tuning.sweep`.
"""

import dataclasses
import math

import jax
import numpy as np

from slt_jax.estimators.diagnostics import mcse_mean
from slt_jax.runner import sharding
from slt_jax.runner.chains import run_chains, setup
from slt_jax.samplers.mala import mala_acceptance


def _se(draws) -> float:
    """Standard error of the mean of ``draws`` ``(chains, draws)``: the larger of the
    chain-spread estimate and numpyro's ESS-based MCSE (either alone is optimistic with few
    chains or short windows)."""
    chains = draws.shape[0]
    spread = float(np.std(draws.mean(axis=1), ddof=1) / math.sqrt(chains)) if chains > 1 else 0.0
    mcse = mcse_mean(draws) if draws.shape[1] >= 4 else float("nan")
    return max(spread, mcse) if np.isfinite(mcse) else spread


def pool(rows) -> dict:
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
    predicted = [r["healthy_step"] for r in rows if r["healthy_step"] is not None]
    if means.size == 0:
        return {**rows[0], "diverged": sum(r["diverged"] for r in rows)}
    return {"mean": float(means.mean()), "se": max(x for x in (spread(means), combined) if np.isfinite(x)),
            "trend": float(second.mean() - first.mean()), "trend_se": math.hypot(spread(first), spread(second)),
            "mala": float(sum(m * c for m, c in rates) / sum(c for _, c in rates)) if rates else float("nan"),
            "diverged": sum(r["diverged"] for r in rows), "health": health[0] if health else None,
            "healthy_step": min(predicted) if predicted else None}



class GroupRunner:
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
        health, healthy_step = self.kernel.stability.health, self.kernel.stability.healthy_step

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
                   "healthy_step": None,
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
                    row["health"] = health(info, self.sweep.rtol, self.sweep.check_z, compared=True)
                    if row["health"] and healthy_step is not None:
                        row["healthy_step"] = healthy_step(info, eps)
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
