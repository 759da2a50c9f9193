"""The main example: λ̂ over the training of a deep linear network that learns in stages.

A deep linear network with widths (5, 2, 2, 5) learns, from a small initialisation, a rank-2
teacher whose singular values (18, 3) are well apart: it picks up one mode at a time, so the
loss has two plateaus and two drops (saddle-to-saddle dynamics). The run is saved with Orbax,
λ̂ is estimated at every checkpoint (log- and linearly spaced steps), stages are detected on
the λ̂ curve (arXiv:2402.02364), and the last λ̂ is compared with Aoyagi's λ for the teacher's
rank. Every layer has width ≥ 2 = rank and the inner ones exactly 2, so the trained point is a
smooth point of the fibre {W₃W₂W₁ = B}, where the local λ equals Aoyagi's λ = 8
(docs/mathematics.md §5.3); the teacher data are noise-free, so the teacher is an exact minimum.

Training is full-batch gradient descent on the same n samples the LLC is measured on,
computed from their second moments (the loss of a linear model is a quadratic form in
them), which makes 100,000 steps take a few seconds.

The same chains also measure a susceptibility (arXiv:2504.18274; docs/mathematics.md §8.2):
χ = d/dh E_h[L_n] = −nβ·Cov(L_n, L_q − L_n) for data moved toward the teacher's second mode
(inputs along its second input direction, teacher outputs) — how the posterior's loss responds
to more weight on the pattern the network learns last. It is drawn as a third panel under λ̂.
"""

import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from slt_jax.groundtruth import dln_learning_coefficient
from slt_jax.models.dln import dln_data, dln_loss
from slt_jax.trajectory.observable_trajectory import observable_trajectory

WIDTHS = (5, 2, 2, 5)
SINGULAR_VALUES = (18.0, 3.0)
INIT_SCALE = 0.01
LEARNING_RATE = 0.01
NUM_STEPS = 100_000
NUM_SAMPLES = 10_000
# ε·nβ·(largest Hessian eigenvalue ≈ 3·18^{4/3}) ≈ 0.08; the weakest learned direction relaxes in
# ≈ 2/(ε·nβ·3^{4/3}) ≈ 850 steps, hence the long burn-in (chains start at w*, where those
# directions hold no energy yet). nβ = n/log n ≈ 1086. The plateaus are saddles: at the trajectory
# default γ = nβ/10 some chains slide off them, γ = 300 holds them, and the weakest direction at
# the end (nβ·h ≈ 4700 ≫ γ) loses a few per cent of its share of λ̂.
SAMPLER = dict(step_size=5e-7, localization=300.0, num_chains=8, num_burnin=2000,
               num_draws=1500, batch_size=100)
SHIFT = "teacher mode 2"
SHIFT_ROWS = 64
# Successive draws 5 steps apart are nearly identical at this step size (the weakest direction
# relaxes in ≈ 850 steps): χ is measured on every 5th draw, at a fifth of its cost.
OBSERVE_EVERY = 5
CHI_COLUMN = f"chi/model/{SHIFT}"


def teacher(key, widths=WIDTHS, singular_values=SINGULAR_VALUES):
    """Balanced, aligned layers whose product has the given singular values.

    ``W_s = Q_s·diag(σ^{1/L})·Q_{s−1}ᵀ`` with random orthonormal frames ``Q_s`` of shape
    ``(H_s, r)``, so ``W_L⋯W_1 = Q_L·diag(σ)·Q_0ᵀ``.

    Args:
      key: PRNG key.
      widths: ``(H_0, …, H_L)``, each at least ``len(singular_values)``.
      singular_values: σ, the teacher's singular values.

    Returns:
      ``[W_1, …, W_L]`` as float32 arrays.
    """
    rank, depth = len(singular_values), len(widths) - 1
    if any(h < rank for h in widths):
        raise ValueError(f"widths {widths} must all be at least the rank {rank}")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    frames = [np.linalg.qr(rng.standard_normal((h, rank)))[0] for h in widths]
    scale = np.asarray(singular_values, np.float64) ** (1.0 / depth)
    return [jnp.asarray((q_out * scale) @ q_in.T, jnp.float32)
            for q_in, q_out in zip(frames, frames[1:])]


