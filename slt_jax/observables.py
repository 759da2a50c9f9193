"""Observables under the local posterior: what a draw measures besides the loss, and ``observe``.

An observable is a function of the parameters whose posterior expectation, variance or
covariance with another one is wanted (docs/mathematics.md §8): a user function
(``lambda w: loss_fn(w, held_out)``), or the per-sample losses of fixed rows
(:class:`SampleLosses`) — training rows, probe data, or per token for sequence models. The
chain runner evaluates them at every draw and keeps streaming moments
(:mod:`slt_jax.runner.observation`), so memory is O(observables) per chain, O(rows × queries)
for a cross-product, never O(draws × rows); per-draw traces are written to disk chunk by chunk
only when asked for (``trace_dir``). :func:`slt_jax.bayesian_influence` and
:func:`slt_jax.susceptibilities` are built from the same pieces.

This module holds the pieces they share: per-sample losses from a mean ``loss_fn``, the input
checks (each a ``ValueError`` naming the argument, raised before sampling), the step-size
resolution, one observed run, and :func:`observe` itself.

Its length: the observation protocol — the kinds of observable, their checks, the run that
observes them and :func:`observe` — is one piece that ``bayesian_influence`` and
``susceptibilities`` build on; none of its parts has a use apart.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masks as masks_lib
from slt_jax import settings as settings_lib
from slt_jax import validation
from slt_jax.estimators import observables as estimators
from slt_jax.paths import local_path
from slt_jax.problem import PrecisionLoss, make_problem
from slt_jax.results import LLCResult, Sampled, summarize
from slt_jax.runner.chains import run_chains, sampled_of, setup
from slt_jax.runner.observation import Observation, TraceWriter, pair_key
from slt_jax.samplers import get_kernel, nuts
from slt_jax.serialization import json_safe
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.tuning.calibration import Calibration


@dataclasses.dataclass(frozen=True)
class SampleLosses:
    """An observable: the loss of each of ``rows`` (a pytree of arrays with a leading row axis).

    Attributes:
      rows: the rows, shaped like batches of the data (training rows, probe rows, …).
      per_sample_loss: ``per_sample_loss(params, batch) -> (B,)`` or ``(B, …)`` (e.g. per token,
        ``(B, T − 1)``); default the mean ``loss_fn`` on one-row batches.
    """

    rows: Any
    per_sample_loss: Callable | None = None


@dataclasses.dataclass(frozen=True)
class RowLosses:
    """``(params, rows) -> (rows, …)``: each row's loss, ``rows_per_call`` rows vmapped at a time.

    Without ``per_sample_loss`` row i's loss is ``loss_fn(params, row_i as a one-row batch)``,
    i.e. ℓ_i with ``L_n = mean_i ℓ_i``. Frozen: equal instances hash alike, so a second run (a
    second checkpoint, block or call) reuses the compiled program.
    """

    loss_fn: Callable
    per_sample_loss: Callable | None = None
    rows_per_call: int = 256

    def one(self, params, row):
        batch = jax.tree.map(lambda x: x[None], row)
        if self.per_sample_loss is None:
            return self.loss_fn(params, batch)
        return self.per_sample_loss(params, batch)[0]

    def __call__(self, params, rows):
        n = jax.tree.leaves(rows)[0].shape[0]
        if n <= self.rows_per_call:  # one vmapped call: the smallest program
            return jax.vmap(self.one, in_axes=(None, 0))(params, rows)
        return jax.lax.map(lambda row: self.one(params, row), rows, batch_size=self.rows_per_call)


def row_losses(problem, per_sample_loss=None) -> RowLosses:
    """The :class:`RowLosses` of ``problem``'s loss at its precision (or of ``per_sample_loss``)."""
    precision = problem.precision
    wrapped = None if per_sample_loss is None else PrecisionLoss(per_sample_loss, precision.compute_dtype,
                                                                 precision.dtype)
    return RowLosses(problem.loss_fn, wrapped, problem.eval_batch_size)


# ----------------------------------------------------------------------------------------------
# Input checks: each raises a ValueError naming the argument and the offending value.


def check_rows(losses: RowLosses, params, rows, name: str) -> tuple[int, tuple]:
    """Check that ``rows`` are rows the model takes; return ``(row count, shape of one row's loss)``."""
    n = validation.check_data(rows, name)
    row = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), rows)
    shapes = jax.tree.map(lambda x: tuple(np.shape(x)[1:]), rows)
    try:
        out = jax.eval_shape(losses.one, params, row)
    except Exception as error:  # the model's own message says what did not fit
        raise ValueError(f"{name}: rows of shape {shapes} do not fit the model (the loss of one row failed: "
                         f"{type(error).__name__}: {error})") from error
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{name}: the loss of one row must be a floating array, got {out}")
    return n, tuple(out.shape)


