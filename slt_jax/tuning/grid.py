"""Where step sizes start: a geometric grid below the localized posterior's stiffness scale.

SGLD on ``exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` (``w' = w − ε/2·∇U + √ε·ξ``) is linearly stable for
ε < 4/(nβ·h + γ), and at ε = 1/(nβ·h + γ) inflates the stiffest direction's variance by 4/3, h the
largest Hessian eigenvalue of L_n along the way (REFERENCE.md §3: large weights make the loss
stiff; Lau et al., arXiv:2308.12108). :func:`default_step_sizes` estimates h by power
iteration on Hessian-vector products and places :func:`slt_jax.calibrate`'s default grid.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from slt_jax import masks, validation
from slt_jax.data.batches import minibatch

# Default grid: GRID_POINTS step sizes GRID_FACTOR apart below the stiffness scale 1/(nβ·h + γ).
GRID_POINTS = 4
GRID_FACTOR = 2.0
_PROBE_ROWS = 4096
_POWER_ITERATIONS = 30
_RADII = 64


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(alpha, x, y):
    """``alpha·x + y`` over pytrees."""
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def _top_curvature(loss_fn, batch, position, probe, mask):
    """|largest eigenvalue| of the Hessian of ``L_B`` on the sampled coordinates (power iteration)."""
    grad = jax.grad(lambda p: loss_fn(p, batch))
    masked = lambda u: jax.tree.map(jnp.multiply, u, mask)
    hvp = lambda u: masked(jax.jvp(grad, (position,), (masked(u),))[1])

    def body(u, _):
        hu = hvp(u)
        norm = jnp.sqrt(_tree_dot(hu, hu))
        return jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30), hu), norm

    _, norms = jax.lax.scan(body, masked(probe), None, length=_POWER_ITERATIONS)
    return norms[-1]


@partial(jax.jit, static_argnames=("loss_fn",))
def _curvatures(loss_fn, batch, positions, probe, mask):
    """h at each of ``positions`` (a params pytree with a leading axis of 2): one program per
    model, shared by the grid (w* and a typical point) and the chains (two at a time)."""
    return jax.vmap(_top_curvature, in_axes=(None, None, 0, None, None))(loss_fn, batch, positions, probe, mask)


@partial(jax.jit, static_argnames=("loss_fn",))
def _typical_pair(loss_fn, batch, center, direction, radii, nbeta, dim):
    """w* and ``w* + r·z`` stacked, r the first of ``radii`` where
    ``nβ·(L_B(w* + r·z) − L_B(w*)) ≥ d/2`` (the last radius if none)."""
    base = loss_fn(center, batch)
    energy = jax.lax.map(lambda r: nbeta * (loss_fn(_axpy(r, direction, center), batch) - base), radii)
    reached = jnp.nan_to_num(energy, nan=jnp.inf) >= dim / 2
    radius = radii[jnp.where(jnp.any(reached), jnp.argmax(reached), radii.size - 1)]
    return jax.tree.map(lambda c, z: jnp.stack([c, c + radius * z]), center, direction)


_probe_batch = jax.jit(minibatch, static_argnums=2)


@jax.jit
def _normal_like(key, tree):
    """Standard normals shaped like ``tree``, drawn as one flat vector: one small compiled
    program per model (a draw per leaf compiled ~0.3 s for each distinct leaf shape on CPU)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def chain_stiffness(loss_fn, positions, data, key, *, param_mask=None) -> np.ndarray:
    """h at each chain's position: |largest Hessian eigenvalue| of ``L_B`` there (power
    iteration on a probe batch of up to 4096 rows, the grid's own estimate).

    :func:`default_step_sizes` places its grid with h estimated near w*; chains that leave a
    singular point along its flat directions can reach much stiffer ground. On the 8-layer
    DLN 61-86-49-29-30-14-68-62 of ``benchmarks/dln_accuracy.py`` h was 305 at w* and 1130–1220
    at the four chains after they left the Laplace plateau at ε = 3.2e-7 (ε·(nβh + γ) ≈ 3.2,
    near SGLD's linear stability limit 4, where the stiffest direction's variance is ~5× its
    own): λ̂ kept rising past λ = 268 (+37 % at the end of the run), while continuing the same
    chains at ε/2 held it near 285.

    Args:
      loss_fn, data: as in :func:`slt_jax.calibrate`.
      positions: the chains' positions, a params pytree with a leading chain axis.
      key: PRNG key for the probe batch and the power iteration's start.
      param_mask: as in :func:`slt_jax.estimate_llc` (curvature on the sampled coordinates).

    Returns:
      h per chain, ``(chains,)``.
    """
    n = validation.check_data(data)
    key_batch, key_power = jax.random.split(key)
    batch = _probe_batch(key_batch, data, min(n, _PROBE_ROWS))
    # On the host: uncommitted like the grid's arguments, so the grid's compiled program serves
    # the chains two at a time whatever mesh they ran on.
    host = jax.device_get(positions)
    center = jax.tree.map(lambda x: jnp.asarray(x[0]), host)
    mask = masks.resolve_mask(param_mask, center)
    mask = jax.tree.map(jnp.ones_like, center) if mask is None else mask
    probe = _normal_like(key_power, center)
    num_chains = jax.tree.leaves(positions)[0].shape[0]
    pairs = [jax.tree.map(lambda x: x[[i, min(i + 1, num_chains - 1)]], host) for i in range(0, num_chains, 2)]
    h = [np.asarray(_curvatures(loss_fn, batch, pair, probe, mask), np.float64) for pair in pairs]
    return np.concatenate(h)[:num_chains]