def mode_data(key, layers, mode: int, num_rows: int = SHIFT_ROWS, scale: float = 1.0):
    """Rows along one mode of the teacher: inputs ``z·v`` (v its ``mode``-th input singular
    direction, z ~ N(0, scale²)) with the teacher's noise-free outputs.

    Args:
      key: PRNG key.
      layers: the teacher ``[W_1, …, W_L]``.
      mode: which singular direction (0 = the strongest).
      num_rows: rows of the dataset.
      scale: standard deviation of z.

    Returns:
      ``{"x": (rows, H_0), "y": (rows, H_L)}`` float32.
    """
    product = np.asarray(layers[0], np.float64)
    for w in layers[1:]:
        product = np.asarray(w, np.float64) @ product
    direction = np.linalg.svd(product)[2][mode]
    z = scale * np.asarray(jax.random.normal(key, (num_rows, 1)), np.float64)
    x = z * direction
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(x @ product.T, jnp.float32)}


def checkpoint_steps(num_steps: int, num_log: int, num_linear: int) -> list[int]:
    """Step 0, ``num_log`` log-spaced steps from 10, and ``num_linear`` linearly spaced ones."""
    log_spaced = np.geomspace(10, num_steps, num_log)
    linear = np.linspace(0, num_steps, num_linear + 1)
    return sorted({0, *np.round(log_spaced).astype(int).tolist(), *np.round(linear).astype(int).tolist()})


def _least_squares(data):
    """Input second moments, the least-squares product B̂ and its residual loss (float64 on the host).

    The loss of a linear model is ``½·tr((P − B̂)·Σ_xx·(P − B̂)ᵀ)`` plus the residual at B̂ (zero for
    noise-free teacher data): computed this way, float32 keeps its precision down to the minimum.
    """
    x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"], np.float64)
    xx = x.T @ x / x.shape[0]
    best = np.linalg.solve(xx, x.T @ y / x.shape[0]).T  # B̂ = Σ_yx·Σ_xx⁻¹
    residual = 0.5 * np.mean(np.sum(np.square(y - x @ best.T), axis=1))
    return jnp.asarray(xx, jnp.float32), jnp.asarray(best, jnp.float32), jnp.float32(residual)


def _excess_loss(params, least_squares):
    """½·mean‖y − W_L⋯W_1 x‖² on the training data (dln_loss without its constant)."""
    xx, best, residual = least_squares
    product = params[0]
    for w in params[1:]:
        product = w @ product
    delta = product - best
    return 0.5 * jnp.trace(delta @ xx @ delta.T) + residual


@jax.jit
def _train(params, losses, least_squares, start, stop):
    """Full-batch gradient descent from step ``start`` to ``stop``, recording each step's loss."""

    def body(t, carry):
        params, losses = carry
        loss, grad = jax.value_and_grad(_excess_loss)(params, least_squares)
        params = jax.tree.map(lambda w, g: w - LEARNING_RATE * g, params, grad)
        return params, losses.at[t].set(loss)

    return jax.lax.fori_loop(start, stop, body, (params, losses))


def train(directory, key, data, steps):
    """Train from a small initialisation and save the parameters at ``steps`` with Orbax.

    Args:
      directory: a new checkpoint directory.
      key: PRNG key of the initialisation.
      data: ``{"x", "y"}`` training data.
      steps: checkpoint steps, sorted; the run lasts ``steps[-1]`` steps.

    Returns:
      The excess training loss ``½·mean‖y − f(x)‖²`` at every step, shape ``(steps[-1] + 1,)``.
    """
    least_squares = _least_squares(data)
    keys = jax.random.split(key, len(WIDTHS) - 1)
    params = [INIT_SCALE * jax.random.normal(k, (h_out, h_in)) / math.sqrt(h_in)
              for k, h_in, h_out in zip(keys, WIDTHS, WIDTHS[1:])]
    losses = jnp.zeros(steps[-1] + 1)
    done = 0
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        for step in steps:
            params, losses = _train(params, losses, least_squares, done, step)
            done = step
            manager.save(step, args=ocp.args.StandardSave(params))
        manager.wait_until_finished()
    _, losses = _train(params, losses, least_squares, done, done + 1)
    return np.asarray(losses)


def loss_drops(losses, levels):
    """The first step at which the loss falls below each midpoint between plateau levels.

    Args:
      losses: training loss per step.
      levels: the plateau levels, decreasing (loss before any mode, after one, …).

    Returns:
      One step per drop.
    """
    levels = np.asarray(levels, np.float64)
    drops = []
    for upper, lower in zip(levels, levels[1:]):
        below = np.flatnonzero(losses < 0.5 * (upper + lower))
        drops.append(int(below[0]) if below.size else -1)
    return drops


