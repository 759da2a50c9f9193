"""``LLCCurve``: λ̂ at each checkpoint of a training run — its table, stages, plots and files.

What :func:`slt_jax.llc_trajectory` returns: one row per checkpoint step (the keys in
``COLUMNS``), the settings that produced them, and the ways to read them — stage detection
(:mod:`slt_jax.curves.stages`), the early-warning statistics (:mod:`slt_jax.curves.early_warning`), plots,
CSV and JSON.

Its length: :class:`LLCCurve` is one result type with its table, stages, plots, files and
summary; each method is short.
"""

import csv
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from slt_jax.curves.early_warning import EarlyWarning, early_warning
from slt_jax.curves.stages import Stages, detect_stages
from slt_jax.distributed import is_primary
from slt_jax.paths import local_path
from slt_jax.serialization import dump_json, json_safe

COLUMNS = (
    "step", "llc_mean", "llc_std", "llc_se", "init_loss", "free_energy_approx", "nbeta",
    "localization", "n", "num_chains", "diverged_chains", "escaped_chains", "flagged", "ess",
    "rhat", "step_size", "calibrated_at",
)


# early_warning's default window is half the series and must span at least 4 values.
MIN_EARLY_WARNING_ROWS = 8


class WrittenFiles(dict):
    """The paths :meth:`LLCCurve.write` wrote, by kind, with ``skipped``: the outputs the rows
    did not allow, by kind, each with a one-line reason."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class LLCCurve:
    """λ̂ at each checkpoint of a training run, with the settings that produced it.

    Attributes:
      rows: one dict per checkpoint step, sorted by step, with the keys in ``COLUMNS``:
        ``llc_mean``/``llc_std``/``llc_se`` (over chains that neither diverged nor escaped),
        ``init_loss`` (L_n(w*)), ``free_energy_approx`` (``n·L_n(w*) + λ̂·log n``, Watanabe's
        asymptotic free energy without the O(log log n) term; meaningful when the loss is
        the per-sample negative log-likelihood in nats), ``nbeta``, ``localization``, ``n``,
        ``num_chains``, ``diverged_chains`` and ``escaped_chains`` (counts), ``flagged``
        (any chain diverged or escaped), ``ess`` and ``rhat`` of the λ̂ trace, ``step_size``
        (the step the estimate ended with) and ``calibrated_at`` (the checkpoint whose
        calibration it used; empty for a fixed step).
      settings: every setting shared by the rows (JSON-ready).
      results: optionally, each step's :class:`~slt_jax.LLCResult` (with its draws), by step;
        not written to files (see :meth:`to_arviz`).
    """

    rows: tuple
    settings: dict
    results: Mapping[int, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def column(self, name: str) -> np.ndarray:
        """One column as a float array (NaN where a value is missing)."""
        if name not in self.columns:
            raise ValueError(f"column {name!r} is not one of {self.columns}")
        return np.array([np.nan if row.get(name) is None else row[name] for row in self.rows],
                        dtype=np.float64)

    @property
    def columns(self) -> tuple:
        """``COLUMNS``, then the observable columns every row carries (e.g. ``"chi/model/q"``,
        from :func:`slt_jax.observable_trajectory`), in the order of the first row."""
        extra = [k for k in (self.rows[0] if self.rows else {}) if k not in COLUMNS]
        return COLUMNS + tuple(k for k in extra if all(k in row for row in self.rows))

    def se_column(self, name: str) -> str | None:
        """The standard-error column of ``name`` (``"llc_se"`` for ``"llc_mean"``, else
        ``name + "_se"``), or ``None`` when the curve has none."""
        se = "llc_se" if name == "llc_mean" else f"{name}_se"
        return se if se in self.columns else None

    @property
    def steps(self) -> np.ndarray:
        """Checkpoint steps, shape ``(rows,)``."""
        return np.array([row["step"] for row in self.rows], dtype=np.int64)

    @property
    def healthy(self) -> np.ndarray:
        """Rows to trust: not flagged, with a finite λ̂ and standard error."""
        flagged = np.array([bool(row["flagged"]) for row in self.rows], dtype=bool)
        finite = np.isfinite(self.column("llc_mean")) & np.isfinite(self.column("llc_se"))
        return finite & ~flagged

    def stages(self, name: str = "llc_mean", *, smoothing: float = 0.1, alpha: float = 0.05) -> Stages:
        """Stage boundaries of one column's curve over the healthy rows (arXiv:2402.02364).

        Args:
          name: the column, λ̂ by default; any observable column (a susceptibility, say) works
            the same, with its ``_se`` column as standard errors when it has one.
          smoothing: Gaussian kernel width in decades of log10(step + 1).
          alpha: false-boundary probability of a trendless curve
            (see :func:`slt_jax.stages.detect_stages`).

        Returns:
          A :class:`~slt_jax.stages.Stages` over the healthy rows.
        """
        keep = self.healthy & np.isfinite(self.column(name))
        if keep.sum() < 3:
            raise ValueError(f"stage detection needs at least 3 healthy rows, got {int(keep.sum())}")
        se = self.se_column(name)
        return detect_stages(self.steps[keep], self.column(name)[keep],
                             None if se is None else self.column(se)[keep], smoothing=smoothing, alpha=alpha)

    def early_warning(self, name: str = "llc_mean", *, seed=0, **kwargs) -> EarlyWarning:
        """Early-warning indicators of one column over the healthy rows, one sample per row.

        Args:
          name: the column (e.g. ``"llc_mean"`` or ``"init_loss"``).
          seed: seed of the surrogate series.
          **kwargs: passed to :func:`slt_jax.early_warning.early_warning`.

        Returns:
          An :class:`~slt_jax.early_warning.EarlyWarning`.
        """
        keep = self.healthy & np.isfinite(self.column(name))
        return early_warning(self.column(name)[keep], seed=seed, **kwargs)

    def _plotted(self, loss):
        """``(healthy rows, the loss panel's values)`` for a plot; raises if nothing can be drawn."""
        keep = self.healthy
        if not keep.any():
            raise ValueError("no healthy rows to plot: every step is flagged")
        loss = self.column("init_loss") if loss is None else np.asarray(loss, np.float64)
        if loss.shape != (len(self.rows),):
            raise ValueError(f"loss must have one value per row ({len(self.rows)}), got shape {loss.shape}")
        return keep, loss

    def plot_panels(self, names, path=None, *, stages: Stages | None = None, loss=None, events=(),
                    title: str | None = None):
        """Loss, λ̂ and one panel per column of ``names`` (± 2 s.e. where it has a ``_se``
        column), over the healthy rows, with stage boundaries and events.

        Args:
          names: observable columns, e.g. ``["chi/model/teacher_mode_2"]``; a ``(column,
            label)`` pair sets the panel's axis label.
          path: optional PNG path.
          stages, loss, events, title: as for :meth:`plot`.

        Returns:
          The matplotlib ``Figure``.
        """
        keep, loss = self._plotted(loss)
        panels = []
        for item in ["llc_mean", *names]:
            name, label = item if isinstance(item, tuple) else (item, None)
            se = self.se_column(name)
            panels.append((label or name, self.column(name)[keep],
                           None if se is None else self.column(se)[keep]))
        from slt_jax.plots import plot_curve_panels  # matplotlib only when plotting

        panels[0] = (None, *panels[0][1:])  # the λ̂ panel keeps its own label
        fig = plot_curve_panels(self.steps[keep], panels, loss=loss[keep],
                                boundaries=None if stages is None else stages.boundaries, title=title)
        for event in events:
            fig.axes[0].axvline(event, color="C2", linewidth=0.8, linestyle=":")
        if path is not None and is_primary():  # one writer in a multi-process run
            fig.savefig(local_path(path), format="png", dpi=120)
        return fig

    def plot(self, path=None, *, stages: Stages | None = None, loss=None, events=(),
             title: str | None = None):
        """Loss and λ̂ (± 2 s.e.) over steps, stage boundaries, flagged steps marked with ×.

        Args:
          path: optional PNG path.
          stages: boundaries to draw (e.g. :meth:`stages`).
          loss: the loss to draw above λ̂, one value per row; default ``init_loss``.
          events: steps to mark on the loss panel (e.g. known loss drops), dotted green.
          title: optional figure title.

        Returns:
          The matplotlib ``Figure``.
        """
        keep, loss = self._plotted(loss)
        from slt_jax.plots import plot_llc_curve  # matplotlib only when plotting

        fig = plot_llc_curve(
            self.steps[keep], self.column("llc_mean")[keep], self.column("llc_se")[keep],
            loss=loss[keep], boundaries=None if stages is None else stages.boundaries, title=title,
        )
        if not keep.all():
            # The loss is valid at every step, flagged or not: draw all of it.
            loss_ax, llc_ax = fig.axes
            loss_ax.lines[0].set_data(self.steps, loss)
            loss_ax.relim()
            loss_ax.autoscale_view()
            llc_ax.plot(self.steps[~keep], np.full(int((~keep).sum()), llc_ax.get_ylim()[0]), "x",
                        color="C3", clip_on=False, label="flagged: chains escaped or diverged")
            llc_ax.legend(loc="best", fontsize="small")
            if self.steps.min() <= 0 < self.steps[keep].min():  # a log axis cannot show step 0
                for ax in fig.axes:
                    ax.set_xscale("symlog", linthresh=1.0)
        for event in events:
            fig.axes[0].axvline(event, color="C2", linewidth=0.8, linestyle=":")
        if path is not None and is_primary():  # one writer in a multi-process run
            fig.savefig(local_path(path), format="png", dpi=120)
        return fig

    def write(self, out_dir, *, stages: Stages | None = None, loss=None, events=(), seed=0,
              title: str | None = None) -> "WrittenFiles":
        """Write ``llc_curve.csv`` and ``llc_curve.json`` (with the stages), then the figures the
        rows allow: ``llc_curve.png`` (at least one healthy row) and ``early_warning.png``
        (indicators of λ̂; at least 8 healthy rows, so that its rolling window of half of them
        spans ≥ 4).

        The CSV and JSON are written first, so nothing computed is lost to a figure; a figure
        that the rows do not allow, or whose statistics fail on them, is skipped and the reason
        kept in the returned ``skipped`` (one line each): short, sparse or all-flagged
        trajectories write what they can and never raise here.

        Args:
          out_dir: output directory (created if missing).
          stages: stage boundaries to record and draw.
          loss, events, title: passed to :meth:`plot`.
          seed: seed of the early-warning surrogates.

        Returns:
          The written paths by kind (``csv``, ``json``, ``plot``, ``early_warning``), a dict
          whose ``skipped`` attribute maps each skipped kind to why. In a multi-process run only
          process 0 writes; the others return the same paths.
        """
        out = local_path(out_dir, "out_dir")
        if is_primary():
            out.mkdir(parents=True, exist_ok=True)
        paths = WrittenFiles(csv=out / "llc_curve.csv", json=out / "llc_curve.json")
        self.to_csv(paths["csv"])
        document = self.to_dict()
        if stages is not None:
            document["stages"] = json_safe({
                "boundaries": stages.boundaries.tolist(), "plateaus": stages.plateaus.tolist(),
                "smoothing": stages.smoothing, "threshold": stages.threshold})
        dump_json(document, paths["json"], indent=1)
        keep = self.healthy
        healthy = int(keep.sum())
        if not healthy:
            paths.skipped["plot"] = (f"llc_curve.png skipped: no healthy rows to plot ({len(self.rows)} flagged "
                                     "or without λ̂)")
        else:
            try:
                self.plot(out / "llc_curve.png", stages=stages, loss=loss, events=events, title=title)
                paths["plot"] = out / "llc_curve.png"
            except ValueError as error:
                paths.skipped["plot"] = f"llc_curve.png skipped: {error}"
        if healthy < MIN_EARLY_WARNING_ROWS:
            paths.skipped["early_warning"] = (
                f"early_warning.png skipped: the indicators need at least {MIN_EARLY_WARNING_ROWS} healthy rows "
                f"(a rolling window of half of them, at least 4), the curve has {healthy}")
        else:
            try:
                from slt_jax.plots import plot_early_warning

                plot_early_warning(self.steps[keep], self.column("llc_mean")[keep],
                                   self.early_warning(seed=seed), log_steps=True,
                                   path=out / "early_warning.png")
                paths["early_warning"] = out / "early_warning.png"
            except ValueError as error:
                paths.skipped["early_warning"] = f"early_warning.png skipped: {error}"
        return paths

    def to_arviz(self) -> dict:
        """The draws of each checkpoint as ``{step: arviz.InferenceData}``
        (:meth:`slt_jax.LLCResult.to_arviz`: ``llc``, ``loss`` and ``distance`` with dims
        ``(chain, draw)``), for the steps whose :class:`~slt_jax.LLCResult` the curve holds.

        One InferenceData per checkpoint: checkpoints may differ in their number of draws (a
        calibrated step size sets its own schedule) and each is a separate posterior, so they
        share no ``(chain, draw)`` grid. A curve's rows are summaries; the draws are there only
        where ``results`` was given (a curve read back from JSON or a results store has none).

        Raises:
          ValueError: when the curve holds no draws.
          ImportError: naming the extra when ArviZ is not installed.
        """
        if not self.results:
            raise ValueError("this curve holds no draws, only per-checkpoint summaries: build it with "
                             "results={step: LLCResult} to export draws")
        return {int(step): result.to_arviz() for step, result in sorted(self.results.items())}

    def to_dict(self) -> dict:
        """A JSON-serialisable dict ``{"settings", "rows"}`` (non-finite numbers as None)."""
        return json_safe({"settings": self.settings, "rows": list(self.rows)})

    def to_json(self, path=None) -> str:
        """Serialise with :meth:`to_dict`; also write to ``path`` if given."""
        return dump_json(self.to_dict(), path, indent=1)

    def to_csv(self, path) -> None:
        """Write the rows as CSV with the columns in :attr:`columns` (empty cell for NaN; process 0
        only in a multi-process run)."""
        if not is_primary():
            return
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=self.columns)
            writer.writeheader()
            for row in json_safe(list(self.rows)):
                writer.writerow({key: "" if row.get(key) is None else row[key] for key in self.columns})

    def summary(self, stages: Stages | None = None) -> str:
        """The rows as a table, with a footer: flagged rows and why, rows whose R-hat or ESS is
        flagged (the thresholds of :class:`~slt_jax.LLCResult`'s summary), the stage boundaries
        (when ``stages`` is given) and how the step size was chosen."""
        from slt_jax.results import MIN_ESS_PER_CHAIN, RHAT_THRESHOLD

        lines = [f"{'step':>8} {'λ̂':>9} {'± se':>7} {'L_n(w*)':>11} {'R-hat':>6} {'ESS':>6} {'chains':>7} "
                 f"{'step size':>9} {'flag':>4}"]
        flagged, bad_rhat, low_ess = [], [], []
        for row in self.rows:
            held = row["num_chains"] - row["diverged_chains"] - row["escaped_chains"]
            if row["flagged"]:
                why = [f"{row[k]} {k.split('_')[0]}" for k in ("diverged_chains", "escaped_chains") if row[k]]
                flagged.append(f"{row['step']} ({', '.join(why) or 'no λ̂'})")
            rhat, ess = _float(row.get("rhat")), _float(row.get("ess"))
            if rhat > RHAT_THRESHOLD:
                bad_rhat.append(str(row["step"]))
            if ess < MIN_ESS_PER_CHAIN * max(held, 1):
                low_ess.append(str(row["step"]))
            chains = f"{held}/{row['num_chains']}"
            lines.append(f"{row['step']:>8d} {_float(row['llc_mean']):>9.3f} {_float(row['llc_se']):>7.3f} "
                         f"{_float(row['init_loss']):>11.5g} {rhat:>6.3f} {ess:>6.0f} {chains:>7} "
                         f"{_float(row.get('step_size')):>9.3g} {'×' if row['flagged'] else '':>4}")
        healthy = int(self.healthy.sum())
        lines.append(f"{len(self.rows)} checkpoints, {healthy} healthy")
        if flagged:
            lines.append(f"flagged (chains diverged or slid away from w*; left out of the λ̂ plot and the stages): "
                         f"steps {', '.join(flagged)}")
        if bad_rhat:
            lines.append(f"R-hat above {RHAT_THRESHOLD} at steps {', '.join(bad_rhat)}")
        if low_ess:
            lines.append(f"ESS below {MIN_ESS_PER_CHAIN} per healthy chain at steps {', '.join(low_ess)}")
        if stages is not None:
            boundaries = ", ".join(f"{b:.0f}" for b in stages.boundaries) or "none"
            lines.append(f"stage boundaries at steps {boundaries} (smoothing {stages.smoothing:g} decades)")
        step_sizes = self.column("step_size")
        calibrated = {row.get("calibrated_at") for row in self.rows} - {None}
        if calibrated:
            where = "at each checkpoint" if len(calibrated) > 1 or len(self.rows) == 1 else \
                f"once, at step {next(iter(calibrated))}"
            lines.append(f"step size calibrated {where}: {np.nanmin(step_sizes):.3g} to {np.nanmax(step_sizes):.3g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _float(value) -> float:
    return np.nan if value is None else float(value)
