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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Observation:
    """What every recorded draw observes, beside the loss (a static part of a run's config).

    Attributes:
      fn: ``fn(params, inputs) -> {name: (k,) array}``: the observables at a position; ``inputs``
        is the run's ``ChainInputs.observed.inputs`` (e.g. the probe rows).
      pairs: ``(a, b)`` name pairs whose cross-products ``Σ v_a v_bᵀ`` are accumulated.
      record: also return every draw's values (thinned traces), not only the moments.
    """

    fn: Callable
    pairs: tuple = ()
    record: bool = False

    def names(self, inputs, center) -> tuple:
        """The observables' names, sorted."""
        return tuple(sorted(jax.eval_shape(self.fn, center, inputs)))


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


def values_at(observation: Observation, position, observed: Observed) -> dict:
    """The observables at ``position`` relative to their values at w*."""
    values = observation.fn(position, observed.inputs)
    return {name: jnp.ravel(values[name]) - observed.center[name] for name in values}


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
