"""Scale-out: chain-steps/s, per-device memory and λ̂ error as models, chains and devices grow.

Sections (``--sections``; all by default):

  * ``dln`` — Furman & Lau's random deep linear networks (arXiv:2402.03698; REFERENCE
    "Furman & Lau DLN benchmark settings") at the scales 10K, 100K, 1M and 10M parameters, as
    many as the devices hold: for each, the network of the class (depth, width ranges) whose
    parameter count is nearest the nominal one among 32 seeded draws, its aligned teacher,
    x ~ U(−10, 10) with noise-free outputs, and for every mesh the devices allow — chains ×
    ``model`` axis — the chain-steps/s of a timed run (after compilation) and the per-device
    memory of the compiled chunk (XLA's analysis: arguments + outputs − donated + temporaries).
    Then λ̂ with the protocol's fixed step ε, batch 500, γ = 1, nβ = n/log n, 90 % burn-in,
    against Aoyagi's λ (``dln_learning_coefficient``). A run whose protocol steps would exceed
    ``--seconds-per-estimate`` at the measured rate is shortened and marked ``truncated``.
  * ``transformer`` — next-token transformers of about 1M, 10M and 100M parameters
    (``slt_jax.models.Transformer``) on random byte sequences: chain-steps/s and per-device
    memory against chains and the model axis (at initialisation λ̂ means nothing: no estimate).
  * ``model_axis`` — with a single device on CPU, the 100K and 1M DLNs and the 1M and 10M
    transformers compiled in a subprocess with 8 simulated CPU devices, ``model`` = 1, 2, 4, 8:
    what the model axis does to per-device memory (not timed: 8 devices share the machine's
    cores).
  * ``multiprocess`` — on CPU: the 10K DLN on 2 local processes × 4 devices (gloo,
    ``slt_jax.launch``) against 1 process × 8 devices: wall time and whether the per-chain λ̂
    agree.
  * ``streaming`` — ``benchmarks/streaming.py``: a memmap against the same rows on device.

Everything is sized from what the run finds: the device count and kind, and each device's
memory (``memory_stats()["bytes_limit"]`` on accelerators; the host's RAM shared by CPU
devices), with a scale or mesh skipped, and said so, when its estimated footprint exceeds half
of it. On CPU the defaults run the smallest sizes (10K DLN, 1M transformer); on a GPU the same
command runs every size that fits. ``--quick`` cuts steps and repeats; ``--budget`` stops
starting new work after that many seconds.

Run::

    python benchmarks/scale_out.py [--quick] [--sections dln transformer ...] [--out benchmarks/results/scale_out.json]

It prints markdown tables and writes JSON (default ``benchmarks/results/scale_out.json``).
"""

import argparse
import functools
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import slt_jax
from slt_jax.groundtruth import dln_learning_coefficient
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher, random_dln
from slt_jax.problem import make_problem
from slt_jax.runner import sharding
from slt_jax.runner.chains import _advance, init_chains, per_chain, run_chains, setup
from slt_jax.samplers import SGLD
from slt_jax.settings import RunSettings

HERE = Path(__file__).resolve().parent
# The protocol (REFERENCE, Furman & Lau): the width and depth ranges, ε, steps and n per scale.
DLN_SCALES = {
    "10K": dict(nominal=1e4, depth_range=(2, 10), width_range=(5, 100), step_size=5e-7, steps=10_000, n=100_000),
    "100K": dict(nominal=1e5, depth_range=(2, 10), width_range=(50, 500), step_size=1e-7, steps=50_000, n=1_000_000),
    "1M": dict(nominal=1e6, depth_range=(2, 20), width_range=(100, 1000), step_size=5e-8, steps=50_000, n=1_000_000),
    "10M": dict(nominal=1e7, depth_range=(2, 20), width_range=(500, 2000), step_size=2e-8, steps=50_000,
                n=1_000_000),
}
TRANSFORMERS = {
    "1M": dict(d_model=128, num_layers=4, num_heads=4),
    "10M": dict(d_model=256, num_layers=12, num_heads=8),
    "100M": dict(d_model=768, num_layers=12, num_heads=12),
}
CONTEXT, SEQUENCES, TOKEN_BATCH = 128, 4096, 32
DLN_BATCH, LOCALIZATION, INPUT_SCALE = 500, 1.0, 10.0
_LOSS = functools.partial(dln_loss, sigma=1.0)


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def device_memory() -> int:
    """Bytes one device may use: its allocator's limit, or on CPU the host's RAM over its devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // jax.local_device_count())


def meshes(model_sizes=None):
    """``(model, mesh)`` for every model-axis size the devices allow (powers of two, ≤ 8)."""
    devices = jax.device_count()
    local = jax.local_device_count()
    sizes = model_sizes or [m for m in (1, 2, 4, 8) if m <= min(local, 8) and devices % m == 0]
    return [(m, sharding.make_mesh(devices, model=m)) for m in sizes]


def param_bytes(params) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def skipped(rows, base, model, chains, need, memory, clock) -> bool:
    """Record a configuration as skipped, and say so, when its estimated footprint exceeds half
    the device's memory or the time budget is spent."""
    why = "does not fit" if need > memory / 2 else "time budget spent" if clock.left() < 20 else None
    if why is not None:
        rows.append({**base, "model": model, "chains": chains, "skipped": why})
    return why is not None


