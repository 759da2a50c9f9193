"""Run one command as N local JAX processes under a wall-clock limit: a supervising launcher.

    python -m slt_jax.launch --processes 2 --cpu-devices 4 --timeout 600 -- python my_script.py ARGS

Each process runs the same command with ``JAX_COORDINATOR_ADDRESS=localhost:<free port>``,
``SLT_JAX_NUM_PROCESSES`` and ``SLT_JAX_PROCESS_ID`` set, which
:func:`slt_jax.distributed.initialize` reads; ``--cpu-devices`` runs them on the CPU with that
many devices each (gloo collectives), to try a multi-host run on one machine. The processes
share fate, as JAX's own multi-process tests do: when one exits with an error the others get
``--grace`` seconds to end on their own, then are terminated; past ``--timeout`` every process
is killed. Output lines are prefixed with the process index. The exit status is 0 when every
process succeeded, 124 on the timeout, else the first failure's status.

On a cluster the scheduler is the supervisor — ``srun --kill-on-bad-exit=1 --time=…`` on SLURM
(docs/scale_out.md) — and this module is not needed.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

from slt_jax.distributed import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

TIMEOUT_STATUS = 124


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(index: int, num_processes: int, port: int, cpu_devices: int | None = None, env=None) -> dict:
    """The environment of local process ``index`` of a job whose coordinator listens on ``port``."""
    out = dict(os.environ if env is None else env)
    out.update({COORDINATOR_ENV: f"localhost:{port}", NUM_PROCESSES_ENV: str(num_processes),
                PROCESS_ID_ENV: str(index)})
    if cpu_devices is not None:
        out.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices))
    return out


def launch(command, num_processes: int, *, timeout: float, cpu_devices: int | None = None, grace: float = 10.0,
           env=None, output=None, port: int | None = None) -> list:
    """Run ``command`` (an argv list) as ``num_processes`` local processes of one JAX job.

    Args:
      command: the argv every process runs.
      num_processes: how many.
      timeout: seconds after which every process still running is killed.
      cpu_devices: run on the CPU with this many devices per process.
      grace: seconds the others get to end after one fails, before they are terminated.
      env: the base environment (default this process's).
      output: a text stream for the prefixed output lines (default ``sys.stdout``); ``None``
        lines are still collected.
      port: the coordinator's port (default a free one).

    Returns:
      One ``(status, seconds, output)`` per process: its exit status (``None`` if it was
      killed at the timeout), when it ended, and everything it printed.
    """
    port = free_port() if port is None else port
    output = sys.stdout if output is None else output
    start = time.monotonic()
    processes, texts, readers = [], [[] for _ in range(num_processes)], []
    lock = threading.Lock()
    for index in range(num_processes):
        process = subprocess.Popen(command, env=process_env(index, num_processes, port, cpu_devices, env),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        processes.append(process)

        def read(process=process, index=index):
            for line in process.stdout:
                texts[index].append(line)
                with lock:
                    output.write(f"[p{index}] {line}")
                    output.flush()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        readers.append(reader)
    ended = [None] * num_processes
    failed_at = None
    while any(e is None for e in ended):
        now = time.monotonic()
        for index, process in enumerate(processes):
            if ended[index] is None and process.poll() is not None:
                ended[index] = now - start
                if process.returncode != 0 and failed_at is None:
                    failed_at = now
        if now - start > timeout:
            _stop(processes, ended, start, kill=True)
            break
        if failed_at is not None and now - failed_at > grace:
            _stop(processes, ended, start, kill=False)
        time.sleep(0.05)
    for reader, process in zip(readers, processes):
        reader.join(timeout=5)
        process.stdout.close()
    timed_out = time.monotonic() - start > timeout
    return [(None if timed_out and p.returncode in (-9, None) else p.returncode, ended[i], "".join(texts[i]))
            for i, p in enumerate(processes)]


def _stop(processes, ended, start, *, kill: bool):
    for process in processes:
        if process.poll() is None:
            process.kill() if kill else process.terminate()
    deadline = time.monotonic() + 5
    for index, process in enumerate(processes):
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if ended[index] is None:
            ended[index] = time.monotonic() - start


def status_of(results) -> int:
    """The job's exit status from :func:`launch`'s results (module docstring)."""
    if any(status is None for status, _, _ in results):
        return TIMEOUT_STATUS
    return next((status for status, _, _ in results if status != 0), 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slt_jax.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="local processes to start")
    parser.add_argument("--cpu-devices", type=int, help="run on the CPU with this many devices per process")
    parser.add_argument("--timeout", type=float, required=True, help="wall-clock limit in seconds")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the others get after one fails (default 10)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    results = launch(command, args.processes, timeout=args.timeout, cpu_devices=args.cpu_devices, grace=args.grace)
    status = status_of(results)
    if status == TIMEOUT_STATUS:
        print(f"slt_jax.launch: killed after the {args.timeout:g} s timeout", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
