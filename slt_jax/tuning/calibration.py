"""``Calibration``: what a step-size sweep found — its table, its choice per setting, and why.

:func:`slt_jax.calibrate` (:mod:`slt_jax.tuning.sweep`) returns it; ``estimate_llc(step_size=
calibration)`` and ``step_size="auto"`` read their step size and schedule from it.
"""

import dataclasses
import math
import warnings

import numpy as np

from slt_jax.distributed import is_primary
from slt_jax.errors import CalibrationError, CalibrationWarning
from slt_jax.paths import local_path
from slt_jax.serialization import dump_json, json_safe


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A step-size sweep: one row per chain group, and the recommended step size per setting.

    Attributes:
      step_sizes, nbetas, localizations: each group's ε, nβ, γ, shape ``(groups,)``.
      llc_mean: λ̂ of each group over its window (healthy chains), ``(groups,)``.
      llc_se: its standard error (the larger of the chain-spread and the ESS-based one).
      llc_per_chain: λ̂ of each chain, ``(groups, num_chains)``.
      trend: second-half minus first-half mean of the λ̂ draws in the window.
      mala_acceptance: Metropolis acceptance of the group's Langevin proposals (NaN where
        the check did not run).
      diverged_chains: diverged chains per group.
      window_draws: draws per chain in the group's window.
      status: one of :data:`slt_jax.step_choice.STATUSES` per group.
      reason: why, per group.
      choices: one dict per (nβ, γ) setting: ``nbeta``, ``localization``, ``step_size``
        (``None`` if nothing passed), ``reason``, ``total_time`` (T), ``window_start`` (T_b),
        ``equilibration_time`` (when λ̂ stopped trending at the chosen step size, ``None`` if
        it did not), ``equilibrated`` and ``burnin_time`` (what an estimate should burn in);
        and the evidence: ``verified`` (two consecutive steps agreed), the agreeing ``pair``,
        the pick's extrapolated ``bias`` (``estimate``, ``se``, ``bound``, ``kappa``),
        ``extensions`` (rounds run after the grid for this setting), ``sweeps`` (each round's
        step sizes, steps, chain-steps and seconds) and ``unverified_step_size``.
      settings: the sweep's settings (JSON-ready).
    """

    step_sizes: np.ndarray
    nbetas: np.ndarray
    localizations: np.ndarray
    llc_mean: np.ndarray
    llc_se: np.ndarray
    llc_per_chain: np.ndarray
    trend: np.ndarray
    mala_acceptance: np.ndarray
    diverged_chains: np.ndarray
    window_draws: np.ndarray
    status: tuple
    reason: tuple
    choices: tuple
    settings: dict

    def choice(self, nbeta=None, localization=None) -> dict:
        """The choice for one (nβ, γ) setting; either may be omitted when it was not swept."""
        found = [c for c in self.choices
                 if (nbeta is None or np.isclose(c["nbeta"], nbeta))
                 and (localization is None or np.isclose(c["localization"], localization))]
        if len(found) != 1:
            settings = [(c["nbeta"], c["localization"]) for c in self.choices]
            raise ValueError(f"nbeta={nbeta}, localization={localization} select {len(found)} of the swept "
                             f"(nbeta, localization) settings {settings}; name exactly one")
        return found[0]

    def recommended(self, nbeta=None, localization=None, *, warn: bool = True) -> float:
        """The recommended step size; raises :class:`CalibrationError` when none passed — also
        when no two consecutive step sizes agreed within the grid's extensions (unless the sweep
        ran with ``on_unverified="warn"``: then the smallest stable step, with a
        :class:`CalibrationWarning` whatever ``warn`` says).

        With ``warn`` (default) a choice whose λ̂ still trended at the end of the sweep warns
        (:class:`CalibrationWarning`); ``estimate_llc`` passes ``False``, since it judges
        equilibration on its own chains and warns itself.
        """
        choice = self.choice(nbeta, localization)
        if choice["step_size"] is None:
            raise CalibrationError(f"no step size passed calibration: {choice['reason']}\n{self}")
        if not choice.get("verified", True):
            warnings.warn(f"step size {choice['step_size']:.3g} is {choice['reason']}", CalibrationWarning,
                          stacklevel=2)
        if warn and not choice["equilibrated"]:
            warnings.warn(f"step size {choice['step_size']:.3g}: {choice['reason']}", CalibrationWarning,
                          stacklevel=2)
        return choice["step_size"]

    def schedule(self, step_size, steps_per_draw: int = 1, nbeta=None, localization=None) -> tuple[int, int]:
        """``(num_burnin, num_draws)`` that give ``step_size`` the simulated time the sweep used.

        Burn-in lasts the choice's ``burnin_time / ε`` steps (the later of T_b and the time
        λ̂ stopped trending at the chosen step size) and the draws span the sweep's window,
        ``(T − T_b) / ε`` steps.
        """
        choice = self.choice(nbeta, localization)
        num_burnin = math.ceil(choice["burnin_time"] / step_size)
        sampling = (choice["total_time"] - choice["window_start"]) / step_size
        return num_burnin, max(1, math.ceil(sampling / steps_per_draw))

    def summary(self, nbeta=None, localization=None) -> dict:
        """What an estimate records: the choice for one setting, why, and the whole table."""
        return json_safe({**self.choice(nbeta, localization), "table": self.table(), "settings": self.settings})

    def table(self) -> list[dict]:
        """One dict per group: step size, nβ, γ, λ̂, se, status, reason and the checks."""
        return [
            {"step_size": float(self.step_sizes[g]), "nbeta": float(self.nbetas[g]),
             "localization": float(self.localizations[g]), "llc_mean": float(self.llc_mean[g]),
             "llc_se": float(self.llc_se[g]), "trend": float(self.trend[g]),
             "mala_acceptance": float(self.mala_acceptance[g]),
             "diverged_chains": int(self.diverged_chains[g]), "window_draws": int(self.window_draws[g]),
             "status": self.status[g], "reason": self.reason[g]}
            for g in range(len(self.step_sizes))
        ]

    def to_dict(self) -> dict:
        """A JSON-ready summary: the table, the choices and the settings."""
        return json_safe({"table": self.table(), "choices": list(self.choices), "settings": self.settings})

    def to_json(self, path=None) -> str:
        """Serialise :meth:`to_dict`; also write it to ``path`` if given."""
        return dump_json(self.to_dict(), path)

    def plot(self, path=None, *, nbeta=None, localization=None, reference=None):
        """λ̂ ± 2·s.e. against step size for one (nβ, γ) setting, the choice starred.

        Groups with no healthy chain are left out; every point is labelled with its status.

        Args:
          path: optional PNG path.
          nbeta, localization: which setting (may be omitted when not swept).
          reference: optional known λ to draw as a line.

        Returns:
          The matplotlib ``Figure``.
        """
        choice = self.choice(nbeta, localization)
        rows = [g for g in range(len(self.step_sizes))
                if np.isclose(self.nbetas[g], choice["nbeta"])
                and np.isclose(self.localizations[g], choice["localization"])
                and np.isfinite(self.llc_mean[g])]
        if not rows:
            raise ValueError("no group of this setting has a finite λ̂ to plot (every chain diverged)")
        se = np.nan_to_num(self.llc_se[rows], nan=0.0, posinf=0.0)
        from slt_jax.plots import plot_llc_vs_step_size  # matplotlib only when plotting

        fig = plot_llc_vs_step_size(self.step_sizes[rows], self.llc_mean[rows], se,
                                    chosen=choice["step_size"], reference=reference)
        ax = fig.axes[0]
        for g in rows:
            ax.annotate(self.status[g], (self.step_sizes[g], self.llc_mean[g]), textcoords="offset points",
                        xytext=(4, -12), fontsize="x-small", color="0.3")
        ax.set_title(f"step-size calibration (nβ = {choice['nbeta']:.4g}, γ = {choice['localization']:.3g})",
                     fontsize="medium")
        if path is not None and is_primary():  # one writer in a multi-process run
            fig.savefig(local_path(path), format="png", dpi=120)
        return fig

    def __str__(self) -> str:
        lines = ["| step size | nβ | γ | λ̂ | se | MALA acc. | status |", "|---|---|---|---|---|---|---|"]
        for row in self.table():
            acc = "" if not np.isfinite(row["mala_acceptance"]) else f"{row['mala_acceptance']:.2f}"
            lines.append(f"| {row['step_size']:.3g} | {row['nbeta']:.4g} | {row['localization']:.3g} | "
                         f"{row['llc_mean']:.4g} | {row['llc_se']:.2g} | {acc} | {row['status']} |")
        for c in self.choices:
            step = "none" if c["step_size"] is None else f"{c['step_size']:.3g}"
            lines.append(f"\nnβ = {c['nbeta']:.4g}, γ = {c['localization']:.3g}: step size {step} — {c['reason']}")
        return "\n".join(lines)