def check_like(data, other, name: str):
    """Check that ``other`` holds rows like ``data``'s: the same pytree structure and row shapes."""
    validation.check_data(other, name)
    if jax.tree.structure(other) != jax.tree.structure(data):
        raise ValueError(f"{name} has the structure {jax.tree.structure(other)}, but data has "
                         f"{jax.tree.structure(data)}: a shift dataset holds rows like data's")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(other), jax.tree.leaves(data)):
        if np.shape(x)[1:] != np.shape(y)[1:] or jnp.result_type(x).kind != jnp.result_type(y).kind:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} has rows of shape {np.shape(x)[1:]} and dtype "
                             f"{jnp.result_type(x)}, but data's are {np.shape(y)[1:]} and {jnp.result_type(y)}")


def check_train_rows(train_rows, n: int) -> np.ndarray:
    """``train_rows`` as distinct indices into the n rows of the data (default all)."""
    if train_rows is None:
        return np.arange(n)
    rows = np.asarray(train_rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"train_rows must be a non-empty 1-D sequence of integer row indices, got "
                         f"{rows.dtype} of shape {rows.shape}")
    outside = rows[(rows < 0) | (rows >= n)]
    if outside.size:
        raise ValueError(f"train_rows holds {outside[:8].tolist()} outside the data's rows [0, {n})")
    values, counts = np.unique(rows, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"train_rows repeats rows {values[counts > 1][:8].tolist()}: each row's influence is "
                         "estimated once")
    return rows


def check_observable(fn, params, name: str, *, scalar: bool = False) -> tuple:
    """Check that ``fn(params)`` is a floating scalar or vector (``scalar``: a scalar); return its shape."""
    if not callable(fn):
        raise ValueError(f"{name} must be a function of the parameters, got {type(fn).__name__}")
    try:
        out = jax.eval_shape(fn, params)
    except Exception as error:
        raise ValueError(f"{name}(params) failed: {type(error).__name__}: {error}") from error
    allowed = "a scalar" if scalar else "a scalar or a vector"
    if not hasattr(out, "shape") or out.ndim > (0 if scalar else 1) or (scalar and out.shape not in ((), (1,))):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"{name} must return {allowed} function of the parameters (one float array), got {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{name} must return a floating array, got dtype {out.dtype}")
    return tuple(out.shape)


def resolve_components(components, params) -> tuple[tuple, list, list]:
    """``(names, 0/1 mask pytrees, sampled counts)`` of ``components`` (name → weight restriction).

    ``None`` (the default) is the whole model, named ``"model"``; a restriction of ``None`` is
    the whole model too.
    """
    if components is None:
        components = {"model": None}
    if not isinstance(components, dict) or not components:
        raise ValueError(f"components must be a non-empty dict of name → weight restriction, got {components!r}")
    names, resolved, counts = [], [], []
    for name, spec in components.items():
        try:
            mask = masks_lib.resolve_mask(spec, params)
        except ValueError as error:
            raise ValueError(f"components[{name!r}]: {error}") from error
        # On the host: a mask per component is a handful of small arrays, not device work.
        mask = jax.tree.map(lambda x: np.ones(np.shape(x), jnp.result_type(x)) if mask is None else np.asarray(x),
                            params if mask is None else mask)
        count = sum(int(np.count_nonzero(m)) for m in jax.tree.leaves(mask))
        if count == 0:
            raise ValueError(f"components[{name!r}] covers no parameter ({masks_lib.mask_label(spec)!r} leaves "
                             "every coordinate frozen)")
        names.append(str(name))
        resolved.append(mask)
        counts.append(count)
    return tuple(names), resolved, counts


def kernel_of(sampler):
    """The SGLD-family kernel of ``sampler`` (NUTS keeps no observables)."""
    if sampler == nuts.NUTS:
        raise ValueError("sampler='nuts' does not run through the chain runner that keeps observables; use an "
                         "SGLD-family sampler")
    return get_kernel(sampler)


