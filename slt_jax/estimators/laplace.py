"""The Laplace value of λ̂: what the estimate reads if the chains only see the quadratic part of L_n.

With ``L_n(w) ≈ L_n(w*) + ½ (w − w*)ᵀ Hess (w − w*)`` the localized posterior is Gaussian and
``λ̂ = ½ Σ_i nβh_i / (nβh_i + γ)`` (:func:`slt_jax.groundtruth.regular_llc`; Lau et al.,
arXiv:2308.12108). At a regular minimum this is the estimand. At a singular one the true
λ ≥ rank(Hess)/2 is larger, and the difference comes from directions that are flat to higher
order — which chains starting at w* reach only by diffusing far along them. Until they do,
λ̂ sits on a plateau at the Laplace value: measured on a DLN 25-15-21-8-35-14 (rank 1,
λ = 60, n = 1e5, γ = 1), the Laplace value is 19.007 and SGLD's λ̂ (ε = 1.37e-7, 4 chains) read
19.0 over its first 20k steps, 23 over the next 20k, and settled near 57 only after ~150k
(``benchmarks/dln_accuracy.py``); an 8-layer DLN sat at 123 against a Laplace value of 121
before climbing to λ = 268. A λ̂ equal to the
Laplace value at a point whose Hessian is degenerate is therefore a warning sign: either the
higher-order directions contribute nothing, or the chains have not left the quadratic part.

Two ways to compute it (``laplace_llc(method=...)``):

- ``"dense"``: the d × d Hessian, built from d HVPs per row batch and diagonalised; exact, and
  it returns the whole spectrum, but d² memory limits it to :data:`MAX_PARAMS` parameters.
- ``"lanczos"``: matrix-free stochastic Lanczos quadrature (Ubaru, Chen & Saad, "Fast
  estimation of tr(f(A)) via stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38(4),
  1075–1099, 2017) of ``tr f(Hess)`` with ``f(h) = ½ nβh/(nβh + γ)``: Hessian-vector products
  only (forward-over-reverse), a Lanczos basis of ``num_lanczos × d`` numbers per probe, and a
  standard error from the spread across Rademacher probes. For models of 10k–1M parameters:
  on the 8-layer DLN 61-86-49-29-30-14-68-62 (17,339 parameters, aligned rank-2 point, 242
  stiff directions, nβ = 8686, γ = 1, 8192 rows) the defaults (16 probes × 64 steps) read
  120.9 ± 2.9 against 120.99 (all stiff eigenvalues ≥ 0.73), in 20–28 s on two CPU cores.

``method="auto"`` (the default) is dense up to :data:`MAX_PARAMS` parameters, Lanczos above.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from slt_jax import validation
from slt_jax.curvature import lanczos_program
from slt_jax.groundtruth import regular_llc
from slt_jax.posterior import default_nbeta

# Refuse dense Hessians beyond this many parameters (d² floats, d HVPs per batch).
MAX_PARAMS = 8192
# Lanczos bases of this many bytes at most are built at once: the probes run in groups
# (vmapped) of the largest divisor of num_probes whose num_lanczos × d bases fit.
LANCZOS_BASIS_BYTES = 1 << 30
METHODS = ("auto", "dense", "lanczos")
class LaplaceLLC(NamedTuple):
    """The Laplace value and the spectrum it came from.

    Attributes:
      llc: ``½ Σ nβh_i / (nβh_i + γ)`` (``method="lanczos"``: the mean of the probes' estimates).
      eigenvalues: ``"dense"``: the Hessian eigenvalues of the mean loss at w*, increasing.
        ``"lanczos"``: the Ritz values (eigenvalues of the tridiagonal Lanczos matrix) of the
        first probe, increasing — at most ``num_lanczos`` numbers, the nodes of its quadrature
        rule; the extreme ones approximate the extreme eigenvalues, the inner ones do not
        resolve individual eigenvalues.
      num_stiff: eigenvalues with ``nβh > γ`` (directions the loss confines more than γ);
        ``"lanczos"``: the same stochastic quadrature with ``f = 1[nβh > γ]``, rounded.
      nbeta, localization: the nβ and γ used.
      llc_se: standard error of ``llc`` across the probes (0.0 for ``"dense"``). It covers the
        probe (Hutchinson) noise, not the bias of a too-short Lanczos run.
      method: ``"dense"`` or ``"lanczos"``, the method that ran.
    """

    llc: float
    eigenvalues: np.ndarray
    num_stiff: int
    nbeta: float
    localization: float
    llc_se: float = 0.0
    method: str = "dense"


def laplace_llc(loss_fn, params, data, *, localization: float, nbeta: float | None = None,
                batch_size: int = 1024, max_rows: int | None = None, method: str = "auto", key=None,
                num_probes: int = 16, num_lanczos: int = 64) -> LaplaceLLC:
    """The λ̂ of the quadratic approximation of L_n at ``params`` (see the module docstring).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss, as for ``estimate_llc``.
      params: w*, a pytree of float arrays (at most :data:`MAX_PARAMS` numbers in all for
        ``method="dense"``).
      data: pytree of arrays with a leading axis of n rows.
      localization: γ ≥ 0.
      nbeta: nβ; default ``n / log n`` as in ``estimate_llc``.
      batch_size: rows per Hessian batch; the Hessian of L_n is the row-weighted mean of the
        batches' Hessians (the last, partial batch weighted by its rows). Both methods.
      max_rows: use only the first ``max_rows`` rows (a cheaper estimate of the Hessian; for
        large n pass e.g. 8192 — every Lanczos step is a pass over these rows).
      method: ``"dense"``, ``"lanczos"``, or ``"auto"``: dense when the parameters number at
        most :data:`MAX_PARAMS`, Lanczos above (``"dense"`` above it is refused).
      key: PRNG key of the Rademacher probes (``"lanczos"`` only); None means
        ``jax.random.key(0)``. The result is a deterministic function of it.
      num_probes: probe vectors (≥ 2, for a standard error); the standard error falls as
        ``1/√num_probes``.
      num_lanczos: Lanczos steps per probe (capped at the number of parameters), with full
        reorthogonalisation; the quadrature has that many nodes.

    Returns:
      A :class:`LaplaceLLC`.

    Stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017):
    for each probe z_j (Rademacher, so ``E[z zᵀ] = I``) Lanczos on the Hessian from
    ``z_j/‖z_j‖`` builds a tridiagonal T_j with eigenpairs (θ_k, s_k); with τ_k the first
    component of s_k, ``z_jᵀ f(Hess) z_j ≈ ‖z_j‖² Σ_k τ_k² f(θ_k)`` (Gauss quadrature of the
    spectral measure of z_j), whose mean over probes estimates ``tr f(Hess)``. A breakdown
    (residual at rounding level, :data:`slt_jax.curvature.BREAKDOWN_EPS`: z_j lies in an invariant subspace) ends
    that probe's recursion early, and its quadrature is then exact up to rounding. The
    Hessian-vector products run in the parameters' dtype, at least float32 (one compiled
    program, reused by later calls with the same loss, layout and counts, with all probes of a
    group vmapped); the quadrature is accumulated in float64.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = validation.check_data(data)
    validation.check_params(params)
    validation.check_positive("localization", localization, allow_zero=True)
    validation.check_positive("batch_size", batch_size, integer=True)
    if nbeta is None:
        nbeta = default_nbeta(n) if n > 1 else 1.0
    validation.check_positive("nbeta", nbeta)
    if max_rows is not None:
        validation.check_positive("max_rows", max_rows, integer=True)
        data = jax.tree.map(lambda x: x[:max_rows], data)
        n = min(n, max_rows)
    # Half-precision Hessians cannot resolve the spectrum (nor Lanczos its breakdowns): at least float32.
    flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)),
                                              params))
    if method == "auto":
        method = "dense" if flat.size <= MAX_PARAMS else "lanczos"
    if method == "lanczos":
        if key is None:
            key = jax.random.key(0)
        validation.key_data(key)
        validation.check_positive("num_probes", num_probes, integer=True)
        if num_probes < 2:
            raise ValueError(f"num_probes must be at least 2 (for a standard error), got {num_probes!r}")
        validation.check_positive("num_lanczos", num_lanczos, integer=True)
        return _lanczos_llc(loss_fn, flat, unravel, data, n, float(nbeta), float(localization), batch_size,
                            key, num_probes, min(num_lanczos, flat.size))
    if flat.size > MAX_PARAMS:
        raise ValueError(f"params has {flat.size} numbers; laplace_llc builds a dense Hessian and takes at most "
                         f"{MAX_PARAMS}")
    try:
        hash(loss_fn)
        hessian = functools.partial(_batch_hessian, loss_fn)
    except TypeError:  # an unhashable loss_fn: compile for this call only
        hessian = jax.jit(functools.partial(_hessian, loss_fn))
    params = unravel(flat)
    total = np.zeros((flat.size, flat.size))
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        batch = jax.tree.map(lambda x: x[start:start + rows], data)
        total += rows * np.asarray(hessian(params, batch), np.float64)
    eigenvalues = np.linalg.eigvalsh(0.5 * (total + total.T) / n)
    return LaplaceLLC(regular_llc(eigenvalues, nbeta, localization), eigenvalues,
                      int(np.sum(nbeta * eigenvalues > localization)), float(nbeta), float(localization),
                      0.0, "dense")


