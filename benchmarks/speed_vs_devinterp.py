"""The same LLC estimate in slt-jax and in devinterp 2.0.1: wall time, chain-steps/s, λ̂.

The work (issue 3): a deep linear network with widths 10-10-10-10 (d = 300) at a rank-5
teacher, n = 10,000 noise-free samples, Gaussian negative log-likelihood with σ = 1 in nats,
SGLD with batch 100, ε = 1e-5, γ = 100, nβ = n / log n (Lau et al., arXiv:2308.12108),
64 chains × 2,000 steps, no burn-in, the init loss L_n(w*) over the whole dataset.

Run it with::

    pip install -e ".[bench]"      # torch==2.13.0 (install the CPU wheel first), devinterp==2.0.1
    python benchmarks/speed_vs_devinterp.py [--chains 64] [--steps 2000] [--skip-devinterp]

It prints a markdown table and writes JSON to ``benchmarks/results/speed_vs_devinterp.json``
(``--out`` to change). Without devinterp installed, only the slt-jax half runs.

Making the work identical:
  * teacher and data are built once in numpy (seed 0) and handed to both libraries as float32;
    x ~ N(0, I_10), y = W_3 W_2 W_1 x with no noise, so w* is an exact minimum of L_n. Each
    W_s = Q_s C_s Q_{s−1}ᵀ with Q_s a 10×5 matrix of orthonormal columns and C_s a 5×5
    orthogonal matrix: every layer has rank exactly 5 and the images are aligned — the most
    singular kind of rank-5 point, where the local λ is Aoyagi's global λ = 46 (multiplicity
    3, so finite-n estimates sit below it; docs/mathematics.md §6.2);
  * both record the minibatch loss at w_t of the batch its gradient used (slt-jax's
    ``loss_estimator="minibatch"``, devinterp's only mode), every step from step 0;
  * devinterp 2.0.1 only takes language-model datasets: it gets the row indices as
    ``input_ids`` of length 2 and a ``loss_fn`` that looks the rows up and returns the
    per-sample loss with shape (batch, 1); ``num_init_loss_batches = n / batch`` covers the
    whole dataset once (its loader drops no rows since batch divides n);
  * minibatches differ only in how rows are drawn: slt-jax draws with replacement on device,
    devinterp shuffles once and replays that epoch (its ``epoch_mode="cycle"``).

slt-jax is timed twice in one process: the first call includes compilation, the second (new
key) must reuse the compiled programs — the XLA compilations it triggers are counted and
reported. devinterp has no compilation; its time in the sampling loop proper is measured
apart from its set-up (init loss over every chain, zarr store) by timing each chain.

A shared machine's speed swings within minutes (up to 2.8× here), and slt-jax's few seconds
can fall into a slow patch that devinterp's minutes average out. So slt-jax's half runs
``--repeats`` times (default 3), each in a fresh Python process — every first call compiles
from scratch — half of them before devinterp and half after; the ratios use the median of
each measure, and the table and the JSON give every run.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import slt_jax
from slt_jax.serialization import json_safe

WIDTHS = (10, 10, 10, 10)
RANK = 5
N = 10_000
BATCH_SIZE = 100
STEP_SIZE = 1e-5
LOCALIZATION = 100.0
NBETA = N / math.log(N)
DATA_SEED = 0
SIGMA = 1.0
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def make_problem(seed: int = DATA_SEED):
    """The rank-5 aligned DLN teacher and its noise-free data, in numpy float32.

    Args:
      seed: numpy seed for the teacher and the inputs.

    Returns:
      ``(weights, x, y)``: the list of W_s, shape ``(H_s, H_{s−1})``, inputs ``(n, H_0)``
      and outputs ``(n, H_L)`` with ``y = W_L ⋯ W_1 x``.
    """
    rng = np.random.default_rng(seed)

    def orthonormal(rows, cols):
        return np.linalg.qr(rng.standard_normal((rows, cols)))[0]

    frames = [orthonormal(h, RANK) for h in WIDTHS]
    weights = [
        (frames[s + 1] @ orthonormal(RANK, RANK) @ frames[s].T).astype(np.float32)
        for s in range(len(WIDTHS) - 1)
    ]
    x = rng.standard_normal((N, WIDTHS[0])).astype(np.float32)
    y = x
    for w in weights:
        y = y @ w.T
    return weights, x, y.astype(np.float32)


def gaussian_nll(residual_sq_sum, dim: int):
    """Per-sample Gaussian negative log-likelihood in nats, σ = SIGMA, from ‖y − f(x)‖²."""
    return 0.5 * residual_sq_sum / SIGMA**2 + 0.5 * dim * math.log(2 * math.pi * SIGMA**2)


def dln_loss(params, batch):
    """Mean Gaussian NLL of the DLN ``f(x) = W_L ⋯ W_1 x`` over a batch (slt-jax side)."""
    out = batch["x"]
    for w in params:
        out = out @ w.T
    return jnp.mean(gaussian_nll(jnp.sum(jnp.square(batch["y"] - out), axis=-1), WIDTHS[-1]))


def _clocks():
    """Wall and process-CPU seconds now, as an array to subtract.

    CPU time sums this process's threads and leaves out time stolen by other processes, so it
    is the steadier measure on a shared machine.
    """
    return np.array([time.perf_counter(), time.process_time()])


@contextlib.contextmanager
def _count_compiles():
    """Count XLA backend compilations inside the block (``counter["compiles"]``)."""
    counter = {"compiles": 0}

    def listener(event, duration, **_):
        if event == _BACKEND_COMPILE_EVENT:
            counter["compiles"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def run_slt_jax(weights, x, y, num_chains: int, num_steps: int) -> dict:
    """Time ``slt_jax.estimate_llc`` twice: compile included, then excluded (new key).

    Args:
      weights, x, y: the problem from :func:`make_problem`.
      num_chains: SGLD chains.
      num_steps: steps per chain (every step a draw, no burn-in).

    Returns:
      Wall times, chain-steps/s, compilations in each call, and both calls' λ̂.
    """
    params = [jnp.asarray(w) for w in weights]
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    def estimate(key, **defaults):
        # Equal work: devinterp records the minibatch loss and checks nothing after its run.
        options = dict(loss_estimator="minibatch", check_step=False) if not defaults else {}
        start = _clocks()
        result = slt_jax.estimate_llc(
            dln_loss, params, data, key, step_size=STEP_SIZE, localization=LOCALIZATION,
            nbeta=NBETA, num_chains=num_chains, num_draws=num_steps, num_burnin=0,
            steps_per_draw=1, batch_size=BATCH_SIZE, progress=False, **options,
        )
        return result, _clocks() - start

    with _count_compiles() as first_compiles:
        first, (first_wall, first_cpu) = estimate(jax.random.key(0))
    with _count_compiles() as second_compiles:
        second, (second_wall, second_cpu) = estimate(jax.random.key(1))
    # Our defaults on the same run: the control variate (read from its table) and the check
    # after the run (the stability rule at 8 chains, the trend) — what a user gets.
    estimate(jax.random.key(2), defaults=True)
    defaults, (defaults_wall, defaults_cpu) = estimate(jax.random.key(3), defaults=True)
    chain_steps = num_chains * num_steps
    return {
        "defaults_wall_s_compile_excluded": defaults_wall,
        "defaults_chain_steps_per_s_steady": chain_steps / defaults_wall,
        "defaults_check_seconds": defaults.settings["step_check"]["seconds"],
        "defaults_llc_mean": defaults.llc_mean, "defaults_llc_se": defaults.llc_se,
        "wall_s_compile_included": first_wall,
        "wall_s_compile_excluded": second_wall,
        "compile_s": first_wall - second_wall,
        "chain_steps_per_s_end_to_end": chain_steps / first_wall,
        "chain_steps_per_s_steady": chain_steps / second_wall,
        "cpu_s_compile_included": first_cpu,
        "cpu_s_compile_excluded": second_cpu,
        "chain_steps_per_cpu_s_end_to_end": chain_steps / first_cpu,
        "chain_steps_per_cpu_s_steady": chain_steps / second_cpu,
        "xla_compiles_first_call": first_compiles["compiles"],
        "xla_compiles_second_call": second_compiles["compiles"],
        "llc_mean": second.llc_mean,
        "llc_std": second.llc_std,
        "llc_se": second.llc_se,
        "llc_mean_first_call": first.llc_mean,
        "llc_se_first_call": first.llc_se,
        "init_loss": second.init_loss,
        "nbeta": second.nbeta,
        "diverged_chains": len(second.diverged_chains),
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
    }


def run_slt_jax_fresh(num_chains: int, num_steps: int) -> dict:
    """:func:`run_slt_jax` in a fresh Python process (its first call compiles from scratch)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slt_jax.json"
        subprocess.run([sys.executable, __file__, "--chains", str(num_chains), "--steps", str(num_steps),
                        "--slt-jax-only", str(out)], check=True)
        return json.loads(out.read_text())


