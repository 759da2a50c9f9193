"""Matplotlib figures for LLC curves, per-chain traces, early-warning indicators and step-size
calibration.

Figures are built on the Agg canvas without pyplot, so no global figure state is kept and
nothing needs closing; each function returns its ``Figure`` and writes a PNG when given
a ``path``. Log step axes are symmetric-log, linear below 1, when the steps include 0.

Its length: one independent function per figure, sharing the canvas helpers at the top.
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slt_jax.curves.early_warning import EarlyWarning
from slt_jax.distributed import is_primary
from slt_jax.paths import local_path

_LLC_LABEL = r"LLC $\hat\lambda$"
_CHAIN_COLORS = ("C0", "C2", "C4", "C5", "C6", "C7", "C8", "C9")  # C1 and C3 mark escaped and diverged chains


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


def plot_curve_panels(steps, panels, *, loss=None, boundaries=None, path=None, title=None) -> Figure:
    """Curves over training, one panel each with a ±2·s.e. band, the loss above them.

    Each panel is drawn over the steps where its values (and standard errors) are finite — a
    susceptibility or other observable (docs/mathematics.md §8) next to λ̂, say.

    Args:
      steps: checkpoint steps, shape ``(n,)``.
      panels: ``(label, values, se)`` triples: an axis label (``None`` for λ̂'s), values of shape
        ``(n,)`` and their standard errors (``None`` for no band).
      loss: optional loss at each checkpoint, drawn in a top panel (log-y when positive).
      boundaries: optional stage boundaries in steps, drawn in every panel.
      path: optional PNG path to write.
      title: optional figure title.

    Returns:
      The ``Figure``.

    Raises:
      ValueError: naming the offending argument.
    """
    steps = _curve("steps", steps)
    loss = None if loss is None else _curve("loss", loss, steps.size)
    boundaries = np.empty(0) if boundaries is None else _curve("boundaries", boundaries)
    if not panels:
        raise ValueError("panels is empty: give at least one (label, values, se) triple")
    fig = _figure(len(panels) + (loss is not None), height_per_panel=2.2)
    axes = fig.axes
    if loss is not None:
        axes[0].plot(steps, loss, color="C1")
        axes[0].set_ylabel("loss")
        if np.all(loss > 0):
            axes[0].set_yscale("log")
    for k, (ax, (label, values, se)) in enumerate(zip(axes[loss is not None:], panels)):
        values = np.asarray(values, dtype=float)
        if values.shape != steps.shape:
            raise ValueError(f"panels[{k}] has {values.shape} values for {steps.size} steps")
        se = np.zeros_like(values) if se is None else np.asarray(se, dtype=float)
        keep = np.isfinite(values) & np.isfinite(se)
        color = f"C{k}" if k else "C0"
        ax.plot(steps[keep], values[keep], color=color)
        ax.fill_between(steps[keep], values[keep] - 2 * se[keep], values[keep] + 2 * se[keep], color=color,
                        alpha=0.25, label="± 2 s.e." if k == 0 else None)
        ax.set_ylabel(_LLC_LABEL if label is None else label)
    for panel in axes:
        _step_axis(panel, steps)
        for k, boundary in enumerate(boundaries):
            panel.axvline(boundary, color="0.4", linestyle="--", linewidth=0.8,
                          label="stage boundary" if k == 0 and panel is axes[-1] else None)
    axes[-1].set_xlabel("step")
    for panel in axes:
        if panel.get_legend_handles_labels()[1]:
            panel.legend(loc="best", fontsize="small")
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


def plot_component_curves(steps, curves: dict, *, loss=None, events=(), path=None, title=None) -> Figure:
    """One λ̂ curve per component (e.g. every attention head's refined LLC) over training.

    Args:
      steps: checkpoint steps, shape ``(n,)``.
      curves: name → ``(llc_mean, llc_se)``, each shape ``(n,)`` (NaN where a row is flagged:
        left out of that component's line).
      loss: optional loss at each checkpoint, drawn in a top panel.
      events: steps to mark (e.g. a loss drop), dotted green.
      path: optional PNG path to write.
      title: optional figure title.

    Returns:
      The ``Figure``.
    """
    steps = _curve("steps", steps)
    if not curves:
        raise ValueError("curves is empty: pass at least one component")
    loss = None if loss is None else _curve("loss", loss, steps.size)
    fig = _figure(2 if loss is not None else 1, height_per_panel=2.8)
    axes = fig.axes
    if loss is not None:
        axes[0].plot(steps, loss, color="0.3")
        axes[0].set_ylabel("loss")
        if np.all(loss > 0):
            axes[0].set_yscale("log")
    ax = axes[-1]
    for k, (name, (mean, se)) in enumerate(curves.items()):
        mean, se = np.asarray(mean, float), np.asarray(se, float)
        if mean.shape != steps.shape or se.shape != steps.shape:
            raise ValueError(f"curves[{name!r}] must hold two arrays of shape {steps.shape}")
        keep = np.isfinite(mean) & np.isfinite(se)
        color = f"C{k % 10}"
        ax.plot(steps[keep], mean[keep], color=color, label=name, linestyle="-" if k < 10 else "--")
        ax.fill_between(steps[keep], (mean - 2 * se)[keep], (mean + 2 * se)[keep], color=color, alpha=0.15)
    ax.set_ylabel(_LLC_LABEL)
    for panel in axes:
        _step_axis(panel, steps)
        for event in events:
            panel.axvline(event, color="C2", linewidth=0.8, linestyle=":")
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize="x-small", ncol=2 if len(curves) > 6 else 1)
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_llc_traces(
    llc_trace, *, steps, burnin, llc_mean=None, llc_se=None, diverged=(), escaped=(),
    distance_trace=None, burnin_label=None, title=None, path=None, max_points=4000,
) -> Figure:
    """Per-chain λ̂ traces (one line per chain) with the burn-in marked and bad chains highlighted.

    Traces longer than ``max_points`` draws are drawn at every k-th draw (a calibrated run can
    record hundreds of thousands); the estimate's line and band are those of all draws.

    Args:
      llc_trace: per-draw λ̂ values, shape ``(chains, draws)``; non-finite values (a diverged
        chain) are left out of the lines.
      steps: the sampler step of each draw, shape ``(draws,)``.
      burnin: steps run before the first draw; shaded as burn-in (draws are recorded after it).
      llc_mean, llc_se: optional estimate drawn as a line with a ±2·s.e. band.
      diverged: indices of diverged chains, drawn in red; the y-range follows the other chains.
      escaped: indices of chains that slid away from w*, drawn dashed in orange.
      distance_trace: optional ``‖w_t − w*‖²`` per draw, ``(chains, draws)``, in a second panel.
      burnin_label: legend text of the burn-in band (default "burn-in (not recorded)").
      title: optional figure title.
      path: optional PNG path to write.
      max_points: the most draws per chain drawn.

    Returns:
      The ``Figure``.

    Raises:
      ValueError: naming the offending argument.
    """
    trace = np.asarray(llc_trace, dtype=float)
    if trace.ndim != 2 or trace.shape[1] < 1:
        raise ValueError(f"llc_trace must have shape (chains, draws), got {trace.shape}")
    steps = _curve("steps", steps, trace.shape[1])
    if not np.isfinite(burnin) or burnin < 0:
        raise ValueError(f"burnin must be a non-negative number, got {burnin!r}")
    diverged, escaped = set(int(c) for c in diverged), set(int(c) for c in escaped)
    if any(not 0 <= c < trace.shape[0] for c in diverged | escaped):
        raise ValueError(f"diverged and escaped must be chain indices below {trace.shape[0]}")
    panels = [("llc", trace)]
    if distance_trace is not None:
        distance = np.asarray(distance_trace, dtype=float)
        if distance.shape != trace.shape:
            raise ValueError(f"distance_trace must have the shape of llc_trace {trace.shape}, got {distance.shape}")
        panels.append(("distance", distance))
    stride = max(1, -(-trace.shape[1] // max_points))
    steps, panels = steps[::stride], [(kind, values[:, ::stride]) for kind, values in panels]

    fig = _figure(len(panels), height_per_panel=2.6)
    for ax, (kind, values) in zip(fig.axes, panels):
        labelled = set()
        for chain, row in enumerate(values):
            row = np.where(np.isfinite(row), row, np.nan)
            if chain in diverged:
                style, label = dict(color="C3", linewidth=1.0, zorder=3), "diverged chain"
            elif chain in escaped:
                style, label = dict(color="C1", linewidth=1.0, linestyle="--", zorder=3), "escaped chain"
            else:
                style, label = dict(color=_CHAIN_COLORS[chain % len(_CHAIN_COLORS)], linewidth=0.6,
                                    alpha=0.7), None
            ax.plot(steps, row, label=label if label not in labelled else None, **style)
            labelled.add(label)
        held = [c for c in range(values.shape[0]) if c not in diverged]
        finite = values[held][np.isfinite(values[held])] if held else np.empty(0)
        if finite.size:  # keep the healthy chains readable: a diverged one would flatten them
            low, high = finite.min(), finite.max()
            margin = 0.1 * (high - low) or 1.0
            ax.set_ylim(low - margin, high + margin)
        ax.axvspan(0, burnin, color="0.85", zorder=0, label=(burnin_label or "burn-in (not recorded)")
                   if kind == "llc" else None)
        ax.set_xlim(0, steps[-1])
        ax.set_ylabel(_LLC_LABEL if kind == "llc" else r"$\|w_t - w^*\|^2$")
    ax = fig.axes[0]
    if llc_mean is not None and np.isfinite(llc_mean):
        ax.hlines(llc_mean, steps[0], steps[-1], color="k", linewidth=1.2, label=f"λ̂ = {llc_mean:.4g}", zorder=4)
        if llc_se is not None and np.isfinite(llc_se):
            ax.fill_between(steps[[0, -1]], llc_mean - 2 * llc_se, llc_mean + 2 * llc_se, color="k", alpha=0.12,
                            label="± 2 s.e.")
    ax.legend(loc="best", fontsize="small")
    fig.axes[-1].set_xlabel("sampler step")
    if title is not None:
        fig.suptitle(title)
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
