"""Parameter masks for the weight-refined LLC: which coordinates the sampler may move.

Wang et al., arXiv:2410.02984: sample only a subset V of the parameters, the rest frozen at w*.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np


def path_string(path) -> str:
    """A pytree path as ``"layers_0/attn/kernel"`` (dict keys, attributes and indices by ``/``)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def resolve_mask(param_mask, params):
    """Turn ``param_mask`` into a pytree of 0/1 float arrays shaped like ``params``.

    Args:
      param_mask: ``None`` (sample everything); a regular expression matched in full against
        each leaf's path (``"layers_0/attn/.*"``, see :func:`path_string`); or a pytree with
        the structure of ``params`` whose leaves are booleans or arrays broadcastable to the
        leaf (True/1 = sampled).
      params: the parameter pytree.

    Returns:
      ``None`` or the float mask pytree.
    """
    if param_mask is None:
        return None
    if isinstance(param_mask, str):
        pattern = re.compile(param_mask)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [path_string(p) for p, _ in leaves]
        hits = [pattern.fullmatch(p) is not None for p in paths]
        if not any(hits):
            raise ValueError(f"param_mask={param_mask!r} matches no parameter path; the paths are {paths}")
        masks = [jnp.full(jnp.shape(x), float(h), jnp.result_type(x)) for (_, x), h in zip(leaves, hits)]
        return jax.tree.unflatten(treedef, masks)
    if jax.tree.structure(param_mask) != jax.tree.structure(params):
        raise ValueError(
            "param_mask must be a regular expression or a pytree with the structure of params: got "
            f"{jax.tree.structure(param_mask)}, params have {jax.tree.structure(params)}"
        )

    def leaf(path, m, x):
        m = np.asarray(m)
        try:
            return jnp.broadcast_to(jnp.asarray(m, jnp.result_type(x)), jnp.shape(x))
        except ValueError:
            raise ValueError(
                f"param_mask{jax.tree_util.keystr(path)} has shape {m.shape}, which does not broadcast "
                f"to the parameter's shape {jnp.shape(x)}"
            ) from None

    return jax.tree_util.tree_map_with_path(leaf, param_mask, params)


def num_sampled(mask, params) -> int:
    """How many coordinates the sampler moves."""
    if mask is None:
        return sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return int(sum(float(jnp.sum(m != 0)) for m in jax.tree.leaves(mask)))
