"""MALA acceptance: a Metropolis check of the Langevin step size on the full-batch posterior.

An SGLD step of size ε is the proposal of the Metropolis-adjusted Langevin algorithm
(Roberts & Tweedie 1996) without the accept/reject step. Running that check on the exact
potential ``U(w) = nβ·(L_n(w) − L_n(w*)) + γ/2·‖w − w*‖²`` (Lau et al., arXiv:2308.12108)
from points the chains reached measures how far ε is from the continuous-time limit: an
acceptance rate near 1 means a small discretisation bias, well below 1 (MALA's optimum is
≈ 0.57) means SGLD at this ε samples a visibly different distribution. Proposals use the
full-batch gradient, so the check sees discretisation error only, not minibatch noise; it
costs ``num_steps`` full-batch gradients per chain — meant for small models.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from slt_jax.data.batches import exact_loss
from slt_jax.posterior import LocalPosterior


@partial(jax.jit, static_argnames=("loss_fn", "batch_size"))
def _acceptance(loss_fn, data, posterior, positions, noise, uniforms, step_size, batch_size):
    """Mean acceptance of MALA chains on flattened coordinates; noise ``(chains, steps, k)``."""
    unravel = ravel_pytree(posterior.center)[1]
    sampled = ravel_pytree(posterior.sampled())[0]
    loss_n = exact_loss(loss_fn, data, batch_size)
    center_loss = loss_n(posterior.center)

    def potential(z):
        w = unravel(z)
        return posterior.potential(loss_n(w), center_loss, w)

    value_and_grad = jax.value_and_grad(potential)
    mean_of = lambda z, g: z - 0.5 * step_size * sampled * g
    log_q = lambda to, mean: -jnp.sum(jnp.square(to - mean)) / (2 * step_size)

    def chain(z, noise, uniforms):
        def step(carry, draw):
            z, u, g = carry
            xi, uniform = draw
            proposal = mean_of(z, g) + jnp.sqrt(step_size) * sampled * xi
            u_new, g_new = value_and_grad(proposal)
            log_ratio = u - u_new + log_q(z, mean_of(proposal, g_new)) - log_q(proposal, mean_of(z, g))
            accept_prob = jnp.where(jnp.isfinite(log_ratio), jnp.exp(jnp.minimum(log_ratio, 0.0)), 0.0)
            accept = uniform < accept_prob
            carry = jax.tree.map(lambda a, b: jnp.where(accept, a, b), (proposal, u_new, g_new), (z, u, g))
            return carry, accept_prob

        _, probs = jax.lax.scan(step, (z, *value_and_grad(z)), (noise, uniforms))
        return jnp.mean(probs)

    flat = jax.vmap(lambda w: ravel_pytree(w)[0])(positions)
    return jax.vmap(chain)(flat, noise, uniforms)


def mala_acceptance(loss_fn, data, posterior: LocalPosterior, positions, key, *, step_size,
                    num_steps: int = 32, batch_size: int = 4096) -> np.ndarray:
    """Mean Metropolis acceptance probability of Langevin proposals, per chain.

    From each starting point, runs ``num_steps`` MALA steps — proposal
    ``w' = w − (ε/2)·∇U(w) + √ε·ξ`` on the sampled coordinates, accepted with probability
    ``min(1, exp(U(w) − U(w') + log q(w|w') − log q(w'|w)))`` — and averages the acceptance
    probabilities.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      data: the dataset whose full-batch loss defines the potential.
      posterior: centre, nβ, γ (scalars) and optional 0/1 mask of the localized posterior.
      positions: starting points, a pytree like ``posterior.center`` with a leading chain
        axis (e.g. the chains' final positions, approximately stationary).
      key: JAX PRNG key.
      step_size: ε, the Langevin step size under test.
      num_steps: MALA steps per chain.
      batch_size: rows per chunk of the full-batch loss (memory only).

    Returns:
      Acceptance rate of each chain, shape ``(chains,)``.
    """
    num_chains = jax.tree.leaves(positions)[0].shape[0]
    center = ravel_pytree(posterior.center)[0]
    # A host generator seeded by the key: the check's few random numbers do not justify
    # compiling the on-device generator for their shapes.
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(key_data).ravel())
    noise = rng.standard_normal((num_chains, num_steps, center.size)).astype(center.dtype)
    uniforms = rng.random((num_chains, num_steps)).astype(center.dtype)
    rates = _acceptance(loss_fn, data, posterior, positions, noise, uniforms, jnp.asarray(step_size, center.dtype),
                        batch_size)
    return np.asarray(rates, np.float64)
