"""The ``slt-jax`` command line as a newcomer meets it: every flag documented, each command on a
small Orbax run written here (``llc``, ``trajectory``, ``calibrate``, ``demo``), ``--step-size
auto``, ``--config`` with an override, a resumed trajectory, relative paths everywhere, and bad
invocations that end in one line on stderr and no traceback.

The factories below are what ``--model test_cli:model`` and ``--data test_cli:data`` load. The
sampler flags are the static settings of tests/trajectory/test_trajectory.py, so a process
that ran those reuses their compiled chain program.
"""

import argparse
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from slt_jax import cli, settings
from slt_jax.cli import options
from slt_jax.demos.dln_trajectory import teacher
from slt_jax.models.dln import dln_data, dln_loss

_TEACHER_KEY, _DATA_KEY = jax.random.split(jax.random.key(0))
SAMPLER_FLAGS = ["--step-size", "5e-7", "--num-chains", "8", "--num-burnin", "100", "--num-draws", "200",
                 "--batch-size", "100", "--chunk-size", "100", "--quiet"]
INPUT_FLAGS = ["--model", "test_cli:model", "--data", "test_cli:data"]
# --step-size auto at test size: a short sweep of two chains per step size, one doubling at most,
# no Laplace-plateau check (each shortens what a real run does; none changes what runs).
AUTO_FLAGS = ["--sweep-steps", "800", "--sweep-chains", "2", "--max-extension", "2",
              "--max-plateau-extension", "none"]
ROOT = Path(__file__).resolve().parents[1]


def model():
    """``--model test_cli:model``: the loss and the parameter template."""
    return dln_loss, teacher(_TEACHER_KEY)


def data():
    """``--data test_cli:data``."""
    return dln_data(_DATA_KEY, teacher(_TEACHER_KEY), 10_000)


def broken():
    """A factory that fails the way user code does."""
    raise RuntimeError("no GPU found")


def save(directory, params_of_step):
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        for step, params in params_of_step.items():
            manager.save(step, args=ocp.args.StandardSave({"params": params, "step": step}))
        manager.wait_until_finished()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A training state saved at steps 0, 10 and 300 (the teacher: every row healthy)."""
    directory = tmp_path_factory.mktemp("run") / "ckpt"
    save(directory, {step: teacher(_TEACHER_KEY) for step in (0, 10, 300)})
    return directory


def run(argv, capsys):
    """``main(argv)`` in this process: its exit status, stdout and stderr."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_documents_every_flag(capsys):
    subparsers = _subparsers(cli.build_parser())
    assert set(subparsers) == {"demo", "llc", "trajectory", "calibrate"}
    for name, sub in subparsers.items():
        status, text, _ = run([name, "--help"], capsys)
        assert status == 0
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert option in text
    assert "(default 8)" in subparsers["llc"].format_help()  # RunSettings' own default
    assert subparsers["demo"].parse_args([]).example == "trajectory"
    status, text, _ = run(["--version"], capsys)
    assert status == 0 and text.strip() == f"slt-jax {__import__('slt_jax').__version__}"


@pytest.mark.unit
def test_every_setting_is_one_flag_with_its_settings_default():
    for group, cls in [("run", settings.RunSettings), ("auto", settings.AutoSettings),
                       ("sweep", settings.SweepSettings), ("precision", settings.Precision)]:
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "sweep"}
        flags = [flag for flag in options.FLAGS if flag.group == group]
        assert sorted(flag.setting for flag in flags) == sorted(fields), group
        for flag in flags:
            assert flag.default_value() == fields[flag.setting]
    assert {f.option for f in options.FLAGS if f.group == "sweep"} >= {"--sweep-chains", "--sweep-steps"}
    from slt_jax.samplers import KERNELS

    assert set(options.SAMPLERS) == {*KERNELS, "nuts"}


