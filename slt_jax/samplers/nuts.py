"""The exact gold standard: the localized tempered posterior sampled with NUTS, full batch.

SGLD-family samplers trade exactness for speed (minibatch gradients, no Metropolis
correction). For models small enough to evaluate ``L_n`` on the whole dataset at every
leapfrog step, numpyro's No-U-Turn sampler (Hoffman & Gelman, arXiv:1111.4246) samples
``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` (Lau et al., arXiv:2308.12108) without
discretisation bias, so comparing the two at equal nβ and γ separates sampler bias from
estimator bias.
"""

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from slt_jax.data.batches import exact_loss
from slt_jax.errors import DivergenceError, DivergenceWarning
from slt_jax.posterior import LocalPosterior
from slt_jax.results import Sampled
from slt_jax.runner.chain import Draws

DEFAULT_BATCH_SIZE = 4096
NUTS = "nuts"  # the sampler name that selects this gold standard in estimate_llc


class NUTSDraws(NamedTuple):
    """What a NUTS run returns.

    Attributes:
      positions: sampled coordinates, ``(chains, draws, k)`` (the k sampled entries of the
        flattened parameters; use ``unravel`` for a pytree).
      center: the same k coordinates of w*, ``(k,)``.
      unravel: maps one ``(k,)`` vector back to the parameter pytree.
      stats: per-run sampler statistics (adapted step size, acceptance, divergences, cost).
    """

    positions: np.ndarray
    center: np.ndarray
    unravel: Any
    stats: dict


def _embedding(params, mask):
    """Flat sampled coordinates ``z`` ↔ parameter pytree, the rest frozen at ``params``."""
    flat_center, unravel = ravel_pytree(params)
    if mask is None:
        index = np.arange(flat_center.size)
    else:
        index = np.flatnonzero(np.asarray(ravel_pytree(mask)[0]) != 0)
    index = jnp.asarray(index)

    def to_params(z):
        return unravel(flat_center.at[index].set(z.astype(flat_center.dtype)))

    return flat_center[index], to_params


def sample_nuts(loss_fn, params, data, key, *, nbeta, localization, num_chains, num_warmup,
                num_samples, thinning=1, mask=None, batch_size=DEFAULT_BATCH_SIZE, step_size=1e-3,
                target_accept_prob=0.8, max_tree_depth=10, progress=False) -> NUTSDraws:
    """Sample ``∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` with NUTS, chains vectorised.

    The potential is ``nβ·(L_n(w) − L_n(w*)) + γ/2·‖w − w*‖²`` with ``L_n`` exact over the
    whole dataset (``batch_size`` rows at a time); step size and a diagonal mass matrix are
    adapted during warm-up (numpyro's windowed adaptation). Every chain starts at w*.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      params: w*, a pytree of float arrays.
      data: the dataset (pytree with a leading sample axis).
      key: JAX PRNG key.
      nbeta: nβ > 0.
      localization: γ ≥ 0 (γ = 0 only where ``L_n`` alone confines the posterior).
      num_chains: chains, run with ``chain_method="vectorized"``.
      num_warmup: adaptation steps per chain (discarded).
      num_samples: NUTS transitions per chain after warm-up.
      thinning: keep every ``thinning``-th transition.
      mask: optional 0/1 pytree like ``params``; only its nonzero coordinates are sampled.
      batch_size: rows per chunk of the full-batch loss.
      step_size: initial leapfrog step size (adapted).
      target_accept_prob: target of the step-size adaptation.
      max_tree_depth: cap on the trajectory doubling (``2^depth`` leapfrog steps).
      progress: show numpyro's progress bar.

    Returns:
      :class:`NUTSDraws`.
    """
    from numpyro.infer import MCMC, NUTS  # numpyro only when NUTS runs

    center_z, to_params = _embedding(params, mask)
    loss_n = exact_loss(loss_fn, data, batch_size)
    center_loss = loss_n(params)

    posterior = LocalPosterior(params, nbeta, localization, mask)

    def potential(z):
        w = to_params(z)
        return posterior.potential(loss_n(w), center_loss, w)

    kernel = NUTS(potential_fn=potential, step_size=step_size, target_accept_prob=target_accept_prob,
                  max_tree_depth=max_tree_depth)
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                thinning=thinning, chain_method="vectorized", progress_bar=progress)
    init = jnp.broadcast_to(center_z, (num_chains, center_z.size))
    mcmc.run(key, init_params=init, extra_fields=("diverging", "num_steps", "accept_prob"))
    extra = mcmc.get_extra_fields(group_by_chain=True)
    positions = np.asarray(mcmc.get_samples(group_by_chain=True))
    num_steps = np.asarray(extra["num_steps"])
    stats = {
        "step_size": np.asarray(mcmc.last_state.adapt_state.step_size).tolist(),
        "accept_prob": float(np.mean(extra["accept_prob"])),
        "num_divergent": int(np.sum(extra["diverging"])),
        "mean_leapfrog_steps": float(np.mean(num_steps)),
        "max_leapfrog_steps": int(np.max(num_steps)),
    }
    return NUTSDraws(positions, np.asarray(center_z), to_params, stats)


