"""The exact gold standard: the localized tempered posterior sampled with NUTS, full batch.

SGLD-family samplers trade exactness for speed (minibatch gradients, no Metropolis
correction). For models small enough to evaluate ``L_n`` on the whole dataset at every
leapfrog step, numpyro's No-U-Turn sampler (Hoffman & Gelman, arXiv:1111.4246) samples
``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` (Lau et al., arXiv:2308.12108) without
discretisation bias, so comparing the two at equal nβ and γ separates sampler bias from
estimator bias.
"""

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.infer import MCMC, NUTS

from slt_jax.runner import divergence as divergence_lib
from slt_jax import masks, validation
from slt_jax.estimators.diagnostics import chain_diagnostics
from slt_jax.estimators.llc import llc_draws, llc_statistics
from slt_jax.data.batches import exact_loss
from slt_jax.posterior import default_nbeta
from slt_jax.results import LLCResult

DEFAULT_BATCH_SIZE = 4096


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
    center_z, to_params = _embedding(params, mask)
    loss_n = exact_loss(loss_fn, data, batch_size)
    center_loss = loss_n(params)

    def potential(z):
        excess = loss_n(to_params(z)) - center_loss
        return nbeta * excess + 0.5 * localization * jnp.sum(jnp.square(z - center_z))

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


def estimate_llc_nuts(loss_fn, params, data, key, *, localization, nbeta=None, step_size=1e-3,
                      num_chains=8, num_draws=500, num_burnin=500, steps_per_draw=1, batch_size=None,
                      eval_data=None, param_mask=None, on_divergence="warn", progress=True) -> LLCResult:
    """λ̂(w*) from NUTS draws of the localized tempered posterior (``sampler="nuts"``).

    The same estimand as :func:`slt_jax.estimate_llc` — ``λ̂ = nβ·(E_p[L_n] − L_n(w*))``,
    Lau et al. arXiv:2308.12108 — with every draw's ``L_n`` exact on the full (evaluation)
    dataset and no discretisation or minibatch bias, for models small enough to take full-batch
    gradients at every leapfrog step.

    Args:
      loss_fn, params, data, key, localization, nbeta, num_chains, eval_data, param_mask: as
        in :func:`slt_jax.estimate_llc`.
      step_size: initial leapfrog step size; NUTS adapts it during warm-up.
      num_draws: recorded NUTS transitions per chain.
      num_burnin: warm-up (adaptation) transitions per chain.
      steps_per_draw: thinning: transitions per recorded draw.
      batch_size: rows per chunk of the full-batch loss (memory only; default min(4096, n)).
      on_divergence: NUTS divergent transitions (energy errors the adapted step could not
        resolve) are counted in ``sampler_stats``; ``"warn"`` also warns, ``"raise"`` raises.
      progress: show numpyro's progress bar.

    Returns:
      An :class:`~slt_jax.results.LLCResult`; ``sampler_stats`` holds the adapted step sizes,
      mean acceptance probability, divergent transitions and leapfrog steps per draw.
    """
    n = validation.check_data(data)
    num_params = validation.check_params(params)
    validation.check_positive("step_size", step_size)
    validation.check_positive("localization", localization, allow_zero=True)
    nbeta = (default_nbeta(n) if n > 1 else 1.0) if nbeta is None else nbeta
    validation.check_positive("nbeta", nbeta)
    batch_size = validation.check_run_settings(
        n, num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
        steps_per_draw=steps_per_draw, batch_size=batch_size, on_divergence=on_divergence,
        default_batch_size=DEFAULT_BATCH_SIZE, min_draws=4)
    params = jax.tree.map(jnp.asarray, params)
    mask = masks.resolve_mask(param_mask, params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype), data)
    validation.check_loss_fn(loss_fn, params, shapes)
    measure, n_eval, eval_batch = data, n, batch_size
    if eval_data is not None:
        n_eval = validation.check_data(eval_data, "eval_data")
        measure, eval_batch = eval_data, min(batch_size, n_eval)

    draws = sample_nuts(loss_fn, params, data, key, nbeta=nbeta, localization=localization,
                        num_chains=num_chains, num_warmup=num_burnin,
                        num_samples=num_draws * steps_per_draw, thinning=steps_per_draw, mask=mask,
                        batch_size=batch_size, step_size=step_size, progress=progress)
    measured = exact_loss(loss_fn, measure, eval_batch)
    flat = jnp.asarray(draws.positions.reshape(-1, draws.positions.shape[-1]))
    batch_loss = jax.jit(lambda zs: jax.lax.map(lambda z: measured(draws.unravel(z)), zs))(flat)
    batch_loss = np.asarray(batch_loss, np.float64).reshape(draws.positions.shape[:2])
    init_loss = float(measured(params))

    per_draw = llc_draws(batch_loss, init_loss, nbeta)
    healthy = np.all(np.isfinite(per_draw), axis=1)
    stats = llc_statistics(per_draw, healthy)
    diagnostics = chain_diagnostics(per_draw[healthy]) if healthy.any() else None
    llc_se = stats.llc_se
    if not np.isfinite(llc_se) and diagnostics is not None:
        llc_se = float(diagnostics.mcse)
    num_divergent = draws.stats["num_divergent"]
    if num_divergent:
        message = (f"NUTS reported {num_divergent} divergent transitions: the posterior has curvature "
                   "the adapted step size cannot resolve, so λ̂ may be biased; raise num_burnin.")
        if on_divergence == "raise":
            raise divergence_lib.DivergenceError(message)
        warnings.warn(message, divergence_lib.DivergenceWarning, stacklevel=2)
    diverged_chains = [int(i) for i in np.flatnonzero(~healthy)]
    settings = {
        "step_size": step_size, "localization": localization, "nbeta": nbeta, "num_chains": num_chains,
        "num_draws": num_draws, "num_burnin": num_burnin, "steps_per_draw": steps_per_draw,
        "batch_size": batch_size, "sampler": "nuts", "loss_estimator": "full_batch",
        "eval_data": eval_data is not None, "n": n, "n_eval": n_eval, "num_params": num_params,
        "num_sampled": masks.num_sampled(mask, params),
        "param_mask": param_mask if isinstance(param_mask, str) or param_mask is None else "pytree",
        "key": validation.key_data(key), "jax_version": jax.__version__,
    }
    return LLCResult(
        llc_mean=stats.llc_mean, llc_std=stats.llc_std, llc_se=llc_se,
        llc_per_chain=stats.llc_per_chain, loss_trace=batch_loss, llc_trace=per_draw,
        distance_trace=np.sum(np.square(draws.positions - draws.center), axis=-1),
        init_loss=init_loss, nbeta=float(nbeta), n=n, diverged_chains=diverged_chains,
        diverged_at=[-1] * len(diverged_chains), plain=None, diagnostics=diagnostics, settings=settings,
        sampler_stats=draws.stats,
    )
