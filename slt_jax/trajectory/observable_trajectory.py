"""Susceptibilities and Bayesian influence at every checkpoint of a training run.

The sibling of :func:`slt_jax.llc_trajectory` for observables (docs/mathematics.md §8): at each
checkpoint it runs :func:`slt_jax.susceptibilities` (with ``shifts``) and/or
:func:`slt_jax.bayesian_influence` (with ``query_data``), each one compiled program for every
checkpoint, and writes one row per step — λ̂ and its diagnostics as in an LLC curve, plus the
observables' columns — to the same resumable :class:`~slt_jax.ResultsStore`. The result is an
:class:`~slt_jax.LLCCurve` whose extra columns take stage detection and early-warning
indicators by name (``curve.stages("chi/model/q")``, ``curve.early_warning("influence")``)
and plot as panels under λ̂ (:meth:`~slt_jax.LLCCurve.plot_panels`).

Columns (each with an ``_se`` column):

- ``llc/<component>``: the component's weight-refined λ̂ (from its own chain group);
- ``chi/<component>/<shift>``: χ = −nβ·Cov_C(φ_C, L_q − L_n);
- ``influence``: the mean BIF over the training rows × queries, −Cov_p(mean_i ℓ_i, mean_j φ_j),
  and ``influence_correlation`` the mean of the correlation form.

The LLC columns (``llc_mean`` …) are those of the first component's chains (give the whole
model first to read them as λ̂), or of the influence run without ``shifts``.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from slt_jax import masks, validation
from slt_jax import settings as settings_lib
from slt_jax.influence import bayesian_influence
from slt_jax.samplers import get_kernel
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.susceptibility import susceptibilities
from slt_jax.trajectory.curve import LLCCurve
from slt_jax.trajectory.llc_trajectory import _calibrate_once, _from_store, llc_row, trajectory_inputs
from slt_jax.trajectory.loop import checkpoint_rows
from slt_jax.tuning.calibration import Calibration


def observable_trajectory(
    checkpoint_dir,
    loss_fn: Callable,
    data,
    key,
    *,
    step_size,
    shifts: dict | None = None,
    components: dict | None = None,
    observable: Callable | None = None,
    query_data=None,
    train_rows=None,
    per_sample_loss: Callable | None = None,
    observe_every: int = 1,
    localization: float | None = None,
    nbeta: float | None = None,
    item: str | None = None,
    select: Callable[[Any], Any] | None = None,
    steps: Sequence[int] | None = None,
    template=None,
    results_path=None,
    on_row: Callable[[dict], None] | None = None,
    prefetch: bool = True,
    progress: bool = True,
    sampler="sgld",
    mesh=None,
    devices=None,
    run: RunSettings | None = None,
    auto: AutoSettings | None = None,
    precision: Precision | None = None,
    calibrate_at="each",
    **options,
) -> LLCCurve:
    """Susceptibilities and/or Bayesian influence at every checkpoint of an Orbax training run.

    Step ``s`` uses the key ``fold_in(key, s)``, so a step's numbers do not depend on which other
    steps run, or in which session; a rerun with the same ``results_path`` skips finished steps
    and refuses different settings.

    Args:
      checkpoint_dir, loss_fn, data, key, step_size, localization, nbeta, item, select, steps,
        template, results_path, on_row, prefetch, progress, sampler, mesh, devices, run, auto,
        precision, calibrate_at, **options: as for :func:`slt_jax.llc_trajectory` (default
        γ = nβ/10; ``step_size="auto"`` calibrates, each step or once).
      shifts, components, observable: as for :func:`slt_jax.susceptibilities`.
      query_data, train_rows: as for :func:`slt_jax.bayesian_influence` (its mean is recorded).
      per_sample_loss: the per-sample (or per-token) loss of the shifts' and queries' entries.
      observe_every: evaluate the observables at every ``observe_every``-th draw only.

    Returns:
      An :class:`~slt_jax.LLCCurve` with the observable columns (module docstring).
    """
    if shifts is None and query_data is None:
        raise ValueError("observable_trajectory needs shifts (susceptibilities) and/or query_data (influence)")
    run, auto, precision = settings_lib.resolve(options, (run, RunSettings), (auto, AutoSettings),
                                                (precision, Precision))
    checkpoint_dir, n, calibrated, nbeta, localization = trajectory_inputs(
        checkpoint_dir, data, step_size=step_size, nbeta=nbeta, localization=localization, calibrate_at=calibrate_at)
    settings = {
        "checkpoint_dir": str(checkpoint_dir), "item": item,
        "select": None if select is None else getattr(select, "__qualname__", repr(select)),
        "key": validation.key_data(key), "n": n,
        "step_size": "calibration" if isinstance(step_size, Calibration) else step_size,
        "nbeta": nbeta, "localization": localization, "sampler": get_kernel(sampler).name,
        "shifts": None if shifts is None else {name: validation.check_data(q, f"shifts[{name!r}]")
                                                for name, q in shifts.items()},
        "components": None if components is None else {name: masks.mask_label(spec)
                                                        for name, spec in components.items()},
        "observable": None if observable is None else getattr(observable, "__qualname__", "fn"),
        "query_data": None if query_data is None else validation.check_data(query_data, "query_data"),
        "train_rows": None if train_rows is None else np.asarray(train_rows).tolist(),
        "per_sample_loss": None if per_sample_loss is None else getattr(per_sample_loss, "__qualname__", "fn"),
        "observe_every": observe_every,
        **settings_lib.to_dict(run), **settings_lib.to_dict(precision),
        "auto": settings_lib.to_dict(auto) if calibrated else None,
        "calibrate_at": calibrate_at if calibrated else None,
    }
    common = dict(localization=localization, nbeta=nbeta, sampler=sampler, mesh=mesh, devices=devices, run=run,
                  auto=auto, precision=precision, progress=False)
    chosen = {"step_size": step_size}

    def before(template):
        if calibrated and calibrate_at != "each" and not isinstance(step_size, Calibration):
            estimate = {**common, "eval_data": None, "param_mask": None}
            chosen["step_size"] = _calibrate_once(checkpoint_dir, loss_fn, data, key, calibrate_at, template, item,
                                                  select, sampler, estimate, progress)

    def measure(step, params):
        step_key = jax.random.fold_in(key, step)
        where = None if not calibrated else (step if calibrate_at == "each" else calibrate_at)
        row, columns = None, {}
        if shifts is not None:
            result = susceptibilities(loss_fn, params, data, step_key, shifts=shifts, components=components,
                                      observable=observable, per_sample_loss=per_sample_loss,
                                      observe_every=observe_every, step_size=chosen["step_size"], **common)
            row = llc_row(step, result.llc[result.components[0]], localization, where)
            for i, c in enumerate(result.components):
                columns[f"llc/{c}"], columns[f"llc/{c}_se"] = result.llc_mean[i], result.llc_se[i]
                for j, q in enumerate(result.shifts):
                    columns[f"chi/{c}/{q}"], columns[f"chi/{c}/{q}_se"] = result.chi[i, j], result.se[i, j]
        if query_data is not None:
            influence = bayesian_influence(loss_fn, params, data, step_key, query_data=query_data,
                                           train_rows=train_rows, per_sample_loss=per_sample_loss,
                                           observe_every=observe_every, step_size=chosen["step_size"], **common)
            if row is None:
                row = llc_row(step, influence.llc, localization, where)
            columns["influence"], columns["influence_se"] = influence.mean_influence, influence.mean_influence_se
            columns["influence_correlation"] = float(np.nanmean(influence.correlation))
        return {**row, **{name: float(value) for name, value in columns.items()}}

    rows = checkpoint_rows(checkpoint_dir, measure, settings=settings, steps=steps, item=item, select=select,
                           template=template, results_path=results_path, on_row=on_row, prefetch=prefetch,
                           progress=progress, before=before, describe=_describe)
    return LLCCurve(rows=tuple(_from_store(row) for row in rows.values()), settings=settings)


def _describe(row) -> str:
    """The progress bar's note after a step: λ̂ and the first susceptibility or the influence."""
    chi = next((k for k in row if k.startswith("chi/") and not k.endswith("_se")), None)
    extra = f", χ = {row[chi]:.3g}" if chi else f", BIF = {row['influence']:.3g}" if "influence" in row else ""
    return f"λ̂ = {row['llc_mean']:.3g}{extra}"