def median_runs(runs: list[dict]) -> dict:
    """Every numeric measure's median over the runs (the rest from the first); ``runs`` beside."""
    merged = dict(runs[0])
    for name, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            median = float(np.median([r[name] for r in runs]))
            merged[name] = int(median) if isinstance(value, int) and median.is_integer() else median
    merged["runs"] = runs
    return merged


def _torch_dln(torch, weights):
    """The teacher as a bias-free ``torch.nn.Sequential`` of Linear layers (W_s as weight)."""
    layers = []
    for w in weights:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
        layers.append(layer)
    return torch.nn.Sequential(*layers)


@contextlib.contextmanager
def _time_chains(sampling):
    """Accumulate the (wall, CPU) seconds devinterp spends inside its per-chain SGLD loops."""
    original = sampling.sample_single_chain
    spent = np.zeros(2)

    def timed(*args, **kwargs):
        start = _clocks()
        try:
            return original(*args, **kwargs)
        finally:
            spent[:] += _clocks() - start

    sampling.sample_single_chain = timed
    try:
        yield spent
    finally:
        sampling.sample_single_chain = original


@contextlib.contextmanager
def _frozen_heap():
    """Exempt the objects alive now from garbage collection inside the block.

    devinterp calls ``gc.collect()`` before and after every chain; without this each call would
    also walk the heap of JAX and of this process, more than a standalone devinterp script
    holds — freezing it errs in devinterp's favour.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_devinterp(weights, x, y, num_chains: int, num_steps: int, threads: int):
    """Run devinterp 2.0.1's ``llc`` on the same problem, or return ``None`` if not installed.

    Args:
      weights, x, y: the problem from :func:`make_problem`.
      num_chains: SGLD chains (devinterp runs them one after another).
      num_steps: steps per chain (every step a draw, no burn-in).
      threads: torch intra-op threads.

    Returns:
      Wall time, time in the sampling loops, chain-steps/s and λ̂; ``None`` without devinterp.
    """
    try:
        import devinterp
        import torch
        from datasets import Dataset
        from devinterp.slt import sampling
        from devinterp.slt.llc import llc
    except ImportError as e:
        print(f"devinterp is not installed ({e}); skipping it. "
              "Install with: pip install -e \".[bench]\" (torch==2.13.0 CPU wheel first).")
        return None

    torch.set_num_threads(threads)
    model = _torch_dln(torch, weights)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    rows = np.arange(N)
    dataset = Dataset.from_dict({"input_ids": np.stack([rows, rows], axis=1)}).with_format("torch")

    def loss_fn(model, input_ids):
        idx = input_ids[:, 0]
        residual = y_t[idx] - model(x_t[idx])
        return gaussian_nll(residual.square().sum(dim=-1), WIDTHS[-1])[:, None]

    # Its per-chain progress bars are kept (they cost what they cost a user) but not shown.
    with tempfile.TemporaryDirectory() as tmp, _frozen_heap(), _time_chains(sampling) as in_chains, \
            warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        start = _clocks()
        result = llc(
            model, dataset, observables={}, lr=STEP_SIZE, n_beta=NBETA, loss_fn=loss_fn,
            num_chains=num_chains, num_draws=num_steps, batch_size=BATCH_SIZE,
            num_burnin_steps=0, num_steps_bw_draws=1, num_init_loss_batches=N // BATCH_SIZE,
            localization=LOCALIZATION, device="cpu", output_path=Path(tmp) / "samples.zarr",
        )
        per_chain = result["llc_per_chain"].values
        init_loss = float(result["init_loss"])
        wall, cpu = _clocks() - start
        loop_wall, loop_cpu = in_chains
    failed = [str(w.message) for w in caught if "Chain failed" in str(w.message)]
    std = float(per_chain.std(ddof=1)) if len(per_chain) > 1 else float("nan")
    chain_steps = num_chains * num_steps
    return {
        "wall_s": wall,
        "sampling_loop_s": loop_wall,
        "setup_s": wall - loop_wall,
        "chain_steps_per_s_end_to_end": chain_steps / wall,
        "chain_steps_per_s_steady": chain_steps / loop_wall,
        "cpu_s": cpu,
        "sampling_loop_cpu_s": loop_cpu,
        "chain_steps_per_cpu_s_end_to_end": chain_steps / cpu,
        "chain_steps_per_cpu_s_steady": chain_steps / loop_cpu,
        "llc_mean": float(per_chain.mean()),
        "llc_std": std,
        "llc_se": std / math.sqrt(len(per_chain)),
        "init_loss": init_loss,
        "nbeta": NBETA,
        "failed_chains": failed,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "devinterp_version": getattr(devinterp, "__version__", "2.0.1"),
    }


def format_table(jax_res: dict, devinterp_res, ratios: dict) -> str:
    """The results as a markdown table."""
    def num(value, fmt):
        return "—" if value is None else format(value, fmt)

    d = devinterp_res or {}
    rows = [
        ("wall time, compile included (s)", num(jax_res["wall_s_compile_included"], ".2f"),
         num(d.get("wall_s"), ".2f"), num(ratios.get("end_to_end"), ".1f")),
        ("wall time, compile excluded (s)", num(jax_res["wall_s_compile_excluded"], ".2f"),
         num(d.get("sampling_loop_s"), ".2f") + (" (loops only)" if d else ""),
         num(ratios.get("steady"), ".1f")),
        ("chain-steps/s, end to end", num(jax_res["chain_steps_per_s_end_to_end"], ",.0f"),
         num(d.get("chain_steps_per_s_end_to_end"), ",.0f"), num(ratios.get("end_to_end"), ".1f")),
        ("chain-steps/s, steady state", num(jax_res["chain_steps_per_s_steady"], ",.0f"),
         num(d.get("chain_steps_per_s_steady"), ",.0f"), num(ratios.get("steady"), ".1f")),
        ("chain-steps per CPU-second, end to end",
         num(jax_res["chain_steps_per_cpu_s_end_to_end"], ",.0f"),
         num(d.get("chain_steps_per_cpu_s_end_to_end"), ",.0f"), num(ratios.get("end_to_end_cpu"), ".1f")),
        ("chain-steps per CPU-second, steady state", num(jax_res["chain_steps_per_cpu_s_steady"], ",.0f"),
         num(d.get("chain_steps_per_cpu_s_steady"), ",.0f"), num(ratios.get("steady_cpu"), ".1f")),
        ("chain-steps/s, steady, at our defaults (control variate, check after the run)",
         num(jax_res["defaults_chain_steps_per_s_steady"], ",.0f"), num(d.get("chain_steps_per_s_steady"), ",.0f"),
         num(ratios.get("defaults_steady"), ".1f")),
        ("λ̂ (mean ± se over chains)", f"{jax_res['llc_mean']:.2f} ± {jax_res['llc_se']:.2f}",
         f"{d['llc_mean']:.2f} ± {d['llc_se']:.2f}" if d else "—", ""),
        ("init loss L_n(w*) (nats)", f"{jax_res['init_loss']:.4f}",
         num(d.get("init_loss"), ".4f"), ""),
    ]
    lines = ["| | slt-jax | devinterp 2.0.1 | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {r} |" for a, b, c, r in rows]
    return "\n".join(lines)


TARGETS = {"steady": 50.0, "end_to_end": 25.0}
"""Issue 16's targets: chain-steps/s against devinterp 2.0.1 at equal work, steady state and end to end."""


