"""One pipeline: every entry point takes every capability, settings are values, the package
loads lazily and the 0.1 import paths still work.

The multi-device checks (a trajectory on 4 simulated devices against 1, the free-energy ladder on
a mesh) run once in a subprocess with 4 CPU devices (this file as a script).
"""

import os
import pickle
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import slt_jax
from slt_jax.settings import AutoSettings, Precision, RunSettings, SweepSettings, resolve

N = 512


def regression(key, n=N, d=3):
    """Noise-free linear regression (its loss in nats) and the least-squares point."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    data = {"x": x, "y": x @ jax.random.normal(kw, (d,))}
    loss_fn = lambda w, batch: 0.5 * jnp.mean(jnp.square(batch["x"] @ w - batch["y"]))
    return loss_fn, data, jnp.linalg.lstsq(x, data["y"])[0]


def dict_loss(loss_fn):
    """The loss of a checkpoint's ``{"w": …}`` parameters."""
    return lambda params, batch: loss_fn(params["w"], batch)


def save_trajectory(directory, center, steps=(0, 5, 10)):
    """A tiny trajectory: the least-squares point shifted a little less at each later step."""
    with ocp.CheckpointManager(directory) as manager:
        for step in steps:
            manager.save(step, args=ocp.args.StandardSave({"w": center + 0.01 / (1 + step)}))
        manager.wait_until_finished()


SMALL = dict(num_chains=4, num_burnin=50, num_draws=50, batch_size=32, progress=False)
CHEAP_AUTO = AutoSettings(max_extension=2, max_plateau_extension=None,
                          sweep=SweepSettings(num_chains=2, num_steps=800, mala=False))


def test_settings_are_hashable_values_and_keywords_map_to_their_fields():
    run, auto, precision = resolve({"num_chains": 3, "max_extension": 2.0, "dtype": jnp.float32},
                                   (None, RunSettings), (None, AutoSettings), (None, Precision))
    assert (run.num_chains, auto.max_extension, precision.dtype) == (3, 2.0, np.dtype(np.float32))
    assert hash(run) == hash(RunSettings(num_chains=3)) and run == RunSettings(num_chains=3)
    with pytest.raises(ValueError, match="unknown setting 'num_chain'; did you mean 'num_chains'"):
        slt_jax.estimate_llc(lambda w, b: jnp.sum(w), jnp.zeros(2), jnp.zeros((4, 1)), jax.random.key(0),
                             step_size=1e-3, localization=1.0, num_chain=3)
    for bad, match in [({"num_draws": 0}, "num_draws"), ({"loss_estimator": "exact"}, "loss_estimator"),
                       ({"on_divergence": "ignore"}, "on_divergence")]:
        with pytest.raises(ValueError, match=match):
            RunSettings(**bad)
    with pytest.raises(ValueError, match="max_plateau_extension"):
        AutoSettings(max_extension=8, max_plateau_extension=2)
    with pytest.raises(ValueError, match="float32 or float64"):
        Precision(dtype=jnp.int32)


def test_a_settings_value_and_its_keywords_give_the_same_estimate():
    loss_fn, data, w_hat = regression(jax.random.key(0))
    by_value = slt_jax.estimate_llc(loss_fn, w_hat, data, jax.random.key(1), step_size=1e-3, localization=1.0,
                                    run=RunSettings(num_chains=4, num_burnin=50, num_draws=50, batch_size=32),
                                    progress=False)
    by_keyword = slt_jax.estimate_llc(loss_fn, w_hat, data, jax.random.key(1), step_size=1e-3, localization=1.0,
                                      **SMALL)
    np.testing.assert_array_equal(by_value.llc_trace, by_keyword.llc_trace)
    assert by_value.settings["num_chains"] == 4 and by_value.settings["batch_size"] == 32


def test_calibrate_runs_in_float64():
    loss_fn, data, w_hat = regression(jax.random.key(0))
    with jax.enable_x64(True):
        cal = slt_jax.calibrate(loss_fn, w_hat.astype(jnp.float64), data, jax.random.key(1), localization=1.0,
                                dtype=jnp.float64, num_chains=2, num_steps=800, mala=False, progress=False)
    assert cal.settings["dtype"] == "float64"
    assert cal.choices[0]["step_size"] is not None


@pytest.mark.filterwarnings("ignore::slt_jax.CalibrationWarning")  # 4 chains, 2× cap: a test of the record
def test_auto_trajectory_records_its_calibration_per_row(tmp_path):
    loss_fn, data, w_hat = regression(jax.random.key(0))
    save_trajectory(tmp_path / "ckpt", w_hat)
    each = slt_jax.llc_trajectory(tmp_path / "ckpt", dict_loss(loss_fn), data, jax.random.key(2), step_size="auto",
                                  localization=1.0, auto=CHEAP_AUTO, **SMALL)
    assert [row["calibrated_at"] for row in each.rows] == [0, 5, 10]
    assert all(row["step_size"] > 0 for row in each.rows)
    once = slt_jax.llc_trajectory(tmp_path / "ckpt", dict_loss(loss_fn), data, jax.random.key(2), step_size="auto",
                                  localization=1.0, auto=CHEAP_AUTO, calibrate_at=5, **SMALL)
    assert [row["calibrated_at"] for row in once.rows] == [5, 5, 5]
    # Calibrated at step 5 with the key step 5 itself would use: the same choice there.
    assert once.rows[1]["step_size"] == each.rows[1]["step_size"]
    with pytest.raises(ValueError, match="calibrate_at=7"):
        slt_jax.llc_trajectory(tmp_path / "ckpt", dict_loss(loss_fn), data, jax.random.key(2), step_size="auto",
                               localization=1.0, calibrate_at=7, **SMALL)


