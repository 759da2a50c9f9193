"""Short, sparse and all-flagged curves write their numbers and whatever figures their rows allow,
and say in one line what they skipped; their summary names flagged rows, verdicts and stages.

Curves are built directly from rows (tests/test_cli.py writes one from a real run)."""

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.trajectory.curve import COLUMNS, MIN_EARLY_WARNING_ROWS, LLCCurve


def row(step, *, flagged=False, escaped=0, rhat=1.002, calibrated_at=None):
    llc = math.nan if flagged else 3.0 + math.log1p(step)
    return {"step": step, "llc_mean": llc, "llc_std": 0.5, "llc_se": math.nan if flagged else 0.2,
            "init_loss": 1.0 / (1 + step), "free_energy_approx": 1.0, "nbeta": 100.0, "localization": 10.0,
            "n": 1000, "num_chains": 8, "diverged_chains": 0, "escaped_chains": escaped, "flagged": flagged,
            "ess": 900.0, "rhat": rhat, "step_size": 1e-5 * (1 + step % 3), "calibrated_at": calibrated_at}


def curve_of(rows):
    return LLCCurve(rows=tuple(rows), settings={"step_size": 1e-5})


@pytest.mark.parametrize("num_rows", [1, 2, 5, 6, 12])
def test_short_curves_write_what_their_rows_allow(tmp_path, num_rows):
    curve = curve_of(row(10 * i) for i in range(num_rows))
    paths = curve.write(tmp_path)
    expected = {"csv", "json", "plot"} | ({"early_warning"} if num_rows >= 12 else set())
    assert set(paths) == expected
    for path in paths.values():
        assert path.stat().st_size > 0
    if num_rows < MIN_EARLY_WARNING_ROWS:
        assert list(paths.skipped) == ["early_warning"]
        assert paths.skipped["early_warning"].count("\n") == 0
        assert f"at least {MIN_EARLY_WARNING_ROWS} healthy rows" in paths.skipped["early_warning"]
        assert f"the curve has {num_rows}" in paths.skipped["early_warning"]
    with open(paths["csv"], newline="") as file:
        assert len(list(csv.DictReader(file))) == num_rows


def test_an_all_flagged_curve_writes_its_numbers(tmp_path):
    curve = curve_of(row(step, flagged=True, escaped=8) for step in (0, 10, 300))
    paths = curve.write(tmp_path, title="all flagged")
    assert set(paths) == {"csv", "json"} and set(paths.skipped) == {"plot", "early_warning"}
    assert paths.skipped["plot"] == "llc_curve.png skipped: no healthy rows to plot (3 flagged or without λ̂)"
    assert [r["llc_mean"] for r in json.loads(paths["json"].read_text())["rows"]] == [None, None, None]
    text = str(curve)
    assert "3 checkpoints, 0 healthy" in text and "steps 0 (8 escaped), 10 (8 escaped), 300 (8 escaped)" in text


def test_rows_read_back_from_json_write_again(tmp_path):
    rows = [row(step) for step in (0, 10, 100, 1000)]
    rows[1] = row(10, flagged=True, escaped=3)
    first = curve_of(rows).write(tmp_path / "first")
    # JSON holds non-finite numbers as null: the rows come back with None in them.
    document = json.loads(first["json"].read_text())
    again = LLCCurve(rows=tuple(document["rows"]), settings=document["settings"])
    paths = again.write(tmp_path / "again", stages=again.stages())
    assert {"csv", "json", "plot"} <= set(paths)
    assert (tmp_path / "again" / "llc_curve.csv").read_text() == first["csv"].read_text()
    assert "stage boundaries at steps" in again.summary(again.stages())


def test_the_summary_names_flags_verdicts_and_calibration():
    rows = [row(0, calibrated_at=100), row(10, rhat=1.2, calibrated_at=100), row(100, calibrated_at=100)]
    rows[0]["ess"] = 50.0
    text = curve_of(rows).summary()
    lines = text.splitlines()
    assert lines[0].split() == ["step", "λ̂", "±", "se", "L_n(w*)", "R-hat", "ESS", "chains", "step", "size", "flag"]
    assert len(lines) == 1 + len(rows) + 4
    assert lines[4] == "3 checkpoints, 3 healthy"
    assert lines[5] == "R-hat above 1.01 at steps 10"
    assert lines[6] == "ESS below 100 per healthy chain at steps 0"
    assert lines[7] == "step size calibrated once, at step 100: 1e-05 to 2e-05"
    assert str(curve_of(rows)) == text


def test_to_arviz_needs_the_draws():
    curve = curve_of([row(0)])
    with pytest.raises(ValueError, match="holds no draws"):
        curve.to_arviz()
    assert set(COLUMNS) == set(row(0))
    np.testing.assert_array_equal(curve.steps, [0])


def test_a_trajectory_keeps_its_computed_results_for_arviz(tmp_path):
    pytest.importorskip("arviz")
    import orbax.checkpoint as ocp

    x = jax.random.normal(jax.random.key(0), (256, 2))
    data = {"x": x, "y": x @ jnp.array([1.0, -1.0])}
    loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        for step in (0, 1):
            manager.save(step, args=ocp.args.StandardSave({"w": jnp.array([1.0, -1.0])}))
        manager.wait_until_finished()
    curve = slt_jax.llc_trajectory(tmp_path / "ckpt", loss_fn, data, jax.random.key(1), step_size=1e-3,
                                   localization=1.0, num_chains=2, num_burnin=20, num_draws=20, batch_size=32,
                                   progress=False)
    exported = curve.to_arviz()
    assert sorted(exported) == [0, 1] and exported[0].posterior["llc"].shape == (2, 20)