def run(out_dir, *, seed: int = 0, num_steps: int = NUM_STEPS, num_log: int = 30,
        num_linear: int = 4, n: int = NUM_SAMPLES, sampler: dict | None = None,
        smoothing: float = 0.15, progress: bool = True) -> dict:
    """Train, checkpoint, estimate λ̂ at every checkpoint, detect stages, write CSV and plots.

    Args:
      out_dir: output directory (its ``checkpoints`` subdirectory is replaced).
      seed: root seed (teacher, data, initialisation and sampler keys derive from it).
      num_steps: training steps.
      num_log: log-spaced checkpoints; ``num_linear``: linearly spaced ones.
      n: number of teacher samples.
      sampler: overrides of ``SAMPLER``.
      smoothing: stage-detection kernel width in decades.
      progress: show progress bars.

    Returns:
      A dict with the ``curve`` (with the susceptibility column ``CHI_COLUMN``), ``stages``,
      ``drops`` (training steps of the loss drops), ``lambda`` (Aoyagi's λ), ``losses`` (per
      training step), file paths and wall times.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out / "checkpoints"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    key_teacher, key_data, key_init, key_sample = jax.random.split(jax.random.key(seed), 4)
    layers = teacher(key_teacher)
    data = dln_data(key_data, layers, n)
    shift = mode_data(jax.random.fold_in(key_data, 1), layers, mode=1)
    steps = checkpoint_steps(num_steps, num_log, num_linear)

    start = time.perf_counter()
    losses = train(checkpoint_dir, key_init, data, steps)
    train_time = time.perf_counter() - start
    residuals = np.cumsum(np.square(SINGULAR_VALUES)[::-1])[::-1]  # Σ_{i ≥ k} σ_i²
    drops = loss_drops(losses, [*(0.5 * residuals), 0.0])

    start = time.perf_counter()
    # One run per checkpoint gives λ̂ and the susceptibility: the observables ride on the chains.
    curve = observable_trajectory(checkpoint_dir, dln_loss, data, key_sample, shifts={SHIFT: shift},
                                  observe_every=OBSERVE_EVERY, progress=progress, **{**SAMPLER, **(sampler or {})})
    sample_time = time.perf_counter() - start
    stages = curve.stages(smoothing=smoothing)
    lam, multiplicity = dln_learning_coefficient(WIDTHS, len(SINGULAR_VALUES))

    title = f"DLN {WIDTHS}, teacher σ = {SINGULAR_VALUES}: Aoyagi λ = {float(lam):g}"
    paths = curve.write(out, stages=stages, loss=losses[curve.steps], events=drops, seed=seed,
                        title=title)
    if "plot" in paths:  # the same figure with the susceptibility panel under λ̂
        curve.plot_panels([(CHI_COLUMN, "χ toward\nteacher mode 2")], paths["plot"], stages=stages,
                          loss=losses[curve.steps], events=drops, title=title)
    return {"curve": curve, "stages": stages, "drops": drops, "lambda": float(lam),
            "multiplicity": multiplicity, "losses": losses, "paths": paths,
            "train_time": train_time, "sample_time": sample_time}


def report(out: dict) -> str:
    """A table of the curve, the stages and the final λ̂ next to Aoyagi's λ."""
    curve, stages = out["curve"], out["stages"]
    losses = out["losses"]
    lines = [f"{'step':>7} {'train loss':>11} {'λ̂':>8} {'± se':>6} {'χ (mode 2)':>11} {'± se':>7}  stage"]
    for row in curve.rows:
        stage = "flagged" if row["flagged"] else str(stages.stage_of(row["step"]))
        lines.append(f"{row['step']:>7d} {losses[row['step']]:>11.4g} {row['llc_mean']:>8.3f} "
                     f"{row['llc_se']:>6.3f} {row[CHI_COLUMN]:>11.4g} {row[CHI_COLUMN + '_se']:>7.2g}  {stage}")
    final = curve.rows[-1]
    rel = final["llc_mean"] / out["lambda"] - 1
    boundaries = ", ".join(f"{b:.0f}" for b in stages.boundaries)
    lines += [
        f"loss drops at steps {out['drops']}; stage boundaries at steps [{boundaries}]",
        f"final λ̂ = {final['llc_mean']:.3f} ± {final['llc_se']:.3f} (nβ = {final['nbeta']:.1f}, "
        f"γ = {final['localization']:.1f}); Aoyagi's λ = {out['lambda']:g} "
        f"(multiplicity {out['multiplicity']}): relative error {rel:+.1%}",
        f"training {out['train_time']:.1f} s, sampling {out['sample_time']:.1f} s; "
        f"wrote {', '.join(str(p) for p in out['paths'].values())}",
    ]
    return "\n".join(lines)
