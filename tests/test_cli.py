"""The ``slt-jax`` command line: every flag documented, and a small ``trajectory`` run that
writes its outputs and resumes. The factories below are what ``--model``/``--data`` load."""

import argparse
import json

import jax
import orbax.checkpoint as ocp
import pytest

from slt_jax import cli
from slt_jax.demos.dln_trajectory import teacher
from slt_jax.models.dln import dln_data, dln_loss

_TEACHER_KEY, _DATA_KEY = jax.random.split(jax.random.key(0))
# The static settings of tests/test_trajectory.py, so the compiled chain program is shared.
SAMPLER_FLAGS = ["--step-size", "5e-7", "--num-chains", "8", "--num-burnin", "100",
                 "--num-draws", "200", "--batch-size", "100", "--quiet"]


def model():
    """``--model test_cli:model``: the loss and the parameter template."""
    return dln_loss, teacher(_TEACHER_KEY)


def data():
    """``--data test_cli:data``."""
    return dln_data(_DATA_KEY, teacher(_TEACHER_KEY), 10_000)


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_documents_every_flag(capsys):
    parser = cli.build_parser()
    subparsers = _subparsers(parser)
    assert set(subparsers) == {"demo", "trajectory"}
    for name, sub in subparsers.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert option in text
    assert "--example" in str(subparsers["demo"].format_help())
    assert subparsers["demo"].parse_args([]).example == "trajectory"


def test_trajectory_run_writes_outputs_and_resumes(tmp_path, capsys):
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        for step in (0, 10, 300):
            params = teacher(_TEACHER_KEY)
            manager.save(step, args=ocp.args.StandardSave(
                {"params": params, "step": step}))
        manager.wait_until_finished()
    argv = ["trajectory", str(tmp_path / "ckpt"), "--model", "test_cli:model", "--data",
            "test_cli:data", "--select", "params", "--out", str(tmp_path / "out"), *SAMPLER_FLAGS]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 checkpoints" in printed
    for name in ("llc_curve.csv", "llc_curve.json", "llc_curve.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    document = json.loads((tmp_path / "out" / "llc_curve.json").read_text())
    assert [row["step"] for row in document["rows"]] == [0, 10, 300]
    assert "stages" in document and document["settings"]["select"] == "select[params]"
    stored = sorted(p.name for p in (tmp_path / "out" / "results").glob("step_*.json"))
    assert len(stored) == 3
    # A rerun finds every step stored; with another step size it refuses to mix results.
    assert cli.main(argv) == 0
    with pytest.raises(SystemExit, match="different settings: .*step_size"):
        cli.main([*argv, "--step-size", "1e-6"])


def test_bad_factory_specs_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--model must be MODULE:FACTORY"):
        cli.main(["trajectory", str(tmp_path), "--model", "nocolon", "--data", "test_cli:data",
                  "--out", str(tmp_path / "o"), "--step-size", "1e-6"])
    with pytest.raises(SystemExit, match="has no 'missing'"):
        cli.main(["trajectory", str(tmp_path), "--model", "test_cli:missing", "--data",
                  "test_cli:data", "--out", str(tmp_path / "o"), "--step-size", "1e-6"])
