"""What one SGLD chain-step costs, against the plain SGD step it cannot beat.

SGLD needs one minibatch gradient per step, like SGD; on top it draws Gaussian noise for
every parameter and pulls towards w*. This script measures, on the machine it runs on:

  * step cost: one SGLD chain-step (``slt_jax.chains.run_chains``, one chain, every step a
    draw with the free ``"minibatch"`` loss record) against one plain jitted SGD step of the
    same model on the same on-device minibatch (a ``lax.scan`` of SGD steps, so neither pays
    Python dispatch per step), for a small MLP and a ~1M-parameter MLP at batch 32, 128, 512
    and 2048; and the noise alone (``tree_normal`` over the parameters). The same for
    ``sampler="sgld_rademacher"`` (±1 noise, one random bit per parameter: the simplified weak
    Euler step, :mod:`slt_jax.samplers.sgld`);
  * noise: ``jax.random.normal`` for 1M parameters with each PRNG implementation
    (threefry2x32, rbg, unsafe_rbg);
  * progress: a run in the default ~20 chunks (progress bar granularity) against one chunk;
  * memory: the compiled chunk program for the 1M model with 16 chains (XLA's memory
    analysis: arguments, outputs, donated aliases, temporaries);
  * devices: chain-steps/s against the number of chains and of (simulated) devices, in a
    subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``;
  * reference (issue 16's target: the default ``estimate_llc`` chain-step ≤ 1.3× a plain
    vmapped ``lax.scan`` SGD step of the same model, batch and chain count): on the devinterp
    workload (DLN 10-10-10-10, 64 chains, batch 100, ``benchmarks/speed_vs_devinterp.py``) and on
    the 1M-parameter MLP (4 chains, batch 256, the default batch, 60 steps), side by side in one process:
    the SGD step; the chain runner's step as ``estimate_llc`` builds it with every step a draw
    (the default control variate read from its table, the forward-pass control variate it
    replaced, the free ``"minibatch"`` record, and Rademacher noise); and a whole default
    ``estimate_llc`` call after compilation (L_n(w*), the table, the check after the run)
    divided by its chain-steps.

Run::

    python benchmarks/step_cost.py [--quick] [--out benchmarks/results/step_cost.json]

It prints markdown tables and writes JSON. On CPU, simulated devices share the machine's
cores: the device table shows the mechanics (same program, chains split) and how far splitting
chains over devices puts idle cores to work (XLA:CPU runs small per-chain ops of one device
largely on one thread).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from slt_jax.runner import sharding
from slt_jax.runner.chains import ChainInputs, RunConfig, _advance, init_chains, per_chain, run_chains
from slt_jax.runner.divergence import Divergence
from slt_jax.data.batches import minibatch
from slt_jax.posterior import LocalPosterior
from slt_jax.samplers import SGLD, SGLD_RADEMACHER
from slt_jax.samplers.noise import normal, tree_normal, tree_rademacher

MODELS = {"small": (16, 64, 64, 1), "1M": (512, 1024, 512, 16)}
BATCHES = (32, 128, 512, 2048)
N = 8192
STEP_SIZE, LOCALIZATION, NBETA, LEARNING_RATE = 1e-7, 1.0, 1000.0, 1e-3


def init_mlp(key, widths):
    """He-initialised weights and zero biases of a tanh MLP with the given widths."""
    params = []
    for k, (a, b) in zip(jax.random.split(key, len(widths) - 1), zip(widths[:-1], widths[1:])):
        params.append({"w": jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a), "b": jnp.zeros(b)})
    return params


def mlp_loss(params, batch):
    """Mean squared error of the tanh MLP on ``batch = {"x", "y"}``."""
    h = batch["x"]
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean(jnp.square(out - batch["y"]))


def problem(widths, key=jax.random.key(0)):
    """Parameters and an n = N regression dataset for an MLP of ``widths``."""
    kp, kx, ky = jax.random.split(key, 3)
    params = init_mlp(kp, widths)
    data = {"x": jax.random.normal(kx, (N, widths[0])), "y": jax.random.normal(ky, (N, widths[-1]))}
    return params, data


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def best_times(fns: dict, rounds: int) -> dict:
    """Minimum wall and process-CPU seconds of each ``fn()`` (blocking on its result).

    The functions are called in turn, ``rounds`` times each after one warm-up call, so a
    machine shared with other work slows them alike; the minimum is the least disturbed run.
    CPU time counts every thread of this process and is steadier than wall time on a busy
    machine.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    wall = {name: math.inf for name in fns}
    cpu = dict(wall)
    for _ in range(rounds):
        for name, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return {name: (wall[name], cpu[name]) for name in fns}


