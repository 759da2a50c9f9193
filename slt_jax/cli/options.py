"""The flags of ``slt-jax``: one table, read from the command line or a TOML file.

Every sampler setting is a flag: each field of :class:`~slt_jax.settings.RunSettings`,
:class:`~slt_jax.settings.AutoSettings`, :class:`~slt_jax.settings.SweepSettings` (as
``--sweep-…``) and :class:`~slt_jax.settings.Precision` has one row in :data:`FLAGS`, whose
default is the dataclass's own. The rest are the run's inputs and outputs.

A configuration file (``--config FILE.toml``) holds the same names as keys, with ``-`` or
``_``: at the top level (shared by every command; a key that is no flag of the command being
run is skipped) or in a ``[llc]``, ``[trajectory]`` or ``[calibrate]`` table (for that command:
every key must be one of its flags). The command line overrides the file, the file the
defaults. :func:`write_config` writes the resolved values back as TOML, so
``slt-jax COMMAND --config OUT/config.toml`` repeats a run.

Its length: most of it is the flag table itself, one row per setting.
"""

import argparse
import dataclasses
import difflib
import json
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

LLC, TRAJECTORY, CALIBRATE = "llc", "trajectory", "calibrate"
COMMANDS = (LLC, TRAJECTORY, CALIBRATE)
SAMPLING = frozenset({LLC, TRAJECTORY})
ALL = frozenset(COMMANDS)
# Flag groups that fill a settings class of slt_jax.settings (imported only when needed: it imports
# JAX, which must start after the command has set XLA_FLAGS).
SETTINGS = {"run": "RunSettings", "auto": "AutoSettings", "sweep": "SweepSettings", "precision": "Precision"}
SAMPLERS = ("sgld", "sgld_rademacher", "rmsprop_sgld", "sgnht", "nuts")


class UsageError(ValueError):
    """Something typed on the command line or in a configuration file is wrong (exit status 2)."""


class RunFailed(RuntimeError):
    """A run ended without its result, for a reason it names (exit status 1)."""


# Parsers: each turns a command-line string into the value; a bad one raises ArgumentTypeError.
def _number(kind: Callable, what: str):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    parse.__name__ = what
    return parse


INT, FLOAT = _number(int, "an integer"), _number(float, "a number")


def _or(parse: Callable, word: str, value):
    """``parse``, or ``value`` for the literal ``word``."""
    def parse_or(text):
        return value if str(text).strip().lower() == word else parse(text)
    return parse_or


def _list(parse: Callable):
    def parse_list(text):
        return [parse(part.strip()) for part in str(text).split(",") if part.strip()]
    return parse_list


def _mesh(text):
    parts = _list(INT)(text)
    if not 1 <= len(parts) <= 2:
        raise argparse.ArgumentTypeError(f"expected CHAINS or CHAINS,DATA, got {text!r}")
    return parts + [1] * (2 - len(parts))


def _tristate(text):
    table = {"auto": None, "on": True, "true": True, "off": False, "false": False}
    key = str(text).strip().lower()
    if key not in table:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return table[key]


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: its name (``num_chains`` → ``--num-chains``), how to read it, its help, the
    commands that take it, and where its value goes (``group``: a settings class of
    :data:`SETTINGS` and its ``field``, or ``"input"``/``"output"``/… for the command itself)."""

    name: str
    parse: Callable = str
    help: str = ""
    commands: frozenset = ALL
    group: str = "input"
    field: str | None = None
    metavar: str | None = None
    choices: tuple | None = None
    switch: bool = False
    default: Any = None
    positional: bool = False
    none_word: str | None = None  # the word that sets a settings field to None (its default is not None)

    @property
    def option(self) -> str:
        return self.name if self.positional else "--" + self.name.replace("_", "-")

    @property
    def setting(self) -> str:
        return self.field or self.name

    def default_value(self):
        """The default: the settings dataclass's for a settings flag (this imports JAX), else
        the table's."""
        if self.group in SETTINGS:
            return {f.name: f.default for f in dataclasses.fields(settings_class(self.group))}[self.setting]
        return self.default

    def convert(self, value, where: str):
        """A configuration file's value, checked and read as the command line would read it."""
        if self.switch:
            if not isinstance(value, bool):
                raise UsageError(f"{where}: expected true or false, got {value!r}")
            return value
        if isinstance(value, bool) or isinstance(value, dict):
            raise UsageError(f"{where}: expected {getattr(self.parse, '__name__', 'a string')}, got {value!r}")
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        try:
            parsed = self.parse(text)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{where}: {error}") from None
        if self.choices is not None and parsed not in self.choices:
            raise UsageError(f"{where}: {parsed!r} is not one of {', '.join(map(str, self.choices))}")
        return parsed


