"""Stochastic-gradient Langevin dynamics on the localized tempered posterior.

Lau et al., arXiv:2308.12108, eq. for SGLD with localization (docs/mathematics.md §2)::

    Δw = (ε/2)·(−nβ·∇L_B(w) − γ·(w − w*)) + N(0, ε·I)

``noise="rademacher"`` replaces N(0, ε·I) by √ε·ξ with independent signs ξ = ±1: the
simplified weak Euler scheme (Kloeden & Platen 1992, §14.1), of the same weak order 1 as the
Gaussian (Euler–Maruyama) step, since the increments' first three moments agree. λ̂ is an
expectation — a weak quantity — so both converge to the same value as ε → 0, and on a quadratic
loss the chain's stationary covariance (hence E[λ̂]) is the Gaussian step's exactly, at any ε:
it depends on the noise only through its covariance. It draws one random bit per parameter
instead of a normal (``benchmarks/step_cost.py``), which matters at small batch and large
models. Not for ``mala=True`` (MALA's proposal density is Gaussian).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from slt_jax.posterior import LocalPosterior
from slt_jax.samplers.base import KernelFactory, SamplingAlgorithm
from slt_jax.samplers.noise import tree_normal, tree_rademacher

PyTree = Any


class SGLDState(NamedTuple):
    position: PyTree


class SGLDInfo(NamedTuple):
    """SGLD reports nothing beyond what the runner records (loss, distance)."""


NOISES = {"gaussian": tree_normal, "rademacher": tree_rademacher}


def _check_noise(noise: str) -> str:
    if noise not in NOISES:
        raise ValueError(f"noise={noise!r} is not one of {sorted(NOISES)}")
    return noise


def sgld(step_size, posterior: LocalPosterior, *, noise: str = "gaussian") -> SamplingAlgorithm:
    """Build the SGLD kernel for the posterior ∝ exp(−nβ·L(w) − γ/2·‖w − w*‖²).

    Args:
      step_size: ε, the Langevin step size (noise variance per step).
      posterior: w*, nβ, γ and the optional 0/1 mask (coordinates with 0 stay at w*:
        weight-refined LLC, Wang et al. arXiv:2410.02984).
      noise: ``"gaussian"`` (N(0, I)) or ``"rademacher"`` (±1 signs; see the module docstring).

    Returns:
      A :class:`SamplingAlgorithm`.
    """
    draw = NOISES[_check_noise(noise)]

    def init(position):
        return SGLDState(position)

    def step(key, state, loss_grad):
        force = posterior.force(state.position, loss_grad)
        deltas = jax.tree.map(lambda w, f, xi: (-0.5 * step_size * f + jnp.sqrt(step_size) * xi).astype(w.dtype),
                              state.position, force, draw(key, state.position))
        return SGLDState(jax.tree.map(jnp.add, state.position, posterior.masked(deltas))), SGLDInfo()

    return SamplingAlgorithm(init, step)


def sgld_kernel(noise: str = "gaussian") -> KernelFactory:
    """An SGLD :class:`KernelFactory` with the given noise.

    Args:
      noise: ``"gaussian"`` or ``"rademacher"``.

    Returns:
      A factory named ``"sgld"`` (Gaussian) or ``"sgld_rademacher"``. Equal arguments return
      the same factory, so repeated runs reuse one compiled program.
    """
    return _sgld_kernel(_check_noise(noise))


@functools.lru_cache(maxsize=None)
def _sgld_kernel(noise: str) -> KernelFactory:
    return KernelFactory("sgld" if noise == "gaussian" else f"sgld_{noise}", functools.partial(sgld, noise=noise))


SGLD = sgld_kernel()
SGLD_RADEMACHER = sgld_kernel("rademacher")
