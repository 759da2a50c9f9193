"""One validated estimation problem, built once and shared by every entry point.

``estimate_llc``, ``calibrate``, ``estimate_free_energy``, NUTS, the observables and every
checkpoint of a trajectory start the same way: check the inputs (errors name the argument and
pytree path), cast w* to the run's precision, resolve the parameter mask, place the data on the
mesh, check ``loss_fn`` on an abstract batch, and evaluate ``L_n(w*)`` exactly over the whole
dataset together with the spread of its batch means (docs/mathematics.md §1). :func:`make_problem`
does it once; a :class:`Problem` carries the result.

Placement: w* lies on the mesh as ``param_specs`` says (replicated, or split over a
``"model"`` axis: :func:`slt_jax.runner.sharding.param_specs`); the data rows over ``"data"`` —
or, for :func:`slt_jax.data.streaming.streamed` data, stay on the host, and L_n(w*) is one
streamed pass over them. In a multi-process run every process first checks that the others hold
the same problem (:func:`slt_jax.distributed.check_consistent`).

Its length: the validation steps, the exact L_n(w*) and the control variate's table all feed
one :class:`Problem` and read top to bottom.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding

from slt_jax import distributed, masks, validation
from slt_jax.data import streaming
from slt_jax.data.batches import FullBatchLoss, full_batch_loss, per_sample_losses
from slt_jax.posterior import LocalPosterior, default_nbeta
from slt_jax.runner import divergence, sharding
from slt_jax.settings import Precision, RunSettings

_full_batch_loss = jax.jit(full_batch_loss, static_argnums=(0, 3))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _per_sample_losses(loss_fn, params, data, batch_size):
    """The per-row losses and, for their check, ``loss_fn`` on the first ``batch_size`` rows (one
    program: an eager call would trace ``loss_fn`` again for every point)."""
    rows = min(batch_size, jax.tree.leaves(data)[0].shape[0])
    first = jax.tree.map(lambda x: x[:rows], data)
    return per_sample_losses(loss_fn, params, data, batch_size), loss_fn(params, first)


@dataclasses.dataclass(frozen=True)
class PrecisionLoss:
    """``loss_fn`` evaluated at ``compute_dtype``, its value returned at ``dtype``.

    With a ``compute_dtype`` (e.g. bfloat16) the parameters and the floating leaves of the batch
    are cast to it before the model runs; the gradient flows back through the cast, so positions
    and gradients stay at ``dtype``. Frozen, so equal wrappers hash alike and a second estimate
    reuses the compiled program.
    """

    loss_fn: Callable
    compute_dtype: Any
    dtype: Any

    def __call__(self, params, batch):
        if self.compute_dtype is not None:
            cast = lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            params, batch = jax.tree.map(cast, (params, batch))
        return self.loss_fn(params, batch).astype(self.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A validated local-posterior problem: what every sampler needs, on device.

    Attributes:
      loss_fn: the user's loss at the run's precision (:class:`PrecisionLoss`).
      user_loss_fn: the user's loss as given (curvature probes run it at full precision).
      params: w*, cast to ``precision.dtype``.
      data: the gradient data, placed on the mesh (rows split over its ``"data"`` axis), or the
        :class:`~slt_jax.data.streaming.Streamed` dataset left on the host.
      eval_data: the measurement data (placed), or ``None`` to measure on ``data``.
      n, n_eval: rows of ``data`` and of the measurement data.
      num_params, num_sampled: parameters in all, and those the mask leaves free.
      mask: the 0/1 mask pytree, or ``None``.
      param_mask: the mask as the user gave it (recorded).
      nbeta, localization: nβ and γ.
      batch_size, eval_batch_size: gradient minibatch rows; measurement batch rows.
      reference: ``L_n(w*)`` on the gradient data and the spread of its batch means.
      init_loss: ``L_n(w*)`` on the measurement data, exact (a Python float).
      mesh: where the chains (and data) run.
      precision: dtype and compute dtype.
      center_losses: the control variate's table: ℓ_i(w*) per row of the measurement data
        (the eval data if given), shifted so that its mean is ``init_loss`` exactly, sharded
        like those rows; ``None`` where each draw evaluates ``L_B(w*)`` by a forward pass
        instead (see :func:`center_table`).
      control_variate: how the control variate reads ``L_B(w*)`` and why (recorded).
      param_specs: how w* lies over the mesh's ``"model"`` axis
        (:class:`~slt_jax.runner.sharding.ParamSpecs`).
    """

    loss_fn: Callable
    user_loss_fn: Callable
    params: Any
    data: Any
    eval_data: Any
    n: int
    n_eval: int
    num_params: int
    num_sampled: int
    mask: Any
    param_mask: Any
    nbeta: float
    localization: float
    batch_size: int
    eval_batch_size: int
    reference: FullBatchLoss
    init_loss: float
    mesh: Any
    precision: Precision
    center_losses: Any = None
    control_variate: dict | None = None
    param_specs: Any = None

    @property
    def streamed(self) -> bool:
        """Whether the gradient data stay on the host (:mod:`slt_jax.data.streaming`)."""
        return streaming.is_streamed(self.data)

    @functools.cached_property
    def resident_data(self):
        """Data on device for what needs rows at hand — curvature probes, the Laplace value: the
        data themselves, or for streamed data a fixed sample of
        :data:`~slt_jax.data.streaming.RESIDENT_ROWS` rows."""
        return self.data.resident(self.mesh) if self.streamed else self.data

    def require_resident(self, what: str):
        """Raise a ValueError naming ``what`` if it needs every row on device and the data stream."""
        if self.streamed:
            raise ValueError(f"{what} needs the whole dataset on device at every step; with streamed data "
                             "use the SGLD family with loss_estimator 'control_variate' or 'minibatch'")

    def posterior(self, nbeta=None, localization=None) -> LocalPosterior:
        """The localized posterior at w* (nβ, γ as arrays of the run's dtype; per-chain
        arrays allowed)."""
        as_array = lambda x: jnp.asarray(x, self.precision.dtype)
        return LocalPosterior(self.params, as_array(self.nbeta if nbeta is None else nbeta),
                              as_array(self.localization if localization is None else localization), self.mask)

    def divergence_threshold(self, run: RunSettings, nbeta=None) -> float:
        """The run's runaway bound (its own, or the default for this problem at ``nbeta``)."""
        if run.divergence_threshold is not None:
            return float(run.divergence_threshold)
        return divergence.default_threshold(self.num_sampled, self.nbeta if nbeta is None else nbeta,
                                            float(self.reference.batch_std))

    def measure_data(self, loss_estimator: str):
        """The data each draw's loss is measured on: the eval data, the whole gradient data for
        ``"full_batch"``, or ``None`` (the gradient minibatch itself)."""
        if self.eval_data is not None:
            return self.eval_data
        return self.data if loss_estimator == "full_batch" else None

    def record(self) -> dict:
        """What the problem contributes to a result's settings (JSON-ready)."""
        return {
            "localization": self.localization, "nbeta": self.nbeta, "batch_size": self.batch_size,
            "eval_data": self.eval_data is not None, "n": self.n, "n_eval": self.n_eval,
            "num_params": self.num_params, "num_sampled": self.num_sampled,
            "param_mask": masks.mask_label(self.param_mask),
            "dtype": str(self.precision.dtype),
            "compute_dtype": None if self.precision.compute_dtype is None else str(self.precision.compute_dtype),
            "devices": sharding.devices_of(self.mesh), "mesh": dict(self.mesh.shape),
            "jax_version": jax.__version__, "control_variate": self.control_variate,
            "processes": jax.process_count(), "streamed": self.streamed,
            "param_specs": None if self.param_specs is None or not self.param_specs.sharded
            else [str(spec) for spec in self.param_specs.specs],
        }


