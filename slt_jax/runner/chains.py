"""Run many sampler chains at once: per-chain keys, chains sharded over devices (shard_map)
and vmapped on each, chunked lax.scan.

Chain ``i`` draws every random number from ``fold_in(key, i)`` and step ``t`` of it from
``fold_in(chain_key, t)``, so its trace depends only on the root key, its index and the
settings — not on how many chains run beside it, nor on how the run is chunked.
"""

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from slt_jax.keys import chain_keys
from slt_jax.results import Sampled
from slt_jax.runner import sharding
from slt_jax.runner.divergence import Divergence
from slt_jax.data.batches import full_batch_loss
from slt_jax.posterior import LocalPosterior
from slt_jax.samplers.base import KernelFactory

PyTree = Any


class RunConfig(NamedTuple):
    """Static settings of a run: changing any of them compiles a new program.

    Attributes:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
      kernel: the sampler's :class:`~slt_jax.samplers.base.KernelFactory`.
      batch_size: rows per gradient minibatch.
      steps_per_draw: sampler steps between recorded draws.
      loss_estimator: what each draw records as its loss (see ``estimate_llc``).
      eval_batch_size: rows per measurement batch (eval minibatch, or full-batch chunk).
      mesh: the device mesh the chains (and data) are sharded over (see
        :mod:`slt_jax.runner.sharding`); ``None`` for the first device.
    """

    loss_fn: Callable
    kernel: KernelFactory
    batch_size: int
    steps_per_draw: int
    loss_estimator: str
    eval_batch_size: int
    mesh: Any = None


class ChainState(NamedTuple):
    """What each chain carries forward: the kernel's state and where it first diverged (−1)."""

    kernel_state: Any
    diverged_at: jax.Array


class Draws(NamedTuple):
    """Per-draw records, each with leading axes ``(chains, draws)``.

    Attributes:
      batch_loss: the loss at w_t on the measurement batch (or the full dataset).
      center_loss: the loss at w* on the same batch (control variate), else ``None``.
      distance: ‖w_t − w*‖², to see chains that drift away from w*.
      info: the kernel's per-step report at the draw.
    """

    batch_loss: jax.Array
    center_loss: Any
    distance: jax.Array
    info: Any


def _step(config, kernel, posterior, divergence, data, chain_key, state, t):
    """One sampler step of one chain at global step ``t``; also returns the loss and batch."""
    key_batch, key_step = jax.random.split(jax.random.fold_in(chain_key, t))
    batch, rows = sharding.minibatch(key_batch, data, config.batch_size, config.mesh)
    loss, grad = jax.value_and_grad(_global_loss(config))(state.kernel_state.position, batch)
    kernel_state, info = kernel.step(key_step, state.kernel_state, grad)
    runaway = posterior.nbeta * (loss - divergence.ref_loss) > divergence.threshold
    bad = ~jnp.isfinite(loss) | runaway
    diverged_at = jnp.where((state.diverged_at < 0) & bad, t, state.diverged_at)
    return ChainState(kernel_state, diverged_at), (loss, batch, rows, info)


def _global_loss(config):
    """The minibatch loss over all data shards (the mean of the shards' means)."""
    return lambda params, batch: sharding.global_mean(config.loss_fn(params, batch), config.mesh)


def _measure(config, posterior, key, position, batch, rows, batch_loss, eval_data, center_losses):
    """The draw's loss record: (loss at w_t, loss at w* on the same batch, or None).

    The control variate's L_B(w*) is the mean of the table ``center_losses`` (ℓ_i(w*) per row
    of the measurement data, :func:`slt_jax.problem.center_table`) over the batch's rows — a
    gather, where a second forward pass at w* made the default estimator 1.4–1.9× a plain SGD
    step on small models — or, without a table, that forward pass.
    """
    loss_fn = _global_loss(config)
    if config.loss_estimator == "full_batch":
        # Shards hold equal row counts, so the mean of their exact means is L_n.
        local = full_batch_loss(config.loss_fn, position, eval_data, config.eval_batch_size).mean
        return sharding.global_mean(local, config.mesh), None
    if eval_data is not None:
        batch, rows = sharding.minibatch(key, eval_data, config.eval_batch_size, config.mesh)
        batch_loss = loss_fn(position, batch)
    if config.loss_estimator != "control_variate":
        return batch_loss, None
    if center_losses is None:
        return batch_loss, loss_fn(posterior.center, batch)
    center = jnp.mean(jnp.take(center_losses, rows, mode="clip"))
    return batch_loss, sharding.global_mean(center, config.mesh).astype(batch_loss.dtype)