@pytest.mark.unit
def test_config_files_merge_under_the_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('num-chains = 4\nseed = 3\ncalibrate_at = 10\n'
                      '[trajectory]\nnum_draws = 50\nsteps = [0, 10]\nstep-size = "auto"\n'
                      '[llc]\nnum_draws = 7\n')
    values = options.resolve("trajectory", {"num_chains": 16}, config)
    assert (values["num_chains"], values["num_draws"], values["seed"]) == (16, 50, 3)
    assert (values["steps"], values["step_size"], values["calibrate_at"]) == ([0, 10], "auto", 10)
    llc = options.resolve("llc", {}, config)  # top-level keys of other commands are skipped
    assert llc["num_draws"] == 7 and "calibrate_at" not in llc
    # What a run writes reads back to the same values.
    values.update(checkpoint_dir="/abs/ckpt", model="m:f", data="m:g", out="/abs/out",
                  max_plateau_extension="none")
    written = options.write_config(tmp_path / "config.toml", "trajectory", values, "test")
    again = options.resolve("trajectory", {}, written)
    assert again["max_plateau_extension"] == "none" and again["max_extension"] == 8.0
    assert {k: again[k] for k, v in values.items() if v is not None and k != "quiet"} == {
        k: v for k, v in values.items() if v is not None and k != "quiet"}
    assert options.settings_of("auto", again)["max_plateau_extension"] is None
    assert tomllib.loads(written.read_text())["trajectory"]["steps"] == [0, 10]

    for text, message in [("num_chain = 4", "unknown key 'num_chain'; did you mean 'num-chains'"),
                          ("[llc]\ncalibrate_at = 3",
                           r"unknown key 'calibrate_at' in \[llc\] \(a flag of trajectory\)"),
                          ("[estimate]\nx = 1", r"unknown table \[estimate\]"),
                          ("num_chains = 'many'", "num_chains: expected an integer, got 'many'"),
                          ("quiet = 1", "quiet: expected true or false"),
                          ("sampler = 'hmc'", "'hmc' is not one of sgld"),
                          ("num_chains = ", "is not valid TOML")]:
        config.write_text(text)
        with pytest.raises(options.UsageError, match=message):
            options.resolve("llc", {}, config)


def test_trajectory_writes_resumes_and_repeats_from_its_config(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["trajectory", checkpoints, *INPUT_FLAGS, "--select", "params", "--out", out, *SAMPLER_FLAGS]
    status, printed, err = run(argv, capsys)
    assert status == 0, err
    assert "3 checkpoints, 3 healthy" in printed and "stage boundaries at steps" in printed
    assert "note:" in printed and "early_warning.png" in printed  # 3 rows: too few for the indicators
    for name in ("llc_curve.csv", "llc_curve.json", "llc_curve.png", "config.toml"):
        assert (out / name).stat().st_size > 0
    document = json.loads((out / "llc_curve.json").read_text())
    assert [row["step"] for row in document["rows"]] == [0, 10, 300]
    assert "stages" in document and document["settings"]["select"] == "select[params]"
    assert len(list((out / "results").glob("step_*.json"))) == 3
    stored = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("step_*.json")}

    # A rerun finds every step stored; the written configuration repeats the run exactly.
    config = tomllib.loads((out / "config.toml").read_text())["trajectory"]
    assert config["checkpoint_dir"] == str(checkpoints) and config["num_chains"] == 8
    assert "sweep_steps" not in config  # a fixed step size: the sweep's settings do not apply
    status, printed, err = run(["trajectory", "--config", out / "config.toml", "--quiet"], capsys)
    assert status == 0, err
    assert stored == {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("step_*.json")}
    assert json.loads((out / "llc_curve.json").read_text())["rows"] == document["rows"]
    # The command line overrides the file; the store refuses to mix the results.
    status, printed, err = run(["trajectory", "--config", out / "config.toml", "--step-size", "1e-6"], capsys)
    assert status == 1
    assert err.startswith("slt-jax trajectory: results_path") and "different settings: " in err
    assert "step_size: stored 5e-07, now 1e-06" in err and err.count("\n") == 1


