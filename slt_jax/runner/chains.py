"""Run many sampler chains at once: per-chain keys, chains sharded over devices (shard_map)
and vmapped on each, chunked lax.scan (one chain's program: :mod:`slt_jax.runner.chain`).

Chain ``i`` draws every random number from ``fold_in(key, i)`` and step ``t`` of it from
``fold_in(chain_key, t)``, so its trace depends only on the root key, its index and the
settings — not on how many chains run beside it, on how many devices or processes they are
split over, nor on how the run is chunked.

The same driver runs on one device, on a mesh of one process, and on a mesh spanning processes
(:mod:`slt_jax.distributed`): inputs are placed with :func:`slt_jax.runner.sharding.put`, each
chain's state follows w*'s layout over the ``"model"`` axis
(:func:`slt_jax.runner.sharding.state_shardings`), and each chunk's draws come back to every
process with :func:`slt_jax.runner.sharding.to_host`. Streamed data
(:mod:`slt_jax.data.streaming`) are fed chunk by chunk by :class:`slt_jax.runner.feed.Feeder`.

Its length: the driver — keys, placement, the chunked scan and the host fetches — is one loop.
"""

import math
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from slt_jax import distributed, validation
from slt_jax.data.streaming import is_streamed
from slt_jax.estimators import diagnostics
from slt_jax.keys import chain_key
from slt_jax.results import Sampled
from slt_jax.runner import feed, sharding
from slt_jax.runner.chain import CHAIN_AXES, Chain, ChainInputs, ChainState, RunConfig, input_specs, per_chain
from slt_jax.runner.divergence import Divergence
from slt_jax.runner.observation import Observation, Observed, zero_moments
from slt_jax.samplers.base import KernelFactory


def setup(problem, kernel: KernelFactory, run, step_size, *, nbeta=None, localization=None, threshold=None,
          masks=None, mask_index=None, observation: Observation | None = None,
          observed_inputs=None) -> tuple[RunConfig, ChainInputs]:
    """The static config and traced inputs of a run on ``problem``.

    Args:
      problem: a :class:`slt_jax.problem.Problem`.
      kernel: the sampler's factory.
      run: :class:`slt_jax.settings.RunSettings`.
      step_size: ε, a scalar or one value per chain.
      nbeta, localization, threshold: per-chain overrides of the problem's nβ, γ and the
        divergence bound (scalars or one value per chain; default the problem's).
      masks, mask_index: per-chain weight restrictions: K 0/1 mask pytrees stacked on a leading
        axis, and which one each chain samples (one index per chain); default the problem's mask.
      observation, observed_inputs: what each draw observes (:class:`Observation`) and its
        inputs (e.g. probe rows); the values at w* are computed here, once.

    Returns:
      ``(RunConfig, ChainInputs)`` for :func:`run_chains`.
    """
    dtype = problem.precision.dtype
    config = RunConfig(problem.loss_fn, kernel, problem.batch_size, run.steps_per_draw, run.loss_estimator,
                       problem.eval_batch_size, problem.mesh, observation, problem.param_specs)
    if threshold is None:
        threshold = problem.divergence_threshold(run)
    posterior = problem.posterior(nbeta, localization)
    if (masks is None) != (mask_index is None):
        raise ValueError("masks and mask_index go together: K stacked masks and one index per chain")
    if masks is not None:
        posterior = posterior._replace(mask=jax.tree.map(lambda m: jnp.asarray(m, dtype), masks))
        mask_index = jnp.asarray(mask_index, jnp.int32)
    observed = None
    if observation is not None:
        at_center = _jitted(observation)(problem.params, observed_inputs, jax.random.key(0))
        observed = Observed(observed_inputs, {name: jnp.ravel(v) for name, v in at_center.items()})
    inputs = ChainInputs(
        step_size=jnp.asarray(step_size, dtype),
        posterior=posterior,
        divergence=Divergence(problem.reference.mean, jnp.asarray(threshold, dtype)),
        data=problem.data,
        eval_data=problem.measure_data(run.loss_estimator),
        mask_index=mask_index,
        observed=observed,
        center_losses=problem.center_losses if run.loss_estimator == "control_variate" else None,
    )
    return config, inputs


