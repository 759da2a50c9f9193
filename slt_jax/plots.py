"""Matplotlib figures for LLC curves, early-warning indicators and step-size calibration.

Figures are built on the Agg canvas without pyplot, so no global figure state is kept and
nothing needs closing; each function returns its ``Figure`` and writes a PNG when given
a ``path``. Log step axes are symmetric-log, linear below 1, when the steps include 0.
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slt_jax.curves.early_warning import EarlyWarning
from slt_jax.distributed import is_primary
from slt_jax.paths import local_path

_LLC_LABEL = r"LLC $\hat\lambda$"


def plot_llc_curve(
    steps, llc_mean, llc_se, *, loss=None, boundaries=None, path=None, title=None
) -> Figure:
    """λ̂ over training with a ±2·s.e. band, the loss above it, and stage boundaries.

    Args:
      steps: checkpoint steps, shape ``(n,)``.
      llc_mean: λ̂ at each checkpoint, shape ``(n,)``.
      llc_se: standard error of λ̂, shape ``(n,)``.
      loss: optional loss at each checkpoint, shape ``(n,)``; drawn in a top panel
        (log-y when positive).
      boundaries: optional stage boundaries in steps (e.g. ``Stages.boundaries``).
      path: optional PNG path to write.
      title: optional figure title.

    Returns:
      The ``Figure``.

    Raises:
      ValueError: naming the offending argument.
    """
    steps = _curve("steps", steps)
    llc_mean = _curve("llc_mean", llc_mean, steps.size)
    llc_se = _curve("llc_se", llc_se, steps.size, non_negative=True)
    loss = None if loss is None else _curve("loss", loss, steps.size)
    boundaries = np.empty(0) if boundaries is None else _curve("boundaries", boundaries)

    fig = _figure(2 if loss is not None else 1, height_per_panel=2.6)
    axes = fig.axes
    if loss is not None:
        axes[0].plot(steps, loss, color="C1")
        axes[0].set_ylabel("loss")
        if np.all(loss > 0):
            axes[0].set_yscale("log")
    ax = axes[-1]
    ax.plot(steps, llc_mean, color="C0", label=_LLC_LABEL)
    ax.fill_between(
        steps, llc_mean - 2 * llc_se, llc_mean + 2 * llc_se, color="C0", alpha=0.25,
        label="± 2 s.e.",
    )
    ax.set_ylabel(_LLC_LABEL)
    for panel in axes:
        _step_axis(panel, steps)
        for k, boundary in enumerate(boundaries):
            panel.axvline(
                boundary, color="0.4", linestyle="--", linewidth=0.8,
                label="stage boundary" if k == 0 and panel is ax else None,
            )
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize="small")
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_early_warning(
    steps, values, early_warning_result: EarlyWarning, *, log_steps=False, path=None
) -> Figure:
    """The series with its trend, and its rolling variance and lag-1 autocorrelation.

    Each indicator is drawn at the last step of its window, with its Kendall τ and
    surrogate p-value (``slt_jax.curves.early_warning``) in the legend; the first window is
    shaded.

    Args:
      steps: step of each sample, shape ``(n,)``.
      values: the series given to ``early_warning``, shape ``(n,)``.
      early_warning_result: the ``EarlyWarning`` computed from ``values``.
      log_steps: log step axis (for log-spaced checkpoints); linear by default, matching
        the indicators' equal-spacing assumption.
      path: optional PNG path to write.

    Returns:
      The ``Figure``.

    Raises:
      ValueError: naming the offending argument.
    """
    steps = _curve("steps", steps)
    values = _curve("values", values, steps.size)
    result = early_warning_result
    if not isinstance(result, EarlyWarning) or result.trend.shape != steps.shape:
        raise ValueError(
            f"early_warning_result must be the EarlyWarning of a series of {steps.size} values"
        )
    window_steps = steps[result.times]

    fig = _figure(3, height_per_panel=2.0)
    series_ax, variance_ax, ac_ax = fig.axes
    series_ax.plot(steps, values, color="0.3", linewidth=0.8, label="series")
    series_ax.plot(steps, result.trend, color="C3", label="trend")
    series_ax.set_ylabel("value")
    variance_ax.plot(
        window_steps, result.variance, color="C0",
        label=_trend_label(result.tau_variance, result.p_variance),
    )
    variance_ax.set_ylabel("rolling variance")
    ac_ax.plot(
        window_steps, result.autocorrelation, color="C2",
        label=_trend_label(result.tau_autocorrelation, result.p_autocorrelation),
    )
    ac_ax.set_ylabel("rolling lag-1 AC")
    ac_ax.set_xlabel("step")
    for panel in fig.axes:
        if log_steps:
            _step_axis(panel, steps)
        panel.axvspan(steps[0], steps[result.window - 1], color="0.85", zorder=0)
        panel.legend(loc="upper left", fontsize="small")
    return _finish(fig, path)


def plot_llc_vs_step_size(
    step_sizes, llc_mean, llc_se, *, chosen=None, reference=None, path=None
) -> Figure:
    """Calibration plot: λ̂ ± 2·s.e. against SGLD step size, log-x.

    Args:
      step_sizes: positive step sizes ε, shape ``(k,)``.
      llc_mean: λ̂ at each step size, shape ``(k,)``.
      llc_se: standard error of λ̂, shape ``(k,)``.
      chosen: optional step size to mark; must be one of ``step_sizes``.
      reference: optional reference λ (e.g. a known ground truth), drawn as a line.
      path: optional PNG path to write.

    Returns:
      The ``Figure``.

    Raises:
      ValueError: naming the offending argument.
    """
    step_sizes = _curve("step_sizes", step_sizes)
    if np.any(step_sizes <= 0):
        raise ValueError("step_sizes must be positive")
    llc_mean = _curve("llc_mean", llc_mean, step_sizes.size)
    llc_se = _curve("llc_se", llc_se, step_sizes.size, non_negative=True)

    fig = _figure(1, height_per_panel=3.2)
    ax = fig.axes[0]
    order = np.argsort(step_sizes)
    ax.errorbar(
        step_sizes[order], llc_mean[order], yerr=2 * llc_se[order], fmt="o-", color="C0",
        capsize=3, label=_LLC_LABEL + " ± 2 s.e.",
    )
    if chosen is not None:
        chosen = float(chosen)
        match = np.flatnonzero(np.isclose(step_sizes, chosen, rtol=1e-9, atol=0.0))
        if match.size == 0:
            raise ValueError(f"chosen must be one of step_sizes, got {chosen}")
        ax.plot(
            step_sizes[match[0]], llc_mean[match[0]], marker="*", markersize=16, color="C3",
            linestyle="none", label=f"chosen ε = {chosen:.3g}",
        )
    if reference is not None:
        reference = float(reference)
        ax.axhline(reference, color="0.3", linestyle=":", label=f"reference λ = {reference:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("step size ε")
    ax.set_ylabel(_LLC_LABEL)
    ax.legend(loc="best", fontsize="small")
    return _finish(fig, path)


def _curve(name, array, size=None, *, non_negative=False):
    array = np.asarray(array, dtype=float)
    if array.ndim != 1 or (size is not None and array.size != size):
        expected = f"({size},)" if size is not None else "1-D"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    if non_negative and np.any(array < 0):
        raise ValueError(f"{name} must be non-negative")
    return array


def _figure(num_panels, height_per_panel):
    fig = Figure(figsize=(7.0, 0.8 + height_per_panel * num_panels), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(num_panels, 1, sharex=True, squeeze=False)
    return fig


def _step_axis(ax, steps):
    if steps.min() > 0:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=1.0)


def _trend_label(tau, p):
    return f"Kendall τ = {tau:.2f}, p = {p:.3f}"


def _finish(fig, path):
    if path is not None and is_primary():  # one writer in a multi-process run
        fig.savefig(local_path(path), format="png", dpi=120)
    return fig
