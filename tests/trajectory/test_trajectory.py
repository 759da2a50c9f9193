"""llc_trajectory over real Orbax trajectories: layouts, mismatches, one compiled program,
resume after an interruption, escaped chains at saddles, and the curve's outputs.

Every test samples the demo's deep linear network (widths (5, 2, 2, 5), n = 10,000) with the
same static settings as tests/test_demo.py and tests/test_cli.py, so the whole file (and the
others after it) reuses one compiled chain program.
"""

import csv
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from slt_jax.demos.dln_trajectory import teacher
from slt_jax.models.dln import dln_data, dln_loss
from slt_jax.trajectory.curve import COLUMNS, LLCCurve
from slt_jax.trajectory.llc_trajectory import escaped_chains, llc_trajectory

SAMPLER = dict(step_size=5e-7, num_chains=8, num_burnin=100, num_draws=200, batch_size=100,
               chunk_size=100, progress=False)
STEPS = (0, 10, 300)
N = 10_000


@pytest.fixture(scope="module")
def problem():
    key_teacher, key_data = jax.random.split(jax.random.key(0))
    minimum = teacher(key_teacher)
    return minimum, dln_data(key_data, minimum, N)


def params_at(minimum, step):
    """A distinct minimum per step: the teacher moved along its fibre, W₁ → A·W₁, W₂ → W₂·A⁻¹."""
    a = 1.0 + 0.05 * (step % 7)
    w1, w2, w3 = minimum
    return [w1 * jnp.array([[a], [1 / a]]), w2 * jnp.array([[1 / a, a]]), w3]


def save(directory, steps, make_args):
    with ocp.CheckpointManager(directory) as manager:
        for step in steps:
            manager.save(step, args=make_args(step))
        manager.wait_until_finished()


@pytest.fixture(scope="module")
def trajectories(problem, tmp_path_factory):
    """The same parameters saved in the three layouts Orbax users write."""
    minimum, _ = problem
    root = tmp_path_factory.mktemp("trajectories")
    save(root / "default", STEPS, lambda s: ocp.args.StandardSave(params_at(minimum, s)))
    save(root / "composite", STEPS, lambda s: ocp.args.Composite(
        params=ocp.args.StandardSave(params_at(minimum, s)),
        opt_state=ocp.args.StandardSave({"mu": params_at(minimum, s), "count": jnp.int32(s)})))
    save(root / "state", STEPS, lambda s: ocp.args.StandardSave(
        {"params": params_at(minimum, s), "opt_state": [params_at(minimum, s + 1)], "step": s}))
    return root


def rows_equal(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            assert x[name] == y[name] or (math.isnan(x[name]) and math.isnan(y[name])), (name, x, y)


def test_every_layout_gives_the_same_curve(problem, trajectories):
    minimum, data = problem
    key = jax.random.key(1)
    default = llc_trajectory(trajectories / "default", dln_loss, data, key, **SAMPLER)
    composite = llc_trajectory(trajectories / "composite", dln_loss, data, key, item="params",
                               template=minimum, **SAMPLER)
    state = llc_trajectory(trajectories / "state", dln_loss, data, key,
                           select=lambda s: s["params"], **SAMPLER)
    rows_equal(default.rows, composite.rows)
    rows_equal(default.rows, state.rows)
    assert list(default.steps) == list(STEPS)
    nbeta = N / math.log(N)
    for row in default.rows:
        assert list(row) == list(COLUMNS)
        assert row["nbeta"] == pytest.approx(nbeta) and row["localization"] == pytest.approx(nbeta / 10)
        assert not row["flagged"] and row["llc_mean"] > 0
        assert row["free_energy_approx"] == pytest.approx(
            N * row["init_loss"] + row["llc_mean"] * math.log(N))
    # Per-step keys are fold_in(key, step): a subset of steps gives the same rows.
    subset = llc_trajectory(trajectories / "default", dln_loss, data, key, steps=[300], **SAMPLER)
    rows_equal(subset.rows, default.rows[-1:])


def test_mismatches_name_the_step_and_the_path(problem, trajectories, tmp_path):
    minimum, data = problem
    wrong = [minimum[0], jnp.zeros((3, 2)), minimum[2]]
    expected = r"step 0: params\[1\] has shape \(2, 2\), the model expects \(3, 2\)"
    with pytest.raises(ValueError, match=expected):
        llc_trajectory(trajectories / "default", dln_loss, data, jax.random.key(0), template=wrong,
                       **SAMPLER)
    with pytest.raises(ValueError, match="pass item=<name>"):
        llc_trajectory(trajectories / "composite", dln_loss, data, jax.random.key(0), **SAMPLER)
    # A later checkpoint whose shapes differ from the first (the inferred template).
    save(tmp_path / "grown", (0, 20), lambda s: ocp.args.StandardSave(
        minimum if s == 0 else [minimum[0], jnp.zeros((2, 3)), minimum[2]]))
    with pytest.raises(ValueError, match=r"step 20: params\[1\] has shape \(2, 3\)"):
        llc_trajectory(tmp_path / "grown", dln_loss, data, jax.random.key(0), **SAMPLER)
    with pytest.raises(ValueError, match=r"steps \[5\] are not finished checkpoints"):
        llc_trajectory(trajectories / "default", dln_loss, data, jax.random.key(0), steps=[5],
                       **SAMPLER)
    with pytest.raises(ValueError, match="unknown setting"):
        llc_trajectory(trajectories / "default", dln_loss, data, jax.random.key(0), num_chain=3,
                       **SAMPLER)


def test_one_compiled_program_serves_every_checkpoint(problem, trajectories):
    _, data = problem
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
    counts = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3.0)(jnp.arange(5.0))  # the listener does see compiles
        assert compiles
        llc_trajectory(trajectories / "default", dln_loss, data, jax.random.key(7),
                       on_row=lambda row: counts.append(len(compiles)), **SAMPLER)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(counts) == len(STEPS)
    # Whatever the first checkpoint compiled (nothing, if an earlier test did), later ones reuse.
    assert counts[-1] == counts[0], compiles