def observing_problem(loss_fn, params, data, key, *, sampler, run, auto, precision, options: dict, **problem):
    """The prologue every observing entry point shares: the settings folded from ``options``, the
    key checked, the SGLD-family kernel and the :class:`~slt_jax.problem.Problem` (``problem``:
    the keywords of :func:`slt_jax.problem.make_problem`). Returns ``(problem, kernel, run, auto)``."""
    run, auto, precision = settings_lib.resolve(options, (run, RunSettings), (auto, AutoSettings),
                                                (precision, Precision))
    validation.key_data(key)
    kernel = kernel_of(sampler)
    return make_problem(loss_fn, params, data, precision=precision, run=run, **problem), kernel, run, auto


def resolve_step(problem, kernel, run: RunSettings, auto: AutoSettings, key, step_size, *, progress=True):
    """``(ε, run, record)``: a fixed ``step_size`` as given, or a calibrated one.

    ``"auto"`` runs :func:`slt_jax.calibrate`'s sweep on the key's calibration stream (for the
    whole model: restricted components are no stiffer); a :class:`~slt_jax.Calibration` is used
    as it is. The run then gets at least the calibrated burn-in and draws; unlike ``estimate_llc``
    it is not extended further (its observables are fixed-length moments).
    """
    if not (isinstance(step_size, Calibration) or step_size == "auto"):
        validation.check_positive("step_size", step_size)
        return float(step_size), run, {}
    from slt_jax.tuning.auto import calibration_for

    calibration = calibration_for(problem, kernel, run, auto, key, step_size, progress=progress)
    eps = calibration.recommended(problem.nbeta, problem.localization)
    burnin, draws = calibration.schedule(eps, run.steps_per_draw, problem.nbeta, problem.localization)
    run = dataclasses.replace(run, num_burnin=max(run.num_burnin, burnin), num_draws=max(run.num_draws, draws))
    return eps, run, {"calibration": calibration.summary(problem.nbeta, problem.localization)}


# ----------------------------------------------------------------------------------------------
# One observed run.


@dataclasses.dataclass(frozen=True)
class ObservedRun:
    """A finished run with observables: its draws and moments, and the observables at w*.

    Attributes:
      sampled: the :class:`~slt_jax.results.Sampled` record (``moments`` on the host).
      center: ``{name: flat value at w*}``.
      traces: ``{name: .npy path}`` of the per-draw traces, or ``None``.
    """

    sampled: Sampled
    center: dict
    traces: dict | None = None


def run_observed(problem, kernel, run: RunSettings, key, *, step_size, observation: Observation, inputs,
                 num_chains=None, masks=None, mask_index=None, threshold=None, trace_dir=None, check=False,
                 check_chains=slice(None), progress=True) -> ObservedRun:
    """Run ``num_chains`` chains (default ``run.num_chains``) that observe ``observation``.

    Args:
      problem, kernel, run, key, step_size: as for :func:`slt_jax.runner.chains.sample`.
      observation: what each draw observes; ``inputs`` its traced inputs.
      masks, mask_index, threshold: per-chain weight restrictions and divergence bounds
        (:func:`slt_jax.runner.chains.setup`).
      trace_dir: write every draw's values there (:class:`~slt_jax.runner.observation.TraceWriter`).
      check: check a fixed step after the run where ``check_chains`` ended, as ``estimate_llc``
        does (:func:`slt_jax.tuning.checks.check_run`; with ``run.check_step``), recorded as
        ``step_check`` in the sampled record.
      progress: show a progress bar.
    """
    num_chains = run.num_chains if num_chains is None else num_chains
    if trace_dir is not None:
        trace_dir = local_path(trace_dir, "trace_dir")
        observation = dataclasses.replace(observation, record=True)
    config, chain_inputs = setup(problem, kernel, run, step_size, threshold=threshold, masks=masks,
                                 mask_index=mask_index, observation=observation, observed_inputs=inputs)
    sink = None
    if trace_dir is not None:
        shapes = observation.shapes(problem.params, inputs)
        sink = TraceWriter(trace_dir, shapes, num_chains, run.num_draws, problem.precision.dtype)
    state, draws = run_chains(key, config, chain_inputs, num_chains=num_chains, num_burnin=run.num_burnin,
                              num_draws=run.num_draws, chunk_size=run.chunk_size, progress=progress, sink=sink)
    center = {name: np.asarray(v, np.float64) for name, v in chain_inputs.observed.center.items()}
    sampled = sampled_of(state, draws, step_size, run)
    if check and run.check_step:
        from slt_jax.tuning.checks import check_run

        part = lambda tree: jax.tree.map(lambda x: None if x is None else x[check_chains], tree)
        checked = state._replace(kernel_state=part(state.kernel_state), diverged_at=state.diverged_at[check_chains],
                                 moments=None)
        record = check_run(problem, kernel, checked, part(draws), key, step_size=step_size)
        sampled = sampled._replace(record={"step_check": record})
    return ObservedRun(sampled, center, None if sink is None else dict(sink.paths))