def sample(problem, run, key, *, step_size, progress=True) -> Sampled:
    """λ̂'s draws from NUTS on ``problem``'s localized posterior (``sampler="nuts"``).

    The same estimand as every other sampler behind :func:`slt_jax.estimate_llc`, with every
    draw's ``L_n`` exact on the full (evaluation) dataset and no discretisation or minibatch
    bias, for models small enough to take full-batch gradients at every leapfrog step. The run's
    ``num_burnin`` is NUTS's warm-up (adaptation), ``num_draws × steps_per_draw`` its transitions
    thinned by ``steps_per_draw``; ``step_size`` is the initial leapfrog step (adapted);
    ``loss_estimator`` and ``chunk_size`` do not apply. NUTS's divergent transitions (energy
    errors the adapted step could not resolve) warn (or raise with ``on_divergence="raise"``).

    Returns:
      A :class:`~slt_jax.results.Sampled` whose ``sampler_stats`` hold the adapted step sizes,
      mean acceptance probability, divergent transitions and leapfrog steps per draw.
    """
    run.require_draws(4, "split R-hat needs them")
    problem.require_resident("sampler='nuts'")
    chunk = min(problem.n, max(problem.batch_size, DEFAULT_BATCH_SIZE))
    draws = sample_nuts(problem.loss_fn, problem.params, problem.data, key, nbeta=problem.nbeta,
                        localization=problem.localization, num_chains=run.num_chains, num_warmup=run.num_burnin,
                        num_samples=run.num_draws * run.steps_per_draw, thinning=run.steps_per_draw,
                        mask=problem.mask, batch_size=chunk, step_size=step_size, progress=progress)
    measure = problem.data if problem.eval_data is None else problem.eval_data
    measured = exact_loss(problem.loss_fn, measure, min(problem.n_eval, chunk))
    flat = jnp.asarray(draws.positions.reshape(-1, draws.positions.shape[-1]))
    batch_loss = jax.jit(lambda zs: jax.lax.map(lambda z: measured(draws.unravel(z)), zs))(flat)
    batch_loss = np.asarray(batch_loss, np.float64).reshape(draws.positions.shape[:2])
    num_divergent = draws.stats["num_divergent"]
    if num_divergent:
        message = (f"NUTS reported {num_divergent} divergent transitions: the posterior has curvature "
                   "the adapted step size cannot resolve, so λ̂ may be biased; raise num_burnin.")
        if run.on_divergence == "raise":
            raise DivergenceError(message)
        warnings.warn(message, DivergenceWarning, stacklevel=3)
    distance = np.sum(np.square(draws.positions - draws.center), axis=-1)
    record = Draws(batch_loss=batch_loss, center_loss=None, distance=distance, info=None)
    return Sampled(record, np.full(run.num_chains, -1), None, float(step_size),
                   dataclasses.replace(run, loss_estimator="full_batch"), draws.stats)