def test_import_loads_no_plotting_checkpointing_or_numpyro():
    code = ("import sys, slt_jax; slt_jax.estimate_llc; slt_jax.calibrate; "
            "print(sorted(m for m in ('matplotlib', 'orbax', 'numpyro') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_numpyro_is_imported_while_the_first_chunk_runs():
    # run_chains computes no ESS itself: numpyro is there because it was preloaded behind chunk 0.
    code = ("import sys, jax, jax.numpy as jnp, slt_jax; from slt_jax.runner import chains; "
            "from slt_jax.problem import make_problem; from slt_jax.samplers import SGLD; "
            "from slt_jax.settings import RunSettings; "
            "run = RunSettings(num_chains=2, num_burnin=0, num_draws=4, batch_size=4); "
            "p = make_problem(lambda w, b: jnp.mean((b['x'] * w) ** 2), jnp.ones(()), {'x': jnp.ones(8)}, localization=1.0, run=run); "
            "config, inputs = chains.setup(p, SGLD, run, 1e-3); "
            "chains.run_chains(jax.random.key(0), config, inputs, num_chains=2, num_burnin=0, num_draws=4, "
            "progress=False); print('numpyro.diagnostics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_the_chain_step_is_traced_once_per_program(monkeypatch):
    # Its shapes (for the padding and non-draw branches) come from jit's cache, not a second trace.
    from slt_jax.runner import chain

    calls = {"step": 0, "measure": 0}
    step, measure = chain._step, chain._measure

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(chain, "_step", counted("step", step))
    monkeypatch.setattr(chain, "_measure", counted("measure", measure))
    loss_fn, data, w_hat = regression(jax.random.key(7))
    # A loss function of its own: no trace of it can sit in jit's cache from another test.
    slt_jax.estimate_llc(lambda w, batch: loss_fn(w, batch), w_hat, data, jax.random.key(1), step_size=1e-4,
                         localization=1.0, check_step=False, **SMALL)
    assert calls == {"step": 1, "measure": 1}


def test_old_import_paths_alias_the_new_modules_and_warn():
    with pytest.warns(DeprecationWarning, match="slt_jax.calibration moved to slt_jax.tuning.sweep"):
        from slt_jax.calibration import calibrate
    assert calibrate is slt_jax.calibrate


def _worker(out_path):
    """A trajectory and a free-energy ladder on 1 device and on a 4-device mesh (4 simulated devices)."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="orbax.*")
    # Short fixed-step runs: the post-run check's warnings (trend) are not this test's subject.
    warnings.filterwarnings("ignore", category=slt_jax.CalibrationWarning)
    assert jax.device_count() == 4
    loss_fn, data, w_hat = regression(jax.random.key(0))
    directory = os.path.join(os.path.dirname(out_path), "ckpt")
    save_trajectory(directory, w_hat)
    out = {}
    for devices in (1, 4):
        curve = slt_jax.llc_trajectory(directory, dict_loss(loss_fn), data, jax.random.key(4), step_size=1e-3,
                                       localization=1.0, mesh=slt_jax.make_mesh(devices), **SMALL)
        out["rows", devices] = curve.rows
        free = slt_jax.estimate_free_energy(loss_fn, w_hat, data, jax.random.key(5), localization=1.0,
                                            betas=[0.01, 0.1, 1.0], num_chains=4, num_burnin=100, num_draws=100,
                                            batch_size=32, devices=devices, progress=False)
        out["free", devices] = (free.mean_nloss, free.settings["mesh"])
    with open(out_path, "wb") as f:
        pickle.dump(out, f)


@pytest.fixture(scope="module")
def four_devices(on_devices):
    return on_devices(__file__, 4, "pipeline")


def test_a_trajectory_on_four_devices_gives_the_rows_of_one(four_devices):
    one, four = four_devices["rows", 1], four_devices["rows", 4]
    assert [r["step"] for r in one] == [r["step"] for r in four] == [0, 5, 10]
    for a, b in zip(one, four):
        np.testing.assert_allclose(b["llc_mean"], a["llc_mean"], rtol=1e-4, atol=1e-4)
        assert a["num_chains"] == b["num_chains"] == 4


def test_the_free_energy_ladder_runs_on_a_mesh(four_devices):
    (one, mesh_one), (four, mesh_four) = four_devices["free", 1], four_devices["free", 4]
    assert mesh_one == {"chains": 1} and mesh_four == {"chains": 4}
    np.testing.assert_allclose(four, one, rtol=1e-5)


if __name__ == "__main__":
    _worker(sys.argv[1])
