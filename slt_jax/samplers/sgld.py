"""Stochastic-gradient Langevin dynamics on the localized tempered posterior.

Lau et al., arXiv:2308.12108, eq. for SGLD with localization (REFERENCE.md §1)::

    Δw = (ε/2)·(−nβ·∇L_B(w) − γ·(w − w*)) + N(0, ε·I)
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from slt_jax.samplers.base import KernelFactory, SamplingAlgorithm
from slt_jax.samplers.noise import tree_normal

PyTree = Any


class SGLDState(NamedTuple):
    position: PyTree


class SGLDInfo(NamedTuple):
    """SGLD reports nothing beyond what the runner records (loss, distance)."""


def sgld(step_size, nbeta, localization, center, mask=None) -> SamplingAlgorithm:
    """Build the SGLD kernel for the posterior ∝ exp(−nβ·L(w) − γ/2·‖w − w*‖²).

    Args:
      step_size: ε, the Langevin step size (noise variance per step).
      nbeta: nβ, the inverse temperature times the number of samples.
      localization: γ, the strength of the Gaussian pull towards ``center``.
      center: w*, the pytree where the LLC is measured.
      mask: optional pytree like ``center`` of 0/1 floats; coordinates with 0 stay at w*
        (weight-refined LLC, Wang et al. arXiv:2410.02984).

    Returns:
      A :class:`SamplingAlgorithm`.
    """

    def init(position):
        return SGLDState(position)

    def step(key, state, loss_grad):
        noise = tree_normal(key, state.position)

        def delta(w, w0, g, xi):
            drift = -nbeta * g - localization * (w - w0)
            return (0.5 * step_size * drift + jnp.sqrt(step_size) * xi).astype(w.dtype)

        deltas = jax.tree.map(delta, state.position, center, loss_grad, noise)
        if mask is not None:
            deltas = jax.tree.map(jnp.multiply, deltas, mask)
        return SGLDState(jax.tree.map(jnp.add, state.position, deltas)), SGLDInfo()

    return SamplingAlgorithm(init, step)


SGLD = KernelFactory("sgld", sgld)
