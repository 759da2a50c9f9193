"""Minibatch row indices: Lemire's multiply-high on one 32-bit word, exact integer arithmetic,
and uniform rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.data.batches import ONE_WORD_ROWS, _multiply_high, minibatch, row_indices

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier


@pytest.mark.parametrize("n", [1, 7, 10_000, 65_537, ONE_WORD_ROWS, 2**31 - 1])
def test_multiply_high_is_the_exact_top_word_of_the_product(n):
    words = np.random.default_rng(n).integers(0, 2**32, 20_000, dtype=np.uint64)
    words[:3] = [0, 1, 2**32 - 1]
    got = np.asarray(_multiply_high(jnp.asarray(words.astype(np.uint32)), n)).astype(np.int64)
    np.testing.assert_array_equal(got, (words * np.uint64(n)) >> np.uint64(32))


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_are_uniform(seed):
    # 10 rows, 200k draws: each count is Binomial(200k, 0.1), sd ≈ 134; a χ² test at 9 degrees
    # of freedom rejects at p < 1e-3 above 27.9.
    counts = np.bincount(np.asarray(row_indices(jax.random.key(seed), 200_000, 10)), minlength=10)
    expected = 200_000 / 10
    assert counts.size == 10 and ((counts - expected) ** 2 / expected).sum() < 27.9, counts


def test_large_datasets_use_two_words_and_stay_in_range():
    n = 3 * ONE_WORD_ROWS
    idx = np.asarray(row_indices(jax.random.key(0), 100_000, n))
    assert idx.min() >= 0 and idx.max() < n and idx.max() > 2 * ONE_WORD_ROWS
    batch, idx = minibatch(jax.random.key(0), {"x": jnp.arange(10.0)[:, None]}, 5)
    rows = batch["x"]
    assert rows.shape == (5, 1) and set(np.asarray(rows).ravel()) <= set(range(10))
    np.testing.assert_array_equal(np.asarray(rows).ravel(), np.asarray(idx))  # the indices of the rows
