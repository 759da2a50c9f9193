"""LLC and free-energy curves over a training run saved as Orbax checkpoints.

``llc_trajectory`` estimates λ̂ (Lau et al., arXiv:2308.12108) at every checkpoint of a
``CheckpointManager`` directory with one compiled sampler program, keyed by the checkpoint's
step so that an interrupted run resumes with identical numbers, and returns an
:class:`LLCCurve`: one row per step, with stage detection (arXiv:2402.02364), early-warning
indicators and plots on top.

Saddles (docs/mathematics.md §6.4). Training plateaus sit near saddles, where the localized posterior
is proper only if γ exceeds nβ·|most negative Hessian eigenvalue|; otherwise chains slide
downhill and their λ̂ measures the slide, not the point. Two guards:

- The default localization is ``γ = nβ/10``. For the quadratic part of the loss the finite-γ
  estimand ½·Σ nβh/(nβh + γ) depends on γ only through γ/nβ, so tying γ to nβ keeps λ̂
  independent of the temperature scale; at γ/nβ = 1/10 the localizer shifts the
  contribution of a direction of curvature h ≥ 1 by under 10 %, and holds chains at saddles
  whose negative curvature is below 1/10 (the ratio Hoogland et al., arXiv:2402.02364, used:
  nβ = 60, γ = 6). Pass ``localization`` to choose another.
- Chains that slide away anyway are detected (:func:`escaped_chains`), left out of the
  step's λ̂ like diverged chains, counted in the row, and the row is flagged; stage detection
  and plots use the unflagged rows.

Every capability of :func:`slt_jax.estimate_llc` applies per checkpoint: the same settings
(:mod:`slt_jax.settings`), ``mesh=``/``devices=`` (rows do not depend on the device count, so
the mesh is not part of what a resumed run must match), precision, and ``step_size="auto"`` —
calibrated at every checkpoint (``calibrate_at="each"``, the default: early checkpoints near
initialisation and late ones differ in curvature by orders of magnitude) or once, at one
checkpoint's parameters (``calibrate_at=step``), whose :class:`~slt_jax.Calibration` every
checkpoint then uses; each row records the step size it ended with and where it was calibrated.

Across processes (:mod:`slt_jax.distributed`) every process restores each checkpoint onto the
mesh (replicated; Orbax's multi-process restore) and runs the same estimates; process 0 reads
the results store and shares its finished steps with the others — so every process skips the
same steps, whatever filesystem the others see — and writes each new row; checkpoints are not
prefetched on a background thread there (its restores would interleave with the estimates'
cross-process collectives in an order the processes do not share).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from slt_jax import settings as settings_lib
from slt_jax import masks, validation
from slt_jax.estimate import estimate_llc
from slt_jax.estimators.diagnostics import chain_diagnostics, mcse_mean
from slt_jax.estimators.llc import escaped_chains, llc_statistics
from slt_jax.paths import checkpoint_path
from slt_jax.posterior import default_nbeta
from slt_jax.problem import make_problem
from slt_jax.runner import sharding
from slt_jax.samplers import get_kernel, nuts
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.trajectory.checkpoints import CheckpointTrajectory, list_steps
from slt_jax.trajectory.curve import COLUMNS, LLCCurve
from slt_jax.trajectory.loop import checkpoint_rows
from slt_jax.tuning.auto import calibration_for
from slt_jax.tuning.calibration import Calibration

DEFAULT_LOCALIZATION_PER_NBETA = 0.1


def llc_row(step: int, result, localization: float, calibrated_at=None) -> dict:
    """One curve row from an estimate: λ̂ over the chains that neither diverged nor escaped."""
    escaped = escaped_chains(result.llc_per_chain, result.distance_trace,
                             num_sampled=result.settings["num_sampled"], localization=localization)
    diverged = np.zeros(escaped.shape, bool)
    diverged[result.diverged_chains] = True
    held = ~diverged & ~escaped & np.all(np.isfinite(result.llc_trace), axis=1)
    stats = llc_statistics(result.llc_trace, held)
    llc_se, ess, rhat = stats.llc_se, math.nan, math.nan
    if held.any() and result.llc_trace.shape[1] >= 4:
        diagnostics = chain_diagnostics(result.llc_trace[held])
        ess, rhat = diagnostics.ess, diagnostics.rhat
        if held.sum() == 1:
            llc_se = mcse_mean(result.llc_trace[held])
    return {
        "step": int(step), "llc_mean": stats.llc_mean, "llc_std": stats.llc_std, "llc_se": llc_se,
        "init_loss": result.init_loss,
        "free_energy_approx": result.n * result.init_loss + stats.llc_mean * math.log(result.n),
        "nbeta": result.nbeta, "localization": float(localization), "n": result.n,
        "num_chains": int(escaped.size), "diverged_chains": int(diverged.sum()),
        "escaped_chains": int((escaped & ~diverged).sum()),
        "flagged": bool((diverged | escaped).any()), "ess": ess, "rhat": rhat,
        "step_size": float(result.settings["step_size"]), "calibrated_at": calibrated_at,
    }


def _settings(checkpoint_dir, key, n, step_size, nbeta, localization, item, select, sampler, eval_data,
              param_mask, run, auto, precision, calibrate_at):
    """Everything that determines the rows, as JSON (what a resumed run must match). The mesh
    is not part of it: rows do not depend on how many devices computed them."""
    calibrated = isinstance(step_size, Calibration) or step_size == "auto"
    return {
        "checkpoint_dir": str(checkpoint_dir), "item": item,
        "select": None if select is None else getattr(select, "__qualname__", repr(select)),
        "key": validation.key_data(key), "n": n,
        "step_size": "calibration" if isinstance(step_size, Calibration) else step_size,
        "nbeta": nbeta, "localization": localization, "sampler": sampler,
        "eval_data": None if eval_data is None else validation.check_data(eval_data, "eval_data"),
        "param_mask": masks.mask_label(param_mask),
        **settings_lib.to_dict(run), **settings_lib.to_dict(precision),
        "auto": settings_lib.to_dict(auto) if calibrated else None,
        "calibrate_at": calibrate_at if calibrated else None,
    }


def llc_trajectory(
    checkpoint_dir,
    loss_fn: Callable,
    data,
    key,
    *,
    step_size,
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
    eval_data=None,
    param_mask=None,
    mesh=None,
    devices=None,
    param_specs=None,
    run: RunSettings | None = None,
    auto: AutoSettings | None = None,
    precision: Precision | None = None,
    calibrate_at="each",
    **options,
) -> LLCCurve:
    """Estimate λ̂ at every checkpoint of an Orbax training run.

    Checkpoints are restored one at a time (the next one prefetched while the current one
    samples) and each is sampled by :func:`slt_jax.estimate_llc` with the same settings, so
    one compiled program serves every step. Step ``s`` uses the key ``fold_in(key, s)``: a
    step's numbers do not depend on which other steps run, or in which session.

    Args:
      checkpoint_dir: the directory given to ``orbax.checkpoint.CheckpointManager`` (relative,
        ``~`` and ``gs://`` paths are accepted).
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean per-sample loss.
      data: the dataset (pytree of arrays with a leading sample axis), e.g. the training set.
      key: a JAX PRNG key.
      step_size: SGLD step size ε, ``"auto"`` (calibrated; see ``calibrate_at``), or a
        :class:`~slt_jax.Calibration`.
      localization: γ; default ``nβ/10`` (see the module docstring: it holds chains at
        saddles whose negative curvature is below 1/10 and keeps λ̂ independent of the
        temperature scale).
      nbeta: nβ; default ``n / log n``.
      item: the item holding the parameters in a composite checkpoint (e.g. ``"params"``).
      select: picks the parameters out of a restored training state,
        e.g. ``lambda state: state["params"]``.
      steps: the steps to estimate; default every finished checkpoint.
      template: the parameter pytree the model expects (arrays or ``ShapeDtypeStruct``);
        default the shapes stored in the first checkpoint.
      results_path: a directory where each finished step is written at once (atomically);
        a rerun with the same path skips finished steps, and refuses to continue if any
        setting differs (see :class:`slt_jax.trajectory.store.ResultsStore`).
      on_row: called with each newly computed row, after it is stored.
      prefetch: restore the next checkpoint while the current one samples (in one process).
      progress: show a progress bar over checkpoints (checkpoint i/N, its step, an ETA).
      sampler, eval_data, param_mask, mesh, devices, param_specs, run, auto, precision, **options:
        as for :func:`slt_jax.estimate_llc`; checkpoints are restored onto the mesh.
      calibrate_at: with a calibrated ``step_size``: ``"each"`` (calibrate at every
        checkpoint) or a checkpoint step (calibrate once there; every row uses that
        :class:`~slt_jax.Calibration`).

    Returns:
      An :class:`LLCCurve` with one row per requested step; ``curve.results`` holds the
      :class:`~slt_jax.LLCResult` (draws included) of every step computed in this call (not of
      steps read back from ``results_path``), for ``curve.to_arviz()`` and trace plots.
    """
    run, auto, precision = settings_lib.resolve(options, (run, RunSettings), (auto, AutoSettings),
                                                (precision, Precision))
    checkpoint_dir, n, calibrated, nbeta, localization = trajectory_inputs(
        checkpoint_dir, data, step_size=step_size, nbeta=nbeta, localization=localization, calibrate_at=calibrate_at)
    sampler_name = nuts.NUTS if sampler == nuts.NUTS else get_kernel(sampler).name
    settings = _settings(checkpoint_dir, key, n, step_size, nbeta, localization, item, select, sampler_name,
                         eval_data, param_mask, run, auto, precision, calibrate_at)
    mesh = sharding.resolve_mesh(mesh, devices)
    estimate = dict(localization=localization, nbeta=nbeta, sampler=sampler, eval_data=eval_data,
                    param_mask=param_mask, mesh=mesh, param_specs=param_specs, run=run, auto=auto,
                    precision=precision, progress=False)
    chosen, results = {"step_size": step_size}, {}

    def before(template):
        if calibrated and calibrate_at != "each" and not isinstance(step_size, Calibration):
            chosen["step_size"] = _calibrate_once(checkpoint_dir, loss_fn, data, key, calibrate_at, template, item,
                                                  select, sampler, estimate, progress)

    def compute(step, params):
        result = estimate_llc(loss_fn, params, data, jax.random.fold_in(key, step), step_size=chosen["step_size"],
                              **estimate)
        results[step] = result
        return llc_row(step, result, localization,
                       None if not calibrated else (step if calibrate_at == "each" else calibrate_at))

    rows = checkpoint_rows(checkpoint_dir, compute, settings=settings, steps=steps, item=item, select=select,
                           template=template, results_path=results_path, on_row=on_row, prefetch=prefetch,
                           sharding=_restore_sharding(mesh),
                           progress=progress, before=before, describe=lambda row: f"λ̂ = {row['llc_mean']:.3g}")
    return LLCCurve(rows=tuple(_from_store(row) for row in rows.values()), settings=settings,
                    results=results or None)


class TrajectoryInputs(NamedTuple):
    """What every trajectory settles before it opens a checkpoint (:func:`trajectory_inputs`)."""

    checkpoint_dir: Any
    n: int
    calibrated: bool
    nbeta: float
    localization: float


def trajectory_inputs(checkpoint_dir, data, *, step_size, nbeta, localization, calibrate_at="each"):
    """The checks every trajectory makes first: the directory (absolute), n from ``data``, a
    fixed ``step_size`` positive (or ``"auto"``/a ``Calibration``), nβ (default n/log n) and γ
    (default nβ/10), and ``calibrate_at`` a checkpoint of the directory where it is not "each"."""
    checkpoint_dir = checkpoint_path(checkpoint_dir)
    n = validation.check_data(data)
    calibrated = isinstance(step_size, Calibration) or step_size == "auto"
    if not calibrated:
        validation.check_positive("step_size", step_size)
    nbeta = float(default_nbeta(n) if nbeta is None else nbeta)
    validation.check_positive("nbeta", nbeta)
    localization = float(DEFAULT_LOCALIZATION_PER_NBETA * nbeta if localization is None else localization)
    validation.check_positive("localization", localization, allow_zero=True)
    if calibrated and calibrate_at != "each":
        available = list_steps(checkpoint_dir)
        if calibrate_at not in available:
            raise ValueError(f"calibrate_at={calibrate_at!r} must be 'each' or a checkpoint step of "
                             f"{str(checkpoint_dir)!r} (it holds {available})")
    return TrajectoryInputs(checkpoint_dir, n, calibrated, nbeta, localization)


def _calibrate_once(checkpoint_dir, loss_fn, data, key, step, template, item, select, sampler, estimate, progress):
    """The :class:`Calibration` at checkpoint ``step``'s parameters, with the key that
    ``estimate_llc(step_size="auto")`` would use there."""
    _, params = next(iter(CheckpointTrajectory(checkpoint_dir, template=template, item=item, select=select,
                                               steps=[step], sharding=_restore_sharding(estimate["mesh"]),
                                               prefetch=False)))
    problem = make_problem(loss_fn, params, data, localization=estimate["localization"], nbeta=estimate["nbeta"],
                           eval_data=estimate["eval_data"], param_mask=estimate["param_mask"], mesh=estimate["mesh"],
                           param_specs=estimate["param_specs"], precision=estimate["precision"], run=estimate["run"])
    return calibration_for(problem, get_kernel(sampler), estimate["run"], estimate["auto"],
                           jax.random.fold_in(key, step), "auto", progress=progress)


def _restore_sharding(mesh):
    """Where checkpoints are restored: replicated over the run's mesh (every process holds its
    devices' copies; :func:`slt_jax.problem.make_problem` then lays w* out over ``"model"``)."""
    return NamedSharding(mesh, sharding.REPLICATED)


def _from_store(row: Mapping) -> dict:
    """A row with its columns in ``COLUMNS`` order, then any further columns (observables) as stored."""
    missing = [name for name in COLUMNS if name not in row]
    if missing:
        raise ValueError(f"stored row for step {row.get('step')} lacks columns {missing}")
    return {**{name: row[name] for name in COLUMNS}, **{k: v for k, v in row.items() if k not in COLUMNS}}
