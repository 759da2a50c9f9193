"""``slt-jax``: parse a command line (and a TOML file), call the library, write results. No maths here.

Commands: ``llc`` (λ̂ at one point), ``trajectory`` (λ̂ at every checkpoint of an Orbax run),
``calibrate`` (the step-size sweep at one point), ``demo`` (an embedded example). Each writes its
results, figures and the resolved ``config.toml`` into ``--out``;
``slt-jax COMMAND --config OUT/config.toml`` repeats a run.

Errors. What the user typed or configured, and what the library refuses (a missing directory, a
bad factory, a factory that raises, a bad setting, a step that is not a checkpoint, a results
store written with other settings, an unknown TOML key), ends the command with one line on
stderr, ``slt-jax COMMAND: message``, and no traceback: exit status 2 for the command line and
its configuration, 1 for a run the library stopped (``ValueError``, ``OSError``,
:class:`~slt_jax.CalibrationError`, :class:`~slt_jax.DivergenceError`). Anything else is a bug
— in slt-jax or in the user's loss function — and keeps its traceback. ``--debug`` shows the
traceback of every error. Warnings print as one line each, ``slt-jax COMMAND: warning: …``.
"""

import argparse
import os
import sys
import warnings

from slt_jax import __version__
from slt_jax.cli import options
from slt_jax.cli.options import RunFailed, UsageError
from slt_jax.job import DistributedError
from slt_jax.job import add_arguments as add_cluster_arguments
from slt_jax.errors import CalibrationError, DivergenceError

_DEMO_OUT = "slt-jax-demo"
# Errors that carry a message meant for the user; others are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError, CalibrationError, DivergenceError, RunFailed, DistributedError)

_DESCRIPTIONS = {
    options.LLC: (
        "λ̂ at one point",
        "Estimate the local learning coefficient at one point: a checkpoint step of an Orbax directory "
        "(CHECKPOINT_DIR --step S) or the parameters returned by --model. Writes result.json, traces.png "
        "(per-chain λ̂ traces) and config.toml into --out and prints a health summary."),
    options.TRAJECTORY: (
        "λ̂ at every checkpoint of an Orbax training run",
        "Estimate the local learning coefficient at every checkpoint of an Orbax CheckpointManager directory; "
        "write llc_curve.csv, llc_curve.json (with stage boundaries), llc_curve.png, early_warning.png (with "
        "enough healthy rows) and config.toml into --out. Finished checkpoints are stored in OUT/results as "
        "they complete, and a rerun resumes there."),
    options.CALIBRATE: (
        "the step-size sweep at one point",
        "Sweep SGLD step sizes at one point (as for llc) in one compiled program, compare them at equal "
        "simulated time and recommend the largest that agrees with the smaller ones. Prints the table; writes "
        "calibration.json, calibration.png and config.toml into --out."),
}
_EPILOG = ("Every flag may also come from --config FILE.toml: keys are the long flag names (with - or _), at "
           "the top level or in a [llc], [trajectory] or [calibrate] table; the command line overrides the file. "
           "Errors print one line (exit 2: the command line or its config; 1: the run); --debug shows tracebacks.")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """Appends each flag's default, read when help is printed: a settings flag's default is its
    settings class's, and importing those imports JAX, which must wait for the command."""

    def _get_help_string(self, action):
        flag = getattr(action, "flag", None)
        default = None if flag is None else flag.default_value()
        if default is None or default is False and not flag.switch:
            return action.help
        return f"{action.help} (default {('on' if default else 'off') if flag.switch else default})"


def _add_flag(group, flag: options.Flag) -> None:
    if flag.positional:
        action = group.add_argument(flag.name, nargs="?", type=flag.parse, metavar=flag.metavar, help=flag.help)
    elif flag.switch:
        action = group.add_argument(flag.option, dest=flag.name, action=argparse.BooleanOptionalAction,
                                    help=flag.help)
    else:
        action = group.add_argument(flag.option, dest=flag.name, type=flag.parse, choices=flag.choices,
                                    metavar=flag.metavar, help=flag.help)
    action.flag = flag


