"""Grokking: λ̂ over the training of a small network on modular addition with weight decay.

An MLP (embeddings of a and b, one ReLU layer) learns ``(a + b) mod 31`` from half of the
961 pairs with AdamW and weight decay 1 from a small initialisation: it memorises the
training half within ~200 steps while test accuracy stays at chance, and generalises only
thousands of steps later. λ̂, measured on the training data alone, rises while the network
memorises and falls as it generalises (docs/case_studies.md §8), tracking the test loss.

Checkpoints are composite Orbax steps (``params`` beside ``evaluation``) read with
``item="params"``. The default localization γ = nβ/10 of :func:`slt_jax.llc_trajectory` is
used; here nβ = n/log n ≈ 78 for n = 480 training pairs. Run time on 2 busy CPU cores: about
three minutes (training ≈ 25 s, λ̂ at 26 checkpoints ≈ 2.5 min).
"""

import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from slt_jax.demos.dln_trajectory import checkpoint_steps
from slt_jax.models.adapters import cross_entropy
from slt_jax.trajectory.llc_trajectory import llc_trajectory

MODULUS = 31
TRAIN_FRACTION = 0.5
EMBED, HIDDEN = 32, 128
INIT_SCALE = 0.3
OPTIMIZER = dict(learning_rate=1e-2, b1=0.9, b2=0.98, weight_decay=1.0)
NUM_STEPS = 5000
# ε·nβ small enough that a 3× smaller step changes λ̂ by under 10 %, measured on this run.
SAMPLER = dict(step_size=3e-4, num_chains=4, num_burnin=500, num_draws=500, batch_size=128)


def modular_addition(key, modulus=MODULUS, train_fraction=TRAIN_FRACTION):
    """All pairs ``(a, b)`` with label ``(a + b) mod modulus``, split at random.

    Args:
      key: PRNG key of the split.
      modulus: p.
      train_fraction: share of the p² pairs in the training set.

    Returns:
      ``(train, test)``, each ``{"x": (m, 2) int32, "y": (m,) int32}``.
    """
    a, b = np.meshgrid(np.arange(modulus), np.arange(modulus), indexing="ij")
    x = np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int32)
    y = ((x[:, 0] + x[:, 1]) % modulus).astype(np.int32)
    order = np.asarray(jax.random.permutation(key, modulus * modulus))
    cut = int(train_fraction * modulus * modulus)
    split = lambda idx: {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx])}
    return split(order[:cut]), split(order[cut:])


def init_params(key, modulus=MODULUS):
    """Embeddings and one hidden layer, scaled by ``INIT_SCALE`` (a small initialisation)."""
    k_embed, k_hidden, k_out = jax.random.split(key, 3)
    return {
        "embed": INIT_SCALE * jax.random.normal(k_embed, (modulus, EMBED)) / math.sqrt(EMBED),
        "w1": INIT_SCALE * jax.random.normal(k_hidden, (2 * EMBED, HIDDEN)) / math.sqrt(2 * EMBED),
        "b1": jnp.zeros(HIDDEN),
        "w2": INIT_SCALE * jax.random.normal(k_out, (HIDDEN, modulus)) / math.sqrt(HIDDEN),
    }


def logits(params, x):
    """Class scores for pairs ``x`` of shape ``(m, 2)``."""
    embedded = params["embed"][x].reshape(x.shape[0], -1)
    return jax.nn.relu(embedded @ params["w1"] + params["b1"][None, :]) @ params["w2"]


def loss_fn(params, batch):
    """Mean cross-entropy in nats (the per-sample negative log-likelihood)."""
    return jnp.mean(cross_entropy(logits(params, batch["x"]), batch["y"]))


def accuracy(params, batch):
    """Share of pairs classified correctly."""
    return jnp.mean(jnp.argmax(logits(params, batch["x"]), axis=-1) == batch["y"])