def make_problem(loss_fn, params, data, *, localization, nbeta=None, eval_data=None, param_mask=None,
                 mesh=None, devices=None, param_specs=None, precision: Precision | None = None,
                 run: RunSettings | None = None, allow_zero_localization: bool = True) -> Problem:
    """Validate the inputs of an estimate and prepare them on device.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean per-sample loss over ``batch``.
      params: w*, a pytree of float arrays.
      data: a pytree of arrays sharing a leading axis of length n, or
        :func:`slt_jax.data.streamed` host arrays.
      localization: γ ≥ 0 (> 0 where ``allow_zero_localization`` is False).
      nbeta: nβ; default ``n / log n``.
      eval_data: optional measurement dataset (data-refined LLC).
      param_mask: which parameters are sampled (see :func:`slt_jax.masks.resolve_mask`).
      mesh, devices: where the chains run (:func:`slt_jax.make_mesh`).
      param_specs: with a ``"model"`` axis, a pytree like ``params`` of ``PartitionSpec`` over
        ``"model"`` (``None`` leaves replicated), or ``None`` for the default layout
        (:func:`slt_jax.runner.sharding.param_specs`).
      precision: dtype and compute dtype (default float32).
      run: the run's settings (batch size and divergence policy are read here).
      allow_zero_localization: whether γ = 0 is allowed.

    Returns:
      A :class:`Problem`.
    """
    precision = Precision() if precision is None else precision
    run = RunSettings() if run is None else run
    precision.check_runtime()
    streamed = streaming.is_streamed(data)
    n = data.n if streamed else validation.check_data(data)
    num_params = validation.check_params(params)
    validation.check_positive("localization", localization, allow_zero=allow_zero_localization)
    nbeta = default_nbeta(n) if nbeta is None else nbeta
    validation.check_positive("nbeta", nbeta)
    batch_size = run.batch_size_for(n)
    mesh = sharding.resolve_mesh(mesh, devices)
    sharding.check_data_split(mesh, n, batch_size)
    if streaming.is_streamed(eval_data):
        raise ValueError("eval_data cannot be streamed: pass it as arrays (it is sampled on device)")
    if streamed and run.loss_estimator == "full_batch" and eval_data is None:
        raise ValueError("loss_estimator='full_batch' needs the whole dataset on device at every draw; with "
                         "streamed data use 'control_variate' or 'minibatch'")
    distributed.check_consistent("problem", lambda: {
        "n": n, "params": distributed.data_fingerprint(params, rows=2**20),
        "data": distributed.data_fingerprint(data.source if streamed else data),
        "eval_data": None if eval_data is None else distributed.data_fingerprint(eval_data),
        "nbeta": float(nbeta), "localization": float(localization), "batch_size": batch_size,
        "param_mask": masks.mask_label(param_mask), "precision": [str(precision.dtype), str(precision.compute_dtype)],
        "mesh": dict(mesh.shape), "run": repr(run)})
    dtype = precision.dtype
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    specs = sharding.param_specs(params, mesh, param_specs)
    params = sharding.put_params(params, mesh, specs)
    mask = masks.resolve_mask(param_mask, params)
    num_sampled = masks.num_sampled(mask, params)
    if not streamed:
        data = sharding.put_data(data, mesh)
    validation.check_loss_fn(loss_fn, params,
                             data.abstract(batch_size) if streamed else _abstract_batch(data, batch_size))
    n_eval, eval_batch_size = n, batch_size
    if eval_data is not None:
        n_eval = validation.check_data(eval_data, "eval_data")
        eval_batch_size = min(batch_size, n_eval)
        sharding.check_data_split(mesh, n_eval, eval_batch_size, "eval_data")
        eval_data = sharding.put_data(eval_data, mesh)
        validation.check_loss_fn(loss_fn, params, _abstract_batch(eval_data, eval_batch_size), "eval_data")
    wrapped = PrecisionLoss(loss_fn, precision.compute_dtype, dtype)
    streamed_table = streamed and eval_data is None and run.loss_estimator == "control_variate"
    table, note = None, None
    if streamed:
        # One pass over the host data: L_n(w*) and, for the control variate, ℓ_i(w*) per row.
        placed = NamedSharding(mesh, sharding.REPLICATED)
        try:
            reference = streaming.full_batch_loss(wrapped, params, data, batch_size, placed, per_row=streamed_table)
        except Exception as error:  # a loss that cannot take one-row batches: L_n alone
            if not streamed_table:
                raise
            reference, streamed_table = streaming.full_batch_loss(wrapped, params, data, batch_size, placed), False
            note = {"method": "forward_pass", "reason": f"loss_fn failed on one-row batches: {error}"[:300]}
        if streamed_table:
            reference, per_row, first = reference
    else:
        reference = _full_batch_loss(wrapped, params, data, batch_size)
    measured = reference if eval_data is None else _full_batch_loss(wrapped, params, eval_data, eval_batch_size)
    init_loss = float(measured.mean)
    if not np.isfinite(init_loss):
        raise ValueError(f"loss_fn is not finite at params (L_n(w*) = {init_loss}): check params and data")
    if streamed_table:
        table, note = checked_table(per_row, first, min(batch_size, n), measured.mean, precision)
        table = None if table is None else sharding.put_data(table, mesh)
    elif run.loss_estimator == "control_variate" and (eval_data is not None or not streamed):
        table, note = center_table(wrapped, params, data if eval_data is None else eval_data, eval_batch_size,
                                   measured.mean, precision)
        table = None if table is None else sharding.put_data(table, mesh)
    problem = Problem(
        loss_fn=wrapped, user_loss_fn=loss_fn, params=params, data=data, eval_data=eval_data, n=n, n_eval=n_eval,
        num_params=num_params, num_sampled=num_sampled, mask=mask, param_mask=param_mask, nbeta=float(nbeta),
        localization=float(localization), batch_size=batch_size, eval_batch_size=eval_batch_size,
        reference=reference, init_loss=init_loss, mesh=mesh, precision=precision, center_losses=table,
        control_variate=note, param_specs=specs)
    validation.check_positive("divergence_threshold", problem.divergence_threshold(run))
    return problem


