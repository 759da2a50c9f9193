"""Curvature of the loss: Hessian-vector products and Lanczos, in one place.

Every step-size rule in slt-jax rests on the Hessian of L: SGLD on the localized posterior is
linearly stable for ε < 4/(nβ·h + γ), h its largest eigenvalue (docs/mathematics.md §3), and the
Laplace value ½·Σ nβh_i/(nβh_i + γ) is a function of its whole spectrum (§5). This module holds
the one HVP (forward-over-reverse), the one estimate of the largest eigenvalue (Lanczos: the
calibration grid at w*, the stiffness checks at the chains' positions, the free-energy ladder's
step rule) and the reorthogonalised Lanczos recursion behind :func:`slt_jax.laplace_llc`'s
stochastic quadrature.
"""

import collections
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from slt_jax import masks, validation
from slt_jax.data.batches import full_batch_loss, minibatch
from slt_jax.runner import sharding

# Rows of the probe batch on which h is measured.
PROBE_ROWS = 4096
# Lanczos steps (Hessian-vector products) per estimate of h: 20, against the 30 power iterations
# they replaced, read closer (top_eigenvalue).
LANCZOS_STEPS = 20
# A Lanczos residual β ≤ BREAKDOWN_EPS·eps·‖Hess q‖ (the largest seen) is a breakdown: the
# Krylov space is invariant to within what HVPs in that dtype resolve. A missed breakdown costs
# nothing (the reorthogonalised residual starts a decoupled block, whose weight in the quadrature
# is O(β²)); a false one truncates the quadrature, so the threshold sits near rounding level.
BREAKDOWN_EPS = 100.0


def hvp(loss, position, tangent):
    """``Hess loss(position) · tangent`` by forward-over-reverse differentiation (pytrees)."""
    return jax.jvp(jax.grad(loss), (position,), (tangent,))[1]


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def top_eigenvalue(loss, position, probe, scale=None, num_steps: int = LANCZOS_STEPS):
    """|largest eigenvalue| of ``S·Hess loss(position)·S``, ``S = diag(scale)``.

    ``scale`` is a pytree like ``position``: a 0/1 mask (the Hessian on the sampled
    coordinates), a preconditioner's ``G^½`` times the mask (the curvature a kernel with a
    diagonal preconditioner G sees: RMSProp-SGLD's step is ε·G per coordinate, so its
    stability is that of ``G^½ ∇²U G^½``), or ``None`` for the plain Hessian.

    ``num_steps`` Lanczos steps from ``probe`` (the three-term recurrence, no
    reorthogonalisation: lost orthogonality only repeats converged Ritz values, Paige 1980), then
    the larger |extreme Ritz value| of the tridiagonal matrix, which approaches the largest
    |eigenvalue| from below. For the same Hessian-vector products it reads far closer than power
    iteration (Kuczyński & Woźniakowski 1992): on the 1M-parameter MLP of
    ``benchmarks/step_cost.py`` (4096 rows) 20 steps read within 0.2 % of 40, where 30 power
    iterations read 3 % below 100. After a breakdown (the Krylov space is invariant, the value
    exact) the remaining steps add zeros. Traced; use inside jit. (The quadrature's recursion,
    :func:`lanczos_program`, keeps every basis vector to reorthogonalise: 20 copies of the
    parameters per chain, which the check at up to 8 chains of a large model cannot afford.)
    """
    scaled = (lambda u: u) if scale is None else (lambda u: jax.tree.map(jnp.multiply, u, scale))
    product = lambda u: scaled(hvp(loss, position, scaled(u)))
    start = scaled(probe)
    dtype = jax.tree.leaves(start)[0].dtype
    tol = BREAKDOWN_EPS * float(jnp.finfo(dtype).eps)
    norm0 = jnp.sqrt(_tree_dot(start, start))
    q0 = jax.tree.map(lambda x: x / jnp.maximum(norm0, 1e-30), start)

    def step(carry, _):
        q, q_prev, beta_prev, scale_hq = carry
        hq = product(q)
        scale_hq = jnp.maximum(scale_hq, jnp.sqrt(_tree_dot(hq, hq)))
        alpha = _tree_dot(q, hq)
        r = jax.tree.map(lambda h, a, b: h - alpha * a - beta_prev * b, hq, q, q_prev)
        beta = jnp.sqrt(_tree_dot(r, r))
        alive = beta > tol * scale_hq  # else: breakdown (or q = 0 after one, or NaN)
        beta = jnp.where(alive, beta, 0.0)
        q_next = jax.tree.map(lambda x: jnp.where(alive, x / jnp.where(alive, beta, 1.0), 0.0), r)
        return (q_next, q, beta, scale_hq), (alpha, beta)

    zero = jnp.zeros((), dtype)
    alphas, betas = lax.scan(step, (q0, jax.tree.map(jnp.zeros_like, q0), zero, zero), None, length=num_steps)[1]
    t = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta = lax.linalg.eigh(t, symmetrize_input=False)[1]  # ascending; lax's traces in half jnp's time
    top = jnp.maximum(jnp.abs(theta[0]), jnp.abs(theta[-1]))
    return jnp.where(jnp.all(jnp.isfinite(alphas)), top, jnp.nan)