def footprint(params, data_bytes, chains_per_group, model) -> int:
    """A rough per-device footprint: the data (replicated), and per chain its position, gradient,
    noise and update temporaries (~4 copies of the parameters, split over the model axis)."""
    return int(data_bytes + 4 * chains_per_group * param_bytes(params) / model)


def compiled_memory(config, inputs, num_chains, chunk) -> dict | None:
    """Per-device memory of the compiled chunk program (XLA's analysis), in MiB."""
    mesh = config.mesh
    specs = config.param_specs or sharding.param_specs(inputs.posterior.center, mesh)
    config = config._replace(param_specs=specs)
    padded = sharding.padded_num_chains(num_chains, mesh)
    from slt_jax.runner.chains import _input_shardings

    on_chains = jax.sharding.NamedSharding(mesh, sharding.chain_spec(mesh))
    chain_index = sharding.put(np.arange(padded, dtype=np.int32), on_chains)
    key = sharding.put(jax.random.key(0), jax.sharding.NamedSharding(mesh, sharding.REPLICATED))
    placed = sharding.put(per_chain(inputs, num_chains, padded), _input_shardings(mesh, specs, inputs))
    state = init_chains(config, placed, padded)
    lowered = _advance.lower(config, placed, chunk, key, chain_index, state, jnp.int32(0), jnp.int32(0),
                             jnp.int32(chunk))
    analysis = lowered.compile().memory_analysis()
    if analysis is None:
        return None
    mib = lambda b: b / 2**20
    arg, out = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
    alias, temp = analysis.alias_size_in_bytes, analysis.temp_size_in_bytes
    return {"arguments_mib": mib(arg), "temporaries_mib": mib(temp), "peak_mib": mib(arg + out - alias + temp)}


def params_per_device(params) -> float:
    """MiB of w* on the device that holds the most of it."""
    held = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values()) / 2**20


def throughput(problem, num_chains, steps, chunk, rounds):
    """Chain-steps/s of a run of ``steps`` steps (best of ``rounds`` after a compiling warm-up;
    ``None`` with no rounds), and the compiled chunk's per-device memory (with w*'s share)."""
    run = RunSettings(num_chains=num_chains, num_burnin=steps - 1, num_draws=1, batch_size=problem.batch_size,
                      chunk_size=chunk)
    config, inputs = setup(problem, SGLD, run, 1e-9)
    memory = compiled_memory(config, inputs, num_chains, chunk) or {}
    memory["params_mib"] = params_per_device(problem.params)
    if rounds == 0:
        return None, memory

    def go():
        state, _ = run_chains(jax.random.key(1), config, inputs, num_chains=num_chains, num_burnin=steps - 1,
                              num_draws=1, chunk_size=chunk, progress=False)
        jax.block_until_ready(state.kernel_state.position)

    go()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        go()
        best = min(best, time.perf_counter() - start)
    return num_chains * steps / best, memory


def nearest_network(spec, seed):
    """The network of the class whose parameter count is nearest the nominal one (32 draws)."""
    best = None
    for i in range(32):
        arch = random_dln(jax.random.key(1000 * seed + i), depth_range=spec["depth_range"],
                          width_range=spec["width_range"])
        count = sum(a * b for a, b in zip(arch.widths, arch.widths[1:]))
        gap = abs(math.log(count / spec["nominal"]))
        if best is None or gap < best[0]:
            best = (gap, arch, count)
    return best[1], best[2]


def failure(error) -> str:
    """An exception as a row's ``error`` (and its traceback on stderr)."""
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    return f"{type(error).__name__}: {error}"[:600]