def sgld_setup(params, data, batch_size, mesh=None, loss_estimator="minibatch", kernel=SGLD):
    """The RunConfig and ChainInputs ``estimate_llc`` would build for this model."""
    config = RunConfig(mlp_loss, kernel, batch_size, 1, loss_estimator, batch_size, mesh)
    inputs = ChainInputs(
        step_size=jnp.float32(STEP_SIZE),
        posterior=LocalPosterior(params, jnp.float32(NBETA), jnp.float32(LOCALIZATION)),
        divergence=Divergence(jnp.float32(0.0), jnp.float32(1e30)),
        data=data,
        eval_data=None,
    )
    return config, inputs


def sgld_run(config, inputs, num_chains, num_steps, chunk_size=None, progress=False):
    """A closure running ``num_steps`` steps of ``num_chains`` chains, every step a draw."""
    key = jax.random.key(1)

    def run():
        state, draws = run_chains(key, config, inputs, num_chains=num_chains, num_burnin=0,
                                  num_draws=num_steps, chunk_size=chunk_size or num_steps,
                                  progress=progress)
        return state.kernel_state.position, draws.batch_loss

    return run


def sgd_run(params, data, batch_size, num_steps):
    """A closure running ``num_steps`` plain SGD steps in one jitted ``lax.scan``."""

    @jax.jit
    def train(params, key):
        def body(p, t):
            batch, _ = minibatch(jax.random.fold_in(key, t), data, batch_size)
            loss, grad = jax.value_and_grad(mlp_loss)(p, batch)
            return jax.tree.map(lambda w, g: w - LEARNING_RATE * g, p, grad), loss

        return jax.lax.scan(body, params, jnp.arange(num_steps))

    return lambda: train(params, jax.random.key(2))


def noise_run(params, num_steps, draw_tree=tree_normal):
    """A closure drawing ``num_steps`` noise pytrees like ``params`` with ``draw_tree``.

    Each draw is summed, so none is optimised away; the sum reads the draw once, like the
    SGLD update does.
    """

    @jax.jit
    def draw(key):
        def body(total, t):
            noise = draw_tree(jax.random.fold_in(key, t), params)
            return total + sum(jnp.sum(x) for x in jax.tree.leaves(noise)), None

        return jax.lax.scan(body, jnp.zeros(()), jnp.arange(num_steps))[0]

    return lambda: draw(jax.random.key(3))


