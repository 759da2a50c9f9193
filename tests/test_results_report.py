"""What a researcher reads off an estimate: the health summary of ``print(result)``, the per-chain
trace figure, the warnings kept in the result, and the export to ArviZ.

The estimates sample the demo's deep linear network with the static settings of
tests/trajectory/test_trajectory.py, so a process that ran those reuses their compiled program.
"""

import dataclasses
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from slt_jax import DivergenceWarning, estimate_llc
from slt_jax.demos.dln_trajectory import teacher
from slt_jax.estimators.diagnostics import effective_sample_size
from slt_jax.models.dln import dln_data, dln_loss
from slt_jax.results import import_arviz

SAMPLER = dict(step_size=5e-7, localization=100.0, num_chains=8, num_burnin=100, num_draws=200, batch_size=100,
               chunk_size=100, progress=False)


@pytest.fixture(scope="module")
def problem():
    key_teacher, key_data = jax.random.split(jax.random.key(0))
    minimum = teacher(key_teacher)
    return minimum, dln_data(key_data, minimum, 10_000)


@pytest.fixture(scope="module")
def result(problem):
    minimum, data = problem
    return estimate_llc(dln_loss, minimum, data, jax.random.key(0), **SAMPLER)


def arviz():
    try:
        return import_arviz()
    except ImportError:
        pytest.skip('ArviZ is not installed (pip install -e ".[arviz]")')


def test_the_summary_gives_the_estimate_and_its_verdicts(result):
    lines = str(result).splitlines()
    assert lines[0] == f"λ̂ = {result.llc_mean:.4g} ± {result.llc_se:.2g} (se; 8 chains, nβ = {result.nbeta:.4g})"
    assert lines[1] == "  sgld, step size 5e-07, γ = 100, n = 10000; 200 draws per chain after 100 burn-in steps"
    assert lines[2] == "  chains: 8 of 8 healthy"
    d = result.diagnostics
    rhat = "FLAGGED: above 1.01" if d.rhat > 1.01 else "ok, ≤ 1.01"
    ess = "ok, ≥ 800" if d.ess >= 800 else "LOW: below 800"
    assert lines[3] == f"  R-hat {d.rhat:.3f} ({rhat}); ESS {d.ess:.0f} ({ess} = 100 per chain); MCSE {d.mcse:.2g}"
    assert len(lines) == 4 and result.settings["warnings"] == []


def test_a_calibrated_run_reports_its_choice_and_equilibration(result):
    calibrated = dataclasses.replace(result, settings={
        **result.settings, "num_burnin": 1500, "warnings": ["CalibrationWarning: λ̂ still trends"],
        "calibration": {"step_size": 5e-7, "reason": "the largest step size that agrees", "table": [{}] * 4},
        "equilibration": {"equilibrated": False, "num_steps": 4000, "planned_steps": 2000, "extensions": 1,
                          "plateau": True, "still_at_plateau": False,
                          "stiffness": [{"step_size": 1e-6}, {"step_size": 5e-7}]}})
    text = str(calibrated)
    assert "  calibration: step size 5e-07 chosen from 4 — the largest step size that agrees" in text
    assert ("  equilibration: NOT settled (λ̂ still trending or moving) after 4000 steps; burn-in read off the λ̂ "
            "trace: 1500 steps; 1 doubling(s) of the 2000-step schedule; sat on the Laplace plateau; step size "
            "halved 1 time(s) where the chains met stiffer ground") in text
    assert text.endswith("  warning: CalibrationWarning: λ̂ still trends")