def group_of(sampled: Sampled, chains) -> Sampled:
    """The part of ``sampled`` that belongs to ``chains`` (a slice of the chain axis)."""
    take = lambda x: None if x is None else np.asarray(x)[chains]
    draws = jax.tree.map(take, sampled.draws)
    positions = jax.tree.map(lambda x: x[chains], sampled.positions)
    moments = None if sampled.moments is None else jax.tree.map(take, sampled.moments)
    return sampled._replace(draws=draws, diverged_at=take(sampled.diverged_at), positions=positions,
                            moments=moments)


def healthy_moments(llc: LLCResult, moments):
    """The moments of the chains of ``llc`` that did not diverge (excluded as from λ̂).

    Without diverged chains the moments are returned as they are: no copy of large
    cross-products.
    """
    keep = np.ones(len(llc.llc_per_chain), bool)
    keep[llc.diverged_chains] = False
    if not keep.any():
        raise ValueError("every chain diverged: no draws to estimate the observables from; lower step_size")
    if keep.all():
        return jax.tree.map(np.asarray, moments)
    return jax.tree.map(lambda x: np.asarray(x)[keep], moments)


# ----------------------------------------------------------------------------------------------
# observe: posterior means, variances and covariances of user observables.


@dataclasses.dataclass(frozen=True)
class NamedObservables:
    """The observation function of :func:`observe`: user functions and per-sample losses by name."""

    functions: tuple  # ((name, fn(params)), …)
    losses: tuple  # ((name, RowLosses), …): rows come in the inputs under the same name

    def __call__(self, params, inputs):
        out = {name: jnp.ravel(fn(params)) for name, fn in self.functions}
        out.update({name: jnp.ravel(losses(params, inputs[name])) for name, losses in self.losses})
        return out


@dataclasses.dataclass(frozen=True)
class ObservedResult:
    """Posterior summaries of named observables, from one sampling run.

    Attributes:
      names: the observables' names.
      shapes: ``{name: shape}`` (a per-sample loss: ``(rows, …)``).
      at_center: ``{name: value at w*}``.
      mean, mean_se: ``{name: E_p[observable]}`` and its Monte Carlo standard error.
      variance, variance_se: ``{name: Var_p}`` of each entry and its standard error.
      covariance, covariance_se: ``{"a|b": Cov_p(a, b)}`` for each requested pair, shaped
        ``shape(a) + shape(b)``.
      llc: λ̂ from the same draws (an :class:`~slt_jax.LLCResult`).
      traces: ``{name: .npy path}`` of the per-draw values relative to w*, ``(chains, draws, k)``,
        or ``None``.
      settings: every setting (JSON-ready).
    """

    names: tuple
    shapes: dict
    at_center: dict
    mean: dict
    mean_se: dict
    variance: dict
    variance_se: dict
    covariance: dict
    covariance_se: dict
    llc: LLCResult
    traces: dict | None
    settings: dict

    def __str__(self) -> str:
        lines = [f"{'observable':>16} {'E_p':>11} {'± se':>9} {'at w*':>11}"]
        for name in self.names:
            if np.size(self.mean[name]) == 1:
                lines.append(f"{name:>16} {float(np.ravel(self.mean[name])[0]):>11.5g} "
                             f"{float(np.ravel(self.mean_se[name])[0]):>9.2g} "
                             f"{float(np.ravel(self.at_center[name])[0]):>11.5g}")
            else:
                lines.append(f"{name:>16} shape {self.shapes[name]}")
        return "\n".join(lines + [str(self.llc)])