def center_table(loss_fn, params, data, batch_size: int, exact_mean, precision: Precision):
    """The control variate's table ℓ_i(w*), read by index instead of a forward pass per draw.

    The per-row losses come from ``loss_fn`` on one-row batches (vmapped, once over the data,
    like L_n(w*)). They serve only if ``loss_fn`` is a mean of per-row terms, checked on the
    first batch: the mean of the rows' values must equal ``loss_fn`` on the batch to float
    tolerance (relative 1e-5 of the losses' scale at float32/float64 compute, 1e-2 at a lower
    ``compute_dtype``). The table is then shifted by ``L_n(w*) − mean(table)`` — a rounding-level
    constant — so that its mean is the exact L_n(w*) and the estimator stays unbiased whatever
    the rounding (docs/mathematics.md §1.3).

    Returns:
      ``(table, note)``: the table ``(n,)`` at the run's dtype (``None`` when the check fails:
      each draw then evaluates L_B(w*) by a forward pass) and a JSON-ready note of which and why.
    """
    rows = min(batch_size, jax.tree.leaves(data)[0].shape[0])
    try:
        table, batch_loss = _per_sample_losses(loss_fn, params, data, batch_size)
    except Exception as error:  # a loss that cannot take one-row batches
        return None, {"method": "forward_pass", "reason": f"loss_fn failed on one-row batches: {error}"[:300]}
    return checked_table(table, batch_loss, rows, exact_mean, precision)


