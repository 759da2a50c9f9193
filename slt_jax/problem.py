"""One validated estimation problem, built once and shared by every entry point.

``estimate_llc``, ``calibrate``, ``estimate_free_energy``, NUTS, the observables and every
checkpoint of a trajectory start the same way: check the inputs (errors name the argument and
pytree path), cast w* to the run's precision, resolve the parameter mask, place the data on the
mesh, check ``loss_fn`` on an abstract batch, and evaluate ``L_n(w*)`` exactly over the whole
dataset together with the spread of its batch means (docs/mathematics.md §1). :func:`make_problem`
does it once; a :class:`Problem` carries the result.
"""

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masks, validation
from slt_jax.data.batches import FullBatchLoss, full_batch_loss, per_sample_losses
from slt_jax.posterior import LocalPosterior, default_nbeta
from slt_jax.runner import divergence, sharding
from slt_jax.settings import Precision, RunSettings

_full_batch_loss = jax.jit(full_batch_loss, static_argnums=(0, 3))


@partial(jax.jit, static_argnums=(0, 3))
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
      data: the gradient data, placed on the mesh (rows split over its ``"data"`` axis).
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
        }


def make_problem(loss_fn, params, data, *, localization, nbeta=None, eval_data=None, param_mask=None,
                 mesh=None, devices=None, precision: Precision | None = None, run: RunSettings | None = None,
                 allow_zero_localization: bool = True) -> Problem:
    """Validate the inputs of an estimate and prepare them on device.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean per-sample loss over ``batch``.
      params: w*, a pytree of float arrays.
      data: a pytree of arrays sharing a leading axis of length n.
      localization: γ ≥ 0 (> 0 where ``allow_zero_localization`` is False).
      nbeta: nβ; default ``n / log n``.
      eval_data: optional measurement dataset (data-refined LLC).
      param_mask: which parameters are sampled (see :func:`slt_jax.masks.resolve_mask`).
      mesh, devices: where the chains run (:func:`slt_jax.make_mesh`).
      precision: dtype and compute dtype (default float32).
      run: the run's settings (batch size and divergence policy are read here).
      allow_zero_localization: whether γ = 0 is allowed.

    Returns:
      A :class:`Problem`.
    """
    precision = Precision() if precision is None else precision
    run = RunSettings() if run is None else run
    precision.check_runtime()
    n = validation.check_data(data)
    num_params = validation.check_params(params)
    validation.check_positive("localization", localization, allow_zero=allow_zero_localization)
    nbeta = default_nbeta(n) if nbeta is None else nbeta
    validation.check_positive("nbeta", nbeta)
    batch_size = run.batch_size_for(n)
    mesh = sharding.resolve_mesh(mesh, devices)
    sharding.check_data_split(mesh, n, batch_size)
    dtype = precision.dtype
    params = sharding.put_replicated(jax.tree.map(lambda x: jnp.asarray(x, dtype), params), mesh)
    mask = masks.resolve_mask(param_mask, params)
    num_sampled = masks.num_sampled(mask, params)
    data = sharding.put_data(data, mesh)
    validation.check_loss_fn(loss_fn, params, _abstract_batch(data, batch_size))
    n_eval, eval_batch_size = n, batch_size
    if eval_data is not None:
        n_eval = validation.check_data(eval_data, "eval_data")
        eval_batch_size = min(batch_size, n_eval)
        sharding.check_data_split(mesh, n_eval, eval_batch_size, "eval_data")
        eval_data = sharding.put_data(eval_data, mesh)
        validation.check_loss_fn(loss_fn, params, _abstract_batch(eval_data, eval_batch_size), "eval_data")
    wrapped = PrecisionLoss(loss_fn, precision.compute_dtype, dtype)
    reference = _full_batch_loss(wrapped, params, data, batch_size)
    measured = reference if eval_data is None else _full_batch_loss(wrapped, params, eval_data, eval_batch_size)
    init_loss = float(measured.mean)
    if not np.isfinite(init_loss):
        raise ValueError(f"loss_fn is not finite at params (L_n(w*) = {init_loss}): check params and data")
    table, note = None, None
    if run.loss_estimator == "control_variate":
        table, note = center_table(wrapped, params, data if eval_data is None else eval_data, eval_batch_size,
                                   measured.mean, precision)
        table = None if table is None else sharding.put_data(table, mesh)
    problem = Problem(
        loss_fn=wrapped, user_loss_fn=loss_fn, params=params, data=data, eval_data=eval_data, n=n, n_eval=n_eval,
        num_params=num_params, num_sampled=num_sampled, mask=mask, param_mask=param_mask, nbeta=float(nbeta),
        localization=float(localization), batch_size=batch_size, eval_batch_size=eval_batch_size,
        reference=reference, init_loss=init_loss, mesh=mesh, precision=precision, center_losses=table,
        control_variate=note)
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