def step_cost(quick: bool):
    """Milliseconds per step of SGD, SGLD and the noise alone, per model and batch."""
    rows = []
    for name, widths in MODELS.items():
        params, data = problem(widths)
        for batch_size in BATCHES:
            # Enough steps that a run takes ≥ ~0.2 s, so dispatch and set-up are amortised.
            steps = {"small": 400, "1M": 10 if quick else 20}[name]
            config, inputs = sgld_setup(params, data, batch_size)
            rademacher, _ = sgld_setup(params, data, batch_size, kernel=SGLD_RADEMACHER)
            t = best_times({"sgd": sgd_run(params, data, batch_size, steps),
                            "sgld": sgld_run(config, inputs, 1, steps),
                            "sgld_rademacher": sgld_run(rademacher, inputs, 1, steps),
                            "noise": noise_run(params, steps),
                            "signs": noise_run(params, steps, tree_rademacher)}, 3 if quick else 6)
            ms = {name_: (1e3 * w / steps, 1e3 * c / steps) for name_, (w, c) in t.items()}
            rows.append({"model": name, "num_params": num_params(params), "batch_size": batch_size,
                         "sgd_ms": ms["sgd"][0], "sgld_ms": ms["sgld"][0], "noise_ms": ms["noise"][0],
                         "sgld_over_sgd": ms["sgld"][0] / ms["sgd"][0],
                         "sgd_cpu_ms": ms["sgd"][1], "sgld_cpu_ms": ms["sgld"][1],
                         "sgld_over_sgd_cpu": ms["sgld"][1] / ms["sgd"][1],
                         "rademacher_ms": ms["sgld_rademacher"][0], "signs_ms": ms["signs"][0],
                         "rademacher_over_sgd": ms["sgld_rademacher"][0] / ms["sgd"][0],
                         "rademacher_over_sgd_cpu": ms["sgld_rademacher"][1] / ms["sgd"][1]})
            print(f"  step cost {name} batch {batch_size}: SGLD/SGD = {rows[-1]['sgld_over_sgd']:.2f} wall, "
                  f"{rows[-1]['sgld_over_sgd_cpu']:.2f} CPU; Rademacher {rows[-1]['rademacher_over_sgd']:.2f} wall",
                  file=sys.stderr)
    return rows


def noise_impls(quick: bool):
    """Milliseconds for 1M float32 standard normals: each PRNG implementation, and slt-jax's."""
    shape = (1_000_000,)
    fns = {}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        draw = jax.jit(lambda k: jax.random.normal(k, shape))
        fns[f"jax.random.normal, {impl}"] = partial(draw, jax.random.key(0, impl=impl))
    ours = jax.jit(lambda k: normal(k, shape, jnp.float32))
    fns["slt_jax noise.normal, threefry2x32 (paired counters)"] = partial(ours, jax.random.key(0))
    t = best_times(fns, 5 if quick else 20)
    return [{"generator": name, "wall_ms": 1e3 * w, "cpu_ms": 1e3 * c} for name, (w, c) in t.items()]


def progress_cost(quick: bool):
    """Wall time of a run in the default chunks (with the progress bar on) against one chunk."""
    params, data = problem(MODELS["small"])
    config, inputs = sgld_setup(params, data, 128, loss_estimator="control_variate")
    steps, chains = 2000, 8
    default_chunk = max(100, math.ceil(steps / 20))
    t = best_times({"one": sgld_run(config, inputs, chains, steps, chunk_size=steps),
                    "chunked": sgld_run(config, inputs, chains, steps, chunk_size=default_chunk, progress=True)},
                   3 if quick else 8)
    one, chunked = t["one"][0], t["chunked"][0]
    return {"chains": chains, "steps": steps, "chunks": math.ceil(steps / default_chunk),
            "one_chunk_s": one, "chunked_with_progress_s": chunked, "overhead": chunked / one - 1}


def memory(num_chains=16, batch_size=512, chunk=100):
    """XLA's memory analysis of the compiled chunk program: 1M-parameter MLP, 16 chains."""
    params, data = problem(MODELS["1M"])
    mesh = sharding.make_mesh()
    config, inputs = sgld_setup(params, data, batch_size, mesh, loss_estimator="control_variate")
    inputs = per_chain(inputs, num_chains)
    state = init_chains(config, inputs, num_chains)
    lowered = _advance.lower(config, inputs, chunk, jax.random.key(0), jnp.arange(num_chains, dtype=jnp.int32), state,
                             jnp.int32(0), jnp.int32(0), jnp.int32(chunk))
    analysis = lowered.compile().memory_analysis()
    mib = lambda b: b / 2**20
    out = {"num_params": num_params(params), "num_chains": num_chains, "batch_size": batch_size,
           "chunk_steps": chunk, "dataset_mib": mib(sum(x.nbytes for x in jax.tree.leaves(data))),
           "positions_mib": mib(4 * num_chains * num_params(params))}
    if analysis is not None:
        arg, res = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
        alias, temp = analysis.alias_size_in_bytes, analysis.temp_size_in_bytes
        out.update(arguments_mib=mib(arg), outputs_mib=mib(res), donated_alias_mib=mib(alias),
                   temporaries_mib=mib(temp), peak_mib=mib(arg + res - alias + temp))
    return out


