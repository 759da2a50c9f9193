"""One chain's compiled program: a step, its measurement, and a chunk of steps as a scan.

Everything here runs inside the driver's ``shard_map`` + ``vmap`` (:mod:`slt_jax.runner.chains`)
on one chain's slice of the inputs. Step ``t`` of chain ``i`` draws from
``fold_in(fold_in(key, i), t)`` (:mod:`slt_jax.keys`): a chain's trace does not depend on the
chains beside it, on the devices or on the chunking.
"""

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import keys
from slt_jax.data.batches import full_batch_loss
from slt_jax.posterior import LocalPosterior
from slt_jax.runner import sharding
from slt_jax.runner.divergence import Divergence
from slt_jax.runner.observation import Observation, Observed, observe_draw
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
      observe: what each draw observes beside the loss (:class:`Observation`), or ``None``.
      param_specs: how w* and each chain's parameter-shaped state lie over the mesh's
        ``"model"`` axis (:class:`slt_jax.runner.sharding.ParamSpecs`); ``None`` for the
        default layout of :func:`slt_jax.runner.sharding.param_specs`.
    """

    loss_fn: Callable
    kernel: KernelFactory
    batch_size: int
    steps_per_draw: int
    loss_estimator: str
    eval_batch_size: int
    mesh: Any = None
    observe: Observation | None = None
    param_specs: Any = None


class ChainState(NamedTuple):
    """What each chain carries forward: the kernel's state, where it first diverged (−1), and
    the running moments of its observables (:class:`slt_jax.runner.observation.Moments`, or
    ``None`` without an observation)."""

    kernel_state: Any
    diverged_at: jax.Array
    moments: Any = None


class Draws(NamedTuple):
    """Per-draw records, each with leading axes ``(chains, draws)``.

    Attributes:
      batch_loss: the loss at w_t on the measurement batch (or the full dataset).
      center_loss: the loss at w* on the same batch (control variate), else ``None``.
      distance: ‖w_t − w*‖², to see chains that drift away from w*.
      info: the kernel's per-step report at the draw.
      observed: the observables at the draw (relative to w*) when the observation records
        them, else ``None``.
    """

    batch_loss: jax.Array
    center_loss: Any
    distance: jax.Array
    info: Any
    observed: Any = None


class Fed(NamedTuple):
    """Minibatches gathered on the host for a chunk of steps (streamed data,
    :mod:`slt_jax.runner.feed`): for one chain, ``batch`` leaves of shape ``(steps, batch, …)``
    and ``rows``, their indices into this data shard's rows ``(steps, batch)`` — the rows
    :func:`_step` would have drawn from data on device."""

    batch: PyTree
    rows: jax.Array


def step_keys(chain_key, t):
    """``(key_batch, key_step)`` of step ``t``: the minibatch's rows and the kernel's noise."""
    return keys.split(keys.fold_in(chain_key, t))


def _step(config, kernel, posterior, divergence, data, chain_key, state, t, fed=None):
    """One sampler step of one chain at global step ``t``; also returns the loss and batch.

    The minibatch is drawn from ``data`` on device, or — for streamed data — read from ``fed``,
    this step's rows gathered on the host from the same draw (:mod:`slt_jax.runner.feed`).
    """
    key_batch, key_step = step_keys(chain_key, t)
    if fed is None:
        batch, rows = sharding.minibatch(key_batch, data, config.batch_size, config.mesh)
    else:
        batch, rows = fed.batch, fed.rows
    loss, grad = jax.value_and_grad(_global_loss(config))(state.kernel_state.position, batch)
    kernel_state, info = kernel.step(key_step, state.kernel_state, grad)
    runaway = posterior.nbeta * (loss - divergence.ref_loss) > divergence.threshold
    bad = ~jnp.isfinite(loss) | runaway
    diverged_at = jnp.where((state.diverged_at < 0) & bad, t, state.diverged_at)
    return state._replace(kernel_state=kernel_state, diverged_at=diverged_at), (loss, batch, rows, info)


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

    ``step_size``, ``posterior.nbeta``, ``posterior.localization``, ``divergence.threshold``
    and ``mask_index`` hold one value per chain (shape ``(chains,)``), so chain groups at
    different step sizes, temperatures or weight restrictions run in one program (calibration
    sweeps, temperature ladders, per-component refined LLCs); use :func:`per_chain` to
    broadcast scalars. With ``mask_index``, ``posterior.mask`` stacks K masks on a leading axis
    and chain i samples the coordinates of mask ``mask_index[i]``.
    """

    step_size: jax.Array
    posterior: LocalPosterior
    divergence: Divergence
    data: PyTree
    eval_data: PyTree
    mask_index: Any = None
    observed: Observed | None = None
    center_losses: Any = None