def rounds(args) -> int:
    """Timed repeats of a throughput run (0: compile and read the memory only)."""
    return 0 if args.memory_only else 1 if args.quick else 2


class Clock:
    """The run's time budget: ``left()`` seconds, or ``inf`` without one."""

    def __init__(self, budget):
        self.start, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - (time.perf_counter() - self.start)


def dln_section(scales, args, clock) -> list:
    rows = []
    memory = device_memory()
    for scale in scales:
        spec = DLN_SCALES[scale]
        if clock.left() < 30:
            rows.append({"scale": scale, "skipped": "time budget spent"})
            continue
        arch, count = nearest_network(spec, args.seed)
        n = min(spec["n"], args.max_n)
        data_bytes = 4 * n * (arch.widths[0] + arch.widths[-1])
        teacher_shapes = [jax.ShapeDtypeStruct((b, a), jnp.float32) for a, b in zip(arch.widths, arch.widths[1:])]
        if footprint(teacher_shapes, data_bytes, 1, 1) > memory / 2 and all(
                footprint(teacher_shapes, data_bytes, 1, m) > memory / 2 for m, _ in meshes()):
            rows.append({"scale": scale, "num_params": count, "skipped": "does not fit in device memory"})
            continue
        key_teacher, key_data, key_sample = jax.random.split(jax.random.key(args.seed), 3)
        teacher = dln_teacher(key_teacher, arch.widths, arch.rank, kind="aligned")
        data = dln_data(key_data, teacher, n, input_scale=INPUT_SCALE, input_dist="uniform")
        truth = dln_learning_coefficient(arch.widths, arch.rank)
        base = {"scale": scale, "num_params": count, "widths": list(arch.widths), "rank": arch.rank, "n": n,
                "lambda": float(truth.lam), "multiplicity": truth.multiplicity}
        steps = 128 if args.quick else 512
        best = None
        for model, mesh in meshes(args.model):
            groups = sharding.axis_size(mesh, sharding.CHAINS)
            for per_group in args.chains_per_group:
                chains = groups * per_group
                if skipped(rows, base, model, chains, footprint(teacher, data_bytes, per_group, model), memory, clock):
                    continue
                try:
                    problem = make_problem(_LOSS, teacher, data, localization=LOCALIZATION, mesh=mesh,
                                           run=RunSettings(batch_size=DLN_BATCH))
                    rate, mem = throughput(problem, chains, steps, steps // 2, rounds(args))
                except Exception as error:  # one configuration's failure is a row, not the end of the run
                    rows.append({**base, "model": model, "chains": chains, "error": failure(error)})
                    continue
                row = {**base, "model": model, "chains": chains, "mesh": dict(mesh.shape),
                       "chain_steps_per_s": rate, "memory": mem}
                rows.append(row)
                print(f"  dln {scale} ({count} params) model={model} chains={chains}: {rate} chain-steps/s, "
                      f"{mem}", file=sys.stderr)
                if rate is not None and (best is None or rate > best[0]):
                    best = (rate, model, chains, mesh)
        if best is None or args.no_estimate:
            continue
        rate, model, chains, mesh = best
        planned = spec["steps"] if not args.quick else min(spec["steps"], 2000)
        affordable = int(rate / chains * min(args.seconds_per_estimate, max(clock.left() - 10, 0)))
        total = min(planned, max(affordable, 200))
        burnin = int(0.9 * total)
        start = time.perf_counter()
        try:
            result = slt_jax.estimate_llc(_LOSS, teacher, data, key_sample, step_size=spec["step_size"],
                                          localization=LOCALIZATION, batch_size=DLN_BATCH, num_chains=chains,
                                          num_burnin=burnin, num_draws=total - burnin, mesh=mesh, progress=False)
        except Exception as error:
            rows.append({**base, "model": model, "chains": chains, "error": failure(error)})
            continue
        rows.append({**base, "model": model, "chains": chains, "mesh": dict(mesh.shape), "estimate": True,
                     "step_size": spec["step_size"], "steps": total, "protocol_steps": spec["steps"],
                     "truncated": total < spec["steps"], "llc_mean": result.llc_mean, "llc_se": result.llc_se,
                     "rel_error": result.llc_mean / truth.lam - 1, "diverged": len(result.diverged_chains),
                     "seconds": time.perf_counter() - start})
    return rows


def transformer_section(sizes, args, clock) -> list:
    from flax import nnx

    from slt_jax.models import Transformer, TransformerConfig, from_nnx

    rows = []
    memory = device_memory()
    tokens = np.random.default_rng(0).integers(0, 256, size=(SEQUENCES, CONTEXT), dtype=np.int32)
    for size in sizes:
        shape = TRANSFORMERS[size]
        config = TransformerConfig(vocab_size=256, context_length=CONTEXT, **shape)
        if clock.left() < 30:
            rows.append({"size": size, "skipped": "time budget spent"})
            continue
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        # Activations of a batch dominate small models: (batch, context, d_model) per layer, a few.
        activations = 16 * TOKEN_BATCH * CONTEXT * (shape["d_model"] * 8 + 256) * shape["num_layers"]
        loss_fn, params = from_nnx(Transformer(config, rngs=nnx.Rngs(0)), loss="next_token")
        base = {"size": size, "num_params": int(count), **shape, "context": CONTEXT, "batch_size": TOKEN_BATCH}
        steps = 16 if args.quick else 64
        if on_cpu():
            steps //= 4
        for model, mesh in meshes(args.model):
            groups = sharding.axis_size(mesh, sharding.CHAINS)
            for per_group in args.chains_per_group:
                chains = groups * per_group
                need = footprint(params, tokens.nbytes, per_group, model) + per_group * activations
                if skipped(rows, base, model, chains, need, memory, clock):
                    continue
                try:
                    problem = make_problem(loss_fn, params, {"tokens": tokens}, localization=LOCALIZATION,
                                           mesh=mesh, run=RunSettings(batch_size=TOKEN_BATCH))
                    rate, mem = throughput(problem, chains, steps, steps // 2, rounds(args))
                except Exception as error:
                    rows.append({**base, "model": model, "chains": chains, "error": failure(error)})
                    continue
                rows.append({**base, "model": model, "chains": chains, "mesh": dict(mesh.shape),
                             "chain_steps_per_s": rate, "tokens_per_s": rate and rate * TOKEN_BATCH * CONTEXT,
                             "memory": mem})
                print(f"  transformer {size} ({count / 1e6:.1f}M) model={model} chains={chains}: "
                      f"{rate} chain-steps/s, {mem}", file=sys.stderr)
    return rows


def model_axis_section(args) -> dict:
    """The dln and transformer sections again with 8 simulated CPU devices (a subprocess)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    out = Path(args.out).with_name(Path(args.out).stem + "_model_axis.json")
    scales, sizes = (["1M"], ["1M"]) if args.quick else (["1M", "10M"], ["1M", "10M"])
    command = [sys.executable, __file__, "--sections", "dln", "transformer", "--scales", *scales, "--sizes", *sizes,
               "--model", "1", "2", "4", "8", "--chains-per-group", "1", "--memory-only", "--max-n", "2048",
               "--out", str(out)]
    if args.quick:
        command.append("--quick")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(out.read_text())


def multiprocess_section(args) -> dict:
    """The 10K DLN on 2 processes × 4 CPU devices against 1 process × 8 (wall times, per-chain λ̂)."""
    from slt_jax import launch

    out = Path(tempfile.mkdtemp(prefix="scale_out_multiprocess"))
    steps = "400" if args.quick else "2000"
    command = [sys.executable, __file__, "--worker", str(out), steps]
    start = time.perf_counter()
    reference = subprocess.run(command, env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8"),
                               capture_output=True, text=True, timeout=1800)
    one = time.perf_counter() - start
    start = time.perf_counter()
    results = launch.launch(command, 2, timeout=1800, cpu_devices=4, output=io.StringIO())
    two = time.perf_counter() - start
    if reference.returncode != 0 or any(status != 0 for status, _, _ in results):
        return {"error": (reference.stderr + "".join(text for _, _, text in results))[-3000:]}
    load = lambda name: json.loads((out / name).read_text())
    ref, p0 = load("p0_of_1.json"), load("p0_of_2.json")
    return {"one_process_8_devices_s": one, "two_processes_4_devices_s": two,
            "estimate_s": {"one": ref["seconds"], "two": p0["seconds"]},
            "max_abs_diff_per_chain_llc": float(np.max(np.abs(np.array(ref["llc"]) - np.array(p0["llc"])))),
            "chains": len(ref["llc"]), "steps": int(steps)}


def multiprocess_worker(out_dir, steps):
    """One process of the multiprocess section (or the 1 × 8 reference)."""
    from slt_jax import distributed

    if os.environ.get("SLT_JAX_NUM_PROCESSES"):
        distributed.initialize()
    spec = DLN_SCALES["10K"]
    arch, _ = nearest_network(spec, 0)
    key_teacher, key_data, key_sample = jax.random.split(jax.random.key(0), 3)
    teacher = dln_teacher(key_teacher, arch.widths, arch.rank, kind="aligned")
    data = jax.tree.map(np.asarray, dln_data(key_data, teacher, 20_000, input_scale=INPUT_SCALE,
                                             input_dist="uniform"))
    start = time.perf_counter()
    result = slt_jax.estimate_llc(_LOSS, teacher, data, key_sample, step_size=spec["step_size"],
                                  localization=LOCALIZATION, batch_size=DLN_BATCH, num_chains=8,
                                  num_burnin=int(0.9 * steps), num_draws=steps - int(0.9 * steps),
                                  mesh=slt_jax.make_mesh(8), progress=False)
    seconds = time.perf_counter() - start
    if distributed.is_primary():
        name = f"p0_of_{jax.process_count()}.json"
        (Path(out_dir) / name).write_text(json.dumps({"llc": result.llc_per_chain.tolist(), "seconds": seconds}))


def tables(record) -> str:
    lines = []
    rate = lambda r, f: "—" if r["chain_steps_per_s"] is None else format(r["chain_steps_per_s"], f)
    dln = [r for r in record.get("dln", []) if "chain_steps_per_s" in r]
    if dln:
        lines += ["### Deep linear networks: throughput and memory", "",
                  "| scale | params | n | mesh | chains | chain-steps/s | peak MiB/device | args MiB/device | "
                  "w* MiB/device |", "|---|---|---|---|---|---|---|---|---|"]
        for r in dln:
            mem = r["memory"] or {}
            lines.append(f"| {r['scale']} | {r['num_params']:,} | {r['n']:,} | {r['mesh']} | {r['chains']} | "
                         f"{rate(r, '.0f')} | {mem.get('peak_mib', float('nan')):.1f} | "
                         f"{mem.get('arguments_mib', float('nan')):.1f} | {mem.get('params_mib', float('nan')):.2f} |")
    est = [r for r in record.get("dln", []) if r.get("estimate")]
    if est:
        lines += ["", "### Deep linear networks: λ̂ against Aoyagi's λ (fixed protocol ε, 90 % burn-in)", "",
                  "| scale | params | λ | λ̂ ± se | rel. error | steps (protocol) | chains | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in est:
            lines.append(f"| {r['scale']} | {r['num_params']:,} | {r['lambda']:.1f} | {r['llc_mean']:.1f} ± "
                         f"{r['llc_se']:.1f} | {100 * r['rel_error']:+.1f} % | {r['steps']:,} ({r['protocol_steps']:,})"
                         f"{' truncated' if r['truncated'] else ''} | {r['chains']} | {r['seconds']:.0f} |")
    tr = [r for r in record.get("transformer", []) if "chain_steps_per_s" in r]
    if tr:
        lines += ["", "### Transformers (random bytes, context 128, batch 32): throughput and memory", "",
                  "| size | params | mesh | chains | chain-steps/s | tokens/s | peak MiB/device | w* MiB/device |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tr:
            mem = r["memory"] or {}
            tokens = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
            lines.append(f"| {r['size']} | {r['num_params'] / 1e6:.1f}M | {r['mesh']} | {r['chains']} | "
                         f"{rate(r, '.1f')} | {tokens} | {mem.get('peak_mib', float('nan')):.1f} | "
                         f"{mem.get('params_mib', float('nan')):.2f} |")
    skipped = [r for key in ("dln", "transformer") for r in record.get(key, []) if "skipped" in r]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r.get('scale') or r.get('size')} model={r.get('model', '-')} "
                                           f"chains={r.get('chains', '-')} ({r['skipped']})" for r in skipped)]
    errors = [f"{key}: {r['error']}" for key in ("dln", "transformer") for r in record.get(key, [])
              if isinstance(r, dict) and "error" in r]
    errors += [f"{key}: {record[key]['error']}" for key in record if isinstance(record[key], dict)
               and "error" in record[key]]
    if errors:
        lines += ["", "Errors: " + "; ".join(e[:300] for e in errors)]
    if "model_axis" in record and "dln" in record["model_axis"]:
        lines += ["", "### The model axis on 8 simulated CPU devices (compiled memory per device; not timed)", "",
                  tables({k: record["model_axis"][k] for k in ("dln", "transformer") if k in record["model_axis"]})]
    if "multiprocess" in record and "error" not in record["multiprocess"]:
        m = record["multiprocess"]
        lines += ["", "### Two processes × 4 CPU devices against one × 8 (10K DLN, 8 chains)", "",
                  "| | wall s (with start-up) | estimate s | max |Δλ̂| per chain |", "|---|---|---|---|",
                  f"| 1 × 8 | {m['one_process_8_devices_s']:.1f} | {m['estimate_s']['one']:.1f} | |",
                  f"| 2 × 4 | {m['two_processes_4_devices_s']:.1f} | {m['estimate_s']['two']:.1f} | "
                  f"{m['max_abs_diff_per_chain_llc']:.2g} |"]
    if "streaming" in record and "ratio" in record["streaming"]:
        sys.path.insert(0, str(HERE))
        from streaming import table

        lines += ["", "### Streamed data (memmap) against data on device", "", table(record["streaming"])]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=None,
                        choices=["dln", "transformer", "model_axis", "multiprocess", "streaming"])
    parser.add_argument("--scales", nargs="+", choices=list(DLN_SCALES), default=None,
                        help="DLN scales (default: 10K on CPU, all on accelerators)")
    parser.add_argument("--sizes", nargs="+", choices=list(TRANSFORMERS), default=None,
                        help="transformer sizes (default: 1M on CPU, all on accelerators)")
    parser.add_argument("--model", nargs="+", type=int, default=None, help="model-axis sizes (default: all that fit)")
    parser.add_argument("--chains-per-group", nargs="+", type=int, default=[1, 4],
                        help="chains per chain group (default 1 and 4)")
    parser.add_argument("--max-n", type=int, default=None,
                        help="cap on the DLN dataset rows (default 20,000 on CPU, the protocol's on accelerators)")
    parser.add_argument("--seconds-per-estimate", type=float, default=None,
                        help="cap on each λ̂ run (default 600 s on CPU, 60 s on accelerators)")
    parser.add_argument("--no-estimate", action="store_true", help="throughput and memory only")
    parser.add_argument("--memory-only", action="store_true",
                        help="compile each configuration and read its memory; no timed runs, no estimate")
    parser.add_argument("--budget", type=float, default=None, help="start no new work after this many seconds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/scale_out.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.no_estimate = args.no_estimate or args.memory_only
    if args.worker:
        return multiprocess_worker(args.worker[0], int(args.worker[1]))
    cpu = on_cpu()
    sections = args.sections or (["dln", "transformer", "model_axis", "multiprocess", "streaming"] if cpu
                                 else ["dln", "transformer", "streaming"])
    scales = args.scales or (["10K"] if cpu else list(DLN_SCALES))
    sizes = args.sizes or (["1M"] if cpu else list(TRANSFORMERS))
    args.max_n = args.max_n or (20_000 if cpu else 10**9)
    args.seconds_per_estimate = args.seconds_per_estimate or (600.0 if cpu else 60.0)
    if args.quick:
        args.max_n = min(args.max_n, 10_000)
    clock = Clock(args.budget)
    record = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "backend": jax.default_backend(),
                          "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
                          "device_memory_mib": device_memory() / 2**20, "jax": jax.__version__},
              "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    def streaming_section():
        sys.path.insert(0, str(HERE))
        from streaming import compare

        steps = (256 if args.quick else 512) * (1 if cpu else 8)
        # On an accelerator the feeder sizes the chunks (≤ chunk_bytes of rows per device).
        return compare(n=32768 if args.quick else 65536, steps=steps, chunk_size=steps // 4 if cpu else None,
                       rounds=2 if args.quick else 3)

    runs = {"dln": lambda: dln_section(scales, args, clock),
            "transformer": lambda: transformer_section(sizes, args, clock),
            "model_axis": lambda: model_axis_section(args) if jax.device_count() == 1 and cpu else None,
            "multiprocess": lambda: multiprocess_section(args) if cpu else None,
            "streaming": lambda: streaming_section() if clock.left() > 60 else {"skipped": "time budget spent"}}
    for name in sections:
        try:
            value = runs[name]()
        except Exception as error:
            value = {"error": failure(error)}
        if value is not None:
            record[name] = value
    record["seconds"] = time.perf_counter() - clock.start
    print(tables(record))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=float))
    print(f"wrote {args.out} in {record['seconds']:.0f} s")
    return record


if __name__ == "__main__":
    main()