def settings_class(group: str):
    """The settings dataclass a flag group fills."""
    from slt_jax import settings

    return getattr(settings, SETTINGS[group])


def _run(name, parse, text, commands=SAMPLING, **kw):
    return Flag(name, parse, text, commands, "run", **kw)


def _auto(name, parse, text, **kw):
    return Flag(name, parse, text, SAMPLING, "auto", **kw)


def _sweep(field, parse, text, name=None, **kw):
    return Flag(name or "sweep_" + field, parse, text, ALL, "sweep", field=field, **kw)


FLAGS: tuple[Flag, ...] = (
    # What to measure.
    Flag("checkpoint_dir", str, "an orbax.checkpoint.CheckpointManager directory (optional for llc and "
         "calibrate: without it, the point is the parameters returned by --model)", positional=True,
         metavar="CHECKPOINT_DIR"),
    Flag("model", str, "a factory returning loss_fn, or (loss_fn, params, ...), where loss_fn(params, batch) is "
         "the mean per-sample loss: MODULE:FACTORY (importable from the working directory) or FILE.py:FACTORY; "
         "required",
         metavar="MODULE:FACTORY"),
    Flag("data", str, "a factory returning the data pytree (arrays with a leading sample axis); required",
         metavar="MODULE:FACTORY"),
    Flag("eval_data", str, "a factory returning data to measure the loss on (data-refined LLC); gradients, n and "
         "nβ stay those of --data", SAMPLING, metavar="MODULE:FACTORY"),
    Flag("item", str, "the item holding the parameters in a composite checkpoint (e.g. params)", metavar="NAME"),
    Flag("select", str, "the path to the parameters inside a saved training state (e.g. params or "
         "state/params)", metavar="KEY[/KEY...]"),
    Flag("step", INT, "the checkpoint step (default the last finished one); its key is fold_in(seed, step), as "
         "for that step's row of a trajectory", frozenset({LLC, CALIBRATE}), metavar="S"),
    Flag("steps", _list(INT), "only these checkpoint steps (default all)", frozenset({TRAJECTORY}),
         metavar="S1,S2,..."),
    Flag("seed", INT, "root PRNG seed", default=0, metavar="SEED"),
    # The posterior and the sampler.
    Flag("step_size", _or(FLOAT, "auto", "auto"), "SGLD step size ε, or auto: calibrated by a step-size sweep "
         "(the --sweep-* flags), then run until λ̂ has settled (the --max-* flags); required", SAMPLING,
         "estimate", metavar="EPS|auto"),
    Flag("calibrate_at", _or(INT, "each", "each"), "with --step-size auto: calibrate at each checkpoint, or once, "
         "at checkpoint STEP, for every row", frozenset({TRAJECTORY}), "estimate", metavar="each|STEP",
         default="each"),
    Flag("step_sizes", _list(FLOAT), "the step sizes to sweep (default a grid placed by the Hessian's scale)",
         frozenset({CALIBRATE}), "estimate", metavar="E1,E2,..."),
    Flag("localization", FLOAT, "localization γ (default nβ/10)", group="estimate", metavar="GAMMA"),
    Flag("nbeta", FLOAT, "inverse temperature times n (default n/log n)", group="estimate", metavar="NBETA"),
    Flag("sampler", str, "the sampler kernel", group="estimate", choices=SAMPLERS, default="sgld"),
    Flag("param_mask", str, "sample only the parameters whose pytree path matches (weight-refined LLC)",
         group="estimate", metavar="REGEX"),
    Flag("mala", bool, "also run the Metropolis (MALA) acceptance check of SGLD proposals (small models)",
         frozenset({LLC}), "estimate", switch=True, default=False),
    # RunSettings: the shape of a run (calibrate uses the batch, chunk and divergence threshold).
    _run("num_chains", INT, "independent chains", metavar="N"),
    _run("num_draws", INT, "recorded draws per chain", metavar="N"),
    _run("num_burnin", INT, "steps per chain before the first draw", metavar="N"),
    _run("steps_per_draw", INT, "sampler steps between draws", metavar="N"),
    _run("batch_size", INT, "rows per gradient minibatch (default min(256, n))", ALL, metavar="N"),
    _run("loss_estimator", str, "what each draw records", choices=("control_variate", "minibatch", "full_batch")),
    _run("chunk_size", INT, "steps per compiled chunk (default 512, or the run's power of 2 if smaller)", ALL,
         metavar="N"),
    _run("divergence_threshold", FLOAT, "a chain diverges when nβ·(L_B − L_n(w*)) exceeds this (default "
         "10·d + 100 + 20·nβ·std(L_B(w*)))", ALL, metavar="X"),
    _run("on_divergence", str, "diverged chains: warn (exclude them and warn) or raise", choices=("warn", "raise")),
    _run("check_step", bool, "after a fixed-step run, check the step's stability at the chains, the kernel's health "
         "and the trend of λ̂ (warns; its cost is recorded)", switch=True),
    # AutoSettings: what --step-size auto may do after the sweep.
    _auto("max_extension", FLOAT, "the longest run while λ̂ still trends, in calibrated schedules", metavar="X"),
    _auto("max_plateau_extension", _or(FLOAT, "none", "none"), "the longest run while λ̂ reads the Laplace value "
          "of a degenerate w*; none skips that check", metavar="X|none", none_word="none"),
    _auto("max_step_reductions", INT, "how often the stiffness check at the chains may halve the step",
          metavar="N"),
    _auto("plateau_settle_efolds", _or(FLOAT, "none", "none"), "a run on the Laplace plateau has settled there after "
          "this many e-folds of 2/(εγ) steps; none waits up to max_plateau_extension", metavar="X|none",
          none_word="none"),
    _auto("plateau_rtol", FLOAT, "λ̂ within this fraction of the Laplace value (+2 se) reads as the plateau",
          metavar="X"),
    _auto("regular_fraction", FLOAT, "points whose Laplace value is at least this fraction of d/2 have no "
          "plateau to leave", metavar="X"),
    _auto("laplace_rows", INT, "rows of the Hessian behind the Laplace value", metavar="N"),
    _auto("laplace_dense_params", INT, "up to this many sampled parameters the Laplace value is dense",
          metavar="N"),
    # SweepSettings: the step-size sweep of calibrate and of --step-size auto.
    _sweep("num_chains", INT, "chains per step size in the sweep (default the sampler's: 4, sgnht 8)",
           name="sweep_chains", metavar="N"),
    _sweep("num_steps", INT, "steps of the sweep (of its smallest step size)", name="sweep_steps", metavar="N"),
    _sweep("burnin_fraction", FLOAT, "the part of the sweep's simulated time before its comparison window",
           metavar="X"),
    _sweep("rtol", FLOAT, "a step size agrees when |Δλ̂| + z·se ≤ rtol·|λ̂_ref|", metavar="X"),
    _sweep("z", FLOAT, "standard errors added to the difference in that test", metavar="X"),
    _sweep("mala", _tristate, "the Metropolis acceptance check of the sweep: auto (small models), on or off",
           metavar="auto|on|off"),
    _sweep("mala_budget", FLOAT, "n·d up to which the Metropolis check runs under auto", metavar="X"),
    _sweep("grid_points", INT, "step sizes in the default grid (default the sampler's: 4, sgnht 3)", metavar="N"),
    _sweep("grid_skip", INT, "grid factors between the stability rule and the grid's largest step (default the "
           "sampler's: 0, sgnht 1)", metavar="N"),
    _sweep("grid_factor", FLOAT, "ratio between neighbouring step sizes of the grid", metavar="X"),
    _sweep("min_window_draws", INT, "draws the largest step size gets in its window, at least", metavar="N"),
    _sweep("window_draws", INT, "draws the largest step size's window records where its steps allow (default the "
           "sampler's: 100, sgnht 200)", metavar="N"),
    _sweep("check_z", FLOAT, "standard errors by which a trend or a negative λ̂ must be significant",
           metavar="X"),
    _sweep("min_mala_acceptance", FLOAT, "acceptance below which a step size counts as unstable", metavar="X"),
    _sweep("max_grid_extensions", INT, "rounds the sweep may add (replicates, or a step further down) until its "
           "pick is verified", metavar="N"),
    _sweep("on_unverified", str, "past that budget: raise (CalibrationError) or warn and use the best unverified "
           "step", choices=("raise", "warn")),
    # Precision.
    Flag("dtype", str, "positions, gradients and losses (float64 turns on jax_enable_x64)", ALL, "precision",
         choices=("float32", "float64")),
    Flag("compute_dtype", str, "evaluate the model at this precision (e.g. bfloat16)", ALL, "precision",
         choices=("bfloat16", "float16", "float32", "float64")),
    # Devices.
    Flag("devices", INT, "shard the chains over the first N local devices; on a CPU host the command exposes N "
         "CPU devices itself when it starts JAX", group="devices", metavar="N"),
    Flag("mesh", _mesh, "a mesh of CHAINS×DATA devices: the chains split over CHAINS groups, the data rows over "
         "DATA devices in each", group="devices", metavar="CHAINS[,DATA]"),
    # Outputs.
    Flag("out", str, "output directory; required", group="output", metavar="DIR"),
    Flag("traces", bool, "keep the per-draw traces in result.json", frozenset({LLC}), "output", switch=True,
         default=False),
    Flag("smoothing", FLOAT, "stage-detection kernel width in decades of steps", frozenset({TRAJECTORY}),
         "output", default=0.1, metavar="DECADES"),
    Flag("resume", bool, "store each finished checkpoint in OUT/results and skip the stored ones on a rerun "
         "(--no-resume: recompute every step, store nothing)", frozenset({TRAJECTORY}), "output", switch=True,
         default=True),
    Flag("quiet", bool, "no progress bars", group="output", switch=True, default=False),
)