@partial(jax.jit, static_argnames=("loss_fn",))
def curvatures(loss_fn, batch, positions, probe, scales):
    """h of ``L_B`` at each of ``positions`` (a params pytree with a leading axis of 2), each on
    its own ``scales`` (leading axis of 2: the mask, times ``G^½`` for a preconditioned kernel;
    :func:`top_eigenvalue`): one program per model, shared by the calibration grid (w* and a
    typical point) and the chains (two at a time)."""
    top = lambda position, scale: top_eigenvalue(lambda p: loss_fn(p, batch), position, probe, scale)
    return jax.vmap(top)(positions, scales)


@partial(jax.jit, static_argnames=("loss_fn", "batch_size"))
def _full_batch_top(loss_fn, params, data, probe, mask, batch_size):
    return top_eigenvalue(lambda p: full_batch_loss(loss_fn, p, data, batch_size).mean, params, probe, mask)


def full_batch_top_eigenvalue(loss_fn, params, data, key, *, mask=None, batch_size: int) -> float:
    """|largest Hessian eigenvalue| of the exact ``L_n`` at ``params`` on the coordinates of
    ``mask`` (:func:`top_eigenvalue`, ``L_n`` over ``batch_size``-row chunks); 0 where it vanishes."""
    probe = normal_like(key, params)
    return float(_full_batch_top(loss_fn, params, data, probe, mask, batch_size))


_probe_batch = jax.jit(lambda key, data, rows: minibatch(key, data, rows)[0], static_argnums=2)


def probe_batch(key, data):
    """Up to :data:`PROBE_ROWS` rows drawn with replacement: the batch h is measured on."""
    return _probe_batch(key, data, min(validation.check_data(data), PROBE_ROWS))


