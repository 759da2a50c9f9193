"""Chains across hosts: one JAX process per host, one global mesh, one clear error when they disagree.

A multi-host run is the single-host run with more devices. Every process calls
:func:`initialize` once, before any other JAX call, then runs the *same* script: the same
``estimate_llc``/``calibrate``/``estimate_free_energy``/``llc_trajectory`` calls, in the same
order, with the same arguments. :func:`slt_jax.make_mesh` then spans every process's devices
(the ``"chains"`` axis crosses hosts; ``"data"`` and ``"model"`` groups stay inside one
process, on its fast links); chain ``i`` still draws from ``fold_in(key, i)``, so a run on
2 processes × 4 devices gives the per-chain λ̂ of 1 process × 8 devices. Every process receives
the complete result (draws are gathered with ``jax.experimental.multihost_utils``); files —
results stores, CSV, plots, JSON — are written by process 0 alone (:func:`is_primary`).

Starting (REFERENCE §8; docs/scale_out.md has SLURM and TPU-pod recipes):

- explicitly: ``initialize("host0:1234", num_processes=2, process_id=i)`` in process ``i``;
- from the cluster: ``initialize()`` with no arguments lets JAX detect SLURM, Open MPI,
  Kubernetes and Cloud TPU environments (``jax.distributed.initialize``'s cluster detection);
  ``JAX_COORDINATOR_ADDRESS``, ``SLT_JAX_NUM_PROCESSES`` and ``SLT_JAX_PROCESS_ID`` fill
  arguments not given (what ``python -m slt_jax.launch`` sets for local processes).

Failures, and how long they take to surface (every bound is an argument of :func:`initialize`):

- a coordinator that cannot be reached: processes other than 0 first wait for its port to
  accept connections, up to ``initialization_timeout``, then raise :class:`DistributedError`
  naming the address (without this, JAX aborts the process natively after the same timeout);
- processes that disagree — on the JAX or slt-jax version, the local device count, the
  platform, or an estimate's settings, data shapes or key — are caught before anything
  compiles: each process publishes what it is about to run in the coordination service's
  key-value store and reads the others' within ``check_timeout``; every process then raises the
  same :class:`DistributedError` naming the differences (:func:`check_consistent`). A process
  that never arrives (it failed earlier, or runs another program) gives the same error after
  ``check_timeout``;
- a process that dies mid-run: the survivors' next cross-process collective raises a
  ``JaxRuntimeError`` (gloo on CPU: "Connection reset by peer"), and the coordination service
  terminates every process natively (SIGABRT) once the dead process misses heartbeats for
  ``heartbeat_timeout`` seconds. A process that hangs (stopped, not dead) holds the others in
  their next collective until that heartbeat timeout ends the job. JAX offers no catchable
  error for these: run under a supervisor with a wall-clock limit (``srun --time``,
  ``python -m slt_jax.launch --timeout``) and rely on the results store to resume — its rows
  are written atomically by process 0, so a killed job never leaves one half-written.

Its length: much of it is this account of how a job starts and fails; the functions are short.
"""

import dataclasses
import hashlib
import json
import os
import socket
import time

import jax
import numpy as np

from slt_jax.job import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV, DistributedError, Timeouts, add_arguments


@dataclasses.dataclass
class _State:
    timeouts: Timeouts = Timeouts()
    checks: int = 0  # consistency checks made so far: the key of the next one


