"""RMSProp-preconditioned SGLD on the localized tempered posterior.

Hitchcock & Hoogland, arXiv:2507.21449 (docs/mathematics.md §2), after Li et al.'s pSGLD
(arXiv:1512.07666): a diagonal preconditioner ``G = 1/(√V + eps)`` built from a running mean
``V`` of the squared minibatch *loss* gradient — never the localization term, whose pull
towards w* would otherwise leak into the step sizes — scales both drift and noise::

    V ← α·V + (1 − α)·(∇L_B(w))²
    Δw = (ε/2)·G·(−nβ·∇L_B(w) − γ·(w − w*)) + √(ε·G)·N(0, I)

Like pSGLD it omits the correction term ``Σ_j ∂G_ij/∂w_j``. Without it the chain samples
``∝ π(w)/G(w)`` wherever ``G`` follows the position, over-weighting regions of large gradient
and biasing λ̂ upwards. The decay ``alpha`` sets how closely ``G`` follows: on a
deep linear network (widths (4, 3, 4), rank 1, n = 1000, γ = 50) devinterp's ``alpha = 0.99``
gave λ̂ 6–9 % above NUTS at small steps, while ``alpha = 0.999`` (our default, a ~1000-step
memory) agreed within 1.5 ± 1.5 % — but at γ = 10, where the chains linger longer in each
part of the fibre, still read 4 ± 2 % high (benchmarks/samplers.py). Near a minimum ``V`` is
small and ``G ≈ 1/eps``: the effective step is up to ``ε/eps`` (10·ε with the default
``eps = 0.1``, as in devinterp), so step sizes are not interchangeable with plain SGLD's.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from slt_jax.posterior import LocalPosterior
from slt_jax.samplers.base import KernelFactory, SamplingAlgorithm, Stability
from slt_jax.samplers.noise import tree_normal

PyTree = Any
DEFAULT_ALPHA = 0.999
DEFAULT_EPS = 0.1


class RMSPropSGLDState(NamedTuple):
    """Position and the running mean ``V`` of the squared loss gradient (shaped like it)."""

    position: PyTree
    square_avg: PyTree


class RMSPropSGLDInfo(NamedTuple):
    """Range of the preconditioner ``G`` over the sampled coordinates at this step."""

    preconditioner_min: jax.Array
    preconditioner_max: jax.Array


def rmsprop_sgld(step_size, posterior: LocalPosterior, *, alpha=DEFAULT_ALPHA, eps=DEFAULT_EPS) -> SamplingAlgorithm:
    """Build the RMSProp-SGLD kernel for the posterior ∝ exp(−nβ·L(w) − γ/2·‖w − w*‖²).

    Args:
      step_size: ε, the step size before preconditioning.
      posterior: w*, nβ, γ and the optional 0/1 mask (coordinates with 0 stay at w*).
      alpha: decay of the running mean of the squared loss gradient.
      eps: floor added to ``√V``; bounds the preconditioner by ``1/eps`` (in units of the loss
        gradient, so it depends on the scale of the loss).

    Returns:
      A :class:`SamplingAlgorithm`.
    """

    def init(position):
        return RMSPropSGLDState(position, jax.tree.map(jnp.zeros_like, position))

    def step(key, state, loss_grad):
        noise = tree_normal(key, state.position)
        square_avg = jax.tree.map(lambda v, g: alpha * v + (1 - alpha) * jnp.square(g), state.square_avg,
                                  loss_grad)
        precond = jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v) + eps), square_avg)
        force = posterior.force(state.position, loss_grad)

        def delta(w, f, xi, p):
            return (-0.5 * step_size * p * f + jnp.sqrt(step_size * p) * xi).astype(w.dtype)

        deltas = posterior.masked(jax.tree.map(delta, state.position, force, noise, precond))
        sampled = precond
        if posterior.mask is not None:
            sampled = jax.tree.map(lambda p, m: jnp.where(m != 0, p, jnp.nan), precond, posterior.mask)
        position = jax.tree.map(jnp.add, state.position, deltas)
        leaves = jax.tree.leaves(sampled)
        info = RMSPropSGLDInfo(jnp.nanmin(jnp.stack([jnp.nanmin(p) for p in leaves])),
                               jnp.nanmax(jnp.stack([jnp.nanmax(p) for p in leaves])))
        return RMSPropSGLDState(position, square_avg), info

    return SamplingAlgorithm(init, step)


@functools.lru_cache(maxsize=None)
def rmsprop_sgld_kernel(alpha: float = DEFAULT_ALPHA, eps: float = DEFAULT_EPS) -> KernelFactory:
    """An RMSProp-SGLD :class:`KernelFactory` with its own hyperparameters.

    Args:
      alpha: decay of the running mean of the squared loss gradient, in [0, 1).
      eps: floor added to ``√V``, positive.

    Returns:
      A factory named ``"rmsprop_sgld"`` for the defaults, else
      ``"rmsprop_sgld(alpha=…, eps=…)"`` (the name is recorded in results' settings). Equal
      arguments return the same factory, so repeated runs reuse one compiled program.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
    if not eps > 0.0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    name = "rmsprop_sgld"
    if (alpha, eps) != (DEFAULT_ALPHA, DEFAULT_EPS):
        name = f"rmsprop_sgld(alpha={alpha:g}, eps={eps:g})"

    def build(step_size, posterior):
        return rmsprop_sgld(step_size, posterior, alpha=alpha, eps=eps)

    def preconditioner(state):
        return jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v) + eps), state.square_avg)

    # The update is SGLD's with the per-coordinate step ε·G (G = 1/(√V + eps)): stable for
    # ε·a < 4, a the curvature of the preconditioned potential G^½ ∇²U G^½. Before V has seen
    # any gradient G = 1/eps everywhere, its largest value (docs/mathematics.md §2.3).
    stability = Stability(limit=4.0, start_preconditioner=1.0 / eps, preconditioner=preconditioner)
    return KernelFactory(name, build, stability)


RMSPROP_SGLD = rmsprop_sgld_kernel()
