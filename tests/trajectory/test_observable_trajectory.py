"""observable_trajectory: susceptibilities and influence per checkpoint, resumable, as curve
columns that take stage detection, early warning and plots by name."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import slt_jax
from slt_jax.trajectory.observable_trajectory import observable_trajectory

STEPS = (0, 1, 3, 10, 30, 100, 300)
SAMPLER = dict(step_size=0.01, localization=1.0, num_chains=4, num_burnin=100, num_draws=100, batch_size=16,
               chunk_size=128, progress=False)


def squared_error(w, batch):
    return 0.5 * jnp.mean(jnp.square(batch["y"] - batch["x"] @ w))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A regression "trained" by gradient descent from near its minimum (so the localized posterior
    holds every chain), checkpointed at STEPS, and its problem."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(64)
    data = {"x": x, "y": y}
    shift = {"x": x[:16] * np.array([2.0, 0.5, 1.0]), "y": y[:16]}
    query = {"x": rng.standard_normal((4, 3)), "y": rng.standard_normal(4)}
    root = tmp_path_factory.mktemp("observables")
    w = np.linalg.lstsq(x, y, rcond=None)[0] + np.array([0.4, -0.4, 0.2])
    with ocp.CheckpointManager(root / "checkpoints") as manager:
        for t in range(STEPS[-1] + 1):
            if t in STEPS:
                manager.save(t, args=ocp.args.StandardSave({"w": jnp.asarray(w, jnp.float32)}))
            w = w - 0.01 * x.T @ (x @ w - y) / 64
        manager.wait_until_finished()
    loss = lambda p, b: squared_error(p["w"], b)
    options = dict(shifts={"q": shift}, components={"model": None, "w0": {"w": np.array([True, False, False])}},
                   query_data=query, train_rows=np.arange(8), **SAMPLER)
    return root, loss, data, options


def test_rows_carry_the_observables_and_resume_from_the_store(run):
    root, loss, data, options = run
    calls = []
    first = observable_trajectory(root / "checkpoints", loss, data, jax.random.key(0), steps=STEPS[:4],
                                  results_path=root / "store", on_row=calls.append, **options)
    assert len(calls) == 4
    curve = observable_trajectory(root / "checkpoints", loss, data, jax.random.key(0), results_path=root / "store",
                                  on_row=calls.append, **options)
    assert len(calls) == len(STEPS)  # the four stored steps were not computed again
    assert [r.keys() for r in curve.rows[:4]] == [r.keys() for r in first.rows]
    for stored, computed in zip(curve.rows[:4], first.rows):
        np.testing.assert_array_equal(np.array(list(stored.values()), float), np.array(list(computed.values()), float))
    assert not any(curve.column("flagged"))
    for name in ("llc/model", "llc/w0", "chi/model/q", "chi/w0/q", "influence", "influence_correlation"):
        assert name in curve.columns and np.all(np.isfinite(curve.column(name)))
    assert curve.se_column("chi/model/q") == "chi/model/q_se" and curve.se_column("llc_mean") == "llc_se"
    # The λ̂ columns are the first component's (the whole model), and a row is what a direct call gives.
    np.testing.assert_allclose(curve.column("llc_mean"), curve.column("llc/model"))
    restored = ocp.CheckpointManager(root / "checkpoints").restore(0, args=ocp.args.StandardRestore())
    direct = slt_jax.susceptibilities(loss, restored, data, jax.random.fold_in(jax.random.key(0), 0),
                                      shifts=options["shifts"], components=options["components"],
                                      **(SAMPLER | {"localization": curve.rows[0]["localization"]}))
    assert curve.rows[0]["chi/w0/q"] == pytest.approx(direct.chi[1, 0], rel=1e-5)
    with pytest.raises(ValueError, match="different settings: .*shifts"):
        observable_trajectory(root / "checkpoints", loss, data, jax.random.key(0), results_path=root / "store",
                              **(options | {"shifts": {"other": options["shifts"]["q"]}}))


def test_stages_early_warning_and_panels_take_a_column(run, tmp_path):
    root, loss, data, options = run
    curve = observable_trajectory(root / "checkpoints", loss, data, jax.random.key(0), results_path=root / "store",
                                  **options)
    stages = curve.stages("chi/model/q", smoothing=0.3)
    assert stages.boundaries.ndim == 1
    warning = curve.early_warning("influence", window=4, detrend="linear", num_surrogates=50)
    assert np.isfinite(warning.tau_variance)
    fig = curve.plot_panels([("chi/model/q", "χ(model, q)"), "influence"], tmp_path / "panels.png",
                            stages=stages)
    assert len(fig.axes) == 4 and (tmp_path / "panels.png").read_bytes()[:4] == b"\x89PNG"
    curve.to_csv(tmp_path / "curve.csv")
    header = (tmp_path / "curve.csv").read_text().splitlines()[0].split(",")
    assert "chi/model/q" in header and "influence_se" in header
    with pytest.raises(ValueError, match="column 'chi/nothing' is not one of"):
        curve.column("chi/nothing")


def test_a_trajectory_needs_something_to_observe(run):
    root, loss, data, _ = run
    with pytest.raises(ValueError, match="needs shifts .* and/or query_data"):
        observable_trajectory(root / "checkpoints", loss, data, jax.random.key(0), **SAMPLER)