class ChainInputs(NamedTuple):
    """The traced inputs of a run: one compiled program serves any values of these.

    ``step_size``, ``posterior.nbeta``, ``posterior.localization`` and
    ``divergence.threshold`` hold one value per chain (shape ``(chains,)``), so chain groups
    at different step sizes or temperatures run in one program (calibration sweeps,
    temperature ladders); use :func:`per_chain` to broadcast scalars.
    """

    step_size: jax.Array
    posterior: LocalPosterior
    divergence: Divergence
    data: PyTree
    eval_data: PyTree
    center_losses: Any = None


class _Chain(NamedTuple):
    """Everything one chain's steps close over."""

    config: RunConfig
    step_size: jax.Array
    posterior: LocalPosterior
    divergence: Divergence
    data: PyTree
    eval_data: PyTree
    center_losses: Any = None

    def kernel(self):
        return self.config.kernel.build(self.step_size, self.posterior)

    def advance(self, chain_key, state, start, num_steps, num_burnin, total):
        """Steps ``start … start+num_steps−1`` of one chain, with a record per step.

        The record is real at draw steps — the last step of each ``steps_per_draw`` block
        after ``num_burnin`` — and zeros elsewhere; steps ≥ ``total`` only pad the last chunk.
        One scan body holds the step and the measurement once, which keeps compilation short.
        """
        config, posterior = self.config, self.posterior
        step = partial(_step, config, self.kernel(), posterior, self.divergence, self.data, chain_key)
        spd = config.steps_per_draw

        def body(state, t):
            is_draw = (t >= num_burnin) & ((t - num_burnin) % spd == spd - 1)

            def live(state):
                position = state.kernel_state.position
                state, (loss, batch, rows, info) = step(state, t)

                def measure(_):
                    key = jax.random.fold_in(jax.random.fold_in(chain_key, t), 1)
                    batch_loss, center_loss = _measure(config, posterior, key, position, batch, rows, loss,
                                                       self.eval_data, self.center_losses)
                    return Draws(batch_loss, center_loss, posterior.sq_distance(position), info)

                # Measured inside the step's branch: only the record leaves it, never the
                # minibatch (a batch carried out of a cond costs ~1.5× at batch 2048 on CPU).
                record = jax.lax.cond(is_draw, measure, lambda _: _zeros(jax.eval_shape(measure, None)), None)
                return state, record

            record_shapes = jax.eval_shape(live, state)[1]
            # Both predicates depend on t alone, shared by every chain: under vmap they stay
            # real branches, so padded steps and non-draw steps cost nothing.
            return jax.lax.cond(t < total, live, lambda s: (s, _zeros(record_shapes)), state)

        return jax.lax.scan(body, state, start + jnp.arange(num_steps, dtype=jnp.int32))


def _zeros(shapes):
    """Zeros like ``shapes``, varying over the same mesh axes (``cond`` branches must agree)."""

    def zeros(x):
        varying = tuple(sorted(x.manual_axis_type.varying)) if x.manual_axis_type else ()
        z = jnp.zeros(x.shape, x.dtype)
        return jax.lax.pcast(z, varying, to="varying") if varying else z

    return jax.tree.map(zeros, shapes)


_CHAIN_AXES = ChainInputs(
    step_size=0,
    posterior=LocalPosterior(center=None, nbeta=0, localization=0, mask=None),
    divergence=Divergence(ref_loss=None, threshold=0),
    data=None,
    eval_data=None,
    center_losses=None,
)


def _input_specs(mesh) -> ChainInputs:
    """How each input lies on the mesh: per-chain values split over chains, data over data."""
    c, d, r = sharding.chain_spec(mesh), sharding.data_spec(mesh), sharding.REPLICATED
    return ChainInputs(
        step_size=c,
        posterior=LocalPosterior(center=r, nbeta=c, localization=c, mask=r),
        divergence=Divergence(ref_loss=r, threshold=c),
        data=d,
        eval_data=d,
        center_losses=d,
    )