@jax.jit
def normal_like(key, tree):
    """Standard normals shaped like ``tree``, drawn as one flat vector: one small compiled
    program per model (a draw per leaf compiled ~0.3 s for each distinct leaf shape on CPU)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def chain_stiffness(loss_fn, positions, data, key, *, param_mask=None, preconditioner=None,
                    max_chains: int | None = None, rows: int = PROBE_ROWS) -> np.ndarray:
    """h at each chain's position: |largest Hessian eigenvalue| of ``L_B`` there
    (:func:`top_eigenvalue` on a probe batch of up to 4096 rows, the grid's own estimate) — of
    ``G^½·∇²L_B·G^½`` for a kernel with a diagonal preconditioner G.

    :func:`slt_jax.tuning.grid.default_step_sizes` places its grid with h estimated near w*; chains that leave a
    singular point along its flat directions can reach much stiffer ground. On the 8-layer
    DLN 61-86-49-29-30-14-68-62 of ``benchmarks/dln_accuracy.py`` h was 305 at w* and 1130–1220
    at the four chains after they left the Laplace plateau at ε = 3.2e-7 (ε·(nβh + γ) ≈ 3.2,
    near SGLD's linear stability limit 4, where the stiffest direction's variance is ~5× its
    own): λ̂ kept rising past λ = 268 (+37 % at the end of the run), while continuing the same
    chains at ε/2 held it near 285.

    Args:
      loss_fn, data: as in :func:`slt_jax.calibrate`.
      positions: the chains' positions, a params pytree with a leading chain axis.
      key: PRNG key for the probe batch and the Lanczos start.
      param_mask: as in :func:`slt_jax.estimate_llc` (curvature on the sampled coordinates).
      preconditioner: G per chain (a params pytree with a leading chain axis), or ``None``.
      max_chains: measure at most this many chains (an even spread of indices; the others are
        NaN), or ``None`` for all — a bound on the cost of checks after every run.
      rows: rows of the probe batch (at most n).

    Returns:
      h per chain, ``(chains,)`` (NaN for chains not measured).
    """
    n = validation.check_data(data)
    key_batch, key_start = jax.random.split(key)
    batch = _probe_batch(key_batch, data, min(n, rows))
    # On the host: uncommitted like the grid's arguments, so the grid's compiled program serves
    # the chains two at a time whatever mesh they ran on.
    host = sharding.to_host(positions)
    center = jax.tree.map(lambda x: jnp.asarray(x[0]), host)
    mask = masks.resolve_mask(param_mask, center)
    mask = jax.tree.map(jnp.ones_like, center) if mask is None else mask
    num_chains = jax.tree.leaves(positions)[0].shape[0]
    if preconditioner is None:
        scales = jax.tree.map(lambda m: np.broadcast_to(np.asarray(m), (num_chains, *np.shape(m))), mask)
    else:
        scales = jax.tree.map(lambda g, m: np.sqrt(np.asarray(g)) * np.asarray(m), jax.device_get(preconditioner),
                              mask)
    probe = normal_like(key_start, center)
    chosen = np.arange(num_chains)
    if max_chains is not None and num_chains > max_chains:
        chosen = np.unique(np.linspace(0, num_chains - 1, max_chains).round().astype(int))
    h = np.full(num_chains, np.nan)
    for i in range(0, chosen.size, 2):
        pair = chosen[[i, min(i + 1, chosen.size - 1)]]
        take = lambda x: jnp.asarray(np.asarray(x)[pair])
        h[pair] = np.asarray(curvatures(loss_fn, batch, jax.tree.map(take, host), probe,
                                        jax.tree.map(take, scales)), np.float64)
    return h


def _lanczos_program(loss_fn, unravel, n: int, batch_size: int, num_full: int, rest: int, num_steps: int):
    """A jitted ``(w, probes, full, last) -> (alphas, betas)``: Lanczos on Hess L_n(w) from each probe.

    ``full`` holds ``num_full`` stacked batches of ``batch_size`` rows, ``last`` the ``rest``
    remaining rows; the HVP is their row-weighted mean. ``alphas``/``betas`` are
    ``(num_steps, probes)``; after a breakdown both are 0.
    """
    highest = lax.Precision.HIGHEST  # no TF32 in the reorthogonalisation

    def batch_hvp(w, vectors, batch):
        # The primal (w, batch) is shared by the vmapped tangents.
        return jax.vmap(lambda v: hvp(lambda u: loss_fn(unravel(u), batch), w, v))(vectors)

    def mean_hvp(w, vectors, full, last):
        total = jnp.zeros_like(vectors)
        if num_full:
            total = lax.scan(lambda acc, batch: (acc + batch_hvp(w, vectors, batch), None), total, full)[0]
            total = total * batch_size
        if rest:
            total = total + rest * batch_hvp(w, vectors, last)
        return total / n

    def run(w, probes, full, last):
        tol = BREAKDOWN_EPS * float(jnp.finfo(probes.dtype).eps)
        count = probes.shape[0]

        def step(carry):
            j, basis, q, q_prev, beta_prev, scale, alphas, betas = carry
            basis = basis.at[j].set(q)
            hq = mean_hvp(w, q, full, last)
            scale = jnp.maximum(scale, jnp.linalg.norm(hq, axis=1))  # ≤ ‖Hess‖, the rounding scale
            alpha = jnp.sum(q * hq, axis=1)
            r = hq - alpha[:, None] * q - beta_prev[:, None] * q_prev
            for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
                coeffs = jnp.einsum("mcd,cd->mc", basis, r, precision=highest)
                r = r - jnp.einsum("mc,mcd->cd", coeffs, basis, precision=highest)
            beta = jnp.linalg.norm(r, axis=1)
            alive = beta > tol * scale  # else: breakdown (or q = 0 after one)
            beta = jnp.where(alive, beta, 0.0)
            q_next = jnp.where(alive[:, None], r / jnp.where(alive, beta, 1.0)[:, None], 0.0)
            return j + 1, basis, q_next, q, beta, scale, alphas.at[j].set(alpha), betas.at[j].set(beta)

        def going(carry):  # until num_steps, or until every probe has broken down
            j, q = carry[0], carry[2]
            return (j < num_steps) & jnp.any(q != 0)

        zeros = jnp.zeros((count,), probes.dtype)
        init = (0, jnp.zeros((num_steps,) + probes.shape, probes.dtype),
                probes / jnp.linalg.norm(probes, axis=1, keepdims=True), jnp.zeros_like(probes), zeros, zeros,
                jnp.zeros((num_steps, count), probes.dtype), jnp.zeros((num_steps, count), probes.dtype))
        alphas, betas = lax.while_loop(going, step, init)[-2:]
        return alphas, betas

    return jax.jit(run)


_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()
_MAX_PROGRAMS = 8


def lanczos_program(loss_fn, flat, unravel, *static):
    """A jitted Lanczos recursion on ``Hess L_n`` (:func:`_lanczos_program`), reused by later
    calls with the same ``loss_fn``, parameter layout and row/step counts (a new program per call
    would recompile each time)."""
    layout = jax.tree.structure(unravel(flat)), tuple((x.shape, x.dtype) for x in jax.tree.leaves(unravel(flat)))
    key = (loss_fn, layout, *static)
    try:
        hash(key)
    except TypeError:  # an unhashable loss_fn: compile for this call only
        return _lanczos_program(loss_fn, unravel, *static)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _lanczos_program(loss_fn, unravel, *static)
        if len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