def train(directory, key, train_data, test_data, steps):
    """Full-batch AdamW; saves ``params`` and ``evaluation`` (the metrics) at ``steps``, composite.

    Returns:
      Metrics per checkpoint step: ``{step: {"train_loss", "test_loss", "train_accuracy",
      "test_accuracy"}}``.
    """
    optimizer = optax.adamw(**OPTIMIZER)
    params = init_params(key)
    state = optimizer.init(params)

    @jax.jit
    def update(params, state):
        grad = jax.grad(loss_fn)(params, train_data)
        updates, state = optimizer.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def measure(params):
        return {"train_loss": loss_fn(params, train_data), "test_loss": loss_fn(params, test_data),
                "train_accuracy": accuracy(params, train_data),
                "test_accuracy": accuracy(params, test_data)}

    metrics, done = {}, 0
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        for step in steps:
            for _ in range(step - done):
                params, state = update(params, state)
            done = step
            metrics[step] = measure(params)
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                evaluation=ocp.args.StandardSave(metrics[step])))
        manager.wait_until_finished()
    return {step: {k: float(v) for k, v in m.items()} for step, m in metrics.items()}


def run(out_dir, *, seed: int = 0, num_steps: int = NUM_STEPS, num_log: int = 20,
        num_linear: int = 6, sampler: dict | None = None, progress: bool = True) -> dict:
    """Train on modular addition, checkpoint, estimate λ̂ at every checkpoint, write outputs.

    Args:
      out_dir: output directory (its ``checkpoints`` subdirectory is replaced).
      seed: root seed (split, initialisation and sampler keys derive from it).
      num_steps: training steps.
      num_log, num_linear: log- and linearly spaced checkpoints.
      sampler: overrides of ``SAMPLER``.
      progress: show a progress bar.

    Returns:
      A dict with the ``curve``, its ``stages``, ``metrics`` per step, the steps at which the network
      ``memorised`` (train accuracy 1) and ``generalised`` (test accuracy ≥ 0.9; −1 if
      never), the written ``paths`` and wall times.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out / "checkpoints"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    key_split, key_init, key_sample = jax.random.split(jax.random.key(seed), 3)
    train_data, test_data = modular_addition(key_split)
    steps = checkpoint_steps(num_steps, num_log, num_linear)

    start = time.perf_counter()
    metrics = train(checkpoint_dir, key_init, train_data, test_data, steps)
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    curve = llc_trajectory(checkpoint_dir, loss_fn, train_data, key_sample, item="params",
                           progress=progress, **{**SAMPLER, **(sampler or {})})
    sample_time = time.perf_counter() - start

    first = lambda name, level: next((s for s in steps if metrics[s][name] >= level), -1)
    memorised, generalised = first("train_accuracy", 1.0), first("test_accuracy", 0.9)
    test_loss = np.array([metrics[s]["test_loss"] for s in curve.steps])
    stages = curve.stages()
    paths = curve.write(
        out, stages=stages, loss=test_loss, events=[s for s in (memorised, generalised) if s >= 0], seed=seed,
        title=f"modular addition mod {MODULUS}: test loss (top), λ̂ on the training set",
    )
    return {"curve": curve, "stages": stages, "metrics": metrics, "memorised": memorised,
            "generalised": generalised,
            "paths": paths, "train_time": train_time, "sample_time": sample_time}


def report(out: dict) -> str:
    """A table of λ̂ next to train and test metrics, and where memorisation and grokking happen."""
    curve, metrics = out["curve"], out["metrics"]
    lines = [f"{'step':>6} {'train loss':>10} {'test acc':>8} {'λ̂':>8} {'± se':>6}"]
    for row in curve.rows:
        m = metrics[row["step"]]
        flag = "  flagged" if row["flagged"] else ""
        lines.append(f"{row['step']:>6d} {m['train_loss']:>10.3g} {m['test_accuracy']:>8.2f} "
                     f"{row['llc_mean']:>8.1f} {row['llc_se']:>6.1f}{flag}")
    llc = curve.column("llc_mean")
    peak = int(curve.steps[np.nanargmax(llc)])
    lines += [
        f"memorised (train accuracy 1) at step {out['memorised']}; generalised (test accuracy "
        f"≥ 0.9) at step {out['generalised']}; λ̂ peaks at step {peak} ({np.nanmax(llc):.1f}) "
        f"and ends at {llc[-1]:.1f}; stage boundaries at steps "
        f"[{', '.join(f'{b:.0f}' for b in out['stages'].boundaries)}]",
        f"training {out['train_time']:.1f} s, sampling {out['sample_time']:.1f} s; "
        f"wrote {', '.join(str(p) for p in out['paths'].values())}",
    ]
    return "\n".join(lines)
