"""Data on device: minibatches drawn with replacement, and the exact full-data loss.

The two data operations every estimate rests on (Lau et al., arXiv:2308.12108;
docs/mathematics.md §1): SGLD's gradient minibatches, drawn on device at O(batch) cost per
step, and L_n(w) evaluated exactly over all n rows.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from slt_jax import keys


def num_samples(data) -> int:
    """The common leading-axis length n of a data pytree."""
    return jax.tree.leaves(data)[0].shape[0]


# Up to this many rows, one random word per index is uniform enough (see ``row_indices``).
ONE_WORD_ROWS = 2**20


def row_indices(key, batch_size: int, n: int) -> jax.Array:
    """``batch_size`` row indices in ``[0, n)``, uniform with replacement.

    Up to ``ONE_WORD_ROWS`` rows, one 32-bit word u per index, mapped by Lemire's multiply-high
    ⌊u·n / 2³²⌋ (arXiv:1805.10941, without its rejection step): each row receives ⌊2³²/n⌋ or
    ⌈2³²/n⌉ of the 2³² words, so row probabilities differ by less than n/2³² relative
    (2.4e-4 at 2²⁰ rows). ``jax.random.randint`` draws two words and takes three integer
    remainders, ~3× the cost of the word itself; on a 23-parameter DLN on CPU (16 chains,
    batch 100) dropping it cut an SGLD step by ~15 %. Larger datasets use it (unevenness n/2⁶⁴).
    """
    if n > ONE_WORD_ROWS:
        return jax.random.randint(key, (batch_size,), 0, n)
    return _multiply_high(keys.random_bits(key, batch_size), n)


def _multiply_high(u, n: int):
    """⌊u·n / 2³²⌋ as int32, for uint32 ``u`` and ``n`` < 2³¹, in 16-bit halves (no 64-bit integers)."""
    n_lo, n_hi = jnp.uint32(n & 0xFFFF), jnp.uint32(n >> 16)
    u_lo, u_hi = u & 0xFFFF, u >> 16
    lo_lo, hi_lo, lo_hi = u_lo * n_lo, u_hi * n_lo, u_lo * n_hi
    carry = ((lo_lo >> 16) + (hi_lo & 0xFFFF) + (lo_hi & 0xFFFF)) >> 16
    return (u_hi * n_hi + (hi_lo >> 16) + (lo_hi >> 16) + carry).astype(jnp.int32)


def minibatch(key, data, batch_size: int):
    """Draw ``batch_size`` rows uniformly with replacement, on device (``row_indices``).

    Sampling with replacement keeps every minibatch loss an unbiased estimate of L_n and costs
    O(batch) per step, where a permutation would cost O(n). The indices lie in range by
    construction, so the gather clips instead of filling out-of-range rows: the same rows,
    without the bounds masking (about 15 % of an SGLD step on a small DLN on CPU).

    Returns:
      ``(batch, indices)``: the rows, and their indices ``(batch_size,)`` into ``data`` — so a
      table over the rows (e.g. the per-sample losses at w*, :func:`per_sample_losses`) can be
      read for the same batch.
    """
    idx = row_indices(key, batch_size, num_samples(data))
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0, mode="clip"), data), idx


def accumulation_dtype():
    """float32, or float64 when JAX runs with x64 enabled: losses are summed at this precision."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


class FullBatchLoss(NamedTuple):
    """The exact mean loss over a dataset, and the spread of its batch means.

    Attributes:
      mean: L_n(w) = (1/n)·Σ_i ℓ_i(w), exact (every row counted once).
      batch_std: standard deviation of the loss of one batch of the given size around the
        mean (0 when the dataset is a single batch) — the scale of minibatch noise.
    """

    mean: jax.Array
    batch_std: jax.Array


def full_batch_loss(loss_fn, params, data, batch_size: int) -> FullBatchLoss:
    """Evaluate L_n(params) exactly on the whole dataset, ``batch_size`` rows at a time.

    ``loss_fn`` returns the mean loss over its batch, so the full mean is the row-weighted mean
    of the batch means; a final partial batch is evaluated on its own.
    """
    n = num_samples(data)
    num_full, rest = divmod(n, batch_size)
    acc = accumulation_dtype()
    total = jnp.zeros((), acc)
    batch_std = jnp.zeros((), acc)
    if num_full:
        blocks = jax.tree.map(
            lambda x: x[: num_full * batch_size].reshape(num_full, batch_size, *x.shape[1:]), data
        )
        losses = jax.lax.map(lambda b: loss_fn(params, b), blocks).astype(acc)
        total = total + batch_size * jnp.sum(losses)
        if num_full > 1:
            batch_std = jnp.std(losses, ddof=1)
    if rest:
        tail = jax.tree.map(lambda x: x[num_full * batch_size :], data)
        total = total + rest * loss_fn(params, tail).astype(acc)
    return FullBatchLoss(total / n, batch_std)


def per_sample_losses(loss_fn, params, data, batch_size: int) -> jax.Array:
    """ℓ_i(params) for every row i: ``loss_fn`` on one-row batches, vmapped over ``batch_size``
    rows at a time (the blocks of :func:`full_batch_loss`), ``(n,)`` at the loss's dtype.

    For a ``loss_fn`` that is the mean of per-row terms, the mean of these over any batch is
    ``loss_fn`` on that batch, so a minibatch's loss at fixed ``params`` is a gather and a mean
    instead of a forward pass (the control variate, docs/mathematics.md §1.3).
    """
    one_row = lambda row: loss_fn(params, jax.tree.map(lambda x: x[None], row))
    n = num_samples(data)
    num_full, rest = divmod(n, batch_size)
    parts = []
    if num_full:
        blocks = jax.tree.map(
            lambda x: x[: num_full * batch_size].reshape(num_full, batch_size, *x.shape[1:]), data
        )
        parts.append(jax.lax.map(jax.vmap(one_row), blocks).reshape(-1))
    if rest:
        parts.append(jax.vmap(one_row)(jax.tree.map(lambda x: x[num_full * batch_size :], data)))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def exact_loss(loss_fn, data, batch_size: int):
    """``w ↦ L_n(w)`` exactly: one call when the data fit in one chunk (a simpler program to
    compile), else :func:`full_batch_loss` over chunks of ``batch_size``."""
    if num_samples(data) <= batch_size:
        return lambda w: loss_fn(w, data)
    return lambda w: full_batch_loss(loss_fn, w, data, batch_size).mean
