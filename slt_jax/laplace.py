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

The Hessian here is dense (d × d), so this is a diagnostic for models up to a few thousand
parameters.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from slt_jax import validation
from slt_jax.groundtruth import regular_llc
from slt_jax.posterior import default_nbeta

# Refuse dense Hessians beyond this many parameters (d² floats, d HVPs per batch).
MAX_PARAMS = 8192


class LaplaceLLC(NamedTuple):
    """The Laplace value and the spectrum it came from.

    Attributes:
      llc: ``½ Σ nβh_i / (nβh_i + γ)``.
      eigenvalues: Hessian eigenvalues of the mean loss at w*, increasing.
      num_stiff: eigenvalues with ``nβh > γ`` (directions the loss confines more than γ).
      nbeta, localization: the nβ and γ used.
    """

    llc: float
    eigenvalues: np.ndarray
    num_stiff: int
    nbeta: float
    localization: float


def laplace_llc(loss_fn, params, data, *, localization: float, nbeta: float | None = None,
                batch_size: int = 1024, max_rows: int | None = None) -> LaplaceLLC:
    """The λ̂ of the quadratic approximation of L_n at ``params`` (see the module docstring).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss, as for ``estimate_llc``.
      params: w*, a pytree of float arrays (at most :data:`MAX_PARAMS` numbers in all).
      data: pytree of arrays with a leading axis of n rows.
      localization: γ ≥ 0.
      nbeta: nβ; default ``n / log n`` as in ``estimate_llc``.
      batch_size: rows per Hessian batch; the Hessian of L_n is the row-weighted mean of the
        batches' Hessians (the last, partial batch weighted by its rows).
      max_rows: use only the first ``max_rows`` rows (a cheaper estimate of the Hessian).

    Returns:
      A :class:`LaplaceLLC`.
    """
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
    flat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    if flat.size > MAX_PARAMS:
        raise ValueError(f"params has {flat.size} numbers; laplace_llc builds a dense Hessian and takes at most "
                         f"{MAX_PARAMS}")
    hessian = jax.jit(jax.hessian(lambda v, batch: loss_fn(unravel(v), batch)))
    total = np.zeros((flat.size, flat.size))
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        batch = jax.tree.map(lambda x: x[start:start + rows], data)
        total += rows * np.asarray(hessian(flat, batch), np.float64)
    eigenvalues = np.linalg.eigvalsh(0.5 * (total + total.T) / n)
    return LaplaceLLC(regular_llc(eigenvalues, nbeta, localization), eigenvalues,
                      int(np.sum(nbeta * eigenvalues > localization)), float(nbeta), float(localization))