@lru_cache(maxsize=16)
def _jitted(observation: Observation):
    """One compiled program per observation (equal observations hash alike): a trajectory's
    checkpoints evaluate the observables at w* without tracing them again."""
    return jax.jit(observation)


@partial(jax.jit, static_argnames=("config", "num_chains"))
def init_chains(config: RunConfig, inputs: ChainInputs, num_chains: int) -> ChainState:
    """Every chain starts at w* (the kernel's own initial state around it), with empty moments;
    laid out over the mesh as :func:`slt_jax.runner.sharding.state_shardings` says."""
    init = lambda inp: Chain(config, inp).kernel().init(inp.posterior.center)
    kernel_state = jax.vmap(init, in_axes=(CHAIN_AXES,))(inputs)
    moments = None
    if config.observe is not None:
        shapes = config.observe.shapes(inputs.posterior.center, inputs.observed.inputs)
        dtype = jax.tree.leaves(inputs.posterior.center)[0].dtype
        one = zero_moments(config.observe, shapes, dtype)
        moments = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains, *x.shape)), one)
    state = ChainState(kernel_state, jnp.full((num_chains,), -1, jnp.int32), moments)
    if config.mesh is None:
        return state
    return jax.lax.with_sharding_constraint(state, sharding.state_shardings(config.mesh, state, config.param_specs))


@partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnames=("state",))
def _advance(config, inputs, num_steps, key, chain_index, state, start, num_burnin, total, fed=None):
    """``num_steps`` steps of every chain: each device vmaps its own block of chains (reading
    its minibatches from ``fed`` when the data are streamed). Chain i's key ``fold_in(key, i)`` is
    formed here, from the replicated root key and the chains' global indices: a separate program
    for the keys cost a compilation (~0.1–0.2 s) on every first call."""

    def local(inputs, key, chain_index, state, start, num_burnin, total, fed):
        run = lambda inp, i, s, f: Chain(config, inp).advance(chain_key(key, i), s, start, num_steps, num_burnin,
                                                              total, f)
        if chain_index.shape[0] > 1:
            return jax.vmap(run, in_axes=(CHAIN_AXES, 0, 0, 0))(inputs, chain_index, state, fed)
        # One chain on this device: run it unbatched, since a vmap over one chain keeps
        # batched matmuls (a few per cent slower for a 1M-parameter MLP on CPU).
        first = lambda tree: jax.tree.map(lambda x: x[0], tree)
        inputs = jax.tree.map(lambda axis, sub: sub if axis is None else first(sub), CHAIN_AXES, inputs,
                              is_leaf=lambda x: x is None)
        return jax.tree.map(lambda x: x[None], run(inputs, chain_index[0], first(state), first(fed)))

    chains, scalar = sharding.chain_spec(config.mesh), sharding.REPLICATED
    in_specs = (input_specs(config.mesh), scalar, chains, chains, scalar, scalar, scalar, feed.fed_spec(config.mesh))
    run = sharding.shard_chains(local, config.mesh, in_specs, chains)
    state, record = run(inputs, key, chain_index, state, start, num_burnin, total, fed)
    # The carry keeps the layout it came in with, so its buffers are donated to the next chunk.
    return jax.lax.with_sharding_constraint(state, sharding.state_shardings(config.mesh, state, config.param_specs)), \
        record


DEFAULT_CHUNK_SIZE = 512
"""Sampler steps per compiled chunk unless told otherwise (:func:`plan_chunks`)."""


def plan_chunks(total: int, chunk_size: int | None = None):
    """``(count, size)``: ``total`` steps in chunks of ``size`` steps, the last one padded.

    Each chunk size is one compiled program, so the size does not follow the run's length: a
    given ``chunk_size`` is used as it is, for runs of any length, and the default is
    :data:`DEFAULT_CHUNK_SIZE` — or the run's own power of two where that is smaller — so every
    run of 512 steps or more with the same chains shares one program: a calibration sweep's
    extension, the estimate it schedules, the next checkpoint's estimate at another length
    (a length-dependent size recompiled there: ``step_size="auto"`` on
    ``benchmarks/samplers.py`` paid 0.8 s of a 2.3 s run for it). Padded steps skip the sampler
    step; on a small DLN 256- to 2048-step chunks ran equally fast.
    """
    if total == 0:
        return 0, 0
    power = 2 ** math.ceil(math.log2(max(1.0, total)))
    return math.ceil(total / (size := chunk_size or min(DEFAULT_CHUNK_SIZE, power))), size


