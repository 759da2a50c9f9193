"""Streamed data against data on device: chain-steps/s of the same run, minibatches gathered on the
host from a memmap (slt_jax.data.streaming) or on device from the array.

The model is ``benchmarks/step_cost.py``'s 1M-parameter tanh MLP (512-1024-512-16); the data,
N rows of 512 inputs and 16 outputs, are written to a ``.npy`` file and memory-mapped. Both
runs draw the same minibatches (same key: the streamed one gathers on the host the rows the
in-memory one gathers on device), so the comparison is of the data path alone. The two runs
alternate ``--rounds`` times after a warm-up (compilation) and the best of each is kept: a
machine shared with other work slows both alike. Also reported: the host's share of a chunk —
computing the indices on device, fetching them, gathering the rows from the memmap and placing
them, per 128 steps — which the background thread overlaps with sampling.

Run::

    python benchmarks/streaming.py [--quick] [--out benchmarks/results/streaming.json]

Target: streamed ≥ 0.9× the in-memory chain-steps/s. On a fast accelerator the host gather
can become the bound for small models (the row bytes per step are fixed, the compute shrinks):
the ratio printed there says when.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, init_mlp, mlp_loss, num_params  # noqa: E402

from slt_jax.data.streaming import streamed  # noqa: E402
from slt_jax.problem import make_problem  # noqa: E402
from slt_jax.runner import feed  # noqa: E402
from slt_jax.runner.chains import run_chains, setup  # noqa: E402
from slt_jax.samplers import SGLD  # noqa: E402
from slt_jax.settings import RunSettings  # noqa: E402

STEP_SIZE = 1e-7
HOST_STEPS = 128  # steps of the chunk whose host-side preparation is timed


def write_memmap(directory, n, widths, seed=0):
    """x (n, widths[0]) and y (n, widths[-1]) as .npy files, memory-mapped read-only."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, width in (("x", widths[0]), ("y", widths[-1])):
        path = os.path.join(directory, f"{name}.npy")
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, width))
        for start in range(0, n, 65536):
            stop = min(n, start + 65536)
            array[start:stop] = rng.normal(size=(stop - start, width)).astype(np.float32)
        array.flush()
        del array
        out[name] = np.load(path, mmap_mode="r")
    return out


def compare(n=65536, chains=4, batch_size=64, steps=512, chunk_size=128, rounds=3, widths=MODELS["1M"]):
    """Chain-steps/s of the same run with the data on device and streamed from a memmap."""
    params = init_mlp(jax.random.key(0), widths)
    run = RunSettings(num_chains=chains, num_burnin=0, num_draws=steps, batch_size=batch_size,
                      loss_estimator="minibatch", chunk_size=chunk_size)
    with tempfile.TemporaryDirectory() as directory:
        mapped = write_memmap(directory, n, widths)
        sources = {"in_memory": {k: np.asarray(v) for k, v in mapped.items()}, "streamed": streamed(mapped)}
        runs = {}
        for name, data in sources.items():
            problem = make_problem(mlp_loss, params, data, localization=1.0, nbeta=1000.0, run=run)
            config, inputs = setup(problem, SGLD, run, STEP_SIZE)

            def go(config=config, inputs=inputs):
                state, draws = run_chains(jax.random.key(1), config, inputs, num_chains=chains, num_burnin=0,
                                          num_draws=steps, chunk_size=chunk_size, progress=False)
                return jax.block_until_ready(state.kernel_state.position), draws.batch_loss

            runs[name] = go
        best, results = {name: float("inf") for name in runs}, {}
        for name, go in runs.items():  # warm-up: compile
            results[name] = go()[1]
        for _ in range(rounds):
            for name, go in runs.items():
                start = time.perf_counter()
                go()
                best[name] = min(best[name], time.perf_counter() - start)
        same = bool(np.array_equal(results["in_memory"], results["streamed"]))
        host = host_share(sources["streamed"], chains, batch_size, HOST_STEPS)
    rate = {name: chains * steps / seconds for name, seconds in best.items()}
    return {"num_params": num_params(params), "n": n, "row_bytes": sources["streamed"].row_bytes,
            "dataset_mib": n * sources["streamed"].row_bytes / 2**20, "chains": chains, "batch_size": batch_size,
            "steps": steps, "chunk_size": chunk_size, "rounds": rounds, "backend": jax.default_backend(),
            "in_memory_chain_steps_per_s": rate["in_memory"], "streamed_chain_steps_per_s": rate["streamed"],
            "ratio": rate["streamed"] / rate["in_memory"], "same_draws": same,
            "host_seconds_per_128_steps": host,
            "sampling_seconds_per_128_steps": best["in_memory"] * HOST_STEPS / steps}


def host_share(data, chains, batch_size, chunk_size, repeats=5):
    """Seconds to prepare one chunk of ``chunk_size`` steps on the host: indices on device and fetched, rows gathered
    from the memmap and placed (what the feeder's background thread does)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("chains",))
    keys = jax.random.split(jax.random.key(0), chains)
    feeder = feed.Feeder(data, jax.device_put(keys), batch_size, mesh)
    try:
        jax.block_until_ready(feeder.start(0, chunk_size)())  # compile the index program
        start = time.perf_counter()
        for i in range(repeats):
            jax.block_until_ready(feeder.start((i + 1) * chunk_size, chunk_size)())
        return (time.perf_counter() - start) / repeats
    finally:
        feeder.close()


def table(row) -> str:
    lines = ["| params | rows (MiB) | chains × batch | in memory (chain-steps/s) | streamed | ratio | same draws | "
             "host s / 128 steps | sampling s / 128 steps |", "|---|---|---|---|---|---|---|---|---|",
             f"| {row['num_params'] / 1e6:.2f}M | {row['n']} ({row['dataset_mib']:.0f}) | {row['chains']} × "
             f"{row['batch_size']} | {row['in_memory_chain_steps_per_s']:.1f} | "
             f"{row['streamed_chain_steps_per_s']:.1f} | {row['ratio']:.2f} | {row['same_draws']} | "
             f"{row['host_seconds_per_128_steps']:.3f} | {row['sampling_seconds_per_128_steps']:.3f} |"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--n", type=int, default=65536, help="rows of the memmap")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/streaming.json")
    args = parser.parse_args(argv)
    steps, rounds = (256, 2) if args.quick else (512, 3)
    chunk_size = steps // 4
    if jax.default_backend() != "cpu":
        steps *= 8  # an accelerator runs a chunk in milliseconds: time enough of them
        chunk_size = None  # the feeder sizes the chunks (≤ chunk_bytes of rows per device)
    row = compare(n=args.n, chains=args.chains, batch_size=args.batch_size, steps=steps, chunk_size=chunk_size,
                  rounds=rounds)
    print(table(row))
    record = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
                          "jax": jax.__version__},
              "streaming": row}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
