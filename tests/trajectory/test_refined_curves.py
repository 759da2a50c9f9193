"""Per-component refined LLC curves over a trajectory: one program per checkpoint, resumable,
one curve per component, the changes across a window, and the files."""

import functools
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import slt_jax
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

loss_fn = functools.partial(dln_loss, sigma=1.0)
RUN = dict(step_size=1e-4, localization=1.0, batch_size=100, num_chains=4, num_burnin=200, num_draws=100,
           chunk_size=200, progress=False)
STEPS = (0, 10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    key_teacher, key_data = jax.random.split(jax.random.key(3))
    teacher = dln_teacher(key_teacher, (2, 3, 3, 2), 1)
    data = dln_data(key_data, teacher, 1000)
    directory = tmp_path_factory.mktemp("refined") / "ckpt"
    with ocp.CheckpointManager(directory) as manager:
        for step in STEPS:  # the same minimum at both steps, rescaled along its fibre
            a = 1.0 + 0.1 * step / 10
            manager.save(step, args=ocp.args.StandardSave([teacher[0] * a, teacher[1] / a, teacher[2]]))
        manager.wait_until_finished()
    return directory, data


def components():
    layer = lambda s: str(s)  # a regex over the list's leaf paths "0", "1", "2"
    return {"layer 0": layer(0), "layer 1": layer(1), "layers 0-1": "0|1"}


def test_one_curve_per_component_resumes_and_writes(run_dir, tmp_path):
    directory, data = run_dir
    store = tmp_path / "store"
    curves = slt_jax.refined_llc_curves(directory, loss_fn, data, jax.random.key(0), components=components(),
                                        results_path=store, **RUN)
    assert list(curves.curves) == list(components()) and list(curves.steps) == list(STEPS)
    for name, curve in curves.curves.items():
        assert curve.settings["component"] == name and all(np.isfinite(curve.column("llc_mean")))
    # The union samples both layers: its λ̂ is at least either layer's alone, within 3 standard errors of
    # the difference (4 chains × 100 draws: λ̂ ≈ 1 with an se of ~0.2).
    column = lambda name, field: np.asarray(curves.curves[name].column(field))
    for layer in ("layer 0", "layer 1"):
        gap = column("layers 0-1", "llc_mean") - column(layer, "llc_mean")
        assert np.all(gap > -3 * np.hypot(column("layers 0-1", "llc_se"), column(layer, "llc_se"))), (layer, gap)
    again = slt_jax.refined_llc_curves(directory, loss_fn, data, jax.random.key(0), components=components(),
                                       results_path=store, **RUN)
    assert again.curves["layer 1"].rows == curves.curves["layer 1"].rows  # read back, not resampled
    change = curves.change(0, 10)
    assert set(change) == set(components())
    paths = curves.write(tmp_path / "out", events=[5])
    assert set(paths) == {"csv", "json", "plot"} and paths["plot"].stat().st_size > 0
    document = json.loads(paths["json"].read_text())
    assert document["settings"]["components"]["layer 1"] == "1"
    assert "layer 0" in str(curves)


def test_components_are_checked_before_sampling(run_dir):
    directory, data = run_dir
    with pytest.raises(ValueError, match="components must be a non-empty dict"):
        slt_jax.refined_llc_curves(directory, loss_fn, data, jax.random.key(0), components={}, **RUN)
    with pytest.raises(ValueError, match="matches no parameter|selects nothing"):
        slt_jax.refined_llc_curves(directory, loss_fn, data, jax.random.key(0), components={"x": "nope"}, **RUN)