def run_chains(key, config: RunConfig, inputs: ChainInputs, *, num_chains, num_burnin, num_draws, chunk_size=None,
               progress=True, state: ChainState | None = None, start: int = 0, sink=None):
    """Run ``num_chains`` chains: ``num_burnin`` steps, then ``num_draws`` recorded draws.

    Args:
      key: root PRNG key; chain i uses ``fold_in(key, i)``.
      config: the run's static settings.
      inputs: the traced step size, posterior, divergence rule and data; scalars are
        broadcast to one value per chain.
      num_chains, num_burnin, num_draws: chain count, burn-in steps, recorded draws.
      chunk_size: sampler steps per compiled chunk (progress granularity); default 512, or the
        run's own power of two where that is smaller (:func:`plan_chunks`).
      progress: show a progress bar (tqdm; hidden when output is not a terminal).
      state, start: continue chains from ``state`` (the first value this function returned)
        at global step ``start`` — the steps it has run — instead of starting them at w*.
        Step t draws from ``fold_in(chain_key, t)`` whatever the split, so a run continued
        in pieces is the same run as one made whole.
      sink: called on the host with each chunk's :class:`~slt_jax.runner.chain.Draws` (real
        chains, draw steps only), in order; what it returns is kept instead — e.g. the draws
        without their observed values once written to disk
        (:class:`~slt_jax.runner.observation.TraceWriter`), so traces never pile up in memory.

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
    specs = config.param_specs or sharding.param_specs(inputs.posterior.center, mesh)
    config = config._replace(mesh=mesh, param_specs=specs)
    streamed = inputs.data if is_streamed(inputs.data) else None
    inputs = inputs._replace(data=None) if streamed is not None else inputs
    padded = sharding.padded_num_chains(num_chains, mesh)
    distributed.check_consistent("run_chains", lambda: {
        "key": validation.key_data(key), "chains": [num_chains, padded], "steps": [num_burnin, num_draws, spd, start],
        "chunk_size": chunk_size, "config": _config_record(config), "inputs": _inputs_record(inputs)})
    on_chains = NamedSharding(mesh, sharding.chain_spec(mesh))
    key = sharding.put(key, NamedSharding(mesh, sharding.REPLICATED))
    chain_index = sharding.put(np.arange(padded, dtype=np.int32), on_chains)
    inputs = sharding.put(per_chain(inputs, num_chains, padded), _input_shardings(mesh, specs, inputs))
    if state is None:
        state = init_chains(config, inputs, padded)
    elif padded > num_chains:
        pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], padded - num_chains, axis=0)])
        state = jax.tree.map(pad, state)
    state = sharding.put(state, sharding.state_shardings(mesh, state, specs))
    count, size = plan_chunks(total_steps, chunk_size)
    feeder = None
    if streamed is not None:
        feeder = feed.Feeder(streamed, key, chain_index, config.batch_size, mesh)
        if chunk_size is None and total_steps:
            size = feeder.steps_per_chunk(size)
            count = math.ceil(total_steps / size)
    draw_steps = num_burnin + spd - 1 + spd * np.arange(num_draws)  # counted from ``start``

    def fetch(i, record):
        # Keep only this chunk's draw steps of the real chains, on the host: device memory
        # stays one chunk.
        local = draw_steps[(draw_steps >= i * size) & (draw_steps < (i + 1) * size)] - i * size
        return jax.tree.map(lambda x: x[:num_chains, local], sharding.to_host(record))

    records, pending = [], None
    try:
        fed_next = feeder.start(start, size) if feeder is not None and count else None
        with tqdm(total=total_steps, disable=None if progress else True, desc="sampling",
                  unit="step", leave=False) as bar:
            for i in range(count + 1):
                if i < count:  # dispatch chunk i before fetching chunk i−1: the device never waits
                    fed = None if fed_next is None else fed_next()
                    if feeder is not None and i + 1 < count:  # its indices go before chunk i's program
                        fed_next = feeder.start(start + (i + 1) * size, size)
                    state, record = _advance(config, inputs, size, key, chain_index, state, np.int32(start + i * size),
                                             np.int32(start + num_burnin), np.int32(start + total_steps), fed)
                    if i == 0:  # while chunk 0 runs: the ESS after the run needs numpyro
                        diagnostics.preload()
                if pending is not None:
                    fetched = fetch(*pending)
                    records.append(fetched if sink is None else sink(fetched))
                    bar.update(min(size, total_steps - pending[0] * size))
                pending = (i, record) if i < count else None
    finally:
        if feeder is not None:
            feeder.close()
    draws = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *records)
    if padded > num_chains:
        state = jax.tree.map(lambda x: x[:num_chains], state)
    return state, draws


def _input_shardings(mesh, specs: sharding.ParamSpecs, inputs: ChainInputs) -> ChainInputs:
    """Where each input lies: :func:`input_specs` over the manual axes, w* and the masks also
    over ``"model"`` as ``specs`` says (stacked masks behind their leading axis)."""
    placement = jax.tree.map(lambda spec: NamedSharding(mesh, spec), input_specs(mesh),
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    center = specs.treedef.unflatten([NamedSharding(mesh, spec) for spec in specs.specs])
    mask = inputs.posterior.mask
    if mask is not None:
        stacked = inputs.mask_index is not None
        mask = specs.treedef.unflatten([NamedSharding(mesh, PartitionSpec(None, *spec) if stacked else spec)
                                        for spec in specs.specs])
    return placement._replace(posterior=placement.posterior._replace(center=center, mask=mask))


def _config_record(config: RunConfig) -> dict:
    """What of a run's static config every process must share (for the consistency check)."""
    return {"kernel": config.kernel.name, "batch_size": config.batch_size, "steps_per_draw": config.steps_per_draw,
            "loss_estimator": config.loss_estimator, "eval_batch_size": config.eval_batch_size,
            "mesh": dict(config.mesh.shape), "observe": config.observe is not None,
            "param_specs": [str(spec) for spec in config.param_specs.specs]}


