"""When has λ̂ stopped trending? Burn-in read off the chains' own trace, and runs extended until it has.

At deep, highly singular points the chains leave w* on a long time scale: on a DLN with
widths 25-15-21-8-35-14 (rank 1, λ = 60, γ = 1, nβ = n/log n at n = 1e5) plain SGLD held
λ̂ ≈ 19 for the first ~0.003 units of simulated time (ε × steps), then climbed and settled
near 57 only after ~0.02 (``benchmarks/dln_accuracy.py``). Singular directions are flat to
high order, and the chains must diffuse far along them before the loss feels it (docs/mathematics.md
§6: chains at highly singular points need longer burn-in); the plateau is the Laplace value
of the quadratic part alone (:mod:`slt_jax.estimators.laplace`). A fixed budget reads the
transient; :func:`run_until_equilibrated` records the whole run, and doubles it — up to a cap
— until :func:`equilibration_time` finds a burn-in after which λ̂ no longer trends.

No test of a finite trace can tell a long metastable plateau from equilibrium: a trace flat
so far may still climb later. A run may therefore also be given a ``plateau`` test
(:mod:`slt_jax.tuning.plateau`): while it holds, the run keeps doubling, up to its own (longer)
cap. The caps and the tests' tolerances are recorded with the result.
"""

import math
from typing import Callable, NamedTuple

import jax
import numpy as np

from slt_jax.estimators.llc import halves_trend, t_equivalent
from slt_jax.runner import sharding
from slt_jax.runner.chain import ChainInputs, Draws, RunConfig
from slt_jax.runner.chains import plan_chunks, run_chains

# Candidate burn-ins, as fractions of the run: up to three quarters, so that the last quarter
# of a run that settled late can serve as its draws.
FRACTIONS = np.arange(1, 16) / 20

SIGNIFICANCE_Z = 2.0
"""A trend significant beyond this many normal standard errors (as the same quantile of Student's t
with ``chains − 1`` degrees of freedom) is a trend, however small (:func:`equilibration_time`)."""


def equilibration_time(draws, times, *, rtol: float = 0.05, z: float = 1.0, significance: float = SIGNIFICANCE_Z,
                       fractions=FRACTIONS) -> float | None:
    """The earliest burn-in after which a ``(chains, draws)`` λ̂ trace stops trending.

    For each candidate burn-in ``t = f · times[-1]`` (``f`` in ``fractions``), the draws
    after t are split into two halves; λ̂ has equilibrated by t when the halves' means
    differ by at most ``rtol·|mean|`` *including* ``z`` standard errors of the difference
    (a noisy trace cannot pass by being noisy) **and** the difference is not significant. The
    difference is taken chain by chain (its standard error from the spread of the chains'
    differences): chains that sit at different levels for a long time — the slow modes of
    singular posteriors — do not hide a shared climb.

    The size test alone passes a slow climb: on DLN 10-26-24-38 (λ = 146) the last quarter of an
    8,799-step run rose by +4.0 ± 0.6 between its halves — 3.4 % of λ̂, within 5 %, but 6.7
    standard errors — while λ̂ = 120 still sat 18 % below where it settled after 70k steps. A
    climb that slow covers a small share of its remaining distance within any window, so its
    size says little; its significance says it has not ended. With several chains, a
    difference beyond ``significance`` normal standard errors (as a t quantile with chains − 1
    degrees of freedom: 3.3 se at 4 chains, 2.4 at 8) therefore counts as a trend. With one
    chain the standard error ignores autocorrelation, and only the size test applies.

    Args:
      draws: λ̂ per draw, ``(chains, draws)``, finite.
      times: simulated time (or step) of each draw, increasing, ``(draws,)``.
      rtol: the trend that counts as none, relative to λ̂.
      z: standard errors added to the trend in that test.
      significance: the normal quantile beyond which a trend is significant (``inf``: size only).
      fractions: candidate burn-ins as fractions of the run, increasing.

    Returns:
      The earliest passing burn-in time, or ``None`` if λ̂ trends after every candidate.
    """
    draws, times = np.asarray(draws, float), np.asarray(times, float)
    limit = t_equivalent(significance, draws.shape[0] - 1) if draws.shape[0] > 1 and np.isfinite(significance) \
        else np.inf
    for f in fractions:
        rest = draws[:, times >= f * times[-1]]
        half = rest.shape[1] // 2
        if half < 4:
            break
        difference, se = halves_trend(rest)
        if abs(difference) + z * se <= rtol * abs(rest.mean()) and not abs(difference) > limit * se:
            return float(f * times[-1])
    return None