def devices_worker(quick: bool):
    """Chain-steps/s against chains and devices (run with 8 simulated devices)."""
    params, data = problem(MODELS["small"])
    steps = 500 if quick else 1000
    rows = []
    for devices in (1, 2, 4, 8):
        mesh = sharding.make_mesh(devices)
        config, inputs = sgld_setup(params, data, 128, mesh)
        for chains in (8, 64):
            wall = best_times({"run": sgld_run(config, inputs, chains, steps)}, 2)["run"][0]
            rows.append({"devices": devices, "chains": chains, "chain_steps_per_s": chains * steps / wall})
    return rows


def vmapped_sgd_run(loss_fn, params, data, batch_size, num_chains, num_steps):
    """``num_steps`` plain SGD steps of ``num_chains`` independent copies (vmapped), each drawing
    its own minibatch, in one jitted ``lax.scan``: the cheapest a chain-step can be."""
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains, *x.shape)), params)

    @jax.jit
    def train(params, key):
        def one(p, k):
            batch, _ = minibatch(k, data, batch_size)
            loss, grad = jax.value_and_grad(loss_fn)(p, batch)
            return jax.tree.map(lambda w, g: w - LEARNING_RATE * g, p, grad), loss

        def body(p, t):
            keys = jax.random.split(jax.random.fold_in(key, t), num_chains)
            return jax.vmap(one)(p, keys)

        return jax.lax.scan(body, params, jnp.arange(num_steps))

    return lambda: train(stacked, jax.random.key(2))


STEP_COST_TARGET = 1.3
"""Issue 16's target: the default ``estimate_llc`` chain-step ≤ 1.3× a vmapped ``lax.scan`` SGD step."""


