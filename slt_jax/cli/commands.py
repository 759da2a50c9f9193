"""What each ``slt-jax`` command does: load the inputs, call the library, write and print results.

No maths here. JAX is imported inside the commands, after :func:`start_jax` has had the chance to
expose several CPU devices (``XLA_FLAGS`` must be set before JAX starts).

Its length: the four commands and the loading, device and writing steps they share; each
function is short.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path

from slt_jax import __version__
from slt_jax.cli import options
from slt_jax.cli.options import UsageError
from slt_jax.paths import is_remote, local_path

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-metal", "jax_metal")
MIN_STAGE_ROWS = 3  # LLCCurve.stages needs three healthy rows


def _say(*parts) -> None:
    print(*parts, flush=True)


# --- devices -------------------------------------------------------------------------------


def _cpu_platform() -> bool:
    """Whether JAX will start on the CPU: ``JAX_PLATFORMS`` says so, or no accelerator plugin
    is installed (checked without importing JAX)."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(name.lower().startswith(_ACCELERATOR_PLUGINS) for name in names)


def requested_devices(values: dict) -> int | None:
    """How many devices ``--devices`` or ``--mesh`` asks for (``None``: the first device)."""
    if values.get("devices") is not None and values.get("mesh") is not None:
        raise UsageError("give --devices or --mesh, not both")
    if values.get("mesh") is not None:
        chains, data = values["mesh"]
        if chains < 1 or data < 1:
            raise UsageError(f"--mesh {chains},{data}: both sizes must be positive")
        return chains * data
    if values.get("devices") is not None and values["devices"] < 1:
        raise UsageError(f"--devices {values['devices']} must be positive")
    return values.get("devices")


