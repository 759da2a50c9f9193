"""slt_jax.keys: the written-out Threefry hash gives exactly jax.random's bits and keys."""

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import keys


def _data(key):
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
@pytest.mark.parametrize("seed", [0, 12345])
def test_key_operations_equal_jax_random(make_key, seed):
    key = make_key(seed)
    for data in (0, 1, 7, 2**31 - 1):
        np.testing.assert_array_equal(_data(keys.fold_in(key, data)), _data(jax.random.fold_in(key, data)))
    for num in (1, 2, 3, 8):
        np.testing.assert_array_equal(_data(keys.split(key, num)), _data(jax.random.split(key, num)))
    words = _data(key)
    for size in (1, 2, 5, 100, 1001):  # odd sizes: JAX pads the count array with a 0
        np.testing.assert_array_equal(keys.random_bits(key, size), jax.random.bits(key, (size,), jnp.uint32))
        np.testing.assert_array_equal(
            keys.hash_counts(key, size),
            jax.extend.random.threefry_2x32((words[0], words[1]), jnp.arange(size, dtype=jnp.uint32)))


def test_key_operations_equal_jax_random_under_vmap_and_jit():
    chain_keys = jax.random.split(jax.random.key(3), 5)
    steps = jnp.arange(5) * 1000

    def ours(key, t):
        key_batch, key_step = keys.split(keys.fold_in(key, t))
        return keys.random_bits(key_batch, 7), jax.random.key_data(key_step)

    def theirs(key, t):
        key_batch, key_step = jax.random.split(jax.random.fold_in(key, t))
        return jax.random.bits(key_batch, (7,), jnp.uint32), jax.random.key_data(key_step)

    for a, b in zip(jax.jit(jax.vmap(ours))(chain_keys, steps), jax.vmap(theirs)(chain_keys, steps)):
        np.testing.assert_array_equal(a, b)


def test_the_values_do_not_follow_the_partitionable_flag():
    key = jax.random.key(1)
    expected = _data(keys.split(key, 3)), np.asarray(keys.random_bits(key, 9))
    with jax.threefry_partitionable(False):
        assert not np.array_equal(_data(jax.random.split(key, 3)), expected[0])  # JAX's own do
        np.testing.assert_array_equal(_data(keys.split(key, 3)), expected[0])
        np.testing.assert_array_equal(keys.random_bits(key, 9), expected[1])


def test_other_implementations_go_to_jax_random():
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(_data(keys.fold_in(key, 4)), _data(jax.random.fold_in(key, 4)))
    np.testing.assert_array_equal(_data(keys.split(key, 2)), _data(jax.random.split(key, 2)))
    np.testing.assert_array_equal(keys.random_bits(key, 6), jax.random.bits(key, (6,), jnp.uint32))
