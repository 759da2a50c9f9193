"""What observables cost in the chain runner, and the memory of a large Bayesian influence.

Two measurements, on the machine it runs on (docs/mathematics.md §8.5):

  * draw cost: one chain-step that is also a draw (``steps_per_draw=1``) of a small tanh MLP
    (16 → 64 → 64 → 1, 5.4k parameters, batch 256, 8 chains), with k per-sample losses of probe
    rows observed at every draw and folded into streaming moments (sums, squares, and their
    cross-product with the draw's loss record, as a susceptibility keeps them), against the same
    run without observables (plain λ̂); the same with ``every=10`` (one draw in ten observed);
  * BIF memory: ``slt_jax.bayesian_influence`` over 10⁴ training rows × 10³ queries of a linear
    regression (8 inputs), 4 chains, in a fresh subprocess per setting; the peak resident memory
    (VmHWM, reset to the current resident set once the data exist, Linux) is that of the run
    alone: all rows in one run, and ``block_rows`` blocks (the same chains rerun per block). The
    per-chain cross-products alone take 4·chains·rows·queries bytes (float32).

Run::

    python benchmarks/observables.py [--quick] [--out benchmarks/results/observables.json]

It prints markdown tables and writes JSON.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

WIDTHS = (16, 64, 64, 1)
N, BATCH, CHAINS = 8192, 256, 8


def mlp_problem():
    from slt_jax.problem import make_problem
    from slt_jax.settings import RunSettings

    keys = jax.random.split(jax.random.key(0), len(WIDTHS))
    params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
              for k, a, b in zip(keys, WIDTHS, WIDTHS[1:])]
    x = jax.random.normal(keys[-1], (N, WIDTHS[0]))

    def forward(p, x):
        for layer in p[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ p[-1]["w"] + p[-1]["b"]

    y = forward(params, x) + 0.1 * jax.random.normal(keys[0], (N, 1))
    loss = lambda p, b: 0.5 * jnp.mean(jnp.square(forward(p, b["x"]) - b["y"]))
    run = RunSettings(num_chains=CHAINS, num_burnin=0, num_draws=1024, batch_size=BATCH, chunk_size=256)
    return make_problem(loss, params, {"x": x, "y": y}, localization=100.0, run=run), run


def draw_cost(repeats: int) -> list[dict]:
    """Seconds per draw with k observed per-sample losses, against plain λ̂."""
    from slt_jax.observables import row_losses
    from slt_jax.runner.chains import run_chains, setup
    from slt_jax.runner.observation import DRAW_LOSS, Observation
    from slt_jax.samplers import SGLD

    problem, run = mlp_problem()
    losses = row_losses(problem)

    def runner(observation, inputs):
        config, chain_inputs = setup(problem, SGLD, run, 1e-5, observation=observation, observed_inputs=inputs)
        go = lambda key: jax.block_until_ready(run_chains(
            key, config, chain_inputs, num_chains=CHAINS, num_burnin=0, num_draws=run.num_draws,
            chunk_size=run.chunk_size, progress=False)[0].kernel_state.position)
        go(jax.random.key(0))  # compile
        return go

    settings = [(0, 1)] + [(k, every) for k in (1, 10, 100, 1000) for every in ((1, 10) if k >= 100 else (1,))]
    runs = {}
    for k, every in settings:
        if k == 0:
            runs[k, every] = runner(None, None)
        else:
            observation = Observation(ProbeLosses(losses), pairs=((DRAW_LOSS, "probe"),), draw_loss=True, every=every)
            runs[k, every] = runner(observation, {"x": problem.data["x"][:k], "y": problem.data["y"][:k]})
    wall = {s: [] for s in settings}
    cpu = {s: [] for s in settings}
    for r in range(repeats):  # interleaved, so that a change in the machine's load hits every setting
        for s in settings:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[s](jax.random.key(r + 1))
            wall[s].append((time.perf_counter() - start) / run.num_draws)
            cpu[s].append((time.process_time() - start_cpu) / run.num_draws)
    median = lambda v: float(np.median(v))
    rows = []
    for k, every in settings[1:]:
        row = {"observables": k, "every": every, "wall_per_draw": median(wall[k, every]),
               "cpu_per_draw": median(cpu[k, every]), "plain_wall_per_draw": median(wall[0, 1]),
               "plain_cpu_per_draw": median(cpu[0, 1])}
        row["wall_ratio"] = row["wall_per_draw"] / row["plain_wall_per_draw"]
        row["cpu_ratio"] = row["cpu_per_draw"] / row["plain_cpu_per_draw"]
        rows.append(row)
        print(f"| {k} | {every} | {1e3 * row['wall_per_draw']:.3f} | {1e3 * row['plain_wall_per_draw']:.3f} | "
              f"{row['wall_ratio']:.2f} | {row['cpu_ratio']:.2f} |", flush=True)
    return rows


class ProbeLosses:
    """The observation of the draw-cost table: every probe row's loss (hashable by its parts)."""

    def __init__(self, losses):
        self.losses = losses

    def __call__(self, params, inputs):
        return {"probe": jnp.ravel(self.losses(params, inputs))}

    def __hash__(self):
        return hash(self.losses)

    def __eq__(self, other):
        return isinstance(other, ProbeLosses) and other.losses == self.losses


