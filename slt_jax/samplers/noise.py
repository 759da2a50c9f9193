"""Noise over parameter pytrees, one independent key per leaf: Gaussian, or Rademacher signs.

SGLD draws a fresh N(0, I) for every parameter at every step, which at small batch is a large
share of a step. For float32 leaves and Threefry keys (JAX's default), :func:`tree_normal`
hashes counter *pairs* — one Threefry-2x32 hash per two draws, bit for bit the draws of
``jax.random.normal`` under ``jax_threefry_partitionable=False`` — where JAX's default
(partitionable) layout spends one hash per draw: about 1.7× faster per 1M draws on CPU
(benchmarks/step_cost.py). The partitionable layout matters only for random arrays that XLA
shards by itself; here each chain's noise is drawn whole on its own device. No global flag is
touched. Other dtypes and key implementations use ``jax.random.normal``. (The ``rbg`` and
``unsafe_rbg`` implementations were measured too: slower than Threefry on CPU.)

:func:`tree_rademacher` draws ±1 signs for the simplified weak Euler scheme (Kloeden & Platen,
*Numerical Solution of Stochastic Differential Equations*, 1992, §14.1): one random *bit* per
parameter, 32 per ``jax.random.bits`` word, so it hashes 1/16 as often as :func:`tree_normal`
(one hash per two normals) and needs no transform; ``jax.random.rademacher`` spends a full
32-bit draw per sign. Measured: 0.5 ms per 1M signs against 4.5 ms per 1M normals on 2 CPU
cores (``benchmarks/step_cost.py``).
"""

import math

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))  # jax.random.normal's open interval (−1, 1)


def _is_threefry(key) -> bool:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_impl(key) == "threefry2x32"
    return key.dtype == jnp.uint32 and key.shape == (2,)


def _normal_float32(key, shape):
    """float32 N(0, 1) draws from Threefry-2x32 over counter pairs (see the module docstring)."""
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    bits = jax.extend.random.threefry_2x32((words[0], words[1]), jax.lax.iota(jnp.uint32, math.prod(shape)))
    # 23 random mantissa bits under exponent 0 give a float in [1, 2); shift it to [−1, 1).
    one = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
    uniform = jnp.maximum(_LOW, (one - np.float32(1.0)) * (np.float32(1.0) - _LOW) + _LOW)
    return (np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(uniform)).reshape(shape)


def normal(key, shape, dtype):
    """Standard normal draws of ``shape`` and ``dtype`` (the faster path where it applies)."""
    if jnp.dtype(dtype) == jnp.float32 and _is_threefry(key) and 0 < math.prod(shape) < 2**32:
        return _normal_float32(key, tuple(shape))
    return jax.random.normal(key, shape, dtype)


def rademacher(key, shape, dtype):
    """Independent ±1 of ``shape`` and ``dtype``, each from one bit of ``jax.random.bits``."""
    size = math.prod(shape)
    words = jax.random.bits(key, (max(1, -(-size // 32)),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & np.uint32(1)
    signs = 1 - 2 * bits.reshape(-1)[:size].astype(jnp.int32)
    return signs.astype(dtype).reshape(shape)


def _tree_draws(draw, key, tree):
    """``draw(key, shape, dtype)`` for every leaf of ``tree``, one key per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [draw(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def tree_rademacher(key, tree):
    """±1 draws shaped like every leaf of ``tree`` (leaf dtypes kept)."""
    return _tree_draws(rademacher, key, tree)


def tree_normal(key, tree):
    """Standard normal draws shaped like every leaf of ``tree`` (leaf dtypes kept)."""
    return _tree_draws(normal, key, tree)
