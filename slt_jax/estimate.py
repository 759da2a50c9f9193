"""``estimate_llc``: the local learning coefficient at a point, from many SGLD-family chains.

Lau et al., arXiv:2308.12108 (REFERENCE.md §1). The flow is model → local posterior →
sampler kernel → chain runner → statistics; this function wires it and records the settings.
"""

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax.runner import divergence as divergence_lib
from slt_jax import masks
from slt_jax.samplers import nuts
from slt_jax import validation
from slt_jax.runner import sharding
from slt_jax.tuning.sweep import CALIBRATION_STREAM, Calibration, CalibrationWarning, calibrate
from slt_jax.runner.chains import LOSS_ESTIMATORS, ChainInputs, RunConfig, run_chains
from slt_jax.tuning.equilibration import equilibration_warning, plateau_check
from slt_jax.estimators.diagnostics import chain_diagnostics
from slt_jax.estimators.llc import llc_draws, llc_statistics
from slt_jax.samplers.mala import mala_acceptance
from slt_jax.data.batches import full_batch_loss
from slt_jax.posterior import LocalPosterior, default_nbeta
from slt_jax.results import LLCResult
from slt_jax.samplers import get_kernel
from slt_jax.tuning.stiffness import run_with_step_checks

DEFAULT_BATCH_SIZE = 256
# With a calibrated step size, the longest run as a multiple of the calibrated schedule.
DEFAULT_MAX_EXTENSION = 8.0
# ... and while λ̂ reads the Laplace value at a degenerate point (a metastable plateau). The
# 8-layer DLN of benchmarks/dln_accuracy.py sat on it for ~20k steps, 11× its 1750-step schedule.
DEFAULT_MAX_PLATEAU_EXTENSION = 64.0
LAPLACE_STREAM = 2**31 - 2  # fold_in(key, ·) for the Laplace value's probe vectors
_full_batch_loss = jax.jit(full_batch_loss, static_argnums=(0, 3))


@dataclasses.dataclass(frozen=True)
class _PrecisionLoss:
    """``loss_fn`` evaluated at ``compute_dtype``, its value returned at ``dtype``.

    With a ``compute_dtype`` (e.g. bfloat16) the parameters and the floating leaves of the
    batch are cast to it before the model runs; the gradient flows back through the cast, so
    positions and gradients stay at ``dtype``. Frozen, so equal wrappers hash alike and a
    second estimate reuses the compiled program.
    """

    loss_fn: Callable
    compute_dtype: Any
    dtype: Any

    def __call__(self, params, batch):
        if self.compute_dtype is not None:
            cast = lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            params, batch = jax.tree.map(cast, (params, batch))
        return self.loss_fn(params, batch).astype(self.dtype)