def _status(field: str) -> float:
    """A memory field of /proc/self/status in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> float:
    """Reset the peak resident set to the current one (Linux clear_refs 5); return it in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak() -> float:
    return _status("VmHWM")


def bif_memory_worker(rows: int, queries: int, block_rows, draws: int) -> dict:
    """One BIF run in this process: peak memory above the baseline after the data exist."""
    import slt_jax

    rng = np.random.default_rng(0)
    d = 8
    x = rng.standard_normal((rows, d)).astype(np.float32)
    y = (x @ rng.standard_normal(d) + rng.standard_normal(rows)).astype(np.float32)
    xq = rng.standard_normal((queries, d)).astype(np.float32)
    yq = (xq @ rng.standard_normal(d)).astype(np.float32)
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0], jnp.float32)
    loss = lambda w, b: 0.5 * jnp.mean(jnp.square(b["y"] - b["x"] @ w))
    baseline = _reset_peak()
    start = time.perf_counter()
    result = slt_jax.bayesian_influence(loss, w, {"x": x, "y": y}, jax.random.key(0), query_data={"x": xq, "y": yq},
                                        step_size=1e-4, localization=1.0, num_chains=4, num_burnin=10,
                                        num_draws=draws, batch_size=256, block_rows=block_rows, progress=False)
    seconds = time.perf_counter() - start
    peak = _peak()
    return {"rows": rows, "queries": queries, "block_rows": block_rows, "chains": 4, "draws": draws,
            "runs": result.settings["runs"], "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak,
            "increase_mb": peak - baseline, "moments_mb": 4 * 4 * rows * queries / 2**20,
            "result_mb": sum(a.nbytes for a in (result.covariance, result.se, result.correlation,
                                                result.correlation_se)) / 2**20}


def bif_memory(rows: int, queries: int, draws: int) -> list[dict]:
    out = []
    for block_rows in (None, rows // 4, rows // 10):
        proc = subprocess.run([sys.executable, __file__, "--bif-worker", json.dumps([rows, queries, block_rows, draws])],
                              capture_output=True, text=True, timeout=3600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(row)
        print(f"| {rows} × {queries} | {block_rows or 'all'} | {row['runs']} | {row['moments_mb']:.0f} | "
              f"{row['result_mb']:.0f} | {row['increase_mb']:.0f} | {row['peak_mb']:.0f} | {row['seconds']:.1f} |",
              flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, a smaller BIF")
    parser.add_argument("--out", default="benchmarks/results/observables.json")
    parser.add_argument("--bif-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bif_worker:
        print(json.dumps(bif_memory_worker(*json.loads(args.bif_worker))))
        return
    print("## Draw cost with k observed per-sample losses (tanh MLP 16-64-64-1, batch 256, 8 chains)\n")
    print("| k | every | ms per draw | plain λ̂ ms per draw | ratio (wall) | ratio (CPU time) |\n"
          "|---|---|---|---|---|---|")
    cost = draw_cost(2 if args.quick else 5)
    rows, queries = (2000, 200) if args.quick else (10_000, 1000)
    print(f"\n## Bayesian influence over {rows} training rows × {queries} queries (4 chains, 20 draws)\n")
    print("| rows × queries | block_rows | runs | moments MB | result MB | peak increase MB | peak RSS MB | s |\n"
          "|---|---|---|---|---|---|---|---|")
    memory = bif_memory(rows, queries, 20)
    record = {"draw_cost": cost, "bif_memory": memory, "machine": platform.platform(),
              "processor": platform.processor(), "cpus": os.cpu_count(), "jax": jax.__version__,
              "devices": [str(d) for d in jax.devices()], "quick": args.quick}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
