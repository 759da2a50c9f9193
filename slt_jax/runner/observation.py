"""Observables inside the chain runner, kept as streaming moments.

At every recorded draw the runner can evaluate named vector functions of the position — the
per-sample losses on fixed rows, a held-out loss, a component's loss — and fold them into
running sums: the count, each observable's sum and sum of squares, and the cross-products of
chosen pairs. Memory is O(observables) per chain (O(rows × queries) for a pair), never draws ×
observables: the estimators of :mod:`slt_jax.estimators.observables` need only these moments
(Bayesian influence, susceptibilities; docs/mathematics.md §8). Values are taken relative to
their value at w*, so the float32 sums of products keep the fluctuations instead of cancelling
them against a large mean; covariances do not depend on that shift.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import keys


@dataclasses.dataclass(frozen=True)
class Observation:
    """What every recorded draw observes, beside the loss (a static part of a run's config).

    Attributes:
      fn: ``fn(params, inputs) -> {name: (k,) array}``: the observables at a position; ``inputs``
        is the run's ``ChainInputs.observed.inputs`` (e.g. the probe rows).
      pairs: ``(a, b)`` name pairs whose cross-products ``Σ v_a v_bᵀ`` are accumulated.
      record: also return every draw's values (thinned traces), not only the moments.
      keyed: ``fn`` takes a third argument, a PRNG key of its own per chain and draw (for
        observables measured on random rows, e.g. a minibatch estimate of L_n); its draws are
        independent of the sampler's minibatch at that step.
      draw_loss: also observe the draw's own loss record relative to w* under the name
        ``"draw_loss"`` (shape ``(1,)``): ``L_B(w_t) − L_B(w*)`` with the control variate,
        ``L(w_t) − L_n(w*)`` otherwise — the λ̂ draw over nβ, an unbiased estimate of
        ``L_n(w_t) − L_n(w*)`` that costs nothing, its batch independent of w_t and of ``fn``'s key.
      every: fold in every ``every``-th draw only (draws 0, every, 2·every, …): successive draws
        of a small step are strongly correlated, so the moments lose little while observables
        that cost as much as a step cost ``every`` times less. λ̂ still uses every draw.
    """

    fn: Callable
    pairs: tuple = ()
    record: bool = False
    keyed: bool = False
    draw_loss: bool = False
    every: int = 1

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if self.every > 1 and self.record:
            raise ValueError("record=True keeps every draw's values; it does not combine with every > 1")

    def __call__(self, params, inputs, key) -> dict:
        """The observables at ``params`` (``key`` is ignored unless ``keyed``)."""
        return self.fn(params, inputs, key) if self.keyed else self.fn(params, inputs)

    def shapes(self, params, inputs) -> dict:
        """``{name: ShapeDtypeStruct}`` of the observables, without evaluating them."""
        shapes = jax.eval_shape(self.__call__, params, inputs, jax.random.key(0))
        if self.draw_loss:
            dtype = jax.tree.leaves(params)[0].dtype
            shapes = {**shapes, DRAW_LOSS: jax.ShapeDtypeStruct((1,), dtype)}
        return shapes

    def names(self, inputs, center) -> tuple:
        """The observables' names, sorted."""
        return tuple(sorted(self.shapes(center, inputs)))


OBSERVATION_STREAM = 2  # fold_in(measurement key, 2): apart from the evaluation minibatch's key
DRAW_LOSS = "draw_loss"


class Observed(NamedTuple):
    """The traced inputs of an observation: its ``inputs`` and its values at w* (the shift)."""

    inputs: Any
    center: Any


class Moments(NamedTuple):
    """Running moments of one chain's observables (values relative to w*).

    Attributes:
      count: draws folded in.
      sums: ``{name: Σ v}``.
      squares: ``{name: Σ v²}`` (elementwise).
      cross: ``{"a|b": Σ v_a v_bᵀ}`` for each accumulated pair.
    """

    count: jax.Array
    sums: dict
    squares: dict
    cross: dict


def pair_key(a: str, b: str) -> str:
    """The key of pair ``(a, b)`` in :attr:`Moments.cross`."""
    return f"{a}|{b}"


def values_at(observation: Observation, position, observed: Observed, key=None, draw_loss=None) -> dict:
    """The observables at ``position`` relative to their values at w*.

    ``key`` is the draw's measurement key (a keyed observation draws from its own stream of it);
    ``draw_loss`` the draw's loss record relative to w* (kept when the observation asks for it).
    """
    if observation.keyed:
        key = keys.fold_in(key, OBSERVATION_STREAM)
    values = observation(position, observed.inputs, key)
    out = {name: jnp.ravel(values[name]) - observed.center[name] for name in values}
    if observation.draw_loss:
        out[DRAW_LOSS] = jnp.reshape(draw_loss, (1,))
    return out


def observe_draw(observation: Observation, moments, position, observed: Observed, key, draw_loss, draw_index):
    """``(moments, values)``: draw ``draw_index``'s observables folded into ``moments``.

    With ``every > 1`` only every ``every``-th draw is evaluated (a branch on the draw index,
    shared by all chains, so skipped draws cost nothing) and no values are returned.
    """
    look = lambda: values_at(observation, position, observed, key, draw_loss)
    if observation.every == 1:
        values = look()
        return accumulate(moments, observation, values), values
    fold = lambda m: accumulate(m, observation, look())
    return jax.lax.cond(draw_index % observation.every == 0, fold, lambda m: m, moments), None


def zero_moments(observation: Observation, shapes: dict, dtype) -> Moments:
    """Empty moments for observables of the given ``{name: ShapeDtypeStruct}``."""
    size = lambda name: int(jnp.size(jnp.zeros(shapes[name].shape)))
    return Moments(
        count=jnp.zeros((), dtype),
        sums={name: jnp.zeros((size(name),), dtype) for name in shapes},
        squares={name: jnp.zeros((size(name),), dtype) for name in shapes},
        cross={pair_key(a, b): jnp.zeros((size(a), size(b)), dtype) for a, b in observation.pairs},
    )


def accumulate(moments: Moments, observation: Observation, values: dict) -> Moments:
    """``moments`` with one draw's ``values`` folded in."""
    cast = {name: v.astype(moments.count.dtype) for name, v in values.items()}
    return Moments(
        count=moments.count + 1,
        sums={name: moments.sums[name] + cast[name] for name in moments.sums},
        squares={name: moments.squares[name] + jnp.square(cast[name]) for name in moments.squares},
        cross={pair_key(a, b): moments.cross[pair_key(a, b)] + jnp.outer(cast[a], cast[b])
               for a, b in observation.pairs},
    )


class TraceWriter:
    """A :func:`~slt_jax.runner.chains.run_chains` sink: per-draw observables go to disk, chunk by chunk.

    Each observable becomes one ``.npy`` file of shape ``(chains, draws, k)`` opened with
    ``np.lib.format.open_memmap`` and filled as chunks arrive, so thinned traces of many rows
    never sit in memory (values relative to w*, as the moments hold them). A run that stops
    early leaves the draws written so far and zeros after them; :attr:`written` counts them.
    """

    def __init__(self, directory, shapes: dict, num_chains: int, num_draws: int, dtype):
        """
        Args:
          directory: where the files go (created if missing).
          shapes: ``{name: ShapeDtypeStruct}`` of the observables (:meth:`Observation.shapes`).
          num_chains, num_draws: the run's chains and recorded draws.
          dtype: the dtype of the stored values.
        """
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths = {name: self.directory / f"{name.replace('/', '__')}.npy" for name in shapes}
        self.arrays = {
            name: np.lib.format.open_memmap(self.paths[name], mode="w+", dtype=np.dtype(dtype),
                                            shape=(num_chains, num_draws, int(np.prod(shapes[name].shape))))
            for name in shapes}
        self.written = 0

    def __call__(self, draws):
        observed = draws.observed
        count = next(iter(observed.values())).shape[1] if observed else 0
        for name, values in observed.items():
            self.arrays[name][:, self.written:self.written + count] = values
            self.arrays[name].flush()
        self.written += count
        return draws._replace(observed=None)