def test_diverged_chains_are_named_drawn_and_their_warning_kept(problem, tmp_path):
    minimum, data = problem
    # A divergence threshold inside the chains' own spread of nβ·(L_B − L_n(w*)): some cross it.
    with pytest.warns(DivergenceWarning) as caught:
        diverging = estimate_llc(dln_loss, minimum, data, jax.random.key(0), divergence_threshold=10.0, **SAMPLER)
    bad = diverging.diverged_chains
    assert 0 < len(bad) < 8
    assert diverging.settings["warnings"] == [f"DivergenceWarning: {caught[0].message}"]
    text = str(diverging)
    assert f"chains: {8 - len(bad)} of 8 healthy; diverged {bad} at steps {diverging.diverged_at}" in text
    assert "warning: DivergenceWarning:" in text
    fig = diverging.plot_traces(tmp_path / "traces.png")
    assert (tmp_path / "traces.png").read_bytes()[:4] == b"\x89PNG" and len(fig.axes) == 2
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels.count("diverged chain") == 1
    assert sum(line.get_color() == "C3" for line in fig.axes[0].lines) == len(bad)
    assert any("burn-in: 100 steps" in text.get_text() for text in fig.axes[0].get_legend().get_texts())


def test_chains_that_slide_away_are_named_escaped(problem):
    minimum, data = problem
    # Half the teacher is far from any critical point: every chain slides downhill.
    slid = estimate_llc(dln_loss, [0.5 * w for w in minimum], data, jax.random.key(0), **{**SAMPLER,
                                                                                          "localization": 1.0})
    assert slid.escaped().all()
    assert "chains: 0 of 8 healthy; escaped [0, 1, 2, 3, 4, 5, 6, 7] (slid away from w*" in str(slid)


def test_warnings_are_emitted_once_and_kept(problem):
    minimum, data = problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimate_llc(dln_loss, minimum, data, jax.random.key(0), divergence_threshold=10.0, **SAMPLER)
    assert [w.category for w in caught] == [DivergenceWarning]  # recorded in the result, emitted once


def test_arviz_export_round_trips_the_draws_and_agrees_on_the_diagnostics(result):
    az = arviz()
    idata = result.to_arviz()
    for name, trace in [("llc", result.llc_trace), ("loss", result.loss_trace), ("distance", result.distance_trace)]:
        assert idata.posterior[name].dims == ("chain", "draw")
        np.testing.assert_array_equal(idata.posterior[name].values, trace)
    assert not idata.sample_stats["diverging"].values.any()
    assert idata.posterior.attrs["llc_mean"] == result.llc_mean and idata.posterior.attrs["sampler"] == "sgld"
    # Split R-hat: the same classic (not rank-normalised) estimator in both, to rounding.
    rhat = float(az.rhat(idata, var_names="llc", method="split")["llc"])
    assert rhat == pytest.approx(result.diagnostics.rhat, rel=1e-9)
    # ESS: ArviZ's "mean" ESS is Geyer's initial monotone sequence on split chains; numpyro's (ours)
    # is the same sequence on whole chains. On the same split chains they differ only by the one
    # extra autocorrelation pair ArviZ adds to τ (its antithetic correction): a few per cent of
    # these short traces' ESS ≈ 15 (3.2 % measured), so 10 %. Whole against split chains differ by
    # the split itself, which is large for short, slowly mixing chains: the same order of magnitude.
    ess = float(az.ess(idata, var_names="llc", method="mean")["llc"])
    half = result.llc_trace.shape[1] // 2
    split = np.concatenate([result.llc_trace[:, :half], result.llc_trace[:, -half:]])
    assert ess == pytest.approx(effective_sample_size(split), rel=0.1)
    assert 0.3 < ess / result.diagnostics.ess < 3


def test_to_arviz_names_the_extra_when_arviz_is_missing(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r'pip install "slt-jax\[arviz\]"'):
        result.to_arviz()


def test_import_slt_jax_and_its_command_load_no_heavy_module():
    code = ("import sys, slt_jax, slt_jax.cli; "
            "print(sorted(m for m in ('jax', 'matplotlib', 'orbax', 'numpyro', 'arviz') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # JAX too: the command imports it when it runs, after setting XLA_FLAGS for --devices.
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
