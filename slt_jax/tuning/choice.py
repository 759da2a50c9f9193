"""The step-size decision rule: classify a sweep's chain groups and pick the largest that agrees.

A pure function of per-group summaries (λ̂, its standard error, trend, MALA acceptance,
divergences), so it can be read and tested apart from sampling; :func:`slt_jax.calibrate`
feeds it. The agreement test is ``|λ̂_ε − λ̂_ref| + z·se ≤ rtol·|λ̂_ref|`` (the difference
*plus* its error must fit), against the inverse-variance mean of the smaller accepted steps.
"""

import math
from typing import NamedTuple

import numpy as np

STATUSES = ("ok", "biased", "unstable", "diverged", "skipped")


def _pooled(values):
    """Inverse-variance mean and its standard error of ``[(mean, se), ...]``."""
    means = np.array([v[0] for v in values])
    se = np.array([v[1] for v in values])
    weights = 1.0 / np.maximum(se, 1e-12 * np.abs(means) + 1e-300) ** 2
    return float(np.sum(weights * means) / np.sum(weights)), float(1.0 / math.sqrt(np.sum(weights)))


class StepChoice(NamedTuple):
    """The verdict on one (nβ, γ) setting's step sizes (see :func:`choose_step_size`).

    Attributes:
      status: one of :data:`STATUSES` per step size.
      reason: why, per step size.
      step_size: the recommended step size, or ``None`` when none is ``"ok"``.
      why: why that one.
    """

    status: tuple
    reason: tuple
    step_size: float | None
    why: str


def _instability(mean, se, mala, check_z, min_mala_acceptance) -> str | None:
    """Why a group is unstable on its own, or ``None``."""
    if mean < -check_z * se:
        return f"λ̂ = {mean:.3g} is significantly negative: w* is not a local minimum here"
    if mala < min_mala_acceptance:
        return f"MALA acceptance {mala:.2f} < {min_mala_acceptance}: far from the continuous-time limit"
    return None


def _drift(trend, trend_se, ref_trend, ref_trend_se, scale, rtol, check_z) -> str | None:
    """Why a group's window trends unlike the reference's, or ``None``.

    At equal simulated time every step size sees the same relaxation of the continuous
    dynamics, so a trend shared with the reference is slow equilibration (measured later,
    see :func:`equilibration_time`); a trend of its own is the discretisation drifting away.
    """
    excess = trend - ref_trend
    if abs(excess) > rtol * abs(scale) + check_z * math.hypot(trend_se, ref_trend_se):
        return (f"λ̂ trends within the window unlike the smallest stable step size ({excess:+.3g} more "
                f"from first to second half, se {math.hypot(trend_se, ref_trend_se):.2g}): drifting away")
    return None


