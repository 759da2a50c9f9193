"""Figures: each writes a non-empty PNG, leaves no pyplot state, and rejects bad input."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from slt_jax.curves.early_warning import early_warning
from slt_jax.plots import plot_early_warning, plot_llc_curve, plot_llc_vs_step_size
from slt_jax.curves.stages import detect_stages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def _llc_curve(steps):
    x = np.log10(steps + 1.0)
    llc = 5.0 + 10.0 / (1.0 + np.exp(-(x - 2.5) / 0.1))
    se = 0.3 + 0.02 * llc
    noisy = llc + se * np.random.default_rng(0).normal(size=steps.size)
    return noisy, se


@pytest.mark.parametrize("with_loss", [True, False])
def test_plot_llc_curve_writes_png(tmp_path, with_loss):
    steps = np.concatenate([[0.0], np.unique(np.round(np.logspace(0, 4, 80)))])
    llc, se = _llc_curve(steps)
    loss = 2.0 / (1.0 + steps / 100.0) if with_loss else None
    stages = detect_stages(steps, llc, se)
    path = tmp_path / "llc.png"
    fig = plot_llc_curve(
        steps, llc, se, loss=loss, boundaries=stages.boundaries, path=path, title="toy"
    )
    assert isinstance(fig, Figure)
    assert len(fig.axes) == (2 if with_loss else 1)
    assert stages.boundaries.size > 0
    _assert_png(path)
    assert plt.get_fignums() == []


@pytest.mark.parametrize("log_steps", [False, True])
def test_plot_early_warning_writes_png(tmp_path, log_steps):
    steps = np.arange(0, 3000, 10)
    values = np.random.default_rng(0).normal(size=steps.size).cumsum()
    result = early_warning(values, seed=0, num_surrogates=20)
    path = tmp_path / "ews.png"
    fig = plot_early_warning(steps, values, result, log_steps=log_steps, path=path)
    assert len(fig.axes) == 3
    assert fig.axes[-1].get_xscale() == ("symlog" if log_steps else "linear")
    _assert_png(path)
    assert plt.get_fignums() == []


def test_plot_llc_vs_step_size_writes_png(tmp_path):
    step_sizes = np.logspace(-6, -3, 7)
    llc = np.array([1.4, 1.45, 1.5, 1.52, 1.6, 2.1, 3.5])
    se = np.full(7, 0.05)
    path = tmp_path / "calibration.png"
    fig = plot_llc_vs_step_size(
        step_sizes, llc, se, chosen=step_sizes[3], reference=1.5, path=str(path)
    )
    assert fig.axes[0].get_xscale() == "log"
    _assert_png(path)
    assert plt.get_fignums() == []


def test_figures_without_path_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plot_llc_vs_step_size([1e-4, 1e-3], [1.0, 1.1], [0.1, 0.1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: plot_llc_curve([1, 2, 3], [1.0, 2.0], [0.1, 0.1, 0.1]), "llc_mean"),
        (lambda: plot_llc_curve([1, 2, 3], [1.0, 2.0, 3.0], [0.1, -0.1, 0.1]), "llc_se"),
        (lambda: plot_llc_curve([1, 2], [1.0, 2.0], [0.1, 0.1], loss=[1.0]), "loss"),
        (lambda: plot_llc_curve([1, 2], [1.0, np.nan], [0.1, 0.1]), "llc_mean"),
        (lambda: plot_llc_vs_step_size([0.0, 1e-3], [1.0, 1.0], [0.1, 0.1]), "step_sizes"),
        (
            lambda: plot_llc_vs_step_size([1e-4, 1e-3], [1.0, 1.0], [0.1, 0.1], chosen=5e-4),
            "chosen",
        ),
        (
            lambda: plot_early_warning(
                np.arange(30), np.zeros(30),
                early_warning(np.sin(np.arange(40.0)), seed=0, num_surrogates=5),
            ),
            "early_warning_result",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
