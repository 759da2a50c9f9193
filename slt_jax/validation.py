"""Checks on user input: one clear error naming the offending argument or pytree path."""

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax.data.streaming import Streamed


def _path(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    """Raise ValueError unless ``value`` is a finite positive (or ≥ 0) number / integer."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {need} {'integer' if integer else 'number'}, got {value!r}")
    return value


def check_data(data, name: str = "data") -> int:
    """Check that every leaf of ``data`` is an array sharing one leading axis; return its length
    (streamed data, :func:`slt_jax.data.streamed`, are checked the same way, on the host)."""
    if isinstance(data, Streamed):
        return check_data(data.source, name)
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        raise ValueError(f"{name} has no arrays: pass a pytree of arrays with a leading sample axis")
    n = None
    first = None
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"{name}{_path(path)} is a scalar; every leaf needs a leading sample axis")
        if n is None:
            n, first = shape[0], _path(path)
        elif shape[0] != n:
            raise ValueError(
                f"{name}{_path(path)} has {shape[0]} rows but {name}{first} has {n}: every leaf of "
                f"{name} must share the leading (sample) axis"
            )
    if n == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    return n


def check_params(params) -> int:
    """Check that ``params`` is a pytree of floating arrays; return the number of parameters."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("params has no arrays")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params{_path(path)} has dtype {jnp.result_type(leaf)}; every parameter must be a "
                "floating-point array (pass non-trainable state through loss_fn's closure)"
            )
    return sum(int(np.size(leaf)) for _, leaf in leaves)


def check_loss_fn(loss_fn, params, batch, name: str = "data"):
    """Trace ``loss_fn(params, batch)`` abstractly and check it returns a real scalar."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    try:
        out = jax.eval_shape(loss_fn, params, batch)
    except Exception as e:  # re-raised with the context a user needs to find the mismatch
        raise ValueError(f"loss_fn(params, batch) failed on a batch of {name}: {type(e).__name__}: {e}") from e
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"loss_fn must return a scalar (the mean loss over the batch), got shape {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn must return a floating-point scalar, got dtype {out.dtype}")


def key_data(key) -> list:
    """The raw bits of a JAX PRNG key (typed or legacy uint32) as a JSON-ready list.

    Raises a ValueError naming ``key`` for anything else (an int seed, say).
    """
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)).tolist()
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32:
        return np.asarray(key).tolist()
    raise ValueError(f"key must be a JAX PRNG key (e.g. jax.random.key(0)), got {type(key).__name__}")