def choose_step_size(step_sizes, llc_mean, llc_se, *, trend=None, trend_se=None, mala_acceptance=None,
                     diverged=None, rtol: float = 0.05, z: float = 1.0, check_z: float = 3.0,
                     min_mala_acceptance: float = 0.7) -> StepChoice:
    """Classify one setting's step sizes and pick the largest that is stable and agrees.

    A pure function of the per-group summaries, so the rule can be read and tested apart
    from sampling. Walking up from the smallest step size: diverged groups are
    ``"diverged"``; groups with a significantly negative λ̂ or a low MALA acceptance are
    ``"unstable"``; the first stable group is the reference (``"ok"``); a later group whose
    window trends more than the reference's (by ``rtol·|λ̂_ref|`` plus 3 standard errors) is
    ``"unstable"`` (drifting away; a trend shared with the reference is slow equilibration,
    which every step size sees alike at equal simulated time); a later stable group is
    ``"ok"`` when ``|λ̂ − λ̂_ref| + z·se ≤ rtol·|λ̂_ref|`` against the inverse-variance mean
    ``λ̂_ref`` of the ``"ok"`` groups below it (``se`` the standard error of the difference),
    else ``"biased"``. After the first failure above the reference, agreeing groups are
    ``"skipped"``: bias grows with ε, so agreement above a failure is luck.

    Args:
      step_sizes: increasing step sizes, shape ``(k,)``.
      llc_mean, llc_se: λ̂ and its standard error per step size (NaN where every chain
        diverged).
      trend, trend_se: second-half minus first-half mean of the window, and its standard
        error (default 0: not checked); compared with the reference's.
      mala_acceptance: Metropolis acceptance per step size (default NaN: not checked).
      diverged: diverged chains per step size (default 0).
      rtol: relative tolerance of the agreement test.
      z: standard errors added to the difference in that test.
      check_z: standard errors by which a trend or a negative λ̂ must be significant to count.
      min_mala_acceptance: MALA acceptance below which a step size counts as unstable: 30 % of
        exact-gradient Langevin proposals rejected means the step is far from the
        continuous-time limit (a heuristic; in few dimensions a visibly biased step can still
        accept > 0.9, which the agreement test catches).

    Returns:
      A :class:`StepChoice`.
    """
    step_sizes = np.asarray(step_sizes, float)
    k = step_sizes.size
    if step_sizes.ndim != 1 or k == 0 or np.any(np.diff(step_sizes) <= 0):
        raise ValueError(f"step_sizes must be a non-empty increasing 1-D sequence, got {step_sizes}")
    fill = lambda x, v: np.full(k, v, float) if x is None else np.asarray(x, float)
    mean, se = fill(llc_mean, np.nan), fill(llc_se, np.nan)
    trend, trend_se = fill(trend, 0.0), fill(trend_se, 0.0)
    mala, diverged = fill(mala_acceptance, np.nan), fill(diverged, 0.0)
    for name, x in (("llc_mean", mean), ("llc_se", se), ("trend", trend), ("trend_se", trend_se),
                    ("mala_acceptance", mala), ("diverged", diverged)):
        if x.shape != (k,):
            raise ValueError(f"{name} must have shape ({k},) like step_sizes, got {x.shape}")

    status, reason = [None] * k, [None] * k
    accepted, failed_at, first = [], None, None
    for g in range(k):
        if diverged[g] > 0 or not np.isfinite(mean[g]):
            status[g], reason[g] = "diverged", f"{int(diverged[g])} chain(s) diverged"
        elif (why := _instability(mean[g], se[g], mala[g], check_z, min_mala_acceptance)) is not None:
            status[g], reason[g] = "unstable", why
        elif first is None:
            status[g], reason[g] = "ok", "reference: the smallest stable step size"
            accepted.append((mean[g], se[g]))
            first = g
            continue
        elif (why := _drift(trend[g], trend_se[g], trend[first], trend_se[first], mean[first], rtol,
                            check_z)) is not None:
            status[g], reason[g] = "unstable", why
        else:
            ref, ref_se = _pooled(accepted)
            diff, diff_se = mean[g] - ref, math.hypot(se[g], ref_se)
            text = (f"λ̂ {diff / ref:+.1%} from the smaller step sizes' {ref:.4g} "
                    f"(se of the difference {abs(diff_se / ref):.1%}, tolerance {rtol:.0%})")
            if abs(diff) + z * diff_se > rtol * abs(ref):
                status[g], reason[g] = "biased", text
            elif failed_at is None:
                status[g], reason[g] = "ok", text
                accepted.append((mean[g], se[g]))
                continue
            else:
                status[g], reason[g] = "skipped", f"{text}; above the failed step size {failed_at:.3g}"
                continue
        if accepted and failed_at is None:
            failed_at = step_sizes[g]

    ok = [g for g in range(k) if status[g] == "ok"]
    if not ok:
        return StepChoice(tuple(status), tuple(reason), None,
                          "every step size diverged or was unstable: lower step_sizes, or check that w* "
                          "is a minimum")
    best = ok[-1]
    if len(ok) == 1:
        why = "the only stable step size: nothing smaller to check it against — extend step_sizes down"
    else:
        why = f"the largest stable step size within {rtol:.0%} of the smaller ones"
    if best + 1 < k:
        why += f"; the next, {step_sizes[best + 1]:.3g}, is {status[best + 1]} ({reason[best + 1]})"
    return StepChoice(tuple(status), tuple(reason), float(step_sizes[best]), why)
