"""``estimate_llc``: the local learning coefficient at a point, from many SGLD-family chains.

Lau et al., arXiv:2308.12108 (REFERENCE.md §1). The flow is model → local posterior →
sampler kernel → chain runner → statistics; this function wires it and records the settings.
"""


import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import divergence as divergence_lib
from slt_jax import masks
from slt_jax import validation
from slt_jax.chains import LOSS_ESTIMATORS, ChainInputs, RunConfig, run_chains
from slt_jax.estimators.diagnostics import chain_diagnostics
from slt_jax.estimators.llc import llc_draws, llc_statistics
from slt_jax.posterior import LocalPosterior, default_nbeta, full_batch_loss
from slt_jax.results import LLCResult
from slt_jax.samplers import get_kernel

DEFAULT_BATCH_SIZE = 256
_full_batch_loss = jax.jit(full_batch_loss, static_argnums=(0, 3))


def _key_data(key):
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)).tolist()
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32:
        return np.asarray(key).tolist()
    raise ValueError(f"key must be a JAX PRNG key (e.g. jax.random.key(0)), got {type(key).__name__}")


def estimate_llc(
    loss_fn,
    params,
    data,
    key,
    *,
    step_size: float,
    localization: float,
    nbeta: float | None = None,
    num_chains: int = 8,
    num_draws: int = 500,
    num_burnin: int = 500,
    steps_per_draw: int = 1,
    batch_size: int | None = None,
    sampler="sgld",
    loss_estimator: str = "control_variate",
    eval_data=None,
    param_mask=None,
    divergence_threshold: float | None = None,
    on_divergence: str = "warn",
    chunk_size: int | None = None,
    progress: bool = True,
) -> LLCResult:
    """Estimate the local learning coefficient λ̂(w*) at ``params``.

    Samples the localized tempered posterior ``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` with
    ``num_chains`` independent chains and returns ``λ̂ = nβ·(E_p[L_n] − L_n(w*))``
    (Lau et al., arXiv:2308.12108), with L_n(w*) evaluated exactly on the full dataset.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean per-sample loss over ``batch``
        (for free energies: the negative log-likelihood in nats; λ̂ does not depend on scale).
      params: the point w* (a pytree of float arrays).
      data: a pytree of arrays sharing a leading axis of length n (the gradient data).
      key: a JAX PRNG key; chain i uses ``fold_in(key, i)``.
      step_size: ε, the SGLD step size (noise variance per step).
      localization: γ ≥ 0, the pull towards w*.
      nbeta: nβ; default ``n / log n`` (β* = 1/log n).
      num_chains: independent chains (vectorised with vmap).
      num_draws: recorded draws per chain, averaged for λ̂.
      num_burnin: steps per chain before the first draw (not recorded).
      steps_per_draw: sampler steps between draws; a chain runs
        ``num_burnin + num_draws × steps_per_draw`` steps.
      batch_size: minibatch rows per gradient step (drawn uniformly with replacement on
        device); default ``min(256, n)``.
      sampler: ``"sgld"`` or a :class:`~slt_jax.samplers.KernelFactory`.
      loss_estimator: what each draw records: ``"control_variate"`` (default)
        ``nβ·(L_B(w_t) − L_B(w*))`` on the same batch, one extra forward pass per draw and
        much less variance; ``"minibatch"`` ``nβ·(L_B(w_t) − L_n(w*))``, free; ``"full_batch"``
        the exact loss on the whole (evaluation) dataset at every draw (costly for large n).
      eval_data: optional dataset on which the loss is measured (data-refined LLC, Wang et
        al. arXiv:2410.02984); gradients, n and nβ stay those of ``data``.
      param_mask: sample only some parameters, the rest frozen at w* (weight-refined LLC,
        arXiv:2410.02984): a regular expression over pytree paths such as
        ``"layers_0/attn/.*"`` or a boolean pytree like ``params`` (see
        :func:`slt_jax.masks.resolve_mask`).
      divergence_threshold: a chain diverges when ``nβ·(L_B(w_t) − L_n(w*))`` exceeds this
        (or the loss is NaN/inf); default ``10·d + 100 + 20·nβ·std(L_B(w*))``.
      on_divergence: ``"warn"`` (exclude diverged chains and warn) or ``"raise"``.
      chunk_size: steps per compiled chunk (progress granularity).
      progress: show a progress bar.

    Returns:
      An :class:`~slt_jax.results.LLCResult`.
    """
    n = validation.check_data(data)
    num_params = validation.check_params(params)
    validation.check_positive("step_size", step_size)
    validation.check_positive("localization", localization, allow_zero=True)
    if nbeta is None:
        nbeta = default_nbeta(n) if n > 1 else 1.0
    validation.check_positive("nbeta", nbeta)
    validation.check_positive("num_chains", num_chains, integer=True)
    validation.check_positive("num_draws", num_draws, integer=True)
    validation.check_positive("num_burnin", num_burnin, integer=True, allow_zero=True)
    validation.check_positive("steps_per_draw", steps_per_draw, integer=True)
    batch_size = min(DEFAULT_BATCH_SIZE, n) if batch_size is None else batch_size
    validation.check_positive("batch_size", batch_size, integer=True)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the dataset (n={n})")
    if loss_estimator not in LOSS_ESTIMATORS:
        raise ValueError(f"loss_estimator={loss_estimator!r} is not one of {LOSS_ESTIMATORS}")
    if on_divergence not in ("warn", "raise"):
        raise ValueError(f"on_divergence={on_divergence!r} must be 'warn' or 'raise'")
    kernel = get_kernel(sampler)
    key_data = _key_data(key)

    params = jax.tree.map(jnp.asarray, params)
    mask = masks.resolve_mask(param_mask, params)
    num_sampled = masks.num_sampled(mask, params)
    data = jax.device_put(data)
    first = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype), data)
    validation.check_loss_fn(loss_fn, params, first)
    measure_data, n_eval = None, n
    if eval_data is not None:
        n_eval = validation.check_data(eval_data, "eval_data")
        eval_data = jax.device_put(eval_data)
        measure_data = eval_data
    elif loss_estimator == "full_batch":
        measure_data = data
    eval_batch_size = min(batch_size, n_eval)
    if eval_data is not None:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((eval_batch_size, *x.shape[1:]), x.dtype),
                              eval_data)
        validation.check_loss_fn(loss_fn, params, shapes, "eval_data")

    reference = _full_batch_loss(loss_fn, params, data, batch_size)
    init = reference if eval_data is None else _full_batch_loss(loss_fn, params, eval_data, eval_batch_size)
    init_loss = float(init.mean)
    if not np.isfinite(init_loss):
        raise ValueError(f"loss_fn is not finite at params (L_n(w*) = {init_loss}): check params and data")
    if divergence_threshold is None:
        divergence_threshold = divergence_lib.default_threshold(num_sampled, nbeta, float(reference.batch_std))
    validation.check_positive("divergence_threshold", divergence_threshold)

    acc = jax.dtypes.canonicalize_dtype(jnp.float64)
    config = RunConfig(loss_fn, kernel, batch_size, steps_per_draw, loss_estimator, eval_batch_size)
    inputs = ChainInputs(
        step_size=jnp.asarray(step_size, acc),
        posterior=LocalPosterior(params, jnp.asarray(nbeta, acc), jnp.asarray(localization, acc), mask),
        divergence=divergence_lib.Divergence(reference.mean, jnp.asarray(divergence_threshold, acc)),
        data=data,
        eval_data=measure_data,
    )
    state, draws = run_chains(key, config, inputs, num_chains=num_chains, num_burnin=num_burnin,
                              num_draws=num_draws, chunk_size=chunk_size, progress=progress)

    batch_loss = np.asarray(draws.batch_loss, np.float64)
    center_loss = None if draws.center_loss is None else np.asarray(draws.center_loss, np.float64)
    per_draw = llc_draws(batch_loss, init_loss, nbeta, center_loss)
    diverged_at = np.asarray(state.diverged_at)
    diverged = (diverged_at >= 0) | ~np.all(np.isfinite(per_draw), axis=1)
    healthy = ~diverged
    stats = llc_statistics(per_draw, healthy)
    diagnostics = chain_diagnostics(per_draw[healthy]) if healthy.any() else None
    llc_se = stats.llc_se
    if not np.isfinite(llc_se) and diagnostics is not None:
        llc_se = float(diagnostics.mcse)
    plain = None
    if center_loss is not None:
        plain_stats = llc_statistics(llc_draws(batch_loss, init_loss, nbeta), healthy)
        plain = {"llc_mean": plain_stats.llc_mean, "llc_se": plain_stats.llc_se}
    loss_trace = batch_loss if center_loss is None else batch_loss - center_loss + init_loss

    diverged_chains = [int(i) for i in np.flatnonzero(diverged)]
    diverged_steps = [int(diverged_at[i]) for i in diverged_chains]
    divergence_lib.report(diverged_chains, diverged_steps, num_chains, step_size, on_divergence)
    settings = {
        "step_size": step_size, "localization": localization, "nbeta": nbeta,
        "num_chains": num_chains, "num_draws": num_draws, "num_burnin": num_burnin,
        "steps_per_draw": steps_per_draw, "batch_size": batch_size, "sampler": kernel.name,
        "loss_estimator": loss_estimator, "eval_data": eval_data is not None, "n": n,
        "n_eval": n_eval, "num_params": num_params, "num_sampled": num_sampled,
        "param_mask": param_mask if isinstance(param_mask, str) or param_mask is None else "pytree",
        "divergence_threshold": divergence_threshold,
        "key": key_data, "dtype": str(acc), "jax_version": jax.__version__,
        "devices": [str(d) for d in jax.devices()[:1]],
    }
    return LLCResult(
        llc_mean=stats.llc_mean, llc_std=stats.llc_std, llc_se=llc_se,
        llc_per_chain=stats.llc_per_chain, loss_trace=loss_trace, llc_trace=per_draw,
        distance_trace=np.asarray(draws.distance), init_loss=init_loss, nbeta=float(nbeta), n=n,
        diverged_chains=diverged_chains, diverged_at=diverged_steps, plain=plain,
        diagnostics=diagnostics, settings=settings,
    )
