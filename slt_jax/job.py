"""A multi-process job's settings without JAX: its timeouts, environment and command-line flags.

The ``slt-jax`` command builds its parser — these flags included — before JAX may start (it
exposes CPU devices first), so they live here; :mod:`slt_jax.distributed` uses and re-exports
them.
"""

import dataclasses

NUM_PROCESSES_ENV = "SLT_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "SLT_JAX_PROCESS_ID"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # JAX's own


class DistributedError(RuntimeError):
    """Processes of a multi-process run cannot work together: the coordinator is unreachable, a
    process did not arrive in time, or they disagree on what they run (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Bounds, in seconds, on how long a multi-process run waits before failing.

    Attributes:
      initialization: for the coordinator to be reachable and every process to connect.
      heartbeat: a process silent this long is declared dead and the job is terminated
        (natively, by JAX's coordination service).
      shutdown: for every process to reach the shutdown barrier at exit.
      check: for every other process to publish what it runs (:func:`slt_jax.distributed.check_consistent`).
    """

    initialization: float = 300.0
    heartbeat: float = 100.0
    shutdown: float = 60.0
    check: float = 120.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"timeout {field.name} must be a positive number of seconds, got {value!r}")


def add_arguments(parser):
    """Add ``--coordinator``, ``--num-processes``, ``--process-id``, ``--distributed`` and the
    timeouts to an ``argparse`` parser (a group "multi-process")."""
    group = parser.add_argument_group(
        "multi-process", "run one process per host on a global device mesh (docs/scale_out.md); "
        "every process runs the same command, process 0 writes the files")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0 (it serves the coordination service there)")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 … N−1")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process job whose settings JAX detects from the cluster "
                       "(SLURM, Open MPI, Kubernetes, Cloud TPU)")
    group.add_argument("--init-timeout", type=float, default=Timeouts.initialization, metavar="S",
                       help=f"seconds to reach the coordinator and connect (default {Timeouts.initialization:g})")
    group.add_argument("--heartbeat-timeout", type=float, default=Timeouts.heartbeat, metavar="S",
                       help="seconds after which a silent process ends the job "
                       f"(default {Timeouts.heartbeat:g})")
    group.add_argument("--check-timeout", type=float, default=Timeouts.check, metavar="S",
                       help="seconds to wait for the other processes at each consistency check "
                       f"(default {Timeouts.check:g})")
    return group
