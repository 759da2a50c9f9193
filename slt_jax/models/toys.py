"""Toy singular potentials with known learning coefficients, as sampler-ready models.

The potentials of docs/mathematics.md §5.4 (normal crossings and relatives; Watanabe 2009, used as
unit tests of LLC estimators in arXiv:2308.12108). Each potential K is written with
arithmetic only, so the same function runs on numpy float64 grids
(`slt_jax.groundtruth.toy_llc_quadrature`) and on JAX parameters (`toy_model`).
"""

import numbers
from fractions import Fraction
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from slt_jax.groundtruth import LearningCoefficient

TOY_NAMES = ("regular_d", "w1^2 w2^2", "w1^2 w2^4", "w1^2 w2^6", "w^2k", "radial")


class ToyPotential(NamedTuple):
    """A potential K(w) (maps shape ``(..., d)`` to ``(...)``), its minimiser w*, and λ at w*."""

    potential: Callable
    center: np.ndarray
    lam: LearningCoefficient


class ToyModel(NamedTuple):
    """A toy potential as ``loss_fn(params, batch)``, the point w*, a dummy dataset, and λ."""

    loss_fn: Callable
    params_star: jnp.ndarray
    data: jnp.ndarray
    lam: LearningCoefficient


def _crossing(power: int) -> Callable:
    return lambda w: w[..., 0] ** 2 * w[..., 1] ** power


def toy_potential(name: str, *, k=None, dim=None, eigenvalues=None) -> ToyPotential:
    """The potential, minimiser and learning coefficient of a named toy model.

    ==============  ==========================  =====================  ===
    name            K(w)                        λ                      m
    ==============  ==========================  =====================  ===
    ``regular_d``   ½ Σ_i h_i w_i²              d/2                    1
    ``w1^2 w2^2``   w1² w2²                     1/2                    2
    ``w1^2 w2^4``   w1² w2⁴                     1/4                    1
    ``w1^2 w2^6``   w1² w2⁶                     1/6                    1
    ``w^2k``        w^{2k} (one parameter)      1/(2k)                 1
    ``radial``      (Σ_{i≤dim} w_i²)^k          dim/(2k)               1
    ==============  ==========================  =====================  ===

    w* is the origin for every toy.

    Args:
      name: one of `TOY_NAMES`.
      k: power of ``w^2k`` and ``radial`` (positive int, default 2).
      dim: number of parameters of ``radial`` (positive int, default 2).
      eigenvalues: Hessian eigenvalues h_i > 0 of ``regular_d`` (default ``(1.0, 1.0)``).

    Returns:
      ``ToyPotential(potential, center, lam)``.
    """
    options = {"k": k, "dim": dim, "eigenvalues": eigenvalues}
    used = {"regular_d": {"eigenvalues"}, "w^2k": {"k"}, "radial": {"k", "dim"}}
    if name not in TOY_NAMES:
        raise ValueError(f"name must be one of {TOY_NAMES}, got {name!r}")
    for option, value in options.items():
        if value is not None and option not in used.get(name, set()):
            raise ValueError(f"{option} does not apply to toy {name!r}")
    for option in ("k", "dim"):
        value = options[option]
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{option} must be a positive integer, got {value!r}")
    k = 2 if k is None else int(k)
    dim = 2 if dim is None else int(dim)

    if name == "regular_d":
        h = (1.0, 1.0) if eigenvalues is None else tuple(float(v) for v in eigenvalues)
        if len(h) == 0 or not all(np.isfinite(v) and v > 0 for v in h):
            raise ValueError(f"eigenvalues must be a non-empty sequence of positive numbers, got {eigenvalues!r}")
        return ToyPotential(
            lambda w: 0.5 * sum(h_i * w[..., i] ** 2 for i, h_i in enumerate(h)),
            np.zeros(len(h)),
            LearningCoefficient(Fraction(len(h), 2), 1),
        )
    if name == "w1^2 w2^2":
        return ToyPotential(_crossing(2), np.zeros(2), LearningCoefficient(Fraction(1, 2), 2))
    if name == "w1^2 w2^4":
        return ToyPotential(_crossing(4), np.zeros(2), LearningCoefficient(Fraction(1, 4), 1))
    if name == "w1^2 w2^6":
        return ToyPotential(_crossing(6), np.zeros(2), LearningCoefficient(Fraction(1, 6), 1))
    if name == "w^2k":
        return ToyPotential(lambda w: w[..., 0] ** (2 * k), np.zeros(1), LearningCoefficient(Fraction(1, 2 * k), 1))
    return ToyPotential(
        lambda w: sum(w[..., i] ** 2 for i in range(dim)) ** k,
        np.zeros(dim),
        LearningCoefficient(Fraction(dim, 2 * k), 1),
    )


def toy_model(name: str, *, n, k=None, dim=None, eigenvalues=None) -> ToyModel:
    """A named toy potential packaged for the samplers: ``loss_fn(params, batch) -> scalar``.

    The potential does not depend on data, but the samplers need a dataset of length n
    (nβ = n·β scales the potential): ``data`` is ``zeros((n, 1))`` and ``loss_fn`` adds
    ``0·mean(batch)`` so the minibatch still flows through. Options as in `toy_potential`.

    Args:
      name: one of `TOY_NAMES`.
      n: dataset length (positive int).
      k: power of ``w^2k`` and ``radial``.
      dim: number of parameters of ``radial``.
      eigenvalues: Hessian eigenvalues of ``regular_d``.

    Returns:
      ``ToyModel(loss_fn, params_star, data, lam)``: ``params_star`` is a 1-D float32 array
      (w* = 0), ``lam`` a `LearningCoefficient` (use ``float(lam.lam)`` for the number).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    potential, center, lam = toy_potential(name, k=k, dim=dim, eigenvalues=eigenvalues)

    def loss_fn(params, batch):
        return potential(params) + 0.0 * jnp.mean(batch)

    return ToyModel(loss_fn, jnp.asarray(center, dtype=jnp.float32), jnp.zeros((int(n), 1)), lam)
