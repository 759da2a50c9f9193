"""Developmental stages of a curve over training: boundaries at critical points in log-step.

Hoogland et al., *Loss Landscape Degeneracy and Stagewise Development in Transformers*
(arXiv:2402.02364): smooth the LLC curve, differentiate it in log t, and put stage
boundaries at its critical points. This module does that on host arrays (one value per
checkpoint) with a rule that makes every boundary statistically significant:

- The curve is smoothed by local linear regression in ``x = log10(step + 1)`` with a
  Gaussian kernel of width ``smoothing``; each local fit gives the level, the slope
  ``dλ̂/dx`` and the slope's standard error. Irregular checkpoint spacing needs no
  resampling, and standard errors weight the points by ``1/se²``. ``step + 1`` keeps
  step 0 (initialisation) on the axis; it shifts ``x`` by under 0.05 for steps ≥ 10.
- The slope is *significant* where ``|slope| / se(slope) > threshold``. The threshold is
  simultaneous over the whole curve: the Gaussian tube formula of Sun & Loader (Ann.
  Statist. 22, 1994) gives the level that pure noise exceeds anywhere with probability
  ``alpha`` (its Student-t form when the noise level is estimated). Runs of significant
  slope are *episodes* (rises, falls); runs in between are *plateaus*.
- Two same-direction episodes count as separate only if the slope in the plateau between
  them is smaller than each episode's peak slope by more than ``threshold`` standard
  errors of the difference; otherwise they merge, so jitter inside one rise makes no
  boundary.
- Boundaries: one per plateau between two episodes (a peak, a valley, or a pause inside
  a rise or fall), at the plateau's midpoint in log-step. The slope is indistinguishable
  from zero across the plateau, which surrounds the critical point, and the midpoint
  moves far less with noise than the zero or minimum of a noisy slope (standard
  deviation ≈ 0.015 decade on the test curves). Where a rise meets a fall with no
  plateau: the zero of the slope. Where a plateau at either end of the curve meets an
  episode: the point where the slope stops (or starts) being significant, so a rise that
  ends in a final plateau starts a new stage there. A plateau at an end counts only if
  it spans at least ``2 · smoothing``: shorter flat ends are the kernel's edge effect.

Without standard errors the noise is taken to be the same at every checkpoint, its level
estimated from second-difference pseudo-residuals (Gasser, Sroka & Jennen-Steinmetz,
Biometrika 73, 1986); pass standard errors when it varies along training. Given standard
errors are scaled up, never down, when the same pseudo-residuals scatter more than they
predict, so under-reported errors cannot create boundaries.

Its length: the detection rule and the significance test that makes each boundary count
belong together.
"""

from typing import NamedTuple

import numpy as np
from scipy import optimize, stats

_CHUNK_ELEMENTS = 1 << 21


class Stages(NamedTuple):
    """Stage boundaries of a curve and the smoothed curve they come from.

    Attributes:
      steps: the input checkpoint steps, shape ``(n,)``.
      boundaries: stage boundaries in step units, increasing, shape ``(k,)``.
      plateaus: ``(start, end)`` steps of each plateau (slope not significant), ``(p, 2)``.
      smoothed: smoothed curve at the input steps, shape ``(n,)``.
      slope: ``d value / d log10(step + 1)`` at the input steps, shape ``(n,)``.
      slope_se: standard error of ``slope``, shape ``(n,)``.
      standard_errors: per-point noise level used (given and possibly scaled up, or
        estimated), shape ``(n,)``.
      smoothing: kernel width in log10-step units.
      threshold: simultaneous significance threshold on ``|slope| / slope_se``.
    """

    steps: np.ndarray
    boundaries: np.ndarray
    plateaus: np.ndarray
    smoothed: np.ndarray
    slope: np.ndarray
    slope_se: np.ndarray
    standard_errors: np.ndarray
    smoothing: float
    threshold: float

    @property
    def intervals(self) -> np.ndarray:
        """``(start, end)`` steps of each stage, shape ``(k + 1, 2)``."""
        edges = np.concatenate([self.steps[:1], self.boundaries, self.steps[-1:]])
        return np.stack([edges[:-1], edges[1:]], axis=1)

    def stage_of(self, step):
        """Index of the stage containing ``step`` (a boundary starts the next stage).

        Args:
          step: a step or array of steps.

        Returns:
          Stage index (an int for a scalar, else an int array of the same shape).
        """
        index = np.searchsorted(self.boundaries, np.asarray(step, dtype=float), side="right")
        return int(index) if np.ndim(index) == 0 else index


