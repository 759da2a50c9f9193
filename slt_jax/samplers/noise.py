"""Gaussian noise over parameter pytrees, one independent key per leaf."""

import jax


def tree_normal(key, tree):
    """Standard normal draws shaped like every leaf of ``tree`` (leaf dtypes kept)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draws = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, draws)
