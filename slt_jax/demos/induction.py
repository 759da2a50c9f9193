"""The induction-head transition: λ̂, its stages and every head's refined λ̂ across it.

A 2-layer attention-only transformer (d_model 16, 2 heads per layer, no MLP or layer norm, 4.5k
parameters) learns a copy task: sequences of 24 random tokens (vocabulary 64) in which a segment of
6 tokens starting at a random position reappears at a random later position. The 5 tokens after
the second occurrence's first one can only be predicted by an induction circuit — a layer-0
previous-token head composed with a layer-1 head that copies what followed the current token's
earlier occurrence (Olsson et al. 2022) — and the loss is scored on those tokens (the mask of the
next-token loss). The held-out loss sits near log 64 for a few hundred steps, then drops abruptly
when the circuit forms (Hoogland et al., arXiv:2402.02364, saw the same transition in λ̂).

The run is saved with Orbax (parameters and Adam state as a composite checkpoint, read back with
``item="params"``) at log-spaced steps and densely around where the drop happens; λ̂ of the whole
model and the weight-refined λ̂ of each head (Wang et al., arXiv:2410.02984) run as chain groups of
one program per checkpoint (:func:`slt_jax.refined_llc_curves`); stages are detected on the λ̂
curve. The report names the step of the loss drop, the nearest stage boundary and the head whose
refined λ̂ changes most across the drop. Each head's susceptibility (Baker et al.,
arXiv:2504.18274: χ = −nβ·Cov_C(φ_C, L_q − L_n)) to a "repeated segment" probe set and to a
"no repeat" one (the same scored positions in fresh random tokens) is measured before the drop
and at the end: an induction head responds to the first and not the second.

Settings (measured in the prototype, 3 seeds): nβ = 60, γ = 300, ε = 1.5e-4 (ε/2 agreed within
1.5 standard errors at steps before, in and after the drop; 3e-4 did not), batch 16, 4 chains of 200
burn-in steps and 200 draws. The checkpoints from before the drop to well after the peak of λ̂ are
0.04 decades apart, so stages are detected with a kernel of 0.05 decades: the boundary that matters
is the peak of λ̂ just after the drop (a rise followed by a fall, with a short plateau between whose
midpoint is the boundary), and a wider kernel or sparse checkpoints after the peak move it later.
"""

import math
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from slt_jax.curves.stages import detect_stages
from slt_jax.models.adapters import from_nnx
from slt_jax.models.transformer import Transformer, TransformerConfig
from slt_jax.paths import local_path
from slt_jax.selectors import head
from slt_jax.serialization import dump_json, json_safe
from slt_jax.susceptibility import susceptibilities
from slt_jax.trajectory.checkpoints import CheckpointTrajectory, infer_template
from slt_jax.trajectory.refined import ComponentCurves, refined_llc_curves

VOCAB, LENGTH, SEGMENT = 64, 24, 6
MODEL = TransformerConfig(vocab_size=VOCAB, context_length=LENGTH, d_model=16, num_heads=2, num_layers=2,
                          attention_only=True, layer_norm=False, use_bias=False)
BATCH, LEARNING_RATE, NUM_STEPS = 64, 3e-3, 3000
NUM_SEQUENCES = 4096  # the fixed dataset λ̂ is measured on
SAMPLER = dict(step_size=1.5e-4, nbeta=60.0, localization=300.0, batch_size=16, num_chains=4, num_burnin=200,
               num_draws=200)
SMOOTHING = 0.05
HEADS = {f"L{layer}H{index}": head(layer, index) for layer in range(2) for index in range(2)}
PROBE_ROWS, OBSERVE_EVERY = 128, 4  # per probe set; its losses are evaluated at every 4th draw