def test_resume_after_an_interruption_samples_each_step_once(problem, trajectories, tmp_path):
    _, data = problem
    key = jax.random.key(3)
    reference = llc_trajectory(trajectories / "default", dln_loss, data, key, **SAMPLER)

    class Interrupted(Exception):
        pass

    first_run = []

    def interrupt_after_two(row):
        first_run.append(row["step"])
        if len(first_run) == 2:
            raise Interrupted

    store = tmp_path / "results"
    with pytest.raises(Interrupted):
        llc_trajectory(trajectories / "default", dln_loss, data, key, results_path=store,
                       on_row=interrupt_after_two, **SAMPLER)
    second_run = []
    resumed = llc_trajectory(trajectories / "default", dln_loss, data, key, results_path=store,
                             on_row=lambda row: second_run.append(row["step"]), **SAMPLER)
    assert first_run == list(STEPS[:2]) and second_run == list(STEPS[2:])
    rows_equal(resumed.rows, reference.rows)
    again = []
    llc_trajectory(trajectories / "default", dln_loss, data, key, results_path=store,
                   on_row=lambda row: again.append(row), **SAMPLER)
    assert again == []
    with pytest.raises(ValueError, match=r"different settings: .*step_size: stored 5e-07, now 1e-06"):
        llc_trajectory(trajectories / "default", dln_loss, data, key, results_path=store,
                       **{**SAMPLER, "step_size": 1e-6})


def test_chains_that_slide_off_a_saddle_are_flagged(problem, tmp_path):
    minimum, data = problem
    # Half of each layer: the product is the teacher / 8, far from any critical point, so the
    # tempered loss pulls every chain downhill; the teacher itself is a minimum.
    save(tmp_path / "ckpt", (0, 1), lambda s: ocp.args.StandardSave(
        [0.5 * w for w in minimum] if s == 0 else minimum))
    curve = llc_trajectory(tmp_path / "ckpt", dln_loss, data, jax.random.key(0), **SAMPLER)
    slope, held = curve.rows
    assert slope["flagged"] and slope["escaped_chains"] == SAMPLER["num_chains"]
    assert math.isnan(slope["llc_mean"])
    assert not held["flagged"] and held["escaped_chains"] == 0 and held["llc_mean"] > 0
    np.testing.assert_array_equal(curve.healthy, [False, True])


def test_escape_rules_on_synthetic_traces():
    distance = np.full((4, 10), 1.0)
    distance[2, 5:] = 9.0  # beyond 2·d/γ = 8 in the second half only
    llc = np.array([3.0, -9.0, 3.0, -11.0])
    np.testing.assert_array_equal(
        escaped_chains(llc, distance, num_sampled=8, localization=2.0), [False, False, True, True])
    # Without localization only the λ̂ rule applies.
    np.testing.assert_array_equal(
        escaped_chains(llc, distance, num_sampled=8, localization=0.0), [False, False, False, True])
    with pytest.raises(ValueError, match="distance_trace must have shape"):
        escaped_chains(llc, distance[:3], num_sampled=8, localization=2.0)


def test_curve_outputs(problem, trajectories, tmp_path):
    _, data = problem
    curve = llc_trajectory(trajectories / "default", dln_loss, data, jax.random.key(1), **SAMPLER)
    nan_row = {**curve.rows[0], "rhat": float("nan")}
    curve = LLCCurve(rows=(nan_row, *curve.rows[1:]), settings=curve.settings)
    paths = curve.write(tmp_path / "out", title="test")
    assert set(paths) == {"csv", "json", "plot"}  # early warning needs 6 healthy rows
    with open(paths["csv"], newline="") as file:
        table = list(csv.DictReader(file))
    assert [int(r["step"]) for r in table] == list(STEPS) and table[0]["rhat"] == ""
    assert float(table[1]["llc_mean"]) == curve.rows[1]["llc_mean"]
    document = json.loads(paths["json"].read_text())
    assert document["rows"][0]["rhat"] is None
    assert document["settings"]["step_size"] == SAMPLER["step_size"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(curve.column("step"), STEPS)
    with pytest.raises(ValueError, match="column 'lambda'"):
        curve.column("lambda")


@pytest.mark.filterwarnings("default::slt_jax.errors.CalibrationWarning")
def test_a_checkpoints_warning_names_its_step(tmp_path):
    from slt_jax.errors import CalibrationWarning
    from slt_jax.trajectory.loop import checkpoint_rows

    save(tmp_path / "ckpt", [3, 7], lambda step: ocp.args.StandardSave({"w": jnp.full(2, float(step))}))

    def compute(step, params):
        if step == 7:
            warnings.warn("λ̂ still trends", CalibrationWarning)
        return {"step": step}

    with pytest.warns(CalibrationWarning) as caught:
        checkpoint_rows(tmp_path / "ckpt", compute, settings={}, progress=False)
    assert [str(w.message) for w in caught] == ["checkpoint step 7: λ̂ still trends"]
