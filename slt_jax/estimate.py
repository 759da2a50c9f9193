"""``estimate_llc``: the local learning coefficient at a point, from many SGLD-family chains.

Lau et al., arXiv:2308.12108 (docs/mathematics.md §1). The flow is model → local posterior →
sampler kernel → chain runner → statistics; this function only wires it: one prologue
(:func:`slt_jax.problem.make_problem`), one sampler run (fixed step, calibrated, or NUTS), one
summary (:func:`slt_jax.results.summarize`).
"""

import contextlib
import dataclasses
import warnings

import jax
import numpy as np

from slt_jax import settings, validation
from slt_jax.problem import make_problem
from slt_jax.results import LLCResult, summarize
from slt_jax.runner import sharding
from slt_jax.samplers import get_kernel, nuts
from slt_jax.samplers.mala import mala_acceptance
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.tuning import auto as auto_lib
from slt_jax.tuning import checks
from slt_jax.tuning.calibration import Calibration


def estimate_llc(loss_fn, params, data, key, *, step_size, localization, nbeta=None, sampler="sgld",
                 eval_data=None, param_mask=None, mala: bool = False, mesh=None, devices=None, param_specs=None,
                 run: RunSettings | None = None, auto: AutoSettings | None = None,
                 precision: Precision | None = None, progress: bool = True, **options) -> LLCResult:
    """Estimate the local learning coefficient λ̂(w*) at ``params``.

    Samples the localized tempered posterior ``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` with
    ``num_chains`` independent chains and returns ``λ̂ = nβ·(E_p[L_n] − L_n(w*))`` (Lau et al.,
    arXiv:2308.12108), with L_n(w*) evaluated exactly on the full dataset.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean per-sample loss over ``batch``
        (for free energies: the negative log-likelihood in nats; λ̂ does not depend on scale).
      params: the point w* (a pytree of float arrays).
      data: a pytree of arrays sharing a leading axis of length n (the gradient data), or
        :func:`slt_jax.data.streamed` host arrays (memmaps) too large for device memory:
        minibatches are then gathered on the host from the same draws
        (:mod:`slt_jax.data.streaming`; not with ``loss_estimator="full_batch"``, NUTS or MALA).
      key: a JAX PRNG key; chain i uses ``fold_in(key, i)``.
      step_size: ε, the step size (noise variance per step); ``"auto"`` to calibrate it first
        (:func:`slt_jax.calibrate`'s sweep on the key's calibration stream), or a
        :class:`~slt_jax.Calibration` to use its choice. A calibrated run records from the
        first step, reads its burn-in off its own λ̂ trace, doubles while λ̂ trends or sits on
        the Laplace plateau of a degenerate w*, and halves the step where the chains reach
        stiffer ground (:mod:`slt_jax.tuning`; docs/calibration.md); ``settings["calibration"]``
        and ``settings["equilibration"]`` record every decision, and a run that has not
        settled warns (:class:`~slt_jax.CalibrationWarning`).
      localization: γ ≥ 0, the pull towards w*.
      nbeta: nβ; default ``n / log n`` (β* = 1/log n).
      sampler: ``"sgld"``, ``"sgld_rademacher"``, ``"rmsprop_sgld"``, ``"sgnht"``, a
        :class:`~slt_jax.samplers.KernelFactory`, or ``"nuts"`` (the exact full-batch gold
        standard for small models; ``step_size`` is its initial leapfrog step, ``num_burnin``
        its warm-up).
      eval_data: optional dataset on which the loss is measured (data-refined LLC, Wang et al.
        arXiv:2410.02984); gradients, n and nβ stay those of ``data``.
      param_mask: sample only some parameters, the rest frozen at w* (weight-refined LLC): a
        regular expression over pytree paths, a selector, or a boolean pytree like ``params``
        (:func:`slt_jax.masks.resolve_mask`).
      mala: also run a Metropolis check of SGLD proposals from the chains' final points on the
        full-batch potential (``sampler="sgld"``, small models); the mean acceptance lands in
        ``sampler_stats["mala_acceptance"]``.
      mesh, devices: a ``jax.sharding.Mesh`` with a ``"chains"`` axis (and optionally
        ``"data"``, ``"model"``), or a device count (:func:`slt_jax.make_mesh`); the same key gives
        the same chains on any number of devices or processes (:mod:`slt_jax.distributed`).
      param_specs: with a ``"model"`` axis, how each leaf of ``params`` is split: a pytree like
        ``params`` of ``PartitionSpec`` over ``"model"`` (``None`` leaves replicated); default
        the largest divisible dimension of each large leaf
        (:func:`slt_jax.runner.sharding.param_specs`).
      run: :class:`~slt_jax.settings.RunSettings` — chains, draws, burn-in, thinning, batch,
        loss estimator, chunking, divergence policy.
      auto: :class:`~slt_jax.settings.AutoSettings` — what a calibrated run may do.
      precision: :class:`~slt_jax.settings.Precision` — ``dtype`` and ``compute_dtype``.
      progress: show a progress bar.
      **options: any field of those three as a keyword (``num_chains=16``, ``num_draws``,
        ``num_burnin``, ``steps_per_draw``, ``batch_size``, ``loss_estimator``, ``chunk_size``,
        ``divergence_threshold``, ``on_divergence``, ``max_extension``,
        ``max_plateau_extension``, ``dtype``, ``compute_dtype``, …).

    Returns:
      An :class:`~slt_jax.results.LLCResult`. Warnings raised while estimating are emitted as
      usual, and their messages are also kept in its ``settings["warnings"]``.
    """
    with _reemitted_warnings() as caught:
        run, auto, precision = settings.resolve(options, (run, RunSettings), (auto, AutoSettings),
                                                (precision, Precision))
        validation.key_data(key)
        kernel = nuts.NUTS if sampler == nuts.NUTS else get_kernel(sampler)
        calibrated = isinstance(step_size, Calibration) or step_size == "auto"
        if not calibrated:
            validation.check_positive("step_size", step_size)
        if calibrated and kernel == nuts.NUTS:
            raise ValueError("sampler='nuts' adapts its own step size: pass a number as its initial step_size")
        if mala and getattr(kernel, "name", kernel) != "sgld":
            raise ValueError(f"mala=True checks SGLD proposals; it does not apply to sampler={kernel!r}")
        problem = make_problem(loss_fn, params, data, localization=localization, nbeta=nbeta, eval_data=eval_data,
                               param_mask=param_mask, mesh=mesh, devices=devices, param_specs=param_specs,
                               precision=precision, run=run)
        if kernel == nuts.NUTS:
            sampled = nuts.sample(problem, run, key, step_size=step_size, progress=progress)
        elif calibrated:
            calibration = auto_lib.calibration_for(problem, kernel, run, auto, key, step_size, progress=progress)
            sampled = auto_lib.sample_calibrated(problem, kernel, run, auto, key, calibration, progress=progress)
        else:
            sampled = checks.sample_checked(problem, kernel, run, key, step_size=step_size, progress=progress)
        if mala:
            problem.require_resident("mala=True")
            rates = mala_acceptance(problem.loss_fn, problem.data, problem.posterior(),
                                    sharding.to_host(sampled.positions),
                                    jax.random.split(key)[1], step_size=sampled.step_size)
            healthy = sampled.diverged_at < 0
            stats = {"mala_acceptance": float(np.mean(rates[healthy])) if healthy.any() else float("nan")}
            sampled = sampled._replace(sampler_stats={**(sampled.sampler_stats or {}), **stats})
        result = summarize(problem, sampled, sampler=getattr(kernel, "name", kernel), key=key)
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    return dataclasses.replace(result, settings={**result.settings, "warnings": messages})


@contextlib.contextmanager
def _reemitted_warnings():
    """Record the warnings raised inside and emit each again, unchanged, on the way out.

    Yields the list of ``warnings.WarningMessage`` the estimate records in its settings. The
    caller's filters still decide: an ``"error"`` filter raises at the source as before, an
    ``"ignore"`` filter leaves nothing to record.
    """
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield caught
    finally:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