def copy_task(key, num: int, length: int = LENGTH, vocab: int = VOCAB, segment: int = SEGMENT) -> dict:
    """Random-token sequences with one segment repeated at a random later offset.

    Returns ``{"tokens": (num, length) int32, "mask": (num, length)}``: the mask scores token t of
    the second occurrence for t after its first token (the ``segment − 1`` tokens only an
    induction circuit can predict).
    """
    key_tokens, key_a, key_b = jax.random.split(key, 3)
    tokens = jax.random.randint(key_tokens, (num, length), 0, vocab)
    a = jax.random.randint(key_a, (num, 1), 0, length - 2 * segment + 1)
    span = length - segment - (a + segment) + 1
    b = a + segment + jnp.floor(jax.random.uniform(key_b, (num, 1)) * span).astype(jnp.int32)
    position = jnp.arange(length)[None, :]
    copied = (position >= b) & (position < b + segment)
    tokens = jnp.take_along_axis(tokens, jnp.where(copied, a + position - b, position), axis=1)
    mask = ((position > b) & (position < b + segment)).astype(jnp.float32)
    return {"tokens": tokens.astype(jnp.int32), "mask": mask}


def checkpoint_steps(num_steps: int = NUM_STEPS, dense=(620, 2400), num_log: int = 13, num_dense: int = 15):
    """Log-spaced steps from 10 and geometric ones across ``dense`` (where the drop happens)."""
    log = [int(s) for s in np.round(np.logspace(1, math.log10(num_steps), num_log))
           if s < 0.9 * dense[0] or s > 1.1 * dense[1]]
    geometric = (np.round(np.geomspace(*dense, num_dense) / 10) * 10).astype(int).tolist()
    return sorted(set(log) | set(geometric))


def train(directory, key, steps, *, num_steps: int = NUM_STEPS):
    """Adam on fresh batches of the copy task; saves ``params`` and ``opt_state`` at ``steps``.

    Returns:
      ``(eval_steps, heldout_loss)``: the held-out induction loss at ~60 log-spaced steps and the
      checkpoint steps.
    """
    key_init, key_batches, key_heldout = jax.random.split(key, 3)
    loss_fn, params = from_nnx(Transformer(MODEL, rngs=nnx.Rngs(int(jax.random.randint(key_init, (), 0, 2**30)))),
                               loss="next_token")
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(params)
    heldout = copy_task(key_heldout, 1024)

    @jax.jit
    def advance(params, opt_state, start, stop):
        def body(t, carry):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, copy_task(jax.random.fold_in(key_batches, t), BATCH))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.lax.fori_loop(start, stop, body, (params, opt_state))

    evaluate = jax.jit(lambda p: loss_fn(p, heldout))
    eval_steps = sorted(set(np.unique(np.round(np.logspace(1, math.log10(num_steps), 60))).astype(int).tolist())
                        | set(steps))
    losses, done = [], 0
    with ocp.CheckpointManager(local_path(directory)) as manager:
        for step in eval_steps:
            params, opt_state = advance(params, opt_state, done, step)
            done = step
            losses.append(float(evaluate(params)))
            if step in steps:
                manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                           opt_state=ocp.args.StandardSave(opt_state)))
        manager.wait_until_finished()
    return np.array(eval_steps), np.array(losses), loss_fn


def loss_drop(steps, losses) -> dict:
    """Where the held-out loss crosses the midpoint of its plateau (median over steps 20–200) and
    its final level, interpolated in log10 step; with the 20 %→80 % width in decades."""
    steps, losses = np.asarray(steps, float), np.asarray(losses, float)
    plateau = float(np.median(losses[(steps >= 20) & (steps <= 200)]))
    final = float(losses[-1])

    def crossing(fraction):
        level = plateau - fraction * (plateau - final)
        below = np.flatnonzero((losses <= level) & (steps > 200))
        if not below.size:
            return float("nan")
        i = int(below[0])
        x0, x1 = math.log10(steps[i - 1] + 1), math.log10(steps[i] + 1)
        t = (losses[i - 1] - level) / (losses[i - 1] - losses[i])
        return 10 ** (x0 + t * (x1 - x0)) - 1

    return {"plateau": plateau, "final": final, "step": crossing(0.5),
            "width_decades": math.log10(crossing(0.8) + 1) - math.log10(crossing(0.2) + 1)}


