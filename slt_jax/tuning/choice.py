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
      verified: whether two consecutive step sizes are stable and agree (the pick is checked
        against a smaller one); an unverified pick is the smallest stable step alone.
      pair: the two step sizes that agreed ``(smaller, larger)``, or ``None``.
      bias: the pick's step-size bias, extrapolated linearly in ε from the agreeing steps
        below it (or, for the smallest of the pair, from the step above): ``estimate``
        (signed), ``se``, ``bound`` (κ·(|Δλ̂| + z·se), what the pick must keep within
        ``rtol·|λ̂_ref|``) and ``kappa``; ``None`` when unverified.
    """

    status: tuple
    reason: tuple
    step_size: float | None
    why: str
    verified: bool = False
    pair: tuple | None = None
    bias: dict | None = None


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


def _bias(step, mean, se, ref_step, ref_mean, ref_se, z) -> dict:
    """The step-size bias at ``step``, extrapolated linearly in ε through a reference at
    ``ref_step``: if λ̂(ε) = λ₀ + b·ε, then b·ε = κ·(λ̂(ε) − λ̂(ε_ref)) with κ = ε/(ε − ε_ref)."""
    kappa = step / (step - ref_step)
    diff, diff_se = mean - ref_mean, math.hypot(se, ref_se)
    return {"estimate": kappa * diff, "se": abs(kappa) * diff_se, "bound": abs(kappa) * (abs(diff) + z * diff_se),
            "kappa": kappa}


def _chord(step, mean, se, above_step, above_mean, above_se, z) -> dict:
    """The step-size bias at ``step`` bounded by the chord to a larger step: b·ε with
    b = (λ̂(ε_q) − λ̂(ε))/(ε_q − ε), i.e. κ·Δλ̂ with κ = ε/(ε_q − ε)."""
    kappa = step / (above_step - step)
    diff, diff_se = above_mean - mean, math.hypot(se, above_se)
    return {"estimate": kappa * diff, "se": kappa * diff_se, "bound": kappa * (abs(diff) + z * diff_se),
            "kappa": kappa}


def choose_step_size(step_sizes, llc_mean, llc_se, *, trend=None, trend_se=None, mala_acceptance=None,
                     diverged=None, unhealthy=None, rtol: float = 0.05, z: float = 1.0, check_z: float = 3.0,
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
      unhealthy: per step size, why the kernel's own health test failed (e.g. SGNHT's kinetic
        temperature), or ``None``; a reason makes the group ``"unstable"``.
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
    unhealthy = [None] * k if unhealthy is None else list(unhealthy)
    if len(unhealthy) != k:
        raise ValueError(f"unhealthy must have one entry per step size ({k}), got {len(unhealthy)}")
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
        elif unhealthy[g]:
            status[g], reason[g] = "unstable", unhealthy[g]
        elif first is None:
            status[g], reason[g] = "ok", "reference: the smallest stable step size"
            accepted.append((mean[g], se[g], step_sizes[g]))
            first = g
            continue
        elif (why := _drift(trend[g], trend_se[g], trend[first], trend_se[first], mean[first], rtol,
                            check_z)) is not None:
            status[g], reason[g] = "unstable", why
        else:
            ref, ref_se = _pooled([a[:2] for a in accepted])
            diff, diff_se = mean[g] - ref, math.hypot(se[g], ref_se)
            text = (f"λ̂ {diff / ref:+.1%} from the smaller step sizes' {ref:.4g} "
                    f"(se of the difference {abs(diff_se / ref):.1%}, tolerance {rtol:.0%})")
            if abs(diff) + z * diff_se > rtol * abs(ref):
                status[g], reason[g] = "biased", text
            elif failed_at is None:
                status[g], reason[g] = "ok", text
                accepted.append((mean[g], se[g], step_sizes[g]))
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
    # The pick must come with a bound on its step-size bias that fits the tolerance, from a
    # comparison with another stable step at equal simulated time (docs/calibration.md §3b):
    # - from below, for a larger "ok" step: with λ̂(ε) = λ₀ + bε through the inverse-variance
    #   mean of the "ok" steps below (at their weighted step ε_ref), its bias is κ·Δλ̂ with
    #   κ = ε/(ε − ε_ref) ≥ 1 — 2× the difference for a pair a factor 2 apart;
    # - from above, for the smallest stable step: the chord to any stable step ε_q above it gives
    #   κ = ε/(ε_q − ε) ≤ 1 — ⅐ for a step 8× larger — and, the bias being convex in ε (SGLD's
    #   variance inflation 1/(1 − εa/4) and its minibatch term both are), the chord's slope is
    #   at least the slope near ε, so the bound is conservative.
    # The bound is κ·(|Δλ̂| + z·se); the largest step whose bound fits rtol·|λ̂| is the pick.
    stable = [g for g in range(k) if status[g] in ("ok", "biased", "skipped")]
    scale = rtol * abs(_pooled([(mean[j], se[j]) for j in ok])[0])
    bounds = {}
    for i, g in enumerate(ok[1:], start=1):
        below = [(mean[j], se[j]) for j in ok[:i]]
        ref, ref_se = _pooled(below)
        weights = np.array([1.0 / max(se[j], 1e-12 * abs(mean[j]) + 1e-300) ** 2 for j in ok[:i]])
        ref_step = float(np.sum(weights * step_sizes[ok[:i]]) / np.sum(weights))
        bounds[g] = {**_bias(step_sizes[g], mean[g], se[g], ref_step, ref, ref_se, z), "against": ref_step}
    low = ok[0]
    chords = [{**_chord(step_sizes[low], mean[low], se[low], step_sizes[q], mean[q], se[q], z),
               "against": float(step_sizes[q])} for q in stable if q > low]
    if chords:
        bounds[low] = min(chords, key=lambda b: b["bound"])
    fitting = [g for g in ok[1:] if bounds[g]["bound"] <= scale]
    best = fitting[-1] if fitting else low
    verified = best in bounds and bounds[best]["bound"] <= scale
    if not verified:
        why = "the only stable step size: nothing smaller to check it against — extend step_sizes down"
        if low in bounds:
            why = (f"the smallest stable step size, whose bias bound against the steps above "
                   f"({bounds[low]['bound'] / abs(scale / rtol):.1%}, against {bounds[low]['against']:.3g}) exceeds "
                   f"{rtol:.0%}: nothing smaller to check it against — extend step_sizes down")
        if low + 1 < k:
            why += f"; the next, {step_sizes[low + 1]:.3g}, is {status[low + 1]} ({reason[low + 1]})"
        return StepChoice(tuple(status), tuple(reason), float(step_sizes[low]), why)
    pair = (float(step_sizes[best]), bounds[best]["against"]) if best == low else (
        bounds[best]["against"], float(step_sizes[best]))
    pair = tuple(sorted(pair))
    if best == low:
        why = (f"the smallest stable step size, its bias bounded by {bounds[low]['bound'] / abs(scale / rtol):.1%} "
               f"against {bounds[low]['against']:.3g} (within {rtol:.0%})")
    elif best == ok[-1]:
        why = f"the largest stable step size within {rtol:.0%} of the smaller ones"
    else:
        above = ok[ok.index(best) + 1]
        why = (f"the largest step size whose bias, extrapolated linearly from the smaller ones, fits {rtol:.0%}: "
               f"{step_sizes[above]:.3g} agrees but its bound is {bounds[above]['bound'] / abs(scale / rtol):.1%}")
    if best + 1 < k and (best == ok[-1] or best == low):
        why += f"; the next, {step_sizes[best + 1]:.3g}, is {status[best + 1]} ({reason[best + 1]})"
    return StepChoice(tuple(status), tuple(reason), float(step_sizes[best]), why, verified=True, pair=pair,
                      bias=bounds[best])