def observe(loss_fn, params, data, key, *, observables: dict, step_size, localization, pairs=(), nbeta=None,
            sampler="sgld", param_mask=None, trace_dir=None, observe_every: int = 1, mesh=None, devices=None,
            run: RunSettings | None = None,
            auto: AutoSettings | None = None, precision: Precision | None = None, progress: bool = True,
            **options) -> ObservedResult:
    """Posterior means, variances and covariances of observables under the localized posterior.

    Samples ``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` as :func:`slt_jax.estimate_llc` does and
    evaluates every observable at every draw, keeping only streaming moments per chain
    (docs/mathematics.md §8.5).

    Args:
      loss_fn, params, data, key, step_size, localization, nbeta, sampler, param_mask, mesh,
        devices, run, auto, precision, progress, **options: as for :func:`slt_jax.estimate_llc`
        (``step_size="auto"`` calibrates first; the run is not extended after it).
      observables: ``{name: observable}``, each a function ``fn(params)`` returning a scalar or a
        vector (e.g. ``lambda w: loss_fn(w, held_out)``), or :class:`SampleLosses` (each row's
        loss, per token with a per-token ``per_sample_loss``).
      pairs: ``(a, b)`` name pairs whose covariance is wanted (kept as ``k_a × k_b`` cross-products).
      trace_dir: also write every draw's values, chunk by chunk, to ``.npy`` files there.
      observe_every: evaluate the observables at every ``observe_every``-th draw only (not with
        ``trace_dir``); λ̂ uses every draw.

    Returns:
      An :class:`ObservedResult`.
    """
    problem, kernel, run, auto = observing_problem(
        loss_fn, params, data, key, sampler=sampler, run=run, auto=auto, precision=precision, options=options,
        localization=localization, nbeta=nbeta, param_mask=param_mask, mesh=mesh, devices=devices)
    if not isinstance(observables, dict) or not observables:
        raise ValueError(f"observables must be a non-empty dict of name → observable, got {observables!r}")
    functions, losses, inputs = [], [], {}
    for name, item in observables.items():
        if not isinstance(name, str) or "|" in name:
            raise ValueError(f"observables: names must be strings without '|', got {name!r}")
        if isinstance(item, SampleLosses):
            row_fn = row_losses(problem, item.per_sample_loss)
            check_rows(row_fn, problem.params, item.rows, f"observables[{name!r}].rows")
            losses.append((name, row_fn))
            inputs[name] = jax.tree.map(jnp.asarray, item.rows)
        else:
            check_observable(item, problem.params, f"observables[{name!r}]")
            functions.append((name, item))
    pairs = tuple((str(a), str(b)) for a, b in pairs)
    unknown = sorted({n for pair in pairs for n in pair} - set(observables))
    if unknown:
        raise ValueError(f"pairs name {unknown}, which are not observables ({sorted(observables)})")
    eps, run, record = resolve_step(problem, kernel, run, auto, key, step_size, progress=progress)
    validation.check_positive("observe_every", observe_every, integer=True)
    if observe_every > 1 and trace_dir is not None:
        raise ValueError(f"trace_dir keeps every draw's values; it does not combine with observe_every={observe_every}")
    observation = Observation(NamedObservables(tuple(functions), tuple(losses)), pairs=pairs, every=int(observe_every))
    observed = run_observed(problem, kernel, run, key, step_size=eps, observation=observation, inputs=inputs,
                            trace_dir=trace_dir, check=not record, progress=progress)
    sampled = observed.sampled._replace(record={**(observed.sampled.record or {}), **record} or None)
    llc = summarize(problem, sampled, sampler=kernel.name, key=key)
    m = healthy_moments(llc, sampled.moments)
    shapes = {name: tuple(s.shape) for name, s in observation.shapes(problem.params, inputs).items()}
    center = observed.center
    shaped = lambda name, x: np.reshape(x, shapes[name])
    mean, mean_se, variance, variance_se = {}, {}, {}, {}
    for name in sorted(observables):
        estimate = estimators.mean(m.count, m.sums[name])
        mean[name] = shaped(name, center[name] + estimate.value)
        mean_se[name] = shaped(name, estimate.se)
        spread = estimators.variance(m.count, m.sums[name], m.squares[name])
        variance[name], variance_se[name] = shaped(name, spread.value), shaped(name, spread.se)
    covariance, covariance_se = {}, {}
    for a, b in pairs:
        estimate = estimators.covariance(estimators.chain_moments(m, a, b))
        covariance[pair_key(a, b)] = estimate.value.reshape(shapes[a] + shapes[b])
        covariance_se[pair_key(a, b)] = estimate.se.reshape(shapes[a] + shapes[b])
    settings = json_safe({**llc.settings, "observables": sorted(observables), "pairs": [list(p) for p in pairs],
                          "trace_dir": None if trace_dir is None else str(trace_dir),
                          "observe_every": int(observe_every)})
    return ObservedResult(
        names=tuple(sorted(observables)), shapes=shapes,
        at_center={name: shaped(name, center[name]) for name in observables}, mean=mean, mean_se=mean_se,
        variance=variance, variance_se=variance_se, covariance=covariance, covariance_se=covariance_se, llc=llc,
        traces=observed.traces, settings=settings)