_STATE = _State()


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands in the job.

    Attributes:
      process_index: this process (0 is the primary: it writes the files).
      process_count: processes in the job.
      local_devices: devices this process drives.
      devices: devices of the whole job.
    """

    process_index: int
    process_count: int
    local_devices: int
    devices: int


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeouts: Timeouts | None = None, cpu_devices: int | None = None, **jax_options) -> Cluster:
    """Join a multi-process JAX job (``jax.distributed.initialize``) with bounded timeouts, then
    check that every process runs the same JAX and slt-jax with the same local device count.

    Call it once per process, before any other JAX call. With no arguments JAX detects the
    cluster (SLURM, Open MPI, Kubernetes, Cloud TPU); arguments not given are read from
    ``JAX_COORDINATOR_ADDRESS``, ``SLT_JAX_NUM_PROCESSES`` and ``SLT_JAX_PROCESS_ID`` when set.

    Args:
      coordinator: ``"host:port"`` of process 0, which serves the coordination service there.
      num_processes: processes in the job.
      process_id: this process's index, ``0 … num_processes − 1``.
      timeouts: :class:`Timeouts` (default: 300 s to connect, 100 s heartbeat, 60 s shutdown,
        120 s for each consistency check).
      cpu_devices: on CPU, how many devices this process exposes (``jax_num_cpu_devices``; for
        tests and trials on one machine). CPU collectives across processes use gloo.
      **jax_options: passed on to ``jax.distributed.initialize`` (``local_device_ids``,
        ``cluster_detection_method``, ``coordinator_bind_address``, …).

    Returns:
      A :class:`Cluster`.

    Raises:
      DistributedError: the coordinator cannot be reached within ``timeouts.initialization``,
        or the processes differ in versions, platform or local device count.
    """
    timeouts = Timeouts() if timeouts is None else timeouts
    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialized: call slt_jax.distributed.initialize once, "
                               "before any other JAX call")
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV)
    num_processes = _from_env(num_processes, NUM_PROCESSES_ENV)
    process_id = _from_env(process_id, PROCESS_ID_ENV)
    # Gloo carries CPU collectives between processes (harmless on GPU and TPU, which ignore it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if coordinator is not None and process_id not in (None, 0):
        wait_for_coordinator(coordinator, timeouts.initialization, process_id=process_id)
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        initialization_timeout=_seconds(timeouts.initialization),
        heartbeat_timeout_seconds=_seconds(timeouts.heartbeat), shutdown_timeout_seconds=_seconds(timeouts.shutdown),
        **jax_options)
    _STATE.timeouts, _STATE.checks = timeouts, 0
    from slt_jax import __version__

    device = jax.local_devices()[0]
    check_consistent("runtime", {"jax": jax.__version__, "slt_jax": __version__, "platform": device.platform,
                                 "device_kind": device.device_kind, "local_devices": jax.local_device_count()})
    return cluster()


def cluster() -> Cluster:
    """This process's place in the job (one process, all its devices, when not distributed)."""
    return Cluster(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files (always true in a single process)."""
    return jax.process_index() == 0


def is_distributed() -> bool:
    """Whether more than one process takes part in the computations."""
    return jax.process_count() > 1


def _from_env(value, name):
    if value is not None or name not in os.environ:
        return value
    try:
        return int(os.environ[name])
    except ValueError as error:
        raise DistributedError(f"{name}={os.environ[name]!r} is not an integer") from error


def _seconds(value: float) -> int:
    return max(1, int(round(value)))


def wait_for_coordinator(address: str, timeout: float, *, process_id=None):
    """Wait until ``host:port`` accepts TCP connections; raise :class:`DistributedError` after
    ``timeout`` seconds (JAX itself would abort the process natively)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator={address!r} must be 'host:port'")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as error:
            last = error
        if time.monotonic() >= deadline:
            who = "" if process_id is None else f"process {process_id}: "
            raise DistributedError(
                f"{who}the coordinator {address} did not accept connections within {timeout:g} s ({last}). "
                "Is process 0 running, and is its address reachable from this host?")
        time.sleep(0.2)


def _client():
    from jax._src import distributed as jax_distributed  # the coordination service's client (as Orbax uses it)

    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError("jax.distributed is not initialized")
    return client


def fingerprint(value) -> str:
    """A short hash of a JSON-ready value (canonical: sorted keys)."""
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_consistent(what: str, record, *, timeout: float | None = None):
    """Check that every process is about to run the same ``what`` with the same ``record``.

    Each process publishes ``record`` — a JSON-ready dict, or a function returning one (called
    only in a multi-process run) — under the index of this check in the
    coordination service's key-value store and reads every other process's, waiting at most
    ``timeout`` seconds (default :class:`Timeouts`' ``check``). A no-op in a single process.

    Raises:
      DistributedError: on every process alike — naming the fields that differ and which
        process holds which value, or the processes that did not arrive in time.
    """
    if jax.process_count() == 1:
        return
    record = record() if callable(record) else record
    client = _client()
    timeout = _STATE.timeouts.check if timeout is None else timeout
    index, me, count = _STATE.checks, jax.process_index(), jax.process_count()
    _STATE.checks += 1
    mine = json.dumps({"what": what, "record": record}, sort_keys=True, default=repr)
    client.key_value_set(f"slt_jax/check/{index}/{me}", mine)
    seen, missing = {}, []
    deadline = time.monotonic() + timeout
    for process in range(count):
        if process == me:
            seen[process] = json.loads(mine)
            continue
        left_ms = max(1, int(1000 * (deadline - time.monotonic())))
        try:
            seen[process] = json.loads(client.blocking_key_value_get(f"slt_jax/check/{index}/{process}", left_ms))
        except Exception:  # DEADLINE_EXCEEDED (XlaRuntimeError); anything else is as fatal here
            missing.append(process)
    if missing:
        raise DistributedError(
            f"process {me}: processes {missing} did not reach consistency check #{index} ({what!r}) within "
            f"{timeout:g} s — they failed earlier, run another program, or are slower than the timeout")
    whats = {p: v["what"] for p, v in seen.items()}
    if len(set(whats.values())) > 1:
        raise DistributedError(f"the processes are at different steps of the program at check #{index}: {whats}")
    differences = _differences({p: v["record"] for p, v in seen.items()})
    if differences:
        raise DistributedError(f"the processes disagree on {what}: " + "; ".join(differences)
                               + ". Every process must run the same script with the same settings and data")


def _differences(records: dict) -> list[str]:
    """``field: process p has X, process q has Y`` for every top-level field that differs."""
    fields = sorted(set().union(*(r.keys() for r in records.values())))
    out = []
    for field in fields:
        values = {p: json.dumps(r.get(field), sort_keys=True, default=repr) for p, r in records.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"process {p} has {v[:120]}" for p, v in sorted(values.items()))
            out.append(f"{field}: {shown}")
    return out


def from_primary(fn, what: str, *, timeout: float | None = None):
    """``fn()`` run on process 0 only, its JSON-ready result handed to every process.

    For what only process 0 should read — a results store on a disk the others may not share
    — yet every process must agree on. An exception raised by ``fn`` on process 0 is raised on
    every process (as a ``ValueError`` or :class:`DistributedError` with its message).
    """
    if jax.process_count() == 1:
        return fn()
    client = _client()
    timeout = _STATE.timeouts.check if timeout is None else timeout
    index = _STATE.checks
    _STATE.checks += 1
    key = f"slt_jax/primary/{index}"
    if is_primary():
        try:
            value = fn()
        except ValueError as error:
            client.key_value_set(key, json.dumps({"what": what, "error": str(error)}))
            raise
        client.key_value_set(key, json.dumps({"what": what, "value": value}))
        return value
    try:
        shared = json.loads(client.blocking_key_value_get(key, max(1, int(1000 * timeout))))
    except Exception as error:
        raise DistributedError(f"process {jax.process_index()}: process 0 did not share {what!r} within "
                               f"{timeout:g} s ({type(error).__name__})") from error
    if shared.get("what") != what:
        raise DistributedError(f"process 0 shared {shared.get('what')!r} where this process expected {what!r}: "
                               "the processes run different programs")
    if "error" in shared:
        raise ValueError(shared["error"])
    return shared["value"]


def data_fingerprint(data, rows: int = 64) -> dict:
    """Shapes, dtypes and a hash of up to ``rows`` evenly spaced rows of each leaf of ``data``
    (host or local arrays; leaves already spread over processes are described by shape only)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        shape, dtype = tuple(np.shape(leaf)), str(np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
        digest = None
        if not (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
            n = shape[0] if shape else 1
            take = np.unique(np.linspace(0, max(n - 1, 0), min(rows, n)).astype(np.int64)) if shape else None
            sample = np.asarray(leaf if take is None else leaf[take])
            digest = hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()[:16]
        out.append([jax.tree_util.keystr(path), shape, dtype, digest])
    return {"leaves": out}


def initialize_from_args(args) -> Cluster | None:
    """:func:`initialize` from :func:`add_arguments`' flags; ``None`` (nothing done) when no
    multi-process flag is given and the environment names no coordinator."""
    explicit = [args.coordinator, args.num_processes, args.process_id]
    environment = COORDINATOR_ENV in os.environ and NUM_PROCESSES_ENV in os.environ
    if not args.distributed and all(v is None for v in explicit) and not environment:
        return None
    if not args.distributed and any(v is None for v in explicit) and not environment:
        raise DistributedError("--coordinator, --num-processes and --process-id go together "
                               "(or pass --distributed to let JAX read them from the cluster)")
    timeouts = Timeouts(initialization=args.init_timeout, heartbeat=args.heartbeat_timeout,
                        check=args.check_timeout)
    return initialize(args.coordinator, args.num_processes, args.process_id, timeouts=timeouts)


__all__ = ["Cluster", "DistributedError", "Timeouts", "add_arguments", "check_consistent", "cluster",
           "data_fingerprint", "from_primary", "initialize", "initialize_from_args", "is_distributed", "is_primary",
           "wait_for_coordinator"]