def _check_dtypes(dtype, compute_dtype):
    """The validated ``(dtype, compute_dtype)`` as numpy dtypes (``compute_dtype`` may be None)."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype={dtype!r} is not a dtype: use jnp.float32 or jnp.float64") from e
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype={dtype} must be float32 or float64 (positions and losses accumulate in it)")
    if dtype == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
                         "at startup, or run estimate_llc inside `with jax.enable_x64(True):`")
    if compute_dtype is not None:
        try:
            compute_dtype = jnp.dtype(compute_dtype)
        except TypeError as e:
            raise ValueError(f"compute_dtype={compute_dtype!r} is not a dtype") from e
        if not jnp.issubdtype(compute_dtype, jnp.floating):
            raise ValueError(f"compute_dtype={compute_dtype} must be a floating dtype such as jnp.bfloat16")
    return dtype, compute_dtype


def estimate_llc(
    loss_fn,
    params,
    data,
    key,
    *,
    step_size: float | str | Calibration,
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
    mala: bool = False,
    max_extension: float = DEFAULT_MAX_EXTENSION,
    max_plateau_extension: float | None = DEFAULT_MAX_PLATEAU_EXTENSION,
    mesh=None,
    devices=None,
    dtype=jnp.float32,
    compute_dtype=None,
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
      step_size: ε, the SGLD step size (noise variance per step); ``"auto"`` to choose it
        with :func:`slt_jax.calibrate` first (default sweep; key ``fold_in(key, 2**31 − 1)``),
        or a :class:`~slt_jax.calibration.Calibration` to use its choice. Either way
        ``num_burnin`` and ``num_draws`` are raised, if needed, to the simulated time over
        which the sweep validated the step size, and ``settings["calibration"]`` records the
        sweep, the choice and why. With a calibrated step size the chains record from
        their first step, the burn-in is read off their own λ̂ trace (the later of the
        calibrated one and the time λ̂ stopped trending, :mod:`slt_jax.tuning.equilibration`), and
        while λ̂ still trends the run doubles, up to ``max_extension`` times the schedule;
        ``settings["equilibration"]`` records the outcome, and a run still trending at the
        cap warns (:class:`~slt_jax.calibration.CalibrationWarning`) and keeps its last quarter.
        A flat trace can still be a metastable plateau: the run is also compared with the
        Laplace value of w* (:func:`slt_jax.laplace_llc`), and while it reads that value at a
        point whose Hessian leaves directions unconfined it keeps doubling, up to
        ``max_plateau_extension`` (:mod:`slt_jax.tuning.equilibration`). Chains that leave w* can
        reach stiffer ground than the grid was placed for: when the run ends, the largest
        Hessian eigenvalue h at the chains' positions is measured, and where the step exceeds
        the grid's rule ``1/(nβh + γ)`` the same chains continue at the step halved as often
        as that takes (at most 4 continuations; SGLD kernels), their burn-in and draws counted
        afresh (:mod:`slt_jax.tuning.stiffness`; ``settings["equilibration"]["stiffness"]`` lists each
        check).
      localization: γ ≥ 0, the pull towards w*.
      nbeta: nβ; default ``n / log n`` (β* = 1/log n).
      num_chains: independent chains (vectorised with vmap).
      num_draws: recorded draws per chain, averaged for λ̂.
      num_burnin: steps per chain before the first draw (not recorded).
      steps_per_draw: sampler steps between draws; a chain runs
        ``num_burnin + num_draws × steps_per_draw`` steps.
      batch_size: minibatch rows per gradient step (drawn uniformly with replacement on
        device); default ``min(256, n)``.
      sampler: ``"sgld"``, ``"sgld_rademacher"``, ``"rmsprop_sgld"``, ``"sgnht"``, a
        :class:`~slt_jax.samplers.KernelFactory`, or ``"nuts"``: the exact full-batch
        gold standard for small models (:func:`slt_jax.nuts.estimate_llc_nuts`; there
        ``step_size`` is NUTS's initial step, ``num_burnin`` its warm-up, and
        ``loss_estimator``, ``divergence_threshold``, ``chunk_size`` and ``mala`` do not apply).
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
      mala: also run a Metropolis check of SGLD proposals at ``step_size`` on the full-batch
        potential from the chains' final points (:func:`slt_jax.mala.mala_acceptance`;
        ``sampler="sgld"`` only, small models); the mean acceptance rate lands in
        ``sampler_stats["mala_acceptance"]``.
      max_extension: with a calibrated ``step_size``, the longest run as a multiple of the
        calibrated schedule (``1`` keeps the schedule, and the burn-in is still read off the
        trace); ignored for a numeric ``step_size``.
      max_plateau_extension: with a calibrated ``step_size``, the longest run while λ̂ sits on
        the Laplace value (≥ ``max_extension``); ``None`` skips the Laplace value (and its
        Hessian-vector products). Also skipped with a ``param_mask`` or ``eval_data`` (λ̂ then
        measures another loss than the Hessian's).
      mesh: a ``jax.sharding.Mesh`` with a ``"chains"`` axis (chains split over it) and
        optionally a ``"data"`` axis (dataset rows split over it; ``n`` and ``batch_size``
        must divide over it); see :mod:`slt_jax.runner.sharding`. Exclusive with ``devices``.
      devices: a device count or a list of devices to split the chains over; default the
        first device. The same key gives the same chains on any number of devices.
      dtype: ``jnp.float32`` (default) or ``jnp.float64`` (needs ``jax_enable_x64``): the
        dtype of the positions, gradients, step sizes and recorded losses; ``params`` are
        cast to it.
      compute_dtype: optionally evaluate the model at a lower precision (``jnp.bfloat16``):
        parameters and floating data are cast to it inside the loss; the loss comes back,
        and positions and gradients stay, at ``dtype``. Write ``loss_fn`` so that its final
        reduction runs in float32 (e.g. ``jnp.mean(x, dtype=jnp.float32)``).

    Returns:
      An :class:`~slt_jax.results.LLCResult`.
    """
    if isinstance(sampler, str) and sampler == "nuts":
        return nuts.estimate_llc_nuts(
            loss_fn, params, data, key, localization=localization, nbeta=nbeta, step_size=step_size,
            num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
            steps_per_draw=steps_per_draw, batch_size=batch_size, eval_data=eval_data,
            param_mask=param_mask, on_divergence=on_divergence, progress=progress)
    n = validation.check_data(data)
    num_params = validation.check_params(params)
    auto = isinstance(step_size, str) and step_size == "auto"
    if not (auto or isinstance(step_size, Calibration)):
        validation.check_positive("step_size", step_size)
    validation.check_positive("localization", localization, allow_zero=True)
    if nbeta is None:
        nbeta = default_nbeta(n) if n > 1 else 1.0
    validation.check_positive("nbeta", nbeta)
    batch_size = validation.check_run_settings(
        n, num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
        steps_per_draw=steps_per_draw, batch_size=batch_size, on_divergence=on_divergence,
        default_batch_size=DEFAULT_BATCH_SIZE)
    if loss_estimator not in LOSS_ESTIMATORS:
        raise ValueError(f"loss_estimator={loss_estimator!r} is not one of {LOSS_ESTIMATORS}")
    kernel = get_kernel(sampler)
    if mala and kernel.name != "sgld":
        raise ValueError(f"mala=True checks SGLD proposals; it does not apply to sampler={kernel.name!r}")
    key_data = validation.key_data(key)
    dtype, compute_dtype = _check_dtypes(dtype, compute_dtype)
    mesh = sharding.resolve_mesh(mesh, devices)
    calibration = step_size if isinstance(step_size, Calibration) else None
    if (auto or calibration is not None) and not max_extension >= 1:
        raise ValueError(f"max_extension must be ≥ 1 (a multiple of the calibrated schedule), got {max_extension!r}")
    if (auto or calibration is not None) and max_plateau_extension is not None \
            and not max_plateau_extension >= max_extension:
        raise ValueError(f"max_plateau_extension must be ≥ max_extension ({max_extension!r}) or None, "
                         f"got {max_plateau_extension!r}")
    if auto:
        calibration = calibrate(loss_fn, params, data, jax.random.fold_in(key, CALIBRATION_STREAM),
                                localization=localization, nbeta=nbeta, batch_size=batch_size, sampler=kernel,
                                param_mask=param_mask, divergence_threshold=divergence_threshold, mesh=mesh,
                                chunk_size=chunk_size, progress=progress)
    if calibration is not None:
        # The sweep's probe may not have settled; the estimate's own chains decide below.
        step_size = calibration.recommended(nbeta, localization, warn=False)
        burnin, draws = calibration.schedule(step_size, steps_per_draw, nbeta, localization)
        num_burnin, num_draws = max(num_burnin, burnin), max(num_draws, draws)

    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    mask = masks.resolve_mask(param_mask, params)
    num_sampled = masks.num_sampled(mask, params)
    sharding.check_data_split(mesh, n, batch_size)
    data = sharding.put_data(data, mesh)
    first = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype), data)
    validation.check_loss_fn(loss_fn, params, first)
    measure_data, n_eval = None, n
    if eval_data is not None:
        n_eval = validation.check_data(eval_data, "eval_data")
        sharding.check_data_split(mesh, n_eval, min(batch_size, n_eval), "eval_data")
        eval_data = sharding.put_data(eval_data, mesh)
        measure_data = eval_data
    elif loss_estimator == "full_batch":
        measure_data = data
    eval_batch_size = min(batch_size, n_eval)
    if eval_data is not None:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((eval_batch_size, *x.shape[1:]), x.dtype),
                              eval_data)
        validation.check_loss_fn(loss_fn, params, shapes, "eval_data")

    user_loss_fn, loss_fn = loss_fn, _PrecisionLoss(loss_fn, compute_dtype, dtype)
    reference = _full_batch_loss(loss_fn, params, data, batch_size)
    init = reference if eval_data is None else _full_batch_loss(loss_fn, params, eval_data, eval_batch_size)
    init_loss = float(init.mean)
    if not np.isfinite(init_loss):
        raise ValueError(f"loss_fn is not finite at params (L_n(w*) = {init_loss}): check params and data")
    if divergence_threshold is None:
        divergence_threshold = divergence_lib.default_threshold(num_sampled, nbeta, float(reference.batch_std))
    validation.check_positive("divergence_threshold", divergence_threshold)

    acc = dtype
    config = RunConfig(loss_fn, kernel, batch_size, steps_per_draw, loss_estimator, eval_batch_size, mesh)
    inputs = ChainInputs(
        step_size=jnp.asarray(step_size, acc),
        posterior=LocalPosterior(params, jnp.asarray(nbeta, acc), jnp.asarray(localization, acc), mask),
        divergence=divergence_lib.Divergence(reference.mean, jnp.asarray(divergence_threshold, acc)),
        data=data,
        eval_data=measure_data,
    )
    equilibration = None
    if calibration is None:
        state, draws = run_chains(key, config, inputs, num_chains=num_chains, num_burnin=num_burnin,
                                  num_draws=num_draws, chunk_size=chunk_size, progress=progress)
    else:
        def llc_of(draws, state):
            center = None if draws.center_loss is None else np.asarray(draws.center_loss, np.float64)
            per = llc_draws(np.asarray(draws.batch_loss, np.float64), init_loss, nbeta, center)
            return per, (np.asarray(state.diverged_at) < 0) & np.all(np.isfinite(per), axis=1)

        laplace, plateau = None, None
        if max_plateau_extension is not None and param_mask is None and eval_data is None:
            laplace, plateau = plateau_check(user_loss_fn, params, data, nbeta=nbeta, localization=localization,
                                             num_sampled=num_sampled, key=jax.random.fold_in(key, LAPLACE_STREAM))
        minimum = (num_burnin, num_draws)
        checked = run_with_step_checks(
            key, config, inputs, llc_of, step_size=step_size,
            schedule=lambda eps: tuple(map(max, minimum, calibration.schedule(eps, steps_per_draw, nbeta,
                                                                              localization))),
            loss_fn=user_loss_fn, data=data, nbeta=nbeta, localization=localization, param_mask=param_mask,
            num_chains=num_chains, num_burnin=num_burnin, num_draws=num_draws, max_extension=max_extension,
            rtol=calibration.settings["rtol"], z=calibration.settings["z"], plateau=plateau,
            max_plateau_extension=max_plateau_extension or 1.0, chunk_size=chunk_size, progress=progress)
        run, step_size, planned = checked.run, checked.step_size, checked.planned_steps
        state, draws = run.state, run.draws
        num_burnin, num_draws = run.num_burnin, int(draws.batch_loss.shape[1])
        equilibration = {"equilibrated": run.equilibrated, "num_steps": checked.num_steps,
                         "final_steps": run.num_steps, "planned_steps": planned, "extensions": checked.extensions,
                         "max_extension": max_extension, "max_plateau_extension": max_plateau_extension,
                         "laplace": laplace, "plateau": checked.plateau, "still_at_plateau": run.still_at_plateau,
                         "stiffness": checked.checks}
        message = equilibration_warning(run, laplace=laplace, planned=planned, step_size=step_size,
                                        max_extension=max_extension, max_plateau_extension=max_plateau_extension)
        if message is not None:
            warnings.warn(message, CalibrationWarning, stacklevel=2)

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
    sampler_stats = {name: float(np.mean(np.asarray(value)[healthy]))
                     for name, value in draws.info._asdict().items()} if healthy.any() else {}
    if mala:
        positions = state.kernel_state.position
        rates = mala_acceptance(loss_fn, data, inputs.posterior, positions, jax.random.split(key)[1],
                                step_size=step_size)
        sampler_stats["mala_acceptance"] = float(np.mean(rates[healthy])) if healthy.any() else float("nan")

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
        "devices": sharding.devices_of(mesh), "mesh": dict(mesh.shape),
        "compute_dtype": None if compute_dtype is None else str(compute_dtype),
        "calibration": None if calibration is None else calibration.summary(nbeta, localization),
        "equilibration": equilibration,
    }
    return LLCResult(
        llc_mean=stats.llc_mean, llc_std=stats.llc_std, llc_se=llc_se,
        llc_per_chain=stats.llc_per_chain, loss_trace=loss_trace, llc_trace=per_draw,
        distance_trace=np.asarray(draws.distance), init_loss=init_loss, nbeta=float(nbeta), n=n,
        diverged_chains=diverged_chains, diverged_at=diverged_steps, plain=plain,
        diagnostics=diagnostics, settings=settings, sampler_stats=sampler_stats or None,
    )