def checked_table(table, batch_loss, rows: int, exact_mean, precision: Precision):
    """:func:`center_table`'s check and shift of per-row losses ``table`` against ``batch_loss``,
    ``loss_fn`` on the first ``rows`` rows (also for a table from a streamed pass)."""
    table = jnp.asarray(table, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    per_row, batch_loss = float(jnp.mean(table[:rows])), float(batch_loss)
    scale = max(abs(batch_loss), float(jnp.mean(jnp.abs(table[:rows]))), 1e-30)
    compute = precision.compute_dtype
    rtol = 1e-5 if compute is None or jnp.dtype(compute).itemsize >= 4 else 1e-2
    if not (np.isfinite(per_row) and abs(per_row - batch_loss) <= rtol * scale):
        return None, {"method": "forward_pass",
                      "reason": (f"the mean of loss_fn over one-row batches ({per_row:.6g}) differs from loss_fn on "
                                 f"the batch ({batch_loss:.6g}) on the first {rows} rows: loss_fn is not a mean of "
                                 f"per-row terms, so each draw evaluates L_B(w*) by a forward pass")}
    shift = jnp.asarray(exact_mean, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32) - jnp.mean(table)
    table = (table + shift).astype(precision.dtype)
    return table, {"method": "table", "reason": "per-sample losses at w*, read by the minibatch's indices",
                   "shift": float(shift)}


def _abstract_batch(data, batch_size: int):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype), data)