def detect_stages(
    steps,
    values,
    standard_errors=None,
    *,
    smoothing: float = 0.1,
    alpha: float = 0.05,
) -> Stages:
    """Find stage boundaries of a curve at the critical points of its slope in log-step.

    Implements the stage-boundary rule of arXiv:2402.02364 with the significance rules in
    the module docstring.

    Args:
      steps: checkpoint steps, non-negative and strictly increasing, shape ``(n,)``, n ≥ 3.
      values: the curve (e.g. λ̂) at those steps, shape ``(n,)``.
      standard_errors: optional positive standard errors of ``values``, shape ``(n,)``;
        without them the noise is assumed constant and estimated from the curve.
      smoothing: standard deviation of the Gaussian kernel in log10-step units (decades).
      alpha: probability that a curve with no trend shows a significant slope anywhere.

    Returns:
      A ``Stages``.

    Raises:
      ValueError: naming the offending argument.
    """
    steps, values, standard_errors = _validated(steps, values, standard_errors)
    if not np.isfinite(smoothing) or smoothing <= 0:
        raise ValueError(f"smoothing must be a positive number, got {smoothing}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    x = np.log10(steps + 1.0)
    se = _noise_level(x, values, standard_errors)
    # Gasser's variance estimate is worth about 18/35 of its n − 2 terms in degrees of freedom.
    dof = None if standard_errors is not None else (x.size - 2) * 18.0 / 35.0

    level, slope, slope_se, _ = _local_linear(x, values, se, x, smoothing)
    grid = np.linspace(x[0], x[-1], int(np.ceil((x[-1] - x[0]) * 10 / smoothing)) + 1)
    _, grid_slope, grid_slope_se, tube_length = _local_linear(x, values, se, grid, smoothing)
    threshold = _tube_threshold(tube_length, alpha, dof)
    boundaries, plateaus = _critical_points(
        grid, grid_slope, grid_slope_se, threshold, smoothing
    )
    return Stages(
        steps=steps,
        boundaries=10.0**boundaries - 1.0,
        plateaus=10.0**plateaus - 1.0,
        smoothed=level,
        slope=slope,
        slope_se=slope_se,
        standard_errors=se,
        smoothing=float(smoothing),
        threshold=threshold,
    )


def _validated(steps, values, standard_errors):
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    if steps.ndim != 1 or steps.size < 3:
        raise ValueError(f"steps must be a 1-D array of at least 3 steps, got shape {steps.shape}")
    if values.shape != steps.shape:
        raise ValueError(f"values must have the shape of steps {steps.shape}, got {values.shape}")
    if not np.all(np.isfinite(steps)) or steps[0] < 0:
        raise ValueError("steps must be finite and non-negative")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing (sorted, no repeats)")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    if standard_errors is not None:
        standard_errors = np.asarray(standard_errors, dtype=float)
        if standard_errors.shape != steps.shape:
            raise ValueError(
                f"standard_errors must have the shape of steps {steps.shape}, "
                f"got {standard_errors.shape}"
            )
        if not np.all(np.isfinite(standard_errors)) or np.any(standard_errors <= 0):
            raise ValueError("standard_errors must be finite and positive")
    return steps, values, standard_errors


def _noise_level(x, values, standard_errors):
    """Per-point noise level from second-difference pseudo-residuals (Gasser et al. 1986)."""
    left, right = x[1:-1] - x[:-2], x[2:] - x[1:-1]
    a, b = right / (left + right), left / (left + right)
    pseudo = a * values[:-2] + b * values[2:] - values[1:-1]
    if standard_errors is None:
        sigma = np.sqrt(np.mean(pseudo**2 / (a**2 + b**2 + 1.0)))
        if sigma == 0:
            raise ValueError("values lie on a straight line in log-step: pass standard_errors")
        return np.full_like(values, sigma)
    predicted = (a * standard_errors[:-2]) ** 2 + (b * standard_errors[2:]) ** 2
    predicted = predicted + standard_errors[1:-1] ** 2
    return standard_errors * max(1.0, float(np.sqrt(np.mean(pseudo**2 / predicted))))


def _local_linear(x, values, se, at, width):
    """Gaussian-kernel local linear fits at ``at``: level, slope, slope s.e., tube length.

    The slope at ``at[i]`` is a linear form ``ℓ_i · values``; the tube length is the length
    of the path traced by the noise-scaled unit vectors ``ℓ_i ⊙ se / ‖ℓ_i ⊙ se‖`` (Sun &
    Loader 1994), measured as the sum of angles between neighbouring evaluation points.
    """
    level = np.empty_like(at)
    slope = np.empty_like(at)
    slope_se = np.empty_like(at)
    tube_length, previous = 0.0, None
    chunk = max(1, _CHUNK_ELEMENTS // x.size)
    for start in range(0, at.size, chunk):
        centre = at[start : start + chunk, None]
        offset = x[None, :] - centre
        log_kernel = -0.5 * (offset / width) ** 2
        # Rescaling a row's weights leaves its fit unchanged; this keeps the nearest point at 1.
        weights = np.exp(log_kernel - log_kernel.max(axis=1, keepdims=True)) / se**2
        s0 = weights.sum(axis=1, keepdims=True)
        s1 = (weights * offset).sum(axis=1, keepdims=True)
        s2 = (weights * offset**2).sum(axis=1, keepdims=True)
        det = s0 * s2 - s1**2
        determined = det > 1e-10 * s0 * s2
        safe_det = np.where(determined, det, 1.0)
        level_rows = np.where(determined, weights * (s2 - s1 * offset) / safe_det, weights / s0)
        slope_rows = np.where(determined, weights * (s0 * offset - s1) / safe_det, 0.0)
        level[start : start + chunk] = level_rows @ values
        slope[start : start + chunk] = slope_rows @ values
        noise_rows = slope_rows * se
        norm = np.sqrt((noise_rows**2).sum(axis=1))
        slope_se[start : start + chunk] = np.where(determined[:, 0], norm, np.inf)
        unit = noise_rows / np.where(norm > 0, norm, 1.0)[:, None]
        if previous is not None:
            unit = np.concatenate([previous, unit])
        cosines = np.clip((unit[1:] * unit[:-1]).sum(axis=1), -1.0, 1.0)
        tube_length += float(np.arccos(cosines).sum())
        previous = unit[-1:]
    return level, slope, slope_se, tube_length


def _tube_threshold(tube_length, alpha, dof):
    """Level c with P(sup |z| > c) = alpha for a Gaussian process with this tube length.

    Two-sided tube formula of Sun & Loader (Ann. Statist. 22, 1994): with known noise
    ``alpha = (κ0 / π) · exp(−c²/2) + 2 · (1 − Φ(c))``; with noise estimated on ``dof``
    degrees of freedom ``alpha = (κ0 / π) · (1 + c²/dof)^(−dof/2) + 2 · P(t_dof > c)``.
    """

    def excess(c):
        if dof is None:
            return tube_length / np.pi * np.exp(-0.5 * c**2) + 2.0 * stats.norm.sf(c) - alpha
        tube = tube_length / np.pi * (1.0 + c**2 / dof) ** (-0.5 * dof)
        return tube + 2.0 * stats.t.sf(c, dof) - alpha

    upper = 40.0
    while excess(upper) > 0:  # few degrees of freedom give heavy t tails
        upper *= 2.0
    return float(optimize.brentq(excess, 0.0, upper))


def _runs(state):
    """Maximal runs of equal state as a list of ``[state, first, last]`` index triples."""
    change = np.flatnonzero(np.diff(state)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change - 1, [state.size - 1]])
    return [[int(state[s]), int(s), int(e)] for s, e in zip(starts, ends)]


def _critical_points(grid, slope, slope_se, threshold, smoothing):
    """Boundaries and plateaus (in log10-step units) from the slope on a fine grid."""
    z = np.divide(slope, slope_se, out=np.zeros_like(slope), where=np.isfinite(slope_se))
    state = np.where(z > threshold, 1, np.where(z < -threshold, -1, 0))
    runs = _merge_insignificant_dips(_runs(state), slope, slope_se, threshold)
    if all(sign == 0 for sign, _, _ in runs):
        return np.empty(0), np.array([[grid[0], grid[-1]]])
    boundaries, plateaus = [], []
    for position, (sign, first, last) in enumerate(runs):
        before = runs[position - 1][0] if position > 0 else None
        after = runs[position + 1][0] if position + 1 < len(runs) else None
        if sign != 0:
            if after is not None and after == -sign:
                boundaries.append(_zero_crossing(grid, slope, last))
            continue
        if before is not None and after is not None:
            plateaus.append((grid[first], grid[last]))
            boundaries.append(0.5 * (grid[first] + grid[last]))
        elif grid[last] - grid[first] >= 2.0 * smoothing:
            plateaus.append((grid[first], grid[last]))
            edge = last if after is not None else first - 1
            boundaries.append(_threshold_crossing(grid, np.abs(z), threshold, edge))
    return np.array(boundaries), np.array(plateaus).reshape(-1, 2)


def _merge_insignificant_dips(runs, slope, slope_se, threshold):
    """Merge same-direction episodes whose separating dip in slope is not significant."""
    merged = []
    for run in runs:
        merged.append(run)
        while len(merged) >= 3 and merged[-1][0] == merged[-3][0] != 0 and merged[-2][0] == 0:
            left, dip, right = merged[-3], merged[-2], merged[-1]
            sign = left[0]
            span = slice(dip[1], dip[2] + 1)
            flattest = dip[1] + int(np.argmin(sign * slope[span]))
            if all(
                _peak_exceeds(sign, slope, slope_se, episode, flattest, threshold)
                for episode in (left, right)
            ):
                break
            merged[-3:] = [[sign, left[1], right[2]]]
    return merged


def _peak_exceeds(sign, slope, slope_se, episode, flattest, threshold):
    span = slice(episode[1], episode[2] + 1)
    peak = episode[1] + int(np.argmax(sign * slope[span]))
    difference = sign * (slope[peak] - slope[flattest])
    return difference > threshold * np.hypot(slope_se[peak], slope_se[flattest])


def _zero_crossing(grid, slope, last):
    """Where the slope crosses zero between grid points ``last`` and ``last + 1``."""
    fraction = slope[last] / (slope[last] - slope[last + 1])
    return grid[last] + fraction * (grid[last + 1] - grid[last])


def _threshold_crossing(grid, abs_z, threshold, inside):
    """Where ``|z|`` crosses the threshold between grid points ``inside`` and ``inside + 1``."""
    low, high = abs_z[inside], abs_z[inside + 1]
    fraction = (threshold - low) / (high - low)
    return grid[inside] + fraction * (grid[inside + 1] - grid[inside])