def test_a_short_flagged_trajectory_writes_what_it_can(tmp_path, capsys):
    # Step 0 sits at half the teacher, far from any critical point: every chain slides downhill.
    save(tmp_path / "ckpt", {0: [0.5 * w for w in teacher(_TEACHER_KEY)], 300: teacher(_TEACHER_KEY)})
    out = tmp_path / "out"
    status, printed, err = run(["trajectory", tmp_path / "ckpt", *INPUT_FLAGS, "--select", "params", "--out", out,
                                *SAMPLER_FLAGS, "--no-resume"], capsys)
    assert status == 0, err
    assert "2 checkpoints, 1 healthy" in printed and "steps 0 (8 escaped)" in printed
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "stages skipped" in notes[0] and "early_warning.png" in notes[1]
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "llc_curve.csv", "llc_curve.json",
                                                     "llc_curve.png"]
    with open(out / "llc_curve.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["flagged"] for r in rows] == ["True", "False"] and rows[0]["llc_mean"] == ""


def test_llc_at_a_checkpoint_is_its_trajectory_row(checkpoints, tmp_path, capsys):
    row = {r["step"]: r for r in json.loads(
        (_trajectory(checkpoints, tmp_path / "curve", capsys) / "llc_curve.json").read_text())["rows"]}[10]
    out = tmp_path / "llc"
    status, printed, err = run(["llc", checkpoints, "--step", "10", *INPUT_FLAGS, "--select", "params",
                                "--out", out, *SAMPLER_FLAGS, "--traces"], capsys)
    assert status == 0, err
    assert printed.startswith(f"λ̂ at step 10 of {checkpoints}\nλ̂ = ")
    assert "chains: 8 of 8 healthy" in printed and "R-hat" in printed and "ESS" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["llc_mean"] == row["llc_mean"] and result["llc_se"] == row["llc_se"]
    assert np.shape(result["llc_trace"]) == (8, 200) and result["settings"]["warnings"] == []
    assert (out / "traces.png").read_bytes()[:4] == b"\x89PNG"
    # Without a checkpoint directory the point is the model's own parameters (the teacher).
    status, printed, err = run(["llc", *INPUT_FLAGS, "--out", tmp_path / "teacher", *SAMPLER_FLAGS], capsys)
    assert status == 0, err
    assert printed.startswith("λ̂ at the parameters of --model")
    assert "llc_trace" not in json.loads((tmp_path / "teacher" / "result.json").read_text())


def _trajectory(checkpoints, out, capsys):
    status, _, err = run(["trajectory", checkpoints, *INPUT_FLAGS, "--select", "params", "--out", out,
                          *SAMPLER_FLAGS, "--no-resume"], capsys)
    assert status == 0, err
    return out


@pytest.mark.filterwarnings("default::slt_jax.errors.CalibrationWarning")  # the CLI prints them: checked below
def test_step_size_auto_and_calibrate(checkpoints, tmp_path, capsys):
    flags = [*INPUT_FLAGS, "--select", "params", "--batch-size", "100", "--chunk-size", "100", "--quiet"]
    status, printed, err = run(["calibrate", checkpoints, "--step", "300", *flags, *AUTO_FLAGS[:4],
                                "--out", tmp_path / "cal"], capsys)
    assert status == 0, err
    assert printed.startswith("| step size | nβ | γ | λ̂ | se | MALA acc. | status |")
    calibration = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert len(calibration["table"]) >= 4 and calibration["choices"][0]["step_size"] > 0  # the grid, and any extension
    assert (tmp_path / "cal" / "calibration.png").stat().st_size > 0

    # The trajectory calibrates once, at step 300, and every row uses that choice.
    out = tmp_path / "auto"
    status, printed, err = run(["trajectory", checkpoints, *flags, "--steps", "10,300", "--step-size", "auto",
                                "--calibrate-at", "300", *AUTO_FLAGS, "--num-chains", "8", "--num-draws", "50",
                                "--num-burnin", "50", "--out", out], capsys)
    assert status == 0, err
    # Short runs may not settle within --max-extension 2: the warning is one line each.
    assert all(line.startswith("slt-jax trajectory: warning: CalibrationWarning: ") for line in err.splitlines())
    assert "step size calibrated once, at step 300" in printed
    rows = json.loads((out / "llc_curve.json").read_text())["rows"]
    assert [r["calibrated_at"] for r in rows] == [300, 300] and all(r["step_size"] > 0 for r in rows)
    config = tomllib.loads((out / "config.toml").read_text())["trajectory"]
    assert (config["step_size"], config["calibrate_at"], config["sweep_steps"]) == ("auto", 300, 800)
    assert config["max_plateau_extension"] == "none"


def test_bad_invocations_end_in_one_line(checkpoints, tmp_path, capsys):
    out = ["--out", tmp_path / "o"]
    config = tmp_path / "bad.toml"
    config.write_text("[llc]\nnum_chain = 4\n")
    cases = [
        (["llc", tmp_path / "missing", *INPUT_FLAGS, *out, *SAMPLER_FLAGS], 1, "does not exist"),
        (["llc", "--model", "nocolon", "--data", "test_cli:data", *out, *SAMPLER_FLAGS], 2, "MODULE:FACTORY"),
        (["llc", "--model", "test_cli:missing", "--data", "test_cli:data", *out, *SAMPLER_FLAGS], 2,
         "has no 'missing'"),
        (["llc", "--model", "no_such_module:f", "--data", "test_cli:data", *out, *SAMPLER_FLAGS], 2,
         "cannot import 'no_such_module'"),
        (["llc", "--model", "test_cli:broken", "--data", "test_cli:data", *out, *SAMPLER_FLAGS], 2,
         "broken() raised RuntimeError: no GPU found"),
        (["llc", *INPUT_FLAGS, *out, *SAMPLER_FLAGS, "--step-size", "-0.00001"], 1, "step_size must be"),
        (["llc", checkpoints, *INPUT_FLAGS, "--item", "weights", *out, *SAMPLER_FLAGS], 1, "has no item 'weights'"),
        (["llc", checkpoints, *INPUT_FLAGS, "--select", "params", "--step", "5", *out, *SAMPLER_FLAGS], 2,
         "--step 5 is not a finished checkpoint"),
        (["llc", checkpoints, *INPUT_FLAGS, "--select", "parms", *out, *SAMPLER_FLAGS], 1,
         "--select 'parms': the restored state has no 'parms'"),
        (["llc", *INPUT_FLAGS, "--step", "5", *out, *SAMPLER_FLAGS], 2, "--step need CHECKPOINT_DIR"),
        (["llc", *INPUT_FLAGS, *out], 2, "--step-size is required"),
        (["trajectory", *INPUT_FLAGS, *out, *SAMPLER_FLAGS], 2, "CHECKPOINT_DIR is required"),
        (["llc", "--config", config, *INPUT_FLAGS, *out, *SAMPLER_FLAGS], 2, "unknown key 'num_chain' in [llc]"),
        (["llc", *INPUT_FLAGS, *out, *SAMPLER_FLAGS, "--num-chains", "0"], 1, "num_chains must be a positive"),
        (["llc", *INPUT_FLAGS, *out, *SAMPLER_FLAGS, "--devices", "64"], 2, "asks for 64 devices, JAX has"),
        (["llc", *INPUT_FLAGS, *out, *SAMPLER_FLAGS, "--num-chains", "x"], 2, "expected an integer, got 'x'"),
        (["llc", *INPUT_FLAGS, *out, "--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    ]
    for argv, expected, message in cases:
        status, _, err = run(argv, capsys)
        assert status == expected, (argv, err)
        assert err.startswith(f"slt-jax {argv[0]}") and err.count("\n") == 1, err
        assert message in err, (message, err)
    with pytest.raises(ValueError, match="step_size must be"):  # --debug keeps the traceback
        cli.main(["llc", *map(str, [*INPUT_FLAGS, *out, *SAMPLER_FLAGS]), "--step-size", "-1", "--debug"])


def test_an_interrupted_trajectory_says_how_to_resume(checkpoints, tmp_path, monkeypatch, capsys):
    from slt_jax.trajectory import llc_trajectory

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llc_trajectory, "llc_trajectory", interrupted)
    status, _, err = run(["trajectory", checkpoints, *INPUT_FLAGS, "--out", tmp_path, *SAMPLER_FLAGS], capsys)
    assert status == 130
    assert err == (f"slt-jax trajectory: interrupted; the finished checkpoints are stored in {tmp_path / 'results'}: "
                   f"run the same command (or slt-jax trajectory --config {tmp_path / 'config.toml'}) to resume\n")


def test_mesh_and_devices_map_to_the_library():
    from slt_jax.cli import commands

    assert commands.start_jax({"devices": 1}) == {"devices": 1}
    mesh = commands.start_jax({"mesh": [1, 1]})["mesh"]
    assert dict(mesh.shape) == {"chains": 1}
    with pytest.raises(options.UsageError, match="give --devices or --mesh, not both"):
        commands.start_jax({"devices": 1, "mesh": [1, 1]})


def test_a_failing_command_prints_no_traceback(tmp_path):
    (tmp_path / "factories.py").write_text("def model():\n    raise RuntimeError('no GPU found')\n")
    done = subprocess.run([sys.executable, "-m", "slt_jax.cli", "llc", "--model", "factories:model", "--data",
                           "factories:model", "--step-size", "1e-5", "--out", "o"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 2
    assert done.stderr == ("slt-jax llc: --model 'factories:model': model() raised RuntimeError: "
                           "no GPU found\n"), done.stderr


def test_devices_flag_exposes_cpu_devices_itself(tmp_path):
    """``--devices 2`` in a fresh process: the command sets XLA_FLAGS before JAX starts."""
    (tmp_path / "line.py").write_text(
        "import jax.numpy as jnp\n"
        "def model():\n    return (lambda w, b: jnp.mean((b['y'] - w['a'] * b['x']) ** 2)), {'a': jnp.ones(())}\n"
        "def data():\n    x = jnp.linspace(-1.0, 1.0, 64)\n    return {'x': x, 'y': x}\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "slt_jax.cli", "llc", "--model", "line.py:model", "--data",
                           "line.py:data", "--step-size", "1e-3", "--num-chains", "4", "--num-draws", "20",
                           "--num-burnin", "10", "--devices", "2", "--out", "out", "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["settings"]["devices"] == ["cpu:0", "cpu:1"] and result["settings"]["mesh"] == {"chains": 2}
    config = tomllib.loads((tmp_path / "out" / "config.toml").read_text())["llc"]
    assert config["model"] == f"{tmp_path / 'line.py'}:model" and config["devices"] == 2


def test_every_path_taking_api_accepts_relative_paths(checkpoints, tmp_path, monkeypatch, capsys):
    import slt_jax

    monkeypatch.chdir(checkpoints.parent)
    relative = checkpoints.name
    assert slt_jax.list_steps(relative) == [0, 10, 300]
    steps = [step for step, _ in slt_jax.CheckpointTrajectory(relative, template=teacher(_TEACHER_KEY),
                                                               select=lambda s: s["params"], steps=[10])]
    assert steps == [10]
    store = slt_jax.ResultsStore("store", {"a": 1})
    store.write(1, {"llc": 2.0})
    assert (checkpoints.parent / "store" / "settings.json").exists()
    curve = slt_jax.llc_trajectory(relative, dln_loss, data(), jax.random.key(0), steps=[10], results_path="llc",
                                   select=lambda s: s["params"], step_size=5e-7, num_chains=8, num_burnin=100,
                                   num_draws=200, batch_size=100, chunk_size=100, progress=False)
    assert curve.settings["checkpoint_dir"] == str(checkpoints)
    assert sorted(p.name for p in (checkpoints.parent / "llc").iterdir())[-1].startswith("step_")
    paths = curve.write("curve")
    assert paths["csv"] == checkpoints.parent / "curve" / "llc_curve.csv"
    result = slt_jax.estimate_llc(dln_loss, teacher(_TEACHER_KEY), data(), jax.random.key(0), step_size=5e-7,
                                  localization=100.0, num_chains=8, num_burnin=100, num_draws=200, batch_size=100,
                                  chunk_size=100, progress=False)
    result.to_json("result.json")
    result.plot_traces("traces.png")
    assert (checkpoints.parent / "result.json").exists() and (checkpoints.parent / "traces.png").exists()
    status, _, err = run(["llc", relative, "--select", "params", *INPUT_FLAGS, "--out", "cli_out",
                          *SAMPLER_FLAGS], capsys)
    assert status == 0, err
    written = tomllib.loads((checkpoints.parent / "cli_out" / "config.toml").read_text())["llc"]
    assert written["checkpoint_dir"] == str(checkpoints) and written["out"] == str(checkpoints.parent / "cli_out")


def test_demo_llc_example(tmp_path, monkeypatch, capsys):
    """``slt-jax demo --example llc`` with fewer draws (the full size is the slow test below)."""
    from slt_jax.demos import llc

    monkeypatch.setattr(llc, "SETTINGS", {**llc.SETTINGS, "num_draws": 200, "num_burnin": 200})
    status, printed, err = run(["demo", "--example", "llc", "--quiet", "--out", tmp_path], capsys)
    assert status == 0, err
    assert "Aoyagi's λ = 8 (multiplicity 1)" in printed
    assert json.loads((tmp_path / "llc_result.json").read_text())["settings"]["num_draws"] == 200


@pytest.mark.slow
def test_demo_llc_example_as_typed(tmp_path):
    done = subprocess.run([sys.executable, "-m", "slt_jax.cli", "demo", "--example", "llc", "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "relative error" in done.stdout and (tmp_path / "slt-jax-demo" / "llc_result.json").exists()


def test_llc_over_two_processes_is_the_one_process_run(tmp_path, monkeypatch):
    """``slt-jax llc --devices 4`` as two processes of one job (the launcher's environment, 2 CPU
    devices each, gloo) gives the per-chain λ̂ of one process with 4 devices; process 0 writes."""
    from slt_jax import launch

    (tmp_path / "line.py").write_text(
        "import jax.numpy as jnp\n"
        "def model():\n    return (lambda w, b: jnp.mean((b['y'] - w['a'] * b['x']) ** 2)), {'a': jnp.ones(())}\n"
        "def data():\n    x = jnp.linspace(-1.0, 1.0, 64)\n    return {'x': x, 'y': x}\n")
    argv = [sys.executable, "-m", "slt_jax.cli", "llc", "--model", "line.py:model", "--data", "line.py:data",
            "--step-size", "1e-3", "--num-chains", "8", "--num-draws", "40", "--num-burnin", "20", "--batch-size",
            "16", "--devices", "4", "--quiet", "--no-check-step"]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": str(ROOT)}
    one = subprocess.run([*argv, "--out", "one"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    monkeypatch.chdir(tmp_path)  # the launcher's processes start here
    results = launch.launch([*argv, "--out", "two"], 2, timeout=300, cpu_devices=2, env=env, output=io.StringIO())
    assert [status for status, _, _ in results] == [0, 0], [text[-2000:] for _, _, text in results]
    single, joint = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two"))
    np.testing.assert_allclose(joint["llc_per_chain"], single["llc_per_chain"], rtol=1e-5, atol=1e-6)
    assert joint["settings"]["processes"] == 2 and len(joint["settings"]["devices"]) == 4
    assert "λ̂" in results[0][2] and "λ̂" in results[1][2]  # every process prints the complete result