class Chain(NamedTuple):
    """Everything one chain's steps close over: the static config and its slice of
    :class:`ChainInputs` (one value per chain where the run has one per chain)."""

    config: RunConfig
    inputs: ChainInputs

    def chain_posterior(self) -> LocalPosterior:
        """The posterior this chain samples (its own mask, when masks are stacked)."""
        if self.inputs.mask_index is None or self.inputs.posterior.mask is None:
            return self.inputs.posterior
        return self.inputs.posterior._replace(mask=jax.tree.map(lambda m: m[self.inputs.mask_index], self.inputs.posterior.mask))

    def kernel(self):
        return self.config.kernel.build(self.inputs.step_size, self.chain_posterior())

    def advance(self, chain_key, state, start, num_steps, num_burnin, total, fed: Fed | None = None):
        """Steps ``start … start+num_steps−1`` of one chain, with a record per step.

        The record is real at draw steps — the last step of each ``steps_per_draw`` block
        after ``num_burnin`` — and zeros elsewhere; steps ≥ ``total`` only pad the last chunk.
        One scan body holds the step and the measurement once, which keeps compilation short.
        With ``fed`` (streamed data) the scan also walks over its batches, one per step.
        """
        config, posterior = self.config, self.chain_posterior()
        step = partial(_step, config, self.kernel(), posterior, self.inputs.divergence, self.inputs.data, chain_key)
        spd = config.steps_per_draw
        observe = config.observe

        def body(state, xs):
            t, fed_t = xs
            is_draw = (t >= num_burnin) & ((t - num_burnin) % spd == spd - 1)

            def live(state):
                position = state.kernel_state.position
                state, (loss, batch, rows, info) = step(state, t, fed_t)

                def measure(moments):
                    key = keys.fold_in(keys.fold_in(chain_key, t), 1)
                    batch_loss, center_loss = _measure(config, posterior, key, position, batch, rows, loss,
                                                       self.inputs.eval_data, self.inputs.center_losses)
                    observed = None
                    if observe is not None:
                        # The draw's own loss record relative to w*, for observables built on it.
                        own = batch_loss - (self.inputs.divergence.ref_loss if center_loss is None else center_loss)
                        moments, observed = observe_draw(observe, moments, position, self.inputs.observed, key, own,
                                                         (t - num_burnin) // spd)
                    record = Draws(batch_loss, center_loss, posterior.sq_distance(position), info,
                                   observed if observe is not None and observe.record else None)
                    return moments, record

                # Jitted so that its shapes and its branch share one trace (jit's cache).
                measure = jax.jit(measure)

                def skip(moments):
                    return moments, zeros_like_shapes(measure.eval_shape(moments)[1])

                # Measured inside the step's branch: only the record leaves it, never the
                # minibatch (a batch carried out of a cond costs ~1.5× at batch 2048 on CPU).
                moments, record = jax.lax.cond(is_draw, measure, skip, state.moments)
                return state._replace(moments=moments), record

            live = jax.jit(live)  # traced once for its shapes and its branch (jit's cache)
            record_shapes = live.eval_shape(state)[1]
            # Both predicates depend on t alone, shared by every chain: under vmap they stay
            # real branches, so padded steps and non-draw steps cost nothing.
            return jax.lax.cond(t < total, live, lambda s: (s, zeros_like_shapes(record_shapes)), state)

        return jax.lax.scan(body, state, (start + jnp.arange(num_steps, dtype=jnp.int32), fed))


def zeros_like_shapes(shapes):
    """Zeros like ``shapes``, varying over the same mesh axes (``cond`` branches must agree)."""

    def zeros(x):
        varying = tuple(sorted(x.manual_axis_type.varying)) if x.manual_axis_type else ()
        z = jnp.zeros(x.shape, x.dtype)
        return jax.lax.pcast(z, varying, to="varying") if varying else z

    return jax.tree.map(zeros, shapes)


CHAIN_AXES = ChainInputs(
    step_size=0,
    posterior=LocalPosterior(center=None, nbeta=0, localization=0, mask=None),
    divergence=Divergence(ref_loss=None, threshold=0),
    data=None,
    eval_data=None,
    mask_index=0,
    observed=None,
    center_losses=None,
)
"""The vmap axes of :class:`ChainInputs`: per-chain values on axis 0, the rest shared."""


def input_specs(mesh) -> ChainInputs:
    """How each input lies on the mesh: per-chain values split over chains, data over data."""
    c, d, r = sharding.chain_spec(mesh), sharding.data_spec(mesh), sharding.REPLICATED
    return ChainInputs(
        step_size=c,
        posterior=LocalPosterior(center=r, nbeta=c, localization=c, mask=r),
        divergence=Divergence(ref_loss=r, threshold=c),
        data=d,
        eval_data=d,
        mask_index=c,
        observed=r,
        center_losses=d,
    )


def per_chain(inputs: ChainInputs, num_chains: int, num_padded: int | None = None) -> ChainInputs:
    """Broadcast scalar step size, nβ, γ, divergence threshold and mask index to one value per chain.

    With ``num_padded``, the values are padded to that many chains by repeating the last one
    (padding chains fill the devices and are dropped).
    """
    extra = (num_padded or num_chains) - num_chains
    # On the host (numpy), to be placed once: eager jnp ops compile a small program each.
    b = lambda x: np.pad(np.broadcast_to(np.asarray(x), (num_chains,)), (0, extra), mode="edge")
    p, d = inputs.posterior, inputs.divergence
    return inputs._replace(
        mask_index=None if inputs.mask_index is None else b(inputs.mask_index),
        step_size=b(inputs.step_size),
        posterior=p._replace(nbeta=b(p.nbeta), localization=b(p.localization)),
        divergence=d._replace(threshold=b(d.threshold)),
    )


