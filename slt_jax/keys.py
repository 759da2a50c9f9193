"""Where every random number comes from: chain keys, the named side streams, and the hashing.

A run's random numbers are a function of its root key alone. Chain ``i`` draws from
``fold_in(key, i)`` and its step ``t`` from ``fold_in(chain_key, t)``, so chain i's trace does
not depend on how many chains run beside it, on how many devices or hosts they are split over,
or on how the run is chunked. The auxiliary computations an estimate makes — the calibration
sweep, the Laplace value, curvature probes, the stiffness checks at the chains — draw from
``fold_in(key, s)`` with stream indices ``s`` near 2³¹, which no chain index reaches.

:func:`fold_in`, :func:`split`, :func:`random_bits` and :func:`hash_counts` return exactly what
``jax.random.fold_in``, ``jax.random.split``, ``jax.random.bits`` (uint32) and
``jax.extend.random.threefry_2x32`` return for Threefry keys under JAX's default
(partitionable) layout, but hash with :func:`threefry2x32`, the 20 rounds of Threefry-2x32
(Salmon, Moraes, Dror & Shaw, *Parallel random numbers: as easy as 1, 2, 3*, SC 2011) written
out as plain integer array operations. On CPU, JAX lowers each of its hashes to a loop of five
iterations, which XLA neither fuses nor compiles quickly: a sampler step holds seven hashes
(the step's key, its split, the minibatch rows, the noise per leaf). Written out, they cut the
XLA compile of the devinterp comparison's chain program (64 chains of a DLN, 2 CPU cores) from
1.07–1.14 s to 0.65–0.78 s. The values do not depend on the ``jax_threefry_partitionable``
flag. Keys of other implementations go to ``jax.random``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

CALIBRATION = 2**31 - 1  # the step-size sweep of step_size="auto"
LAPLACE = 2**31 - 2  # the Laplace value's rows and probe vectors
CURVATURE = 2**31 - 3  # the free-energy ladder's curvature probe
STEP_CHECK = 2**31 - 4  # the curvature probe of the check after a fixed-step run
STIFFNESS = 2**31 - 16  # + k: the k-th stiffness check at the chains' positions

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def stream(key, index: int, offset: int = 0):
    """The side stream ``fold_in(key, index + offset)`` (``index`` one of this module's constants)."""
    return fold_in(key, index + offset)


def chain_key(key, index):
    """Chain ``index``'s key: ``fold_in(key, index)``, independent of the number of chains."""
    return fold_in(key, index)


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds of the counter words ``(x1, x2)`` under key ``(k1, k2)``.

    All arguments are uint32; the key words are scalars and the counters two arrays of one
    shape. Returns the two hashed words: JAX's ``threefry2x32`` primitive, as straight-line
    array code that XLA fuses (use inside ``jit``: eagerly each operation dispatches alone).
    """
    const = lambda v: jax.lax.full_like(x1, v)
    rotate_left = lambda x, r: jax.lax.bitwise_or(jax.lax.shift_left(x, const(r)),
                                                  jax.lax.shift_right_logical(x, const(32 - r)))
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x1 = x1 + x2
            x2 = rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(block + 1) % 3]
        x2 = x2 + (ks[(block + 2) % 3] + np.uint32(block + 1))
    return x1, x2


def _is_typed(key) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def is_threefry(key) -> bool:
    """Whether ``key`` is one Threefry key: typed with that implementation, or raw uint32 ``(2,)``."""
    if _is_typed(key):
        return key.shape == () and jax.random.key_impl(key) == "threefry2x32"
    return key.dtype == jnp.uint32 and key.shape == (2,)


def _words(key):
    data = jax.random.key_data(key) if _is_typed(key) else key
    return data[0], data[1]


def _like(key, h1, h2):
    """Words ``(h1, h2)`` as keys of the same kind as ``key`` (typed or raw)."""
    data = jnp.stack([h1, h2], axis=-1)
    return jax.random.wrap_key_data(data, impl="threefry2x32") if _is_typed(key) else data


def _hash_iota(key, size: int):
    """The hashes of counters ``(0, i)``, ``i < size``: JAX's partitionable layout."""
    k1, k2 = _words(key)
    counts = jax.lax.iota(jnp.uint32, size)
    return threefry2x32(k1, k2, jnp.zeros_like(counts), counts)


# Each traced once per signature (jit's cache) and, inside a caller's jit, kept as one call.
@jax.jit
def _fold_in(key, data):  # the counter (0, data)
    k1, k2 = _words(key)
    h1, h2 = threefry2x32(k1, k2, jnp.zeros((), jnp.uint32), jax.lax.convert_element_type(data, jnp.uint32))
    return _like(key, h1, h2)


@functools.partial(jax.jit, static_argnums=1)
def _split(key, num: int):
    return _like(key, *_hash_iota(key, num))


@functools.partial(jax.jit, static_argnums=1)
def _bits(key, size: int):
    h1, h2 = _hash_iota(key, size)
    return h1 ^ h2


@functools.partial(jax.jit, static_argnums=1)
def _hash_counts(key, size: int):
    k1, k2 = _words(key)
    half = -(-size // 2)
    counts = jax.lax.iota(jnp.uint32, half)
    second = counts + np.uint32(half)
    if size % 2:  # JAX pads an odd count array with a 0, which pairs with count half − 1
        second = jnp.where(counts == half - 1, np.uint32(0), second)
    h1, h2 = threefry2x32(k1, k2, counts, second)
    return jnp.concatenate([h1, h2])[:size]


def fold_in(key, data):
    """``jax.random.fold_in(key, data)`` for one key and integer ``data``."""
    if not is_threefry(key):
        return jax.random.fold_in(key, data)
    return _fold_in(key, jnp.asarray(data, jnp.uint32) if isinstance(data, int) else data)


def split(key, num: int = 2):
    """``jax.random.split(key, num)`` for one key: ``num`` keys on a leading axis."""
    return _split(key, num) if is_threefry(key) else jax.random.split(key, num)


def random_bits(key, size: int):
    """``jax.random.bits(key, (size,), jnp.uint32)``: ``size`` uniform 32-bit words."""
    if not is_threefry(key) or size >= 2**32:
        return jax.random.bits(key, (size,), jnp.uint32)
    return _bits(key, size)


def hash_counts(key, size: int):
    """``jax.extend.random.threefry_2x32(key words, iota(size))`` for one Threefry key:
    ``size`` words from ``⌈size/2⌉`` hashes (count ``i`` paired with ``i + ⌈size/2⌉``)."""
    return _hash_counts(key, size)