def probe_sets(key, rows: int = PROBE_ROWS) -> dict:
    """The susceptibilities' data shifts: ``"repeated segment"`` (the copy task) and ``"no
    repeat"`` (the same scored positions in sequences of fresh random tokens, where nothing can
    be copied)."""
    key_repeat, key_random = jax.random.split(key)
    repeated = copy_task(key_repeat, rows)
    fresh = jax.random.randint(key_random, repeated["tokens"].shape, 0, VOCAB).astype(jnp.int32)
    return {"repeated segment": repeated, "no repeat": {"tokens": fresh, "mask": repeated["mask"]}}


def head_susceptibilities(checkpoint_dir, loss_fn, data, key, steps, sampler: dict, progress=True) -> dict:
    """Every head's susceptibility χ = −nβ·Cov_C(φ_C, L_q − L_n) to each probe set at each of
    ``steps`` (:func:`slt_jax.susceptibilities`, the heads as chain groups of one program).

    Returns ``{step: SusceptibilityResult}``.
    """
    key_probe, key_sample = jax.random.split(key)
    probes = probe_sets(key_probe)
    template = infer_template(checkpoint_dir, steps[0], "params", None)
    out = {}
    for step, params in CheckpointTrajectory(checkpoint_dir, template=template, item="params", steps=list(steps)):
        out[step] = susceptibilities(loss_fn, params, data, jax.random.fold_in(key_sample, step), shifts=probes,
                                     components=HEADS, observe_every=OBSERVE_EVERY, progress=progress, **sampler)
    return out


def _window_means(curve, drop, low=0.1, high=0.35):
    """λ̂ over the healthy checkpoints 0.1–0.35 decades before and after the drop (NaN if none)."""
    offset = np.log10(curve.steps + 1) - math.log10(drop + 1)
    values = curve.column("llc_mean")
    mean = lambda where: float(values[where & curve.healthy].mean()) if np.any(where & curve.healthy) else math.nan
    return mean((offset < -low) & (offset > -high)), mean((offset > low) & (offset < high))