def per_chain(inputs: ChainInputs, num_chains: int, num_padded: int | None = None) -> ChainInputs:
    """Broadcast scalar step size, nβ, γ and divergence threshold to one value per chain.

    With ``num_padded``, the values are padded to that many chains by repeating the last one
    (padding chains fill the devices and are dropped).
    """
    extra = (num_padded or num_chains) - num_chains
    b = lambda x: jnp.pad(jnp.broadcast_to(jnp.asarray(x), (num_chains,)), (0, extra), mode="edge")
    p, d = inputs.posterior, inputs.divergence
    return inputs._replace(
        step_size=b(inputs.step_size),
        posterior=p._replace(nbeta=b(p.nbeta), localization=b(p.localization)),
        divergence=d._replace(threshold=b(d.threshold)),
    )


def setup(problem, kernel: KernelFactory, run, step_size, *, nbeta=None, localization=None,
          threshold=None) -> tuple[RunConfig, ChainInputs]:
    """The static config and traced inputs of a run on ``problem``.

    Args:
      problem: a :class:`slt_jax.problem.Problem`.
      kernel: the sampler's factory.
      run: :class:`slt_jax.settings.RunSettings`.
      step_size: ε, a scalar or one value per chain.
      nbeta, localization, threshold: per-chain overrides of the problem's nβ, γ and the
        divergence bound (scalars or one value per chain; default the problem's).

    Returns:
      ``(RunConfig, ChainInputs)`` for :func:`run_chains`.
    """
    dtype = problem.precision.dtype
    config = RunConfig(problem.loss_fn, kernel, problem.batch_size, run.steps_per_draw, run.loss_estimator,
                       problem.eval_batch_size, problem.mesh)
    if threshold is None:
        threshold = problem.divergence_threshold(run)
    inputs = ChainInputs(
        step_size=jnp.asarray(step_size, dtype),
        posterior=problem.posterior(nbeta, localization),
        divergence=Divergence(problem.reference.mean, jnp.asarray(threshold, dtype)),
        data=problem.data,
        eval_data=problem.measure_data(run.loss_estimator),
        center_losses=problem.center_losses if run.loss_estimator == "control_variate" else None,
    )
    return config, inputs


@partial(jax.jit, static_argnames=("config", "num_chains"))
def init_chains(config: RunConfig, inputs: ChainInputs, num_chains: int) -> ChainState:
    """Every chain starts at w* (the kernel's own initial state around it)."""
    init = lambda inp: _Chain(config, *inp).kernel().init(inp.posterior.center)
    kernel_state = jax.vmap(init, in_axes=(_CHAIN_AXES,))(inputs)
    return ChainState(kernel_state, jnp.full((num_chains,), -1, jnp.int32))


@partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnames=("state",))
def _advance(config, inputs, num_steps, chain_keys, state, start, num_burnin, total):
    """``num_steps`` steps of every chain: each device vmaps its own block of chains."""

    def local(inputs, chain_keys, state, start, num_burnin, total):
        run = lambda inp, k, s: _Chain(config, *inp).advance(k, s, start, num_steps, num_burnin, total)
        if chain_keys.shape[0] > 1:
            return jax.vmap(run, in_axes=(_CHAIN_AXES, 0, 0))(inputs, chain_keys, state)
        # One chain on this device: run it unbatched, since a vmap over one chain keeps
        # batched matmuls (a few per cent slower for a 1M-parameter MLP on CPU).
        first = lambda tree: jax.tree.map(lambda x: x[0], tree)
        inputs = jax.tree.map(lambda axis, sub: sub if axis is None else first(sub), _CHAIN_AXES, inputs,
                              is_leaf=lambda x: x is None)
        return jax.tree.map(lambda x: x[None], run(inputs, chain_keys[0], first(state)))

    chains, scalar = sharding.chain_spec(config.mesh), sharding.REPLICATED
    in_specs = (_input_specs(config.mesh), chains, chains, scalar, scalar, scalar)
    run = sharding.shard_chains(local, config.mesh, in_specs, chains)
    return run(inputs, chain_keys, state, start, num_burnin, total)


def plan_chunks(total: int, chunk_size: int | None = None):
    """``(count, size)``: ``total`` steps in chunks of ``size`` steps, the last one padded.

    Each chunk size is one compiled program, so the size does not follow the run's length: a
    given ``chunk_size`` is used as it is, for runs of any length, and the default — about a
    twentieth of the run, at least 128 steps — is rounded up to a power of two, so runs within
    a factor of two of each other (a calibration sweep and the estimate it schedules) share
    one. Padded steps skip the sampler step.
    """
    if total == 0:
        return 0, 0
    power = lambda x: 2 ** math.ceil(math.log2(max(1.0, x)))
    size = chunk_size or min(max(128, power(total / 20)), power(total))
    return math.ceil(total / size), size