class Equilibrated(NamedTuple):
    """A run extended until λ̂ stopped trending (see :func:`run_until_equilibrated`).

    Attributes:
      state: the chains' final state.
      draws: the draws after the burn-in, ``(chains, draws, …)``.
      num_burnin: the burn-in in steps (at least the planned one).
      num_steps: the steps every chain ran.
      equilibrated: whether λ̂ stopped trending within the cap — and, if the run was extended,
        left any plateau and stopped moving between the last two doublings.
      extensions: how many times the run was doubled.
      plateau: whether the ``plateau`` test held at some round (the run was then allowed up to
        ``max_plateau_extension``).
      still_at_plateau: whether it still held when the run stopped.
      plateau_settled: whether the run stopped on the plateau because it had lasted long enough
        for the chains to reach the localizer's scale along every direction (the Laplace value is
        then the estimate, not a transient).
      trending: whether λ̂ still trended when the run stopped (the draws are then its last
        quarter).
      chunk_size: the steps per compiled chunk every round ran in (a continuation passing it
        on compiles no new program).
    """

    state: object
    draws: Draws
    num_burnin: int
    num_steps: int
    equilibrated: bool
    extensions: int
    plateau: bool = False
    still_at_plateau: bool = False
    trending: bool = False
    chunk_size: int | None = None
    plateau_settled: bool = False


def level(llc):
    """Mean λ̂ of ``(chains, draws)`` and its standard error from the chains' spread (None
    without draws)."""
    if llc.shape[1] == 0:
        return None
    means = np.asarray(llc, float).mean(axis=1)
    se = float(np.std(means, ddof=1) / math.sqrt(means.size)) if means.size > 1 else 0.0
    return float(means.mean()), se


def _agree(current, previous, rtol, z) -> bool:
    """Two rounds' λ̂ agree: their difference plus ``z`` standard errors within ``rtol`` (a noisy
    pair cannot agree by being noisy)."""
    if current is None or previous is None:
        return False
    (a, se_a), (b, se_b) = current, previous
    return abs(a - b) + z * math.hypot(se_a, se_b) <= rtol * abs(a)


def _concat(records):
    """The rounds' draws joined along the draw axis (kernel infos are pytrees of arrays)."""
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *records)


