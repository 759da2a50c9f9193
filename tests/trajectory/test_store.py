"""The resumable results store: round trip, crash safety, settings mismatch."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.trajectory.store import ResultsStore

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier

SETTINGS = {
    "nbeta": np.float64(250.0),
    "localization": 1.0,
    "num_chains": np.int32(4),
    "sampler": {"name": "sgld", "step_size": jnp.float32(0.5)},
    "widths": (3, 2, 3),
}


def test_round_trip_and_resume(tmp_path):
    store = ResultsStore(tmp_path / "results", SETTINGS)
    assert store.completed() == {}
    store.write(300, {"llc": np.float32(1.5), "llc_se": 0.25, "draws": jnp.arange(3)})
    store.write(np.int64(20), {"llc": float("nan")})
    store.write(5, {"llc": 0.75, "diagnostics": {"diverged": np.bool_(False)}})

    reopened = ResultsStore(tmp_path / "results", SETTINGS)
    completed = reopened.completed()
    assert list(completed) == [5, 20, 300]
    assert completed[300] == {"step": 300, "llc": 1.5, "llc_se": 0.25, "draws": [0, 1, 2]}
    assert completed[5]["diagnostics"] == {"diverged": False}
    assert math.isnan(completed[20]["llc"])
    assert [row["step"] for row in reopened.rows()] == [5, 20, 300]
    assert reopened.settings["sampler"]["step_size"] == 0.5
    assert reopened.settings["widths"] == [3, 2, 3]
    assert type(store.settings["nbeta"]) is float and type(store.settings["num_chains"]) is int

    reopened.write(20, {"llc": 1.0})
    assert reopened.completed()[20] == {"step": 20, "llc": 1.0}


def test_interrupted_write_leaves_a_stray_temporary_file_that_is_ignored(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "results", SETTINGS)
    store.write(1, {"llc": 1.0})

    def crash(source, destination):
        raise KeyboardInterrupt  # killed between the fsync and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write(2, {"llc": 2.0})
    monkeypatch.undo()
    assert not list((tmp_path / "results").glob(".*.tmp"))  # an exception cleans up
    # A hard kill skips cleanup; leave the half-written file it would have left behind.
    (tmp_path / "results" / ".step_0000000002.x1y2.tmp").write_text('{"step": 2, "ll')
    (tmp_path / "results" / ".settings.abc.tmp").write_text("{")

    reopened = ResultsStore(tmp_path / "results", SETTINGS)
    assert reopened.completed() == {1: {"step": 1, "llc": 1.0}}
    reopened.write(2, {"llc": 2.0})
    assert [row["llc"] for row in reopened.rows()] == [1.0, 2.0]


def test_write_replaces_the_file_in_one_rename(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "results", SETTINGS)
    calls = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(descriptor):
        calls.append("fsync")
        real_fsync(descriptor)

    def replace(source, destination):
        calls.append(("replace", os.path.basename(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.write(7, {"llc": 3.0})
    assert calls[:2] == ["fsync", ("replace", "step_0000000007.json")]
    assert json.loads((tmp_path / "results" / "step_0000000007.json").read_text())["llc"] == 3.0


def test_different_settings_are_refused_with_the_differences(tmp_path):
    ResultsStore(tmp_path / "results", SETTINGS)
    changed = dict(SETTINGS, nbeta=500.0, sampler={"name": "sgld", "step_size": 0.5}, seed=3)
    del changed["localization"]
    with pytest.raises(ValueError) as error:
        ResultsStore(tmp_path / "results", changed)
    message = str(error.value)
    assert "different settings" in message
    assert "nbeta: stored 250.0, now 500.0" in message
    assert "localization: stored 1.0, now (absent)" in message
    assert "seed: stored (absent), now 3" in message
    assert "sampler" not in message
    assert "new results_path" in message
    # Equal settings given as other (numpy, tuple, key order) types still match.
    ResultsStore(tmp_path / "results", {key: SETTINGS[key] for key in reversed(SETTINGS)})


def test_bad_input_names_the_offending_argument(tmp_path):
    with pytest.raises(ValueError, match=r"settings\['sampler'\]\['loss_fn'\] is a function"):
        ResultsStore(tmp_path / "a", {"sampler": {"loss_fn": lambda w: w}})
    with pytest.raises(ValueError, match="settings must be a dict"):
        ResultsStore(tmp_path / "a", [("nbeta", 1.0)])
    store = ResultsStore(tmp_path / "b", {})
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        store.write(-1, {})
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        store.write(1.5, {})
    with pytest.raises(ValueError, match=r"row\['llc'\] is a complex"):
        store.write(1, {"llc": 1j})
    with pytest.raises(ValueError, match=r"row\['step'\] is 2, but step is 1"):
        store.write(1, {"step": 2})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty directory without settings.json"):
        ResultsStore(tmp_path / "c", {})
    (tmp_path / "d").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        ResultsStore(tmp_path / "d", {})