def main(argv=None):
    """Parse flags, run both halves, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=64, help="SGLD chains (default 64)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per chain (default 2000)")
    parser.add_argument("--skip-devinterp", action="store_true", help="run only slt-jax")
    # One thread is torch's fastest setting here: the matmuls are 100×10×10, too small to split,
    # and on a shared 2-core machine a second OpenMP thread spins against other processes
    # (measured: 38 µs per Linear call with 1 thread, 2.3 ms with 2 under load).
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, its fastest for this model)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="slt-jax runs, each in a fresh process, around devinterp's (default 3)")
    parser.add_argument("--slt-jax-only", type=Path, metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "speed_vs_devinterp.json",
                        help="where to write the JSON results")
    args = parser.parse_args(argv)
    for name in ("chains", "steps", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    weights, x, y = make_problem()
    if args.slt_jax_only is not None:  # one fresh-process run of slt-jax's half, for the parent
        args.slt_jax_only.write_text(json.dumps(json_safe(run_slt_jax(weights, x, y, args.chains, args.steps))))
        return

    # Timings on a shared machine move with its load: record it beside them.
    load_before = os.getloadavg()
    before = (args.repeats + 1) // 2
    runs = [run_slt_jax_fresh(args.chains, args.steps) for _ in range(before)]
    devinterp_res = None
    if args.skip_devinterp:
        print("devinterp skipped (--skip-devinterp).")
    else:
        devinterp_res = run_devinterp(weights, x, y, args.chains, args.steps, args.threads)
    runs += [run_slt_jax_fresh(args.chains, args.steps) for _ in range(args.repeats - before)]
    jax_res = median_runs(runs)
    ratios, llc_z = {}, None
    if devinterp_res is not None:
        ratios = {
            name: jax_res[f"chain_steps_per_{unit}_{phase}"] / devinterp_res[f"chain_steps_per_{unit}_{phase}"]
            for name, unit, phase in (("steady", "s", "steady"), ("end_to_end", "s", "end_to_end"),
                                      ("steady_cpu", "cpu_s", "steady"),
                                      ("end_to_end_cpu", "cpu_s", "end_to_end"))
        }
        ratios["defaults_steady"] = (jax_res["defaults_chain_steps_per_s_steady"]
                                     / devinterp_res["chain_steps_per_s_steady"])
        # Independent runs: their λ̂ differ by chance with se² = se_jax² + se_devinterp².
        llc_z = (jax_res["llc_mean"] - devinterp_res["llc_mean"]) / math.hypot(
            jax_res["llc_se"], devinterp_res["llc_se"])

    print(f"DLN widths {'-'.join(map(str, WIDTHS))}, rank {RANK}, n = {N}, batch {BATCH_SIZE}, "
          f"ε = {STEP_SIZE:g}, γ = {LOCALIZATION:g}, nβ = {NBETA:.1f}, "
          f"{args.chains} chains × {args.steps} steps, no burn-in")
    print(format_table(jax_res, devinterp_res, ratios))
    if len(runs) > 1:
        print(f"slt-jax medians of {len(runs)} fresh-process runs ({before} before devinterp); each run's wall time, "
              "compile included / excluded: " + ", ".join(
                  f"{r['wall_s_compile_included']:.2f} / {r['wall_s_compile_excluded']:.2f} s" for r in runs) + ".")
    print(f"slt-jax second call: {jax_res['xla_compiles_second_call']} XLA compilations "
          f"(first call: {jax_res['xla_compiles_first_call']}).")
    if llc_z is not None:
        print(f"λ̂ difference slt-jax − devinterp: {llc_z:+.2f} standard errors.")
    targets = {name: None if name not in ratios else bool(ratios[name] >= limit) for name, limit in TARGETS.items()}
    if ratios:
        print("targets: " + "; ".join(f"{name.replace('_', ' ')} ≥ {limit:g}×: {ratios[name]:.1f}×, "
                                      f"{'met' if targets[name] else 'MISSED'}" for name, limit in TARGETS.items()))

    report = {
        "problem": {
            "widths": WIDTHS, "rank": RANK, "n": N, "batch_size": BATCH_SIZE,
            "step_size": STEP_SIZE, "localization": LOCALIZATION, "nbeta": NBETA, "sigma": SIGMA,
            "num_chains": args.chains, "num_steps": args.steps, "num_burnin": 0,
            "data_seed": DATA_SEED, "noise_free": True, "aoyagi_lambda": 46.0,
        },
        "slt_jax_repeats": {"runs": len(runs), "before_devinterp": before, "statistic": "median"},
        "slt_jax": jax_res,
        "devinterp": devinterp_res,
        "ratio_chain_steps_per_s": ratios or None,
        "targets_met": targets,
        "llc_difference_z": llc_z,
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "load_avg_1_5_15min_before": load_before,
                    "load_avg_1_5_15min_after": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