def start_jax(values: dict, cluster=None):
    """Start JAX — first exposing the CPU devices ``--devices``/``--mesh`` ask for, where that
    is still possible, and joining the multi-process job ``cluster`` (the flags of
    :func:`slt_jax.distributed.add_arguments`) when it names one — and return the
    ``mesh``/``devices`` keywords of the library call.

    A CPU host has one JAX device unless asked for more before JAX's backend starts: the command
    sets ``jax_num_cpu_devices`` when more devices are asked for, the platform is the CPU and
    ``XLA_FLAGS`` sets no count of its own. Across processes the devices are global: each of the
    P processes exposes ``N / P`` of them.
    """
    count = requested_devices(values)
    import jax

    from slt_jax import distributed
    from slt_jax.distributed import NUM_PROCESSES_ENV

    processes = None if cluster is None else cluster.num_processes or int(os.environ.get(NUM_PROCESSES_ENV, 0))
    local = count if count is None or not processes else max(1, count // processes)
    if local is not None and local > 1 and _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", "") \
            and "JAX_NUM_CPU_DEVICES" not in os.environ and _cpu_platform():
        try:
            jax.config.update("jax_num_cpu_devices", local)
        except RuntimeError:  # the backend already runs: the count check below says what is there
            pass
    if cluster is not None:
        distributed.initialize_from_args(cluster)
    if values.get("dtype") == "float64":
        jax.config.update("jax_enable_x64", True)
    if count is None:
        return {}
    available = jax.devices()  # every process's devices in a multi-process job
    if count > len(available):
        flag = f"--devices {count}" if values.get("mesh") is None else "--mesh " + ",".join(map(str, values["mesh"]))
        raise UsageError(
            f"{flag} asks for {count} devices, JAX has {len(available)} ({available[0].platform}). On a CPU host "
            f"slt-jax exposes them itself unless XLA_FLAGS sets a device count of its own ({_DEVICE_COUNT_FLAG}); "
            f"on accelerators, give at most the devices the job has")
    if values.get("mesh") is not None:
        from slt_jax.runner.sharding import make_mesh

        chains, data = values["mesh"]
        return {"mesh": make_mesh(chains * data, data=data)}
    return {"devices": count}


# --- inputs --------------------------------------------------------------------------------


def load(spec: str, flag: str):
    """``MODULE:NAME`` or ``FILE.py:NAME`` → that attribute (the working directory is importable)."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise UsageError(f"{flag} must be MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = local_path(module_name, flag)
            if not path.is_file():
                raise UsageError(f"{flag} {spec!r}: no file {str(path)!r}")
            name = f"_slt_jax_user_{abs(hash(str(path)))}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[name] = module
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` would: modules beside the run
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:  # the user's module failed to import: say which and why, in one line
        raise UsageError(f"{flag} {spec!r}: cannot import {module_name!r} ({type(error).__name__}: {error})") \
            from error
    if not hasattr(module, attribute):
        raise UsageError(f"{flag} {spec!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


def call(spec: str, flag: str):
    """Load the factory ``spec`` and call it; whatever it raises becomes one line naming it."""
    factory = load(spec, flag)
    try:
        return factory()
    except Exception as error:
        raise UsageError(f"{flag} {spec!r}: {getattr(factory, '__name__', 'the factory')}() raised "
                         f"{type(error).__name__}: {error}") from error


def model_of(values: dict):
    """``(loss_fn, params or None)`` from ``--model``."""
    returned = call(values["model"], "--model")
    parts = returned if isinstance(returned, tuple) else (returned,)
    if not parts or not callable(parts[0]):
        raise UsageError(f"--model {values['model']!r} must return loss_fn or (loss_fn, params, ...), "
                         f"got {type(returned).__name__}")
    return parts[0], (parts[1] if len(parts) > 1 else None)


def selector(path: str):
    """``a/b/0`` → a function picking ``state["a"]["b"][0]`` out of a restored state."""
    parts = [part for part in path.split("/") if part]

    def select(state):
        for depth, part in enumerate(parts):
            try:
                state = state[int(part)] if isinstance(state, (list, tuple)) else state[part]
            except (KeyError, IndexError, ValueError, TypeError):
                where = "/".join(parts[:depth]) or "the top level"
                keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"--select {path!r}: the restored state has no {part!r} at {where} "
                                 f"(it holds {keys})") from None
        return state

    select.__qualname__ = f"select[{path}]"
    return select


def _require(values: dict, *names) -> None:
    for name in names:
        if values.get(name) is None:
            flag = options.BY_NAME[name]
            raise UsageError(f"{flag.metavar if flag.positional else flag.option} is required (on the command "
                             "line or in --config)")


def prepare(command: str, values: dict) -> tuple[dict, Path, dict]:
    """Check the required values, make paths absolute, create ``--out``, start JAX and write
    ``OUT/config.toml`` — before the run, so an interrupted run can be repeated with
    ``--config``. Returns the values, the output directory and the library's ``devices``/``mesh``
    keywords."""
    required = ("model", "data", "out") + (("step_size",) if command in options.SAMPLING else ())
    _require(values, *(["checkpoint_dir"] if command == options.TRAJECTORY else []), *required)
    if values.get("checkpoint_dir") is None:
        given = [options.BY_NAME[name].option for name in ("item", "select", "step") if values.get(name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need CHECKPOINT_DIR (without it, the point is --model's params)")
    values = dict(values)
    values["out"] = str(local_path(values["out"], "--out"))
    if values.get("checkpoint_dir") is not None and not is_remote(values["checkpoint_dir"]):
        values["checkpoint_dir"] = str(local_path(values["checkpoint_dir"], "CHECKPOINT_DIR"))
    for name in ("model", "data", "eval_data"):
        spec = values.get(name)
        if spec and spec.rpartition(":")[0].endswith(".py"):
            module, _, attribute = spec.rpartition(":")
            values[name] = f"{local_path(module)}:{attribute}"
    placement = start_jax(values, values.pop("cluster", None))
    out = Path(values["out"])
    out.mkdir(parents=True, exist_ok=True)
    options.write_config(out / "config.toml", command, values, __version__)
    return values, out, placement


def settings(values: dict) -> dict:
    """The settings values of the run, built from their flags (each validates its fields)."""
    from slt_jax.settings import AutoSettings, Precision, RunSettings, SweepSettings

    sweep = SweepSettings(**options.settings_of("sweep", values))
    return {"run": RunSettings(**options.settings_of("run", values)),
            "auto": AutoSettings(sweep=sweep, **options.settings_of("auto", values)),
            "sweep": sweep, "precision": Precision(**options.settings_of("precision", values))}


def _localization(values: dict, data) -> float:
    """γ: as given, else nβ/10 (the trajectory's default) with nβ as given or n/log n."""
    if values.get("localization") is not None:
        return values["localization"]
    from slt_jax import validation
    from slt_jax.posterior import default_nbeta
    from slt_jax.trajectory.llc_trajectory import DEFAULT_LOCALIZATION_PER_NBETA

    nbeta = values["nbeta"] if values.get("nbeta") is not None else default_nbeta(validation.check_data(data))
    return DEFAULT_LOCALIZATION_PER_NBETA * nbeta


def point(values: dict, template):
    """The parameters to measure, and the key of the run: a checkpoint's (``fold_in(seed, step)``)
    or the model factory's (``seed``)."""
    import jax

    key = jax.random.key(values["seed"])
    if values.get("checkpoint_dir") is None:
        if template is None:
            raise UsageError(f"--model {values['model']!r} returned only loss_fn: give CHECKPOINT_DIR to "
                             "measure a checkpoint, or return (loss_fn, params)")
        return template, key, None
    from slt_jax.trajectory.checkpoints import CheckpointTrajectory, infer_template, list_steps

    directory = values["checkpoint_dir"]
    available = list_steps(directory)
    step = available[-1] if values.get("step") is None else values["step"]
    if step not in available:
        raise UsageError(f"--step {step} is not a finished checkpoint in {directory!r} (it holds {available})")
    select = None if values.get("select") is None else selector(values["select"])
    if template is None:
        template = infer_template(directory, step, values.get("item"), select)
    restored = CheckpointTrajectory(directory, template=template, item=values.get("item"), select=select,
                                    steps=[step], prefetch=False)
    _, params = next(iter(restored))
    return params, jax.random.fold_in(key, step), step


def _figure(write, path: Path, notes: list) -> Path | None:
    """Draw a figure; a figure that fails on the data becomes a note (the numbers are written)."""
    try:
        write(path)
        return path
    except ValueError as error:
        notes.append(f"{path.name} skipped: {error}")
        return None


def _finish(notes: list, written: list, start: float) -> None:
    for note in notes:
        _say(f"note: {note}")
    _say(f"wall time {time.perf_counter() - start:.1f} s; wrote " + ", ".join(str(p) for p in written if p))


# --- commands ------------------------------------------------------------------------------


def llc(values: dict) -> int:
    """``slt-jax llc``: λ̂ at one point."""
    start = time.perf_counter()
    values, out, placement = prepare(options.LLC, values)
    loss_fn, template = model_of(values)
    data = call(values["data"], "--data")
    eval_data = None if values.get("eval_data") is None else call(values["eval_data"], "--eval-data")
    params, key, step = point(values, template)
    from slt_jax.estimate import estimate_llc

    chosen = settings(values)
    result = estimate_llc(
        loss_fn, params, data, key, step_size=values["step_size"], localization=_localization(values, data),
        nbeta=values.get("nbeta"), sampler=values["sampler"], eval_data=eval_data,
        param_mask=values.get("param_mask"), mala=values["mala"], run=chosen["run"], auto=chosen["auto"],
        precision=chosen["precision"], progress=not values["quiet"], **placement)
    where = "the parameters of --model" if step is None else f"step {step} of {values['checkpoint_dir']}"
    _say(f"λ̂ at {where}")
    _say(result)
    result.to_json(out / "result.json", traces=values["traces"])
    notes = []
    traces = _figure(result.plot_traces, out / "traces.png", notes)
    _finish(notes, [out / "result.json", traces, out / "config.toml"], start)
    return 0


def calibrate(values: dict) -> int:
    """``slt-jax calibrate``: the step-size sweep at one point."""
    start = time.perf_counter()
    values, out, placement = prepare(options.CALIBRATE, values)
    loss_fn, template = model_of(values)
    data = call(values["data"], "--data")
    params, key, _ = point(values, template)
    from slt_jax.tuning.sweep import calibrate as run_calibration

    chosen = settings(values)
    calibration = run_calibration(
        loss_fn, params, data, key, localization=_localization(values, data), step_sizes=values.get("step_sizes"),
        nbeta=values.get("nbeta"), sampler=values["sampler"], param_mask=values.get("param_mask"),
        sweep=chosen["sweep"], run=chosen["run"], precision=chosen["precision"], progress=not values["quiet"],
        **placement)
    _say(calibration)
    calibration.to_json(out / "calibration.json")
    notes = []
    plot = _figure(calibration.plot, out / "calibration.png", notes)
    _finish(notes, [out / "calibration.json", plot, out / "config.toml"], start)
    choice = calibration.choices[0]
    if choice["step_size"] is None:
        raise options.RunFailed(f"no step size passed calibration: {choice['reason'].splitlines()[0]}")
    return 0


def trajectory(values: dict) -> int:
    """``slt-jax trajectory``: λ̂ at every checkpoint, stages, figures."""
    start = time.perf_counter()
    values, out, placement = prepare(options.TRAJECTORY, values)
    import jax

    from slt_jax.trajectory.llc_trajectory import llc_trajectory

    loss_fn, template = model_of(values)
    data = call(values["data"], "--data")
    eval_data = None if values.get("eval_data") is None else call(values["eval_data"], "--eval-data")
    chosen = settings(values)
    results = out / "results" if values["resume"] else None
    try:
        curve = llc_trajectory(
            values["checkpoint_dir"], loss_fn, data, jax.random.key(values["seed"]),
            step_size=values["step_size"], localization=values.get("localization"), nbeta=values.get("nbeta"),
            item=values.get("item"), select=None if values.get("select") is None else selector(values["select"]),
            steps=values.get("steps"), template=template, results_path=results, progress=not values["quiet"],
            sampler=values["sampler"], eval_data=eval_data, param_mask=values.get("param_mask"),
            run=chosen["run"], auto=chosen["auto"], precision=chosen["precision"],
            calibrate_at=values["calibrate_at"], **placement)
    except KeyboardInterrupt:
        if results is None:
            raise
        raise KeyboardInterrupt(f"the finished checkpoints are stored in {results}: run the same command (or "
                                f"slt-jax trajectory --config {out / 'config.toml'}) to resume") from None
    notes = []
    stages = None
    healthy = int(curve.healthy.sum())
    if healthy < MIN_STAGE_ROWS:
        notes.append(f"stages skipped: stage detection needs at least {MIN_STAGE_ROWS} healthy rows, the curve "
                     f"has {healthy}")
    else:
        try:
            stages = curve.stages(smoothing=values["smoothing"])
        except ValueError as error:
            notes.append(f"stages skipped: {error}")
    paths = curve.write(out, stages=stages, seed=values["seed"], title=str(values["checkpoint_dir"]))
    notes += list(paths.skipped.values())
    _say(curve.summary(stages))
    _finish(notes, [*paths.values(), out / "config.toml"], start)
    return 0


def demo(args) -> int:
    """``slt-jax demo``: an embedded example end to end."""
    out = Path(args.out)
    start = time.perf_counter()
    if args.example == "llc":
        from slt_jax.demos import llc as example

        result = example.run(seed=args.seed, progress=not args.quiet)
        _say(example.report(result))
        out.mkdir(parents=True, exist_ok=True)
        result["result"].to_json(out / "llc_result.json")
        _say(f"  result written to {out / 'llc_result.json'}")
    elif args.example == "grokking":
        from slt_jax.demos import grokking

        _say(grokking.report(grokking.run(out, seed=args.seed, progress=not args.quiet)))
    elif args.example == "induction":
        from slt_jax.demos import induction

        _say(induction.report(induction.run(out, seed=args.seed, progress=not args.quiet)))
    else:
        from slt_jax.demos import dln_trajectory

        _say(dln_trajectory.report(dln_trajectory.run(out, seed=args.seed, progress=not args.quiet)))
    _say(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


COMMANDS = {options.LLC: llc, options.TRAJECTORY: trajectory, options.CALIBRATE: calibrate}