def stable_step(step_size: float, stiffness: float, *, nbeta, localization, factor: float = GRID_FACTOR) -> float:
    """``step_size`` divided by ``factor`` until it is at most the grid's top rule
    ``1/(nβ·h + γ)`` for the stiffness h (itself if it already is)."""
    limit = 1.0 / (nbeta * stiffness + localization)
    while step_size > limit:
        step_size /= factor
    return step_size


def default_step_sizes(loss_fn, params, data, key, *, nbeta, localization, param_mask=None,
                       num_points: int = GRID_POINTS, factor: float = GRID_FACTOR) -> np.ndarray:
    """A geometric grid of step sizes below the posterior's stiffness scale.

    For the localized posterior the SGLD step is linearly stable for ε < 4/(nβ·h + γ), h the
    largest Hessian eigenvalue of L_n along the way (REFERENCE.md §3: large weights make the
    loss stiff). h is taken as the larger of its value at w* and at a typical posterior
    point — w* plus a random direction scaled until ``nβ·(L − L(w*)) = d/2``, the most a
    posterior draw carries on average (λ ≤ d/2) — because at singular points the Hessian at
    w* can vanish. The grid is ``ε_top · factor^(−k)``, k = 0 … num_points−1, with
    ``ε_top = 1/(nβ·h + γ)``; both are estimated on a probe batch of up to 4096 rows.

    Args:
      loss_fn, params, data: as in :func:`calibrate`.
      key: PRNG key for the probe batch and directions.
      nbeta: nβ > 0.
      localization: γ ≥ 0.
      param_mask: as in :func:`slt_jax.estimate_llc`.
      num_points: grid size.
      factor: ratio between neighbouring step sizes (> 1).

    Returns:
      Step sizes, increasing, shape ``(num_points,)``.
    """
    validation.check_positive("num_points", num_points, integer=True)
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    n = validation.check_data(data)
    key_batch, key_dir, key_power = jax.random.split(key, 3)
    batch = _probe_batch(key_batch, data, min(n, _PROBE_ROWS))
    params = jax.tree.map(jnp.asarray, params)
    mask = masks.resolve_mask(param_mask, params)
    mask = jax.tree.map(jnp.ones_like, params) if mask is None else mask
    dim = masks.num_sampled(mask, params)
    direction = jax.tree.map(jnp.multiply, _normal_like(key_dir, params), mask)
    flat = ravel_pytree(params)[0]
    scale = float(jnp.sqrt(jnp.mean(jnp.square(flat)))) + 1.0
    top = 10.0 * scale if localization == 0 else min(10.0 * scale, 10.0 / math.sqrt(localization))
    radii = jnp.logspace(math.log10(top) - 9, math.log10(top), _RADII, dtype=flat.dtype)
    probe = _normal_like(key_power, params)
    both = _typical_pair(loss_fn, batch, params, direction, radii, nbeta, dim)
    h = float(jnp.max(_curvatures(loss_fn, batch, both, probe, mask)))
    if not np.isfinite(h):
        raise ValueError("loss_fn has a non-finite Hessian near params: cannot place a step-size grid; "
                         "pass step_sizes explicitly")
    top_step = 1.0 / (nbeta * h + localization)
    return top_step * factor ** -np.arange(num_points)[::-1].astype(float)
