"""Per-component LLC curves: every restriction's refined λ̂ at every checkpoint, one program each.

Wang et al. (arXiv:2410.02984) follow the weight-refined LLC of each attention head of a
transformer over training and separate induction heads from multigram heads by their curves.
:func:`refined_llc_curves` runs :func:`slt_jax.estimate_refined_llcs` — every component as a
chain group of one compiled program — at each checkpoint of an Orbax directory, through the
same resumable loop as :func:`slt_jax.llc_trajectory` (:mod:`slt_jax.trajectory.loop`), and
returns one :class:`~slt_jax.LLCCurve` per component.
"""

import csv
import dataclasses

import jax
import numpy as np

from slt_jax import masks
from slt_jax import settings as settings_lib
from slt_jax import validation
from slt_jax.paths import local_path
from slt_jax.refined import estimate_refined_llcs
from slt_jax.serialization import dump_json, json_safe
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.trajectory.curve import COLUMNS, LLCCurve
from slt_jax.trajectory.llc_trajectory import llc_row, trajectory_inputs
from slt_jax.trajectory.loop import checkpoint_rows


@dataclasses.dataclass(frozen=True)
class ComponentCurves:
    """λ̂ of each component at each checkpoint.

    Attributes:
      curves: component name → its :class:`~slt_jax.LLCCurve` (rows as ``llc_trajectory``'s,
        flagged rows included).
      settings: everything that produced them (JSON-ready).
    """

    curves: dict
    settings: dict

    @property
    def steps(self) -> np.ndarray:
        """Checkpoint steps, shape ``(rows,)``."""
        return next(iter(self.curves.values())).steps

    def change(self, before: int, after: int) -> dict:
        """Each component's λ̂ at the last checkpoint ≤ ``after`` minus at the last ≤ ``before``
        (healthy rows only; NaN where either is missing), largest |change| first."""
        out = {}
        for name, curve in self.curves.items():
            mean = np.where(curve.healthy, curve.column("llc_mean"), np.nan)
            at = lambda s: mean[np.flatnonzero(curve.steps <= s)[-1]] if np.any(curve.steps <= s) else np.nan
            out[name] = float(at(after) - at(before))
        return dict(sorted(out.items(), key=lambda item: -abs(item[1]) if np.isfinite(item[1]) else 0.0))

    def plot(self, path=None, *, loss=None, events=(), title=None):
        """One λ̂ ± 2 s.e. line per component (flagged rows left out); see
        :func:`slt_jax.plots.plot_component_curves`."""
        from slt_jax.plots import plot_component_curves  # matplotlib only when plotting

        lines = {name: (np.where(c.healthy, c.column("llc_mean"), np.nan), np.where(c.healthy, c.column("llc_se"),
                                                                                    np.nan))
                 for name, c in self.curves.items()}
        return plot_component_curves(self.steps, lines, loss=loss, events=events, path=path, title=title)

    def to_dict(self) -> dict:
        """``{"settings", "components": {name: rows}}`` as JSON types."""
        return json_safe({"settings": self.settings,
                          "components": {name: list(c.rows) for name, c in self.curves.items()}})

    def write(self, out_dir, *, loss=None, events=(), title=None) -> dict:
        """Write ``component_curves.csv`` (one row per step and component), ``.json`` and ``.png``.

        Returns:
          The written paths by kind (``csv``, ``json``, ``plot``).
        """
        out = local_path(out_dir, "out_dir")
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "component_curves.csv", "json": out / "component_curves.json"}
        with open(paths["csv"], "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=("component", *COLUMNS))
            writer.writeheader()
            for name, curve in self.curves.items():
                for row in json_safe(list(curve.rows)):
                    writer.writerow({"component": name, **{k: "" if row.get(k) is None else row[k] for k in COLUMNS}})
        dump_json(self.to_dict(), paths["json"], indent=1)
        if any(c.healthy.any() for c in self.curves.values()):
            paths["plot"] = out / "component_curves.png"
            self.plot(paths["plot"], loss=loss, events=events, title=title)
        return paths

    def __str__(self) -> str:
        names = list(self.curves)
        lines = [f"{'step':>8} " + " ".join(f"{name[:12]:>12}" for name in names)]
        for i, step in enumerate(self.steps):
            cells = []
            for name in names:
                row = self.curves[name].rows[i]
                cells.append(f"{row['llc_mean']:>11.3g}" + ("×" if row["flagged"] else " "))
            lines.append(f"{step:>8d} " + " ".join(cells))
        return "\n".join(lines)


def refined_llc_curves(checkpoint_dir, loss_fn, data, key, *, components: dict, step_size, localization=None,
                       nbeta=None, item=None, select=None, steps=None, template=None, results_path=None, on_row=None,
                       prefetch=True, progress=True, sampler="sgld", eval_data=None, mesh=None, devices=None,
                       run: RunSettings | None = None, auto: AutoSettings | None = None,
                       precision: Precision | None = None, **options) -> ComponentCurves:
    """The weight-refined λ̂ of every component at every checkpoint of an Orbax training run.

    Args:
      checkpoint_dir, loss_fn, data, key, localization, nbeta, item, select, steps, template,
        results_path, on_row, prefetch, progress, sampler, eval_data, mesh, devices, run, auto,
        precision, **options: as for :func:`slt_jax.llc_trajectory` (step ``s`` uses
        ``fold_in(key, s)``; a rerun with the same ``results_path`` resumes).
      components: name → weight restriction (e.g. ``{f"L{l}H{h}": slt_jax.head(l, h) …}``).
      step_size: ε shared by the components, or ``"auto"`` (calibrated on the whole model at each
        checkpoint; see :func:`slt_jax.estimate_refined_llcs`).

    Returns:
      A :class:`ComponentCurves`.
    """
    run, auto, precision = settings_lib.resolve(options, (run, RunSettings), (auto, AutoSettings),
                                                (precision, Precision))
    checkpoint_dir, n, _, nbeta, localization = trajectory_inputs(checkpoint_dir, data, step_size=step_size,
                                                                  nbeta=nbeta, localization=localization)
    if not isinstance(components, dict) or not components:
        raise ValueError(f"components must be a non-empty dict name → weight restriction, got {components!r}")
    settings = {
        "checkpoint_dir": str(checkpoint_dir), "item": item, "key": validation.key_data(key), "n": n,
        "step_size": step_size if not hasattr(step_size, "choices") else "calibration", "nbeta": nbeta,
        "localization": localization, "sampler": getattr(sampler, "name", sampler),
        "components": {name: masks.mask_label(r) for name, r in components.items()},
        "eval_data": None if eval_data is None else validation.check_data(eval_data, "eval_data"),
        **settings_lib.to_dict(run), **settings_lib.to_dict(precision),
    }

    def compute(step, params):
        results = estimate_refined_llcs(loss_fn, params, data, jax.random.fold_in(key, step), components=components,
                                        step_size=step_size, localization=localization, nbeta=nbeta, sampler=sampler,
                                        eval_data=eval_data, mesh=mesh, devices=devices, run=run, auto=auto,
                                        precision=precision, progress=False)
        return {"step": int(step), "components": {name: llc_row(step, r, localization) for name, r in results.items()}}

    rows = checkpoint_rows(checkpoint_dir, compute, settings=settings, steps=steps, item=item, select=select,
                           template=template, results_path=results_path, on_row=on_row, prefetch=prefetch,
                           progress=progress)
    curves = {name: LLCCurve(rows=tuple({k: row["components"][name][k] for k in COLUMNS} for row in rows.values()),
                             settings={**settings, "component": name})
              for name in components}
    return ComponentCurves(curves=curves, settings=settings)