def run(out_dir, *, seed: int = 0, num_steps: int = NUM_STEPS, sampler: dict | None = None,
        progress: bool = True) -> dict:
    """Train, checkpoint, estimate λ̂ and every head's refined λ̂ at each checkpoint, detect stages.

    Args:
      out_dir: output directory (its ``checkpoints`` and ``results`` are replaced).
      seed: root seed of the initialisation, the batches, the λ̂ data and the chains.
      num_steps: training steps.
      sampler: overrides of ``SAMPLER``.
      progress: show progress bars.

    Returns:
      A dict with the ``curves`` (whole model and heads), ``stages``, ``drop``, per-head
      ``changes``, the nearest boundary, file paths and wall times.
    """
    out = local_path(out_dir, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out / "checkpoints"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    key_train, key_data, key_sample = jax.random.split(jax.random.key(seed), 3)
    scale = num_steps / NUM_STEPS
    steps = checkpoint_steps(num_steps, dense=(round(620 * scale), round(2400 * scale)))
    start = time.perf_counter()
    eval_steps, heldout, loss_fn = train(checkpoint_dir, key_train, steps, num_steps=num_steps)
    train_time = time.perf_counter() - start
    drop = loss_drop(eval_steps, heldout)

    start = time.perf_counter()
    data = copy_task(key_data, NUM_SEQUENCES)
    curves = refined_llc_curves(checkpoint_dir, loss_fn, data, key_sample, components={"all": None, **HEADS},
                                item="params", progress=progress, **{**SAMPLER, **(sampler or {})})
    sample_time = time.perf_counter() - start
    whole = curves.curves["all"]
    keep = whole.healthy
    stages = detect_stages(whole.steps[keep], whole.column("llc_mean")[keep], whole.column("llc_se")[keep],
                           smoothing=SMOOTHING)
    dropped = math.isfinite(drop["step"])  # a run too short for the transition has no drop
    distances = np.log10(stages.boundaries + 1) - math.log10(drop["step"] + 1) if dropped else np.empty(0)
    nearest = int(np.argmin(np.abs(distances))) if distances.size else None
    changes = {name: _window_means(curve, drop["step"]) for name, curve in curves.curves.items()
               if name != "all" and dropped}
    ranked = sorted(changes, key=lambda name: -abs(changes[name][1] - changes[name][0])) or [None]

    # Per-head susceptibilities to the probe sets, ~0.2 decades before the drop and at the end.
    start = time.perf_counter()
    before = whole.steps[np.argmin(np.abs(np.log10(whole.steps + 1) - (math.log10(drop["step"] + 1) - 0.2)))] \
        if dropped else None
    chi_steps = sorted({int(whole.steps[-1])} | ({int(before)} if before is not None else set()))
    chi = head_susceptibilities(checkpoint_dir, loss_fn, data, jax.random.fold_in(key_sample, 1), chi_steps,
                                {**SAMPLER, **(sampler or {})}, progress=progress)
    chi_time = time.perf_counter() - start

    heldout_at = np.interp(whole.steps, eval_steps, heldout)
    paths = whole.write(out, stages=stages, loss=heldout_at, events=[drop["step"]],
                        title="2-layer attention-only transformer, copy task: λ̂ and its stages")
    head_curves = ComponentCurves(curves={k: v for k, v in curves.curves.items() if k != "all"},
                                  settings=curves.settings)
    paths.update({f"heads_{kind}": path for kind, path in head_curves.write(
        out / "heads", loss=heldout_at, events=[drop["step"]], title="refined λ̂ per attention head").items()})
    summary = {
        "seed": seed, "drop": drop, "boundaries": stages.boundaries.tolist(), "smoothing": SMOOTHING,
        "nearest_boundary": None if nearest is None else float(stages.boundaries[nearest]),
        "nearest_distance_decades": None if nearest is None else float(distances[nearest]),
        "changes": {name: {"before": b, "after": a} for name, (b, a) in changes.items()}, "most_changed": ranked[0],
        "susceptibilities": {str(step): {"components": list(r.components), "shifts": list(r.shifts),
                                          "chi": r.chi.tolist(), "se": r.se.tolist()} for step, r in chi.items()},
        "train_time": train_time, "sample_time": sample_time, "susceptibility_time": chi_time,
    }
    paths["report"] = out / "induction.json"
    dump_json(json_safe(summary), paths["report"])
    return {**summary, "curves": curves, "stages": stages, "eval_steps": eval_steps, "heldout": heldout,
            "paths": paths}


def report(out: dict) -> str:
    """The transition in words: the loss drop, the nearest stage boundary, the head that changed most."""
    drop = out["drop"]
    if not math.isfinite(drop["step"]):
        lines = [f"held-out induction loss: {drop['plateau']:.3f} on the plateau → {drop['final']:.3f}: no drop yet "
                 "(train longer)"]
    else:
        lines = [f"held-out induction loss: {drop['plateau']:.3f} on the plateau → {drop['final']:.3f}; the drop's "
                 f"midpoint at step {drop['step']:.0f} (20→80 % within {drop['width_decades']:.2f} decades)"]
    if out["nearest_boundary"] is None:
        lines.append("no stage boundary detected on the λ̂ curve")
    else:
        boundaries = ", ".join(f"{b:.0f}" for b in out["boundaries"])
        lines.append(f"stage boundaries of λ̂ at steps {boundaries}; the nearest "
                     f"to the drop at {out['nearest_boundary']:.0f} ({out['nearest_distance_decades']:+.2f} decades)")
    if out["changes"]:
        lines.append("refined λ̂ per head, 0.1–0.35 decades before → after the drop: " + ", ".join(
            f"{name} {c['before']:.2f} → {c['after']:.2f}" for name, c in out["changes"].items()))
        lines.append(f"the head whose refined λ̂ changes most across the drop: {out['most_changed']}")
    for step, chi in out["susceptibilities"].items():
        cells = [f"{name} " + " / ".join(f"{v:+.3g}±{e:.2g}" for v, e in zip(row, se))
                 for name, row, se in zip(chi["components"], chi["chi"], chi["se"])]
        lines.append(f"susceptibility χ per head at step {step} ({' / '.join(chi['shifts'])}): " + ", ".join(cells))
    lines.append(f"training {out['train_time']:.0f} s, sampling {out['sample_time']:.0f} s, susceptibilities "
                 f"{out['susceptibility_time']:.0f} s; wrote "
                 + ", ".join(str(p) for p in out["paths"].values()))
    return "\n".join(lines)