BY_NAME = {flag.name: flag for flag in FLAGS}
GROUP_TITLES = {
    "input": "what to measure", "estimate": "the posterior and the sampler",
    "run": "the run (RunSettings)", "auto": "--step-size auto (AutoSettings)",
    "sweep": "the step-size sweep (SweepSettings)", "precision": "precision (Precision)",
    "devices": "devices", "output": "outputs",
}
NOT_WRITTEN = ("quiet",)  # presentation only: not part of a run's configuration


def flags_of(command: str) -> list[Flag]:
    """The flags ``command`` takes, in table order."""
    return [flag for flag in FLAGS if command in flag.commands]


def defaults(command: str) -> dict:
    """Every flag of ``command`` at the command's default: ``None`` for the settings flags,
    whose defaults are the settings classes' own."""
    return {flag.name: flag.default for flag in flags_of(command)}


def _unknown(key: str, names) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(names), n=1)
    return f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""


def read_config(path, command: str) -> dict:
    """The values a TOML file gives ``command``: top-level keys, then its ``[command]`` table.

    Raises:
      UsageError: naming the file and the key, for an unreadable file, an unknown key or table,
        or a value the flag does not accept.
    """
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise UsageError(f"--config {str(path)!r}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {str(path)!r} is not valid TOML: {error}") from None
    mine = {flag.name: flag for flag in flags_of(command)}
    values = {}
    for key, value in document.items():
        if isinstance(value, dict):
            if key not in COMMANDS:
                raise UsageError(f"--config {str(path)!r}: unknown table [{key}] (tables: "
                                 f"{', '.join(f'[{c}]' for c in COMMANDS)})")
            continue
        name = key.replace("-", "_")
        if name not in BY_NAME:
            raise UsageError(f"--config {str(path)!r}: unknown key {key!r}{_unknown(key, BY_NAME)}")
        if name in mine:
            values[name] = mine[name].convert(value, f"--config {str(path)!r}: {key}")
    for key, value in document.get(command, {}).items():
        name = key.replace("-", "_")
        if name not in mine:
            other = f" (a flag of {', '.join(sorted(BY_NAME[name].commands))})" if name in BY_NAME else ""
            raise UsageError(f"--config {str(path)!r}: unknown key {key!r} in [{command}]{other}"
                             f"{_unknown(key, mine)}")
        values[name] = mine[name].convert(value, f"--config {str(path)!r}: [{command}] {key}")
    return values