def _add_command(sub, command: str) -> None:
    summary, description = _DESCRIPTIONS[command]
    parser = sub.add_parser(command, help=summary, description=description, epilog=_EPILOG,
                            argument_default=argparse.SUPPRESS, formatter_class=_Help)
    groups = {}
    for flag in options.flags_of(command):
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(options.GROUP_TITLES[flag.group])
        _add_flag(groups[flag.group], flag)
    parser.add_argument("--config", metavar="FILE.toml", help="read flags from a TOML file (the command line "
                        "overrides it); OUT/config.toml repeats a run")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    add_cluster_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``slt-jax`` argument parser with its subcommands."""
    parser = _Parser(prog="slt-jax", description="The local learning coefficient λ̂ of a model: at one point "
                     "(llc), at every checkpoint of an Orbax training run (trajectory), and the step-size sweep "
                     "behind it (calibrate).", epilog="slt-jax COMMAND --help lists the flags of each command.")
    parser.add_argument("--version", action="version", version=f"slt-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run an embedded example end to end",
        description="Run an embedded example. The default trains a deep linear network that "
        "learns in stages, saves it with Orbax, and draws its LLC curve with stage boundaries.",
    )
    demo.add_argument(
        "--example", choices=["trajectory", "llc", "grokking", "induction"], default="trajectory",
        help="trajectory (default): LLC curve and stages of a deep linear network's training; "
        "llc: λ̂ of one deep linear network next to Aoyagi's exact λ; grokking: LLC curve of "
        "modular addition learned with weight decay; induction: a 2-layer attention-only "
        "transformer's induction-head transition, its LLC stages and every head's refined LLC",
    )
    demo.add_argument("--seed", type=int, default=0, help="root PRNG seed (default 0)")
    demo.add_argument("--out", default=_DEMO_OUT, metavar="DIR", help=f"output directory (default ./{_DEMO_OUT})")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--debug", action="store_true", help="show the traceback of any error")
    for command in options.COMMANDS:
        _add_command(sub, command)
    parser.commands = sub.choices  # each command's parser, for its own error line
    return parser


def _show_warning(command):
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"slt-jax {command}: warning: {category.__name__}: {text}", file=sys.stderr, flush=True)
    return show


# The multi-process flags (slt_jax.distributed.add_arguments): per process, so never in config.toml.
_CLUSTER_FLAGS = ("coordinator", "num_processes", "process_id", "distributed", "init_timeout", "heartbeat_timeout",
                  "check_timeout")


def _run(args) -> int:
    from slt_jax.cli import commands

    if args.command == "demo":
        return commands.demo(args)
    cluster = {name: getattr(args, name, None) for name in _CLUSTER_FLAGS}
    given = {name: value for name, value in vars(args).items()
             if name not in ("command", "config", "debug", *_CLUSTER_FLAGS)}
    values = options.resolve(args.command, given, getattr(args, "config", None))
    return commands.COMMANDS[args.command]({**values, "cluster": argparse.Namespace(**cluster)})


def main(argv=None) -> int:
    """Entry point of the ``slt-jax`` command.

    Returns 0 when the command succeeded; otherwise exits (``SystemExit``) with status 2 (the
    command line or its configuration) or 1 (the run failed), after one line on stderr.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning(args.command)
        try:
            return _run(args)
        except BrokenPipeError:  # the reader went away (`slt-jax ... | head`): nothing left to say
            # Python's recipe: stdout to devnull, so that the interpreter's last flush does not fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
        except USER_ERRORS as error:
            if getattr(args, "debug", False):
                raise
            message = " ".join(str(error).splitlines()[0].split()) if str(error) else type(error).__name__
            print(f"slt-jax {args.command}: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2 if isinstance(error, UsageError) else 1) from None
        except KeyboardInterrupt as interrupt:
            if getattr(args, "debug", False):
                raise
            hint = f"; {interrupt}" if str(interrupt) else ""
            print(f"slt-jax {args.command}: interrupted{hint}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
