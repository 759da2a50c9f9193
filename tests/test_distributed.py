"""Chains across processes (slt_jax.distributed): the same numbers as one process, one writer,
and failures that end in a clear error within a bounded time.

Each multi-process check starts local CPU processes with gloo collectives through
``slt_jax.launch`` (this file run as a script is the worker), every one of them under a
wall-clock limit, so that a hang fails the test instead of stalling the suite.
"""

import io
import os
import pickle
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import launch

N = 512
SMALL = dict(num_chains=8, num_burnin=100, num_draws=100, batch_size=32, progress=False)


def regression(key, n=N, d=3):
    """Noise-free linear regression and its least-squares point."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    data = {"x": x, "y": x @ jax.random.normal(kw, (d,))}
    loss_fn = lambda w, batch: 0.5 * jnp.mean(jnp.square(batch["x"] @ w["w"] - batch["y"]))
    return loss_fn, data, {"w": jnp.linalg.lstsq(x, data["y"])[0]}


def _worker(mode, out_dir):
    """One process of a job (or the single-process reference): writes its results to out_dir."""
    import slt_jax
    import slt_jax.data.streaming
    from slt_jax import distributed

    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="orbax.*")
    if mode == "reference":
        assert jax.device_count() == 8
    else:
        distributed.initialize(timeouts=distributed.Timeouts(initialization=60, heartbeat=20, check=60))
    pid = jax.process_index()
    mine = os.path.join(out_dir, f"{mode}-p{pid}")
    if mode == "mismatch":
        # Process 1 asks for another localization: every process must raise before sampling.
        loss_fn, data, w = regression(jax.random.key(0))
        try:
            slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(1), step_size=1e-3,
                                 localization=1.0 + pid, **SMALL)
        except distributed.DistributedError as error:
            print(f"RAISED {error}", flush=True)
            return
        raise AssertionError("the mismatch went unnoticed")
    loss_fn, data, w = regression(jax.random.key(0))
    out = {"devices": jax.device_count(), "local": jax.local_device_count(), "processes": jax.process_count()}
    start = time.perf_counter()
    result = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(1), step_size=1e-3, localization=1.0,
                                  mesh=slt_jax.make_mesh(8), **SMALL)
    out["llc_per_chain"], out["llc_trace"] = result.llc_per_chain, result.llc_trace
    out["settings"] = {k: result.settings[k] for k in ("mesh", "processes", "devices")}
    result.to_json(mine + "-result.json")
    # Streamed from the host: each process gathers the rows of its own chains.
    host = slt_jax.data.streaming.streamed(jax.tree.map(np.asarray, data))
    out["streamed"] = slt_jax.estimate_llc(loss_fn, w, host, jax.random.key(1), step_size=1e-3, localization=1.0,
                                           mesh=slt_jax.make_mesh(8), **SMALL).llc_per_chain
    checkpoints = os.path.join(out_dir, "ckpt")  # written by the pytest process beforehand
    trajectory = lambda: slt_jax.llc_trajectory(checkpoints, loss_fn, data, jax.random.key(2), step_size=1e-3,
                                                localization=1.0, results_path=mine + "-store",
                                                mesh=slt_jax.make_mesh(8), **SMALL)
    curve = trajectory()
    out["rows"] = curve.rows
    curve.write(mine + "-curve")
    out["resumed"] = trajectory().rows  # every step is in the store now: nothing is sampled
    out["seconds"] = time.perf_counter() - start
    with open(mine + ".pkl", "wb") as f:
        pickle.dump(out, f)


def _more_worker(mode, out_dir):
    """The other entry points over the global mesh: calibrate, step_size="auto", the free-energy
    ladder and observation moments (as _worker: a job process or the 1 × 8 reference)."""
    import slt_jax
    from slt_jax import distributed
    from slt_jax.problem import make_problem
    from slt_jax.runner.chains import run_chains, sampled_of, setup
    from slt_jax.runner.observation import Observation
    from slt_jax.samplers import SGLD
    from slt_jax.settings import AutoSettings, RunSettings, SweepSettings

    warnings.simplefilter("error")
    if mode == "more-job":
        distributed.initialize(timeouts=distributed.Timeouts(initialization=60, heartbeat=20, check=60))
    loss_fn, data, w = regression(jax.random.key(0))
    mesh = slt_jax.make_mesh(8)
    out = {}
    cal = slt_jax.calibrate(loss_fn, w, data, jax.random.key(3), localization=1.0, num_chains=2, num_steps=800,
                            batch_size=32, mesh=mesh, progress=False)
    out["calibrate"] = (cal.step_sizes, cal.llc_mean, cal.status)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", slt_jax.CalibrationWarning)
        auto = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(4), step_size="auto", localization=1.0, mesh=mesh,
                                    auto=AutoSettings(max_extension=2, max_plateau_extension=None,
                                                      sweep=SweepSettings(num_chains=2, num_steps=800)), **SMALL)
    out["auto"] = (auto.settings["step_size"], auto.llc_per_chain)
    free = slt_jax.estimate_free_energy(loss_fn, w, data, jax.random.key(5), localization=1.0, betas=[0.01, 0.1, 1.0],
                                        num_chains=4, num_burnin=50, num_draws=50, batch_size=32, mesh=mesh,
                                        progress=False)
    out["free"] = free.mean_nloss
    run = RunSettings(num_chains=8, num_burnin=20, num_draws=30, batch_size=32)
    problem = make_problem(loss_fn, w, data, localization=1.0, mesh=mesh, run=run)
    probe = jax.tree.map(lambda x: x[:4], data)
    observe = Observation(lambda params, rows: {"losses": jax.vmap(lambda r: loss_fn(params, jax.tree.map(
        lambda x: x[None], r)))(rows)}, pairs=(("losses", "losses"),))
    config, inputs = setup(problem, SGLD, run, 1e-3, observation=observe, observed_inputs=probe)
    state, draws = run_chains(jax.random.key(6), config, inputs, num_chains=8, num_burnin=20, num_draws=30,
                              progress=False)
    out["moments"] = sampled_of(state, draws, 1e-3, run).moments
    with open(os.path.join(out_dir, f"{mode}-p{jax.process_index()}.pkl"), "wb") as f:
        pickle.dump(out, f)


def _save_checkpoints(directory):
    import orbax.checkpoint as ocp

    _, _, w = regression(jax.random.key(0))
    with ocp.CheckpointManager(directory) as manager:
        for step in (0, 10):
            manager.save(step, args=ocp.args.StandardSave({"w": w["w"] + 0.01 / (1 + step)}))
        manager.wait_until_finished()


def _script(*args):
    return [sys.executable, os.path.abspath(__file__), *args]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A 2 × 4-device job and the 1 × 8-device reference, run side by side."""
    out = tmp_path_factory.mktemp("distributed")
    _save_checkpoints(str(out / "ckpt"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    reference = subprocess.Popen(_script("reference", str(out)), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    start = time.perf_counter()
    results = launch.launch(_script("job", str(out)), 2, timeout=300, cpu_devices=4, output=io.StringIO())
    job_seconds = time.perf_counter() - start
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-4000:]
    for status, _, text in results:
        assert status == 0, text[-4000:]
    def load(name):
        with open(out / f"{name}.pkl", "rb") as f:
            return pickle.load(f)

    return {"dir": out, "ref": load("reference-p0"), "p0": load("job-p0"), "p1": load("job-p1"),
            "job_seconds": job_seconds}


def test_two_processes_give_the_chains_of_one(two_processes):
    ref, p0, p1 = two_processes["ref"], two_processes["p0"], two_processes["p1"]
    assert (p0["devices"], p0["local"], p0["processes"]) == (8, 4, 2)
    assert (ref["devices"], ref["processes"]) == (8, 1)
    assert p0["settings"]["mesh"] == ref["settings"]["mesh"] == {"chains": 8}
    assert p0["settings"]["processes"] == 2
    # Complete on every process, and chain i's λ̂ the same as on one process with 8 devices.
    np.testing.assert_array_equal(p0["llc_trace"], p1["llc_trace"])
    np.testing.assert_allclose(p0["llc_per_chain"], ref["llc_per_chain"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p0["llc_trace"], ref["llc_trace"], rtol=1e-5, atol=1e-5)
    # Streamed data: the same chains again.
    np.testing.assert_allclose(p0["streamed"], ref["llc_per_chain"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(p0["streamed"], p1["streamed"])


def test_two_process_trajectory_matches_and_resumes(two_processes):
    ref, p0, p1 = two_processes["ref"], two_processes["p0"], two_processes["p1"]
    assert [r["step"] for r in p0["rows"]] == [0, 10]
    for a, b, c in zip(ref["rows"], p0["rows"], p1["rows"]):
        np.testing.assert_allclose(b["llc_mean"], a["llc_mean"], rtol=1e-5, atol=1e-6)
        assert b == c
    # The second call found every step in process 0's store and shared it with process 1.
    for p in (p0, p1):
        for a, b in zip(p["rows"], p["resumed"]):
            np.testing.assert_allclose(b["llc_mean"], a["llc_mean"], rtol=1e-12)


def test_only_process_zero_writes_files(two_processes):
    out = two_processes["dir"]
    written = sorted(path.name for path in out.iterdir())
    assert "job-p0-result.json" in written and "job-p0-curve" in written and "job-p0-store" in written
    assert not [name for name in written if name.startswith("job-p1") and not name.endswith(".pkl")], written
    assert (out / "job-p0-store" / "step_0000000010.json").exists()
    assert (out / "job-p0-curve" / "llc_curve.csv").exists()


def test_processes_that_disagree_raise_on_every_process(tmp_path):
    results = launch.launch(_script("mismatch", str(tmp_path)), 2, timeout=120, cpu_devices=2,
                            output=io.StringIO())
    for status, seconds, text in results:
        assert status == 0, text[-3000:]
        assert "RAISED the processes disagree on problem: localization: process 0 has 1.0, process 1 has 2.0" \
            in text, text[-3000:]


def test_different_device_counts_raise_at_initialize(tmp_path):
    code = ("import os, jax; from slt_jax import distributed\n"
            "pid = int(os.environ['SLT_JAX_PROCESS_ID'])\n"
            "try:\n"
            "    distributed.initialize(cpu_devices=2 + pid, timeouts=distributed.Timeouts(initialization=60, check=30))\n"
            "except distributed.DistributedError as error:\n"
            "    print('RAISED', error, flush=True)\n")
    results = launch.launch([sys.executable, "-c", code], 2, timeout=120, output=io.StringIO(),
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    for status, _, text in results:
        assert status == 0, text[-3000:]
        assert "RAISED the processes disagree on runtime: local_devices: process 0 has 2, process 1 has 3" in text, \
            text[-3000:]


def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout():
    port = launch.free_port()  # nothing listens there
    code = ("import time; from slt_jax import distributed\n"
            "start = time.monotonic()\n"
            "try:\n"
            f"    distributed.initialize('localhost:{port}', 2, 1, timeouts=distributed.Timeouts(initialization=3))\n"
            "except distributed.DistributedError as error:\n"
            "    print(f'RAISED after {time.monotonic() - start:.1f} s:', error)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAISED after" in proc.stdout and f"coordinator localhost:{port} did not accept connections" in proc.stdout
    seconds = float(proc.stdout.split("RAISED after ")[1].split(" s")[0])
    assert 2.5 < seconds < 10


def _dying_worker():
    """Process 1 dies between two collectives; process 0 must not outlive the heartbeat timeout."""
    from slt_jax import distributed

    distributed.initialize(timeouts=distributed.Timeouts(initialization=60, heartbeat=5, shutdown=5))
    import slt_jax

    loss_fn, data, w = regression(jax.random.key(0))
    estimate = lambda: slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(1), step_size=1e-3, localization=1.0,
                                            **SMALL)
    estimate()
    print("first estimate done", flush=True)
    if jax.process_index() == 1:
        os._exit(3)
    estimate()
    estimate()


@pytest.mark.slow
def test_a_dead_process_ends_the_job_within_the_heartbeat_timeout():
    start = time.monotonic()
    results = launch.launch(_script("dying", "-"), 2, timeout=180, cpu_devices=2, grace=120,
                            output=io.StringIO())
    (status0, seconds0, text0), (status1, _, _) = results
    assert status1 == 3
    assert status0 not in (0, None), text0[-3000:]  # ended by JAX (abort) or an error, not by our timeout
    assert seconds0 < 90, (seconds0, text0[-3000:])
    assert time.monotonic() - start < 180


@pytest.mark.unit
def test_command_line_flags_and_pure_helpers(monkeypatch):
    import argparse

    from slt_jax import distributed

    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize_from_args(parser.parse_args([])) is None  # one process: nothing to do
    args = parser.parse_args(["--coordinator", "host:1234", "--num-processes", "2", "--init-timeout", "5"])
    assert (args.coordinator, args.num_processes, args.process_id, args.init_timeout) == ("host:1234", 2, None, 5.0)
    with pytest.raises(distributed.DistributedError, match="go together"):
        distributed.initialize_from_args(args)
    with pytest.raises(ValueError, match="heartbeat"):
        distributed.Timeouts(heartbeat=0)
    differences = distributed._differences({0: {"a": 1, "b": [1, 2]}, 1: {"a": 1, "b": [1, 3]}})
    assert differences == ["b: process 0 has [1, 2], process 1 has [1, 3]"]
    assert distributed.is_primary() and not distributed.is_distributed()
    distributed.check_consistent("anything", lambda: 1 / 0)  # a no-op in one process: never evaluated
    assert distributed.from_primary(lambda: {"x": 1}, "value") == {"x": 1}
    assert launch.status_of([(0, 1.0, ""), (0, 1.0, "")]) == 0
    assert launch.status_of([(0, 1.0, ""), (3, 1.0, "")]) == 3
    assert launch.status_of([(None, 9.0, ""), (0, 1.0, "")]) == launch.TIMEOUT_STATUS


@pytest.mark.slow
def test_every_entry_point_runs_over_two_processes(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    reference = subprocess.Popen(_script("more-reference", str(tmp_path)), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    results = launch.launch(_script("more-job", str(tmp_path)), 2, timeout=600, cpu_devices=4, output=io.StringIO())
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out[-4000:]
    for status, _, text in results:
        assert status == 0, text[-4000:]

    def load(name):
        with open(tmp_path / f"{name}.pkl", "rb") as f:
            return pickle.load(f)

    ref, p0, p1 = load("more-reference-p0"), load("more-job-p0"), load("more-job-p1")
    for got in (p0, p1):
        np.testing.assert_allclose(got["calibrate"][0], ref["calibrate"][0], rtol=1e-6)
        np.testing.assert_allclose(got["calibrate"][1], ref["calibrate"][1], rtol=1e-4, atol=1e-4)
        assert got["calibrate"][2] == ref["calibrate"][2]
        assert got["auto"][0] == pytest.approx(ref["auto"][0], rel=1e-6)
        np.testing.assert_allclose(got["auto"][1], ref["auto"][1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["free"], ref["free"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got["moments"]), jax.tree.leaves(ref["moments"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
    if sys.argv[1] == "dying":
        _dying_worker()
    elif sys.argv[1].startswith("more"):
        _more_worker(sys.argv[1], sys.argv[2])
    else:
        _worker(sys.argv[1], sys.argv[2])