def resolve(command: str, given: dict, config=None) -> dict:
    """The run's values: the defaults, overridden by the configuration file, overridden by
    the flags given on the command line (``given``)."""
    values = defaults(command)
    if config is not None:
        values.update(read_config(config, command))
    values.update(given)
    return values


def settings_of(group: str, values: dict) -> dict:
    """The fields of one settings class that the run sets (unset ones keep their default)."""
    return {flag.setting: None if flag.none_word is not None and values[flag.name] == flag.none_word
            else values[flag.name] for flag in FLAGS
            if flag.group == group and flag.name in values and values[flag.name] is not None}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         "inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def write_config(path, command: str, values: dict, version: str) -> Path:
    """Write the resolved ``values`` of ``command`` as a ``[command]`` TOML table.

    A settings flag left unset is written with its settings class's default, so the file
    still says what ran if a later version changes a default; values that stay ``None`` (the
    library decides from the data, e.g. ``batch_size``) are left out, and so are the sweep's
    and ``--step-size auto``'s settings when the step size is a number.
    """
    lines = [f"# slt-jax {version}: the resolved configuration of this run.",
             f"# Repeat it with: slt-jax {command} --config {path}", f"[{command}]"]
    calibrated = command not in SAMPLING or values.get("step_size") == "auto"
    for flag in flags_of(command):
        if flag.name in NOT_WRITTEN or flag.group in ("auto", "sweep") and not calibrated:
            continue
        value = values.get(flag.name)
        if value is None and flag.group in SETTINGS:
            value = flag.default_value()
        if value is None:
            continue
        lines.append(f"{flag.name} = {_toml(value)}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
