"""Where step sizes start: a geometric grid below the localized posterior's stiffness scale.

SGLD on ``exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` (``w' = w − ε/2·∇U + √ε·ξ``) is linearly stable for
ε < 4/(nβ·h + γ), and at ε = 1/(nβ·h + γ) inflates the stiffest direction's variance by 4/3, h the
largest Hessian eigenvalue of L_n along the way (docs/mathematics.md §3: large weights make the
loss stiff; Lau et al., arXiv:2308.12108). :func:`default_step_sizes` estimates h by
Lanczos on Hessian-vector products (:mod:`slt_jax.curvature`) and places
:func:`slt_jax.calibrate`'s default grid.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from slt_jax import masks, validation
from slt_jax.curvature import curvatures, normal_like, probe_batch
from slt_jax.samplers.base import SGLD_STABILITY, Stability

# Radii tried, log-spaced over nine decades, for the typical posterior point.
_RADII = 64


def _axpy(alpha, x, y):
    """``alpha·x + y`` over pytrees."""
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


@partial(jax.jit, static_argnames=("loss_fn",))
def _typical_pair(loss_fn, batch, center, direction, radii, nbeta, dim):
    """w* and ``w* + r·z`` stacked, r the first of ``radii`` where
    ``nβ·(L_B(w* + r·z) − L_B(w*)) ≥ d/2`` (the last radius if none)."""
    base = loss_fn(center, batch)
    energy = jax.lax.map(lambda r: nbeta * (loss_fn(_axpy(r, direction, center), batch) - base), radii)
    reached = jnp.nan_to_num(energy, nan=jnp.inf) >= dim / 2
    radius = radii[jnp.where(jnp.any(reached), jnp.argmax(reached), radii.size - 1)]
    return jax.tree.map(lambda c, z: jnp.stack([c, c + radius * z]), center, direction)


def stable_step(step_size: float, stiffness: float, *, nbeta, localization, factor: float = 2.0,
                limit: float | None = None) -> float:
    """``step_size`` divided by ``factor`` until it is at most the grid's top rule for the
    stiffness h: ``1/(nβ·h + γ)`` (SGLD), or ``limit`` itself where given — a kernel's own rule
    (:meth:`slt_jax.samplers.base.Stability.stable_step`). Itself if it already is."""
    limit = 1.0 / (nbeta * stiffness + localization) if limit is None else limit
    while step_size > limit:
        step_size /= factor
    return step_size


def default_step_sizes(loss_fn, params, data, key, *, nbeta, localization, param_mask=None,
                       num_points: int = 4, factor: float = 2.0, skip: int = 0,
                       stability: Stability = SGLD_STABILITY) -> np.ndarray:
    """A geometric grid of step sizes below the posterior's stiffness scale.

    For the localized posterior the SGLD step is linearly stable for ε < 4/(nβ·h + γ), h the
    largest Hessian eigenvalue of L_n along the way (docs/mathematics.md §3.1: large weights make the
    loss stiff). h is taken as the larger of its value at w* and at a typical posterior
    point — w* plus a random direction scaled until ``nβ·(L − L(w*)) = d/2``, the most a
    posterior draw carries on average (λ ≤ d/2) — because at singular points the Hessian at
    w* can vanish. The grid is ``ε_top · factor^(−k)``, k = skip … skip + num_points − 1, with
    ``ε_top = 1/(nβ·h + γ)``; both are estimated on a probe batch of up to 4096 rows.

    Args:
      loss_fn, params, data: as in :func:`calibrate`.
      key: PRNG key for the probe batch and directions.
      nbeta: nβ > 0.
      localization: γ ≥ 0.
      param_mask: as in :func:`slt_jax.estimate_llc`.
      num_points: grid size.
      factor: ratio between neighbouring step sizes (> 1).
      skip: grid factors between the stability rule and the largest step size (≥ 0).
      stability: the kernel's :class:`~slt_jax.samplers.base.Stability` (default SGLD's).

    Returns:
      Step sizes, increasing, shape ``(num_points,)``.
    """
    validation.check_positive("num_points", num_points, integer=True)
    validation.check_positive("skip", skip, integer=True, allow_zero=True)
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    key_batch, key_dir, key_power = jax.random.split(key, 3)
    batch = probe_batch(key_batch, data)
    params = jax.tree.map(jnp.asarray, params)
    mask = masks.resolve_mask(param_mask, params)
    mask = jax.tree.map(jnp.ones_like, params) if mask is None else mask
    dim = masks.num_sampled(mask, params)
    direction = jax.tree.map(jnp.multiply, normal_like(key_dir, params), mask)
    flat = ravel_pytree(params)[0]
    scale = float(jnp.sqrt(jnp.mean(jnp.square(flat)))) + 1.0
    top = 10.0 * scale if localization == 0 else min(10.0 * scale, 10.0 / math.sqrt(localization))
    radii = jnp.logspace(math.log10(top) - 9, math.log10(top), _RADII, dtype=flat.dtype)
    probe = normal_like(key_power, params)
    both = _typical_pair(loss_fn, batch, params, direction, radii, nbeta, dim)
    scales = jax.tree.map(lambda m: jnp.stack([m, m]), mask)
    h = float(jnp.max(curvatures(loss_fn, batch, both, probe, scales)))
    if not np.isfinite(h):
        raise ValueError("loss_fn has a non-finite Hessian near params: cannot place a step-size grid; "
                         "pass step_sizes explicitly")
    g = stability.start_preconditioner
    top_step = stability.stable_step(g * h, nbeta=nbeta, localization=localization)
    return top_step * factor ** -np.arange(skip, skip + num_points)[::-1].astype(float)