def _inputs_record(inputs: ChainInputs) -> dict:
    """Shapes and a hash of every input (the data by shape and a sample of rows)."""
    record = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(inputs._replace(data=None, eval_data=None)):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            record[jax.tree_util.keystr(path)] = [list(leaf.shape), str(leaf.dtype)]
        else:
            record[jax.tree_util.keystr(path)] = distributed.fingerprint(np.asarray(leaf).tolist()) \
                if np.size(leaf) <= 4096 else [list(np.shape(leaf)), str(leaf.dtype)]
    record["data"] = distributed.data_fingerprint(inputs.data) if inputs.data is not None else None
    record["eval_data"] = distributed.data_fingerprint(inputs.eval_data) if inputs.eval_data is not None else None
    return record


def sample(problem, kernel: KernelFactory, run, key, *, step_size, progress=True) -> Sampled:
    """Run ``kernel`` at a fixed ``step_size`` on ``problem`` with the shape of ``run``.

    Returns:
      A :class:`~slt_jax.results.Sampled` for :func:`slt_jax.results.summarize`.
    """
    config, inputs = setup(problem, kernel, run, step_size)
    state, draws = run_chains(key, config, inputs, num_chains=run.num_chains, num_burnin=run.num_burnin,
                              num_draws=run.num_draws, chunk_size=run.chunk_size, progress=progress)
    return sampled_of(state, draws, step_size, run)


def sampled_of(state: ChainState, draws, step_size, run) -> Sampled:
    """The :class:`~slt_jax.results.Sampled` record of a finished run (moments on the host)."""
    moments = None if state.moments is None else sharding.to_host(state.moments)
    return Sampled(draws, sharding.to_host(state.diverged_at), state.kernel_state.position, float(step_size), run,
                   moments=moments)