def _hessian(loss_fn, params, batch):
    """The Hessian of ``loss_fn(·, batch)`` at ``params``, in ``ravel_pytree`` order."""
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda v: loss_fn(unravel(v), batch))(flat)


_batch_hessian = jax.jit(_hessian, static_argnums=0)
"""One program per loss and shapes, reused by later calls (a fresh closure per call compiled again
each time: 0.3–0.4 s of every ``step_size="auto"`` run on a 24-parameter DLN)."""


def _lanczos_llc(loss_fn, flat, unravel, data, n, nbeta, localization, batch_size, key, num_probes, num_steps):
    d = flat.size
    num_full, rest = divmod(n, batch_size) if n > batch_size else (0, n)
    data = jax.tree.map(jnp.asarray, data)
    full = jax.tree.map(lambda x: x[:num_full * batch_size].reshape((num_full, batch_size) + x.shape[1:]), data)
    last = jax.tree.map(lambda x: x[num_full * batch_size:n], data)
    if num_full == 0:
        full = None
    if rest == 0:
        last = None
    per_probe = num_steps * d * flat.dtype.itemsize
    group = max(g for g in range(1, num_probes + 1)
                if num_probes % g == 0 and (g == 1 or g * per_probe <= LANCZOS_BASIS_BYTES))
    program = lanczos_program(loss_fn, flat, unravel, n, batch_size, num_full, rest, num_steps)
    probes = jax.random.rademacher(key, (num_probes, d), flat.dtype)
    alphas, betas = [], []
    for start in range(0, num_probes, group):
        a, b = program(flat, probes[start:start + group], full, last)
        alphas.append(np.asarray(a, np.float64))
        betas.append(np.asarray(b, np.float64))
    alphas, betas = np.concatenate(alphas, axis=1).T, np.concatenate(betas, axis=1).T  # (probes, steps)
    if not (np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))):
        raise ValueError("laplace_llc: the Hessian-vector products are not finite at params")

    llc, stiff, first_ritz = np.zeros(num_probes), np.zeros(num_probes), None
    for j in range(num_probes):
        dead = np.flatnonzero(betas[j] == 0)
        size = int(dead[0]) + 1 if dead.size else num_steps
        beta = betas[j, :size - 1]
        theta, vectors = np.linalg.eigh(np.diag(alphas[j, :size]) + np.diag(beta, 1) + np.diag(beta, -1))
        precision = nbeta * theta + localization
        if np.any(precision <= 0):
            raise ValueError(
                "laplace_llc: the localized posterior is improper (nbeta*h + localization <= 0 for the Ritz value "
                f"h = {theta[precision <= 0].min()}); increase localization above nbeta*|h_min|")
        weights = d * vectors[0] ** 2  # ‖z‖² = d for a Rademacher z
        llc[j] = np.sum(weights * 0.5 * nbeta * theta / precision)
        stiff[j] = np.sum(weights * (nbeta * theta > localization))
        if j == 0:
            first_ritz = theta
    return LaplaceLLC(float(llc.mean()), first_ritz, int(round(stiff.mean())), nbeta, localization,
                      float(llc.std(ddof=1) / math.sqrt(num_probes)), "lanczos")
