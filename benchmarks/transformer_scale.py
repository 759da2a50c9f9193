"""How λ̂ on a transformer scales: chain-steps per second and peak memory against model size,
sequence length and compute dtype, on whatever devices are present.

For transformers with MLPs and layer norm (``slt_jax.models.Transformer``) of about 10⁵, 10⁶ and
10⁷ parameters, at two sequence lengths, with float32 and bfloat16 compute
(``compute_dtype``; positions, gradients and the loss stay float32), this runs
``slt_jax.estimate_llc`` on random tokens twice with the same compiled program and reports
the second run (steady state): chain-steps per second, milliseconds per chain-step, and the peak
memory — the device's ``peak_bytes_in_use`` where the backend reports it (GPU/TPU), else XLA's
memory analysis of the compiled chunk program (arguments + outputs + temporaries − aliased) on CPU.
It runs unchanged on a GPU (the same script, larger sizes fit); on these 2 CPU cores use
``--quick`` for the two smaller sizes at the shorter length.

Run::

    python benchmarks/transformer_scale.py [--quick] [--out benchmarks/results/transformer_scale.json]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import slt_jax
from slt_jax.models import from_nnx
from slt_jax.models.transformer import Transformer, TransformerConfig

# (name, d_model, layers, heads, vocab): about 1e5, 1e6 and 1e7 parameters.
SIZES = [("1e5", 64, 2, 4, 256), ("1e6", 128, 4, 4, 2048), ("1e7", 384, 6, 6, 8192)]
LENGTHS = (64, 256)
CHAINS, BATCH, STEPS = 4, 8, 32


def model_and_data(d_model, layers, heads, vocab, length, n=512, seed=0):
    """A randomly initialised transformer (as ``(loss_fn, params)``) and random token data."""
    config = TransformerConfig(vocab_size=vocab, context_length=length, d_model=d_model, num_heads=heads,
                               num_layers=layers)
    loss_fn, params = from_nnx(Transformer(config, rngs=nnx.Rngs(seed)), loss="next_token")
    tokens = np.random.default_rng(seed).integers(0, vocab, (n, length), dtype=np.int32)
    return loss_fn, params, {"tokens": jnp.asarray(tokens)}


def peak_bytes(device) -> int | None:
    """The device's peak allocation so far, where the backend reports it."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def compiled_bytes(loss_fn, params, data) -> int:
    """XLA's memory analysis of the chunk program (what one device holds while it runs)."""
    from slt_jax.problem import make_problem
    from slt_jax.runner.chains import _advance, init_chains, per_chain, setup
    from slt_jax.samplers import SGLD
    from slt_jax.settings import RunSettings

    run = RunSettings(num_chains=CHAINS, batch_size=BATCH, num_burnin=0, num_draws=STEPS)
    problem = make_problem(loss_fn, params, data, localization=1.0, run=run)
    config, inputs = setup(problem, SGLD, run, 1e-6)
    inputs = per_chain(inputs, CHAINS)
    state = init_chains(config, inputs, CHAINS)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(CHAINS))
    lowered = _advance.lower(config, inputs, STEPS, keys, state, jnp.int32(0), jnp.int32(0), jnp.int32(STEPS))
    analysis = lowered.compile().memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def measure(name, d_model, layers, heads, vocab, length, compute_dtype):
    loss_fn, params, data = model_and_data(d_model, layers, heads, vocab, length)
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    run = dict(step_size=1e-6, localization=1.0, nbeta=100.0, num_chains=CHAINS, batch_size=BATCH, num_burnin=0,
               num_draws=STEPS, chunk_size=STEPS, loss_estimator="minibatch", compute_dtype=compute_dtype,
               progress=False)
    start = time.perf_counter()
    slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(0), **run)
    first = time.perf_counter() - start
    start = time.perf_counter()
    slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(1), **run)
    steady = time.perf_counter() - start
    device = jax.devices()[0]
    peak = peak_bytes(device)
    source = "device peak"
    if peak is None:
        peak, source = compiled_bytes(loss_fn, params, data), "XLA memory analysis"
    chain_steps = CHAINS * STEPS
    return {"size": name, "params": num_params, "length": length,
            "compute": "float32" if compute_dtype is None else str(jnp.dtype(compute_dtype)),
            "chain_steps_per_s": chain_steps / steady, "ms_per_chain_step": 1e3 * steady / chain_steps,
            "first_run_s": first, "steady_run_s": steady, "peak_mib": peak / 2**20, "memory_source": source}


def markdown(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two smaller sizes at the shorter length (CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transformer_scale.json"))
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    lengths = LENGTHS[:1] if args.quick else LENGTHS
    rows = []
    for name, d_model, layers, heads, vocab in sizes:
        for length in lengths:
            for compute_dtype in (None, jnp.bfloat16):
                row = measure(name, d_model, layers, heads, vocab, length, compute_dtype)
                rows.append(row)
                print(f"{name} L={length} {row['compute']}: {row['chain_steps_per_s']:.1f} chain-steps/s, "
                      f"{row['peak_mib']:.1f} MiB", flush=True)
    columns = ["size", "params", "length", "compute", "chain_steps_per_s", "ms_per_chain_step", "first_run_s",
               "peak_mib", "memory_source"]
    print(markdown(rows, columns))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"rows": rows, "chains": CHAINS, "batch": BATCH, "steps": STEPS, "devices": [str(d) for d in jax.devices()],
              "backend": jax.default_backend(), "platform": platform.platform(), "jax": jax.__version__}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
