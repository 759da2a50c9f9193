"""``LLCCurve``: λ̂ at each checkpoint of a training run — its table, stages, plots and files.

What :func:`slt_jax.llc_trajectory` returns: one row per checkpoint step (the keys in
``COLUMNS``), the settings that produced them, and the ways to read them — stage detection
(:mod:`slt_jax.curves.stages`), the early-warning statistics (:mod:`slt_jax.curves.early_warning`), plots,
CSV and JSON.
"""

import csv
import dataclasses

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
    """

    rows: tuple
    settings: dict

    def column(self, name: str) -> np.ndarray:
        """One column as a float array (NaN where a value is missing)."""
        if name not in COLUMNS:
            raise ValueError(f"column {name!r} is not one of {COLUMNS}")
        return np.array([np.nan if row.get(name) is None else row[name] for row in self.rows],
                        dtype=np.float64)

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

    def stages(self, *, smoothing: float = 0.1, alpha: float = 0.05) -> Stages:
        """Stage boundaries of the λ̂ curve over the healthy rows (arXiv:2402.02364).

        Args:
          smoothing: Gaussian kernel width in decades of log10(step + 1).
          alpha: false-boundary probability of a trendless curve
            (see :func:`slt_jax.stages.detect_stages`).

        Returns:
          A :class:`~slt_jax.stages.Stages` over the healthy rows.
        """
        keep = self.healthy
        if keep.sum() < 3:
            raise ValueError(f"stage detection needs at least 3 healthy rows, got {int(keep.sum())}")
        return detect_stages(self.steps[keep], self.column("llc_mean")[keep],
                             self.column("llc_se")[keep], smoothing=smoothing, alpha=alpha)

    def early_warning(self, name: str = "llc_mean", *, seed=0, **kwargs) -> EarlyWarning:
        """Early-warning indicators of one column over the healthy rows, one sample per row.

        Args:
          name: the column (e.g. ``"llc_mean"`` or ``"init_loss"``).
          seed: seed of the surrogate series.
          **kwargs: passed to :func:`slt_jax.early_warning.early_warning`.

        Returns:
          An :class:`~slt_jax.early_warning.EarlyWarning`.
        """
        return early_warning(self.column(name)[self.healthy], seed=seed, **kwargs)

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
        keep = self.healthy
        if not keep.any():
            raise ValueError("no healthy rows to plot: every step is flagged")
        loss = self.column("init_loss") if loss is None else np.asarray(loss, np.float64)
        if loss.shape != (len(self.rows),):
            raise ValueError(f"loss must have one value per row ({len(self.rows)}), got shape {loss.shape}")
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
        for event in events:
            fig.axes[0].axvline(event, color="C2", linewidth=0.8, linestyle=":")
        if path is not None and is_primary():  # one writer in a multi-process run
            fig.savefig(local_path(path), format="png", dpi=120)
        return fig

    def write(self, out_dir, *, stages: Stages | None = None, loss=None, events=(), seed=0,
              title: str | None = None) -> dict:
        """Write ``llc_curve.csv``, ``llc_curve.json`` (with the stages), ``llc_curve.png``
        and, with at least 6 healthy rows, ``early_warning.png`` (indicators of λ̂).

        Args:
          out_dir: output directory (created if missing).
          stages: stage boundaries to record and draw.
          loss, events, title: passed to :meth:`plot`.
          seed: seed of the early-warning surrogates.

        Returns:
          The written paths by kind (``csv``, ``json``, ``plot``, ``early_warning``). In a
          multi-process run only process 0 writes; the others return the same paths.
        """
        out = local_path(out_dir, "out_dir")
        if is_primary():
            out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "llc_curve.csv", "json": out / "llc_curve.json"}
        self.to_csv(paths["csv"])
        document = self.to_dict()
        if stages is not None:
            document["stages"] = json_safe({
                "boundaries": stages.boundaries.tolist(), "plateaus": stages.plateaus.tolist(),
                "smoothing": stages.smoothing, "threshold": stages.threshold})
        dump_json(document, paths["json"], indent=1)
        keep = self.healthy
        if keep.any():
            paths["plot"] = out / "llc_curve.png"
            self.plot(paths["plot"], stages=stages, loss=loss, events=events, title=title)
        if keep.sum() >= 6:
            paths["early_warning"] = out / "early_warning.png"
            from slt_jax.plots import plot_early_warning

            plot_early_warning(self.steps[keep], self.column("llc_mean")[keep],
                               self.early_warning(seed=seed), log_steps=True,
                               path=paths["early_warning"])
        return paths

    def to_dict(self) -> dict:
        """A JSON-serialisable dict ``{"settings", "rows"}`` (non-finite numbers as None)."""
        return json_safe({"settings": self.settings, "rows": list(self.rows)})

    def to_json(self, path=None) -> str:
        """Serialise with :meth:`to_dict`; also write to ``path`` if given."""
        return dump_json(self.to_dict(), path, indent=1)

    def to_csv(self, path) -> None:
        """Write the rows as CSV with the columns in ``COLUMNS`` (empty cell for NaN; process 0
        only in a multi-process run)."""
        if not is_primary():
            return
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            for row in json_safe(list(self.rows)):
                writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})

    def __str__(self) -> str:
        lines = [f"{'step':>8} {'λ̂':>9} {'± se':>7} {'L_n(w*)':>11} {'flag':>5}"]
        for row in self.rows:
            mark = "×" if row["flagged"] else ""
            lines.append(f"{row['step']:>8d} {row['llc_mean']:>9.3f} {row['llc_se']:>7.3f} "
                         f"{row['init_loss']:>11.5g} {mark:>5}")
        return "\n".join(lines)