def run_chains(key, config: RunConfig, inputs: ChainInputs, *, num_chains, num_burnin, num_draws, chunk_size=None,
               progress=True, state: ChainState | None = None, start: int = 0):
    """Run ``num_chains`` chains: ``num_burnin`` steps, then ``num_draws`` recorded draws.

    Args:
      key: root PRNG key; chain i uses ``fold_in(key, i)``.
      config: the run's static settings.
      inputs: the traced step size, posterior, divergence rule and data; scalars are
        broadcast to one value per chain.
      num_chains, num_burnin, num_draws: chain count, burn-in steps, recorded draws.
      chunk_size: sampler steps per compiled chunk (progress granularity); default about a
        twentieth of the run, at least 128 steps, rounded up to a power of two
        (:func:`plan_chunks`).
      progress: show a progress bar (tqdm; hidden when output is not a terminal).
      state, start: continue chains from ``state`` (the first value this function returned)
        at global step ``start`` — the steps it has run — instead of starting them at w*.
        Step t draws from ``fold_in(chain_key, t)`` whatever the split, so a run continued
        in pieces is the same run as one made whole.

    The chains are split over ``config.mesh``'s ``"chains"`` axis (padded to a multiple of
    it; padding chains run and are dropped) and the chain state buffers are donated from
    chunk to chunk.

    Returns:
      ``(final ChainState, Draws)`` with draws of shape ``(num_chains, num_draws, …)``.
    """
    spd = config.steps_per_draw
    total_steps = num_burnin + num_draws * spd
    if start < 0 or (start > 0) != (state is not None):
        raise ValueError(f"start={start} must be 0 with a fresh run and the steps already run with state")
    mesh = sharding.resolve_mesh(config.mesh)
    config = config._replace(mesh=mesh)
    padded = sharding.padded_num_chains(num_chains, mesh)
    on_chains = NamedSharding(mesh, sharding.chain_spec(mesh))
    keys = jax.device_put(chain_keys(key, padded), on_chains)
    specs = _input_specs(mesh)
    placement = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    inputs = jax.device_put(per_chain(inputs, num_chains, padded), placement)
    if state is None:
        state = init_chains(config, inputs, padded)
    elif padded > num_chains:
        pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], padded - num_chains, axis=0)])
        state = jax.tree.map(pad, state)
    state = jax.device_put(state, on_chains)
    count, size = plan_chunks(total_steps, chunk_size)
    draw_steps = num_burnin + spd - 1 + spd * np.arange(num_draws)  # counted from ``start``

    def fetch(i, record):
        # Keep only this chunk's draw steps of the real chains, on the host: device memory
        # stays one chunk.
        local = draw_steps[(draw_steps >= i * size) & (draw_steps < (i + 1) * size)] - i * size
        return jax.tree.map(lambda x: np.asarray(x)[:num_chains, local], record)

    records, pending = [], None
    with tqdm(total=total_steps, disable=None if progress else True, desc="sampling",
              unit="step", leave=False) as bar:
        for i in range(count + 1):
            if i < count:  # dispatch chunk i before fetching chunk i−1: the device never waits
                state, record = _advance(config, inputs, size, keys, state, jnp.int32(start + i * size),
                                         jnp.int32(start + num_burnin), jnp.int32(start + total_steps))
            if pending is not None:
                records.append(fetch(*pending))
                bar.update(min(size, total_steps - pending[0] * size))
            pending = (i, record) if i < count else None
    draws = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *records)
    if padded > num_chains:
        state = jax.tree.map(lambda x: x[:num_chains], state)
    return state, draws


def sample(problem, kernel: KernelFactory, run, key, *, step_size, progress=True) -> Sampled:
    """Run ``kernel`` at a fixed ``step_size`` on ``problem`` with the shape of ``run``.

    Returns:
      A :class:`~slt_jax.results.Sampled` for :func:`slt_jax.results.summarize`.
    """
    config, inputs = setup(problem, kernel, run, step_size)
    state, draws = run_chains(key, config, inputs, num_chains=run.num_chains, num_burnin=run.num_burnin,
                              num_draws=run.num_draws, chunk_size=run.chunk_size, progress=progress)
    return Sampled(draws, np.asarray(state.diverged_at), state.kernel_state.position, float(step_size), run)