def run_until_equilibrated(key, config: RunConfig, inputs: ChainInputs, llc_of: Callable, *, num_chains: int,
                           num_burnin: int, num_draws: int, max_extension: float, rtol: float = 0.05,
                           z: float = 1.0, plateau: Callable | None = None, max_plateau_extension: float = 1.0,
                           plateau_settles_after: int | None = None, chunk_size=None, progress=True, state=None,
                           start: int = 0) -> Equilibrated:
    """Run the planned ``num_burnin + num_draws·steps_per_draw`` steps, recording from step 0,
    and double the run while λ̂ still trends, up to ``max_extension`` times the plan — or
    while it sits on a ``plateau``, up to ``max_plateau_extension`` times.

    The burn-in is the later of ``num_burnin`` and :func:`equilibration_time` of the healthy
    chains' λ̂ trace; the draws are every recorded draw after it (at least a quarter of the
    run). A run that had to be extended is a slow one, and a slow climb can stall long enough
    to pass the trend test (DLN 10-26-24-38 of ``benchmarks/dln_accuracy.py`` held λ̂ ≈ 136 from
    24k to 36k steps, then climbed to λ = 146 by 54k): it ends only when, besides, the newest
    doubling's λ̂ agrees with the previous round's — the difference plus ``z`` standard errors
    within ``rtol``, disjoint windows.
    Chains continue where they stopped (:func:`slt_jax.chains.run_chains` with ``state``), so
    an extended run is the same run as one planned that long.

    Args:
      key, config, inputs: as for :func:`slt_jax.chains.run_chains`.
      llc_of: ``llc_of(draws, state) -> (llc, healthy)``: per-draw λ̂ ``(chains, draws)`` and
        which chains are healthy ``(chains,)`` (diverged ones are left out of the test).
      num_chains: chains.
      num_burnin, num_draws: the planned burn-in (steps) and draws.
      max_extension: the longest run, as a multiple of the planned one (≥ 1).
      rtol, z: the trend test of :func:`equilibration_time`.
      plateau: optional ``plateau(llc) -> bool`` on the healthy chains' λ̂ draws after the
        burn-in, ``(chains, draws)``: True while they may sit on a metastable plateau. Once it
        has held, the run's cap is ``max_plateau_extension`` times the plan.
      max_plateau_extension: that cap (≥ 1).
      plateau_settles_after: steps after which a run still on the plateau, with its last two
        doublings agreeing, has settled there: by then the chains have relaxed along every
        direction to at least the localizer's scale (a few e-folds of ``2/(εγ)`` steps, the
        slowest relaxation of a direction only γ confines), so directions the Hessian leaves
        unconfined contribute nothing within it — at smooth points of a fibre with symmetries the
        Laplace value is λ. ``None``: wait up to the cap.
      chunk_size, progress: as for :func:`slt_jax.chains.run_chains`.
      state, start: continue chains from ``state`` after the ``start`` steps they have run
        (:func:`slt_jax.chains.run_chains`) instead of starting them at w*; the burn-in, the
        trend test and the returned draws and ``num_steps`` count from there.

    Returns:
      An :class:`Equilibrated`.
    """
    spd = config.steps_per_draw
    planned = max(8, math.ceil((num_burnin + num_draws * spd) / spd))  # in draws
    cap = max(planned, math.ceil(planned * max_extension))
    plateau_cap = max(cap, math.ceil(planned * max_plateau_extension))
    # Every round runs in the first round's chunks: extending reuses the compiled program.
    chunk_size = plan_chunks(planned * spd, chunk_size)[1]
    records, done, extensions = [], 0, 0
    target, seen_plateau, stuck, previous = planned, False, False, None
    while True:
        state, record = run_chains(key, config, inputs, num_chains=num_chains, num_burnin=0,
                                   num_draws=target - done, chunk_size=chunk_size, progress=progress,
                                   state=state, start=start + done * spd)
        records.append(record)
        before, done = done, target
        draws = _concat(records)
        llc, healthy = llc_of(draws, state)
        steps = spd * (np.arange(done) + 1)
        settle = equilibration_time(llc[healthy], steps, rtol=rtol, z=z) if healthy.any() else None
        burn = None if settle is None else max(num_burnin, settle)
        tail = None if burn is None else llc[healthy][:, steps > burn]
        stuck = tail is not None and plateau is not None and bool(plateau(tail))
        settled_there = stuck and plateau_settles_after is not None and done * spd >= plateau_settles_after
        # A slow climb can pass the trend test where it stalls: once a run has had to be extended
        # (it trended at its plan, or sat on a plateau), it is over only when the newest
        # doubling's draws agree with the previous round's (disjoint windows).
        newest = None if burn is None else level(llc[healthy][:, steps > max(burn, before * spd)])
        steady = extensions == 0 or _agree(newest, previous, rtol, z)
        seen_plateau |= stuck
        limit = plateau_cap if seen_plateau else cap
        waiting = stuck and not settled_there
        if (settle is not None and not waiting and steady) or done >= limit or not healthy.any():  # all diverged
            break
        # Still trending: the round's last quarter is its latest level.
        previous = level(tail if tail is not None else llc[healthy][:, steps > FRACTIONS[-1] * steps[-1]])
        target = min(2 * done, limit)
        extensions += 1
    equilibrated = settle is not None and not waiting and steady
    if settle is None:  # still trending at the cap: the last quarter is the latest estimate
        settle = FRACTIONS[-1] * steps[-1]
    burnin = min(max(num_burnin, int(settle)), int(steps[-4] - spd))
    kept = jax.tree.map(lambda x: x[:, steps > burnin], draws)
    return Equilibrated(state, kept, burnin, done * spd, equilibrated, extensions, seen_plateau, stuck,
                        trending=burn is None, chunk_size=chunk_size, plateau_settled=settled_there and equilibrated)


def equilibration_warning(run: Equilibrated, *, laplace, planned: int, step_size: float, max_extension: float,
                          max_plateau_extension) -> str | None:
    """Why ``run`` may not have settled, in words for a ``CalibrationWarning`` (None if it did,
    or if every chain diverged: the divergence report says so)."""
    if np.all(sharding.to_host(run.state.diverged_at) >= 0) or run.equilibrated:
        return None
    cap = f"{max_plateau_extension if run.plateau else max_extension:g}× the calibrated {planned}"
    option = "max_plateau_extension" if run.plateau else "max_extension"
    if run.still_at_plateau:
        return (f"λ̂ still reads the Laplace value {laplace['llc']:.4g} after {run.num_steps} steps ({cap}) at step "
                f"size {step_size:.3g}: either the directions the Hessian leaves unconfined add nothing here, or the "
                f"chains have not yet diffused along them (a metastable plateau; λ̂ may read low); raise {option}")
    if run.trending:
        return (f"λ̂ still trends after {run.num_steps} steps ({cap}) at step size {step_size:.3g}: the estimate is "
                f"the last quarter of the run and may read low; raise {option}")
    left = f"λ̂ left the Laplace value {laplace['llc']:.4g}, but" if run.plateau else "λ̂ stopped trending, but"
    return (f"{left} the last two doublings did not agree within the tolerance (including their standard error) "
            f"after {run.num_steps} steps ({cap}) at step size {step_size:.3g}: the estimate is the draws after the "
            f"burn-in read off the trace and may still be settling; raise {option}, or num_chains to sharpen the "
            f"comparison")