def reference(quick: bool):
    """The default chain-step against a vmapped SGD step (see the module docstring)."""
    import dataclasses
    import warnings

    import slt_jax
    from slt_jax.problem import make_problem
    from slt_jax.runner.chains import setup
    from slt_jax.samplers import SGLD
    from slt_jax.settings import RunSettings

    sys.path.insert(0, str(Path(__file__).parent))
    import speed_vs_devinterp as devinterp_workload

    weights, x, y = devinterp_workload.make_problem()
    dln = ([jnp.asarray(w) for w in weights], {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    workloads = {
        "DLN 10-10-10-10 (devinterp workload)": (devinterp_workload.dln_loss, *dln, 100, 64,
                                                 500 if quick else 2000, devinterp_workload.STEP_SIZE,
                                                 devinterp_workload.LOCALIZATION),
        # 60 steps: at 20 the ratio moved from 1.21x to 1.37x between runs of the same code.
        "MLP 1M": (mlp_loss, *problem(MODELS["1M"]), 256, 4, 15 if quick else 60, STEP_SIZE, LOCALIZATION),
    }
    rows = []
    for name, (loss_fn, params, data, batch_size, chains, steps, eps, gamma) in workloads.items():
        run = RunSettings(num_chains=chains, num_burnin=0, num_draws=steps, batch_size=batch_size,
                          chunk_size=steps)
        prob = make_problem(loss_fn, params, data, localization=gamma, run=run)
        fns = {"sgd": vmapped_sgd_run(loss_fn, params, data, batch_size, chains, steps)}
        variants = {"default (table)": (prob, run, SGLD), "forward-pass CV": (
            dataclasses.replace(prob, center_losses=None), run, SGLD),
            "minibatch": (prob, dataclasses.replace(run, loss_estimator="minibatch"), SGLD),
            "table, Rademacher": (prob, run, SGLD_RADEMACHER)}
        for label, (p, r, kernel) in variants.items():
            config, inputs = setup(p, kernel, r, eps)
            fns[label] = sgld_run(config, inputs, chains, steps, chunk_size=steps)

        def whole():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(5), step_size=eps,
                                            localization=gamma, num_chains=chains, num_burnin=0, num_draws=steps,
                                            batch_size=batch_size, chunk_size=steps, progress=False).llc_mean

        fns["estimate_llc (default, whole call)"] = whole
        t = best_times(fns, 2 if quick else 5)
        per = {label: 1e3 * wall / (chains * steps) for label, (wall, _) in t.items()}
        row = {"workload": name, "chains": chains, "batch_size": batch_size, "steps": steps,
               "sgd_ms_per_chain_step": per["sgd"]}
        for label in fns:
            if label != "sgd":
                row[f"{label} ms"] = per[label]
                row[f"{label} / sgd"] = per[label] / per["sgd"]
        row["target_default_le_1.3x"] = bool(row["default (table) / sgd"] <= STEP_COST_TARGET)
        rows.append(row)
        print(f"  reference {name}: default/sgd = {row['default (table) / sgd']:.2f}", file=sys.stderr)
    return rows


def markdown(rows, columns):
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return "\n".join([head] + ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cost.json"))
    parser.add_argument("--devices-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-only", action="store_true", help="only the default-vs-SGD table")
    args = parser.parse_args()
    if args.reference_only:
        rows = reference(args.quick)
        print(json.dumps(rows, indent=1))
        for row in rows:
            print(f"target default ≤ {STEP_COST_TARGET:g}× SGD, {row['workload']}: {row['default (table) / sgd']:.2f}×, "
                  f"{'met' if row['target_default_le_1.3x'] else 'MISSED'}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_name("step_cost_reference.json").write_text(json.dumps(rows, indent=2))
        return
    if args.devices_worker:
        print(json.dumps(devices_worker(args.quick)))
        return

    results = {
        "device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "reference": reference(args.quick),
        "step_cost": step_cost(args.quick),
        "noise_impls": noise_impls(args.quick),
        "progress": progress_cost(args.quick),
        "memory": memory(),
    }
    # After the single-device timings, not beside them: both would share the same cores.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, __file__, "--devices-worker"] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    results["devices"] = json.loads(out.strip().splitlines()[-1])

    print(f"## Default chain-step against a vmapped SGD step ({results['device']}, jax {jax.__version__})\n")
    for row in results["reference"]:
        print(f"### {row['workload']}: {row['chains']} chains, batch {row['batch_size']}, {row['steps']} steps; "
              f"SGD {row['sgd_ms_per_chain_step']:.4f} ms per chain-step\n")
        print("| variant | ms per chain-step | ratio to SGD |\n|---|---|---|")
        for key, value in row.items():
            if key.endswith(" ms"):
                label = key[:-3]
                print(f"| {label} | {value:.4f} | {row[label + ' / sgd']:.2f}× |")
        print(f"\ntarget default ≤ {STEP_COST_TARGET:g}× SGD: {row['default (table) / sgd']:.2f}×, "
              f"{'met' if row['target_default_le_1.3x'] else 'MISSED'}\n")
    print(f"## Step cost ({results['device']}, jax {jax.__version__})\n")
    print(markdown(results["step_cost"], ["model", "num_params", "batch_size", "sgd_ms", "sgld_ms",
                                          "noise_ms", "sgld_over_sgd", "sgld_over_sgd_cpu"]))
    print("\n## Step cost with Rademacher noise (sampler=\"sgld_rademacher\")\n")
    print(markdown(results["step_cost"], ["model", "batch_size", "sgd_ms", "rademacher_ms", "signs_ms",
                                          "rademacher_over_sgd", "rademacher_over_sgd_cpu"]))
    print("\n## 1M float32 standard normals\n")
    print(markdown(results["noise_impls"], ["generator", "wall_ms", "cpu_ms"]))
    print("\n## Progress (chunked scan) cost\n")
    print(markdown([results["progress"]], list(results["progress"])))
    print("\n## Memory of one compiled chunk: 1M-parameter MLP, 16 chains\n")
    print(markdown([results["memory"]], list(results["memory"])))
    print("\n## Chain-steps/s against chains and simulated devices (small MLP, batch 128)\n")
    print(markdown(results["devices"], ["devices", "chains", "chain_steps_per_s"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
