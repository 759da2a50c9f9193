"""Parameter masks for the weight-refined LLC: which coordinates the sampler may move.

Wang et al., arXiv:2410.02984: sample only a subset V of the parameters, the rest frozen at w*.
"""

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
      param_mask: ``None`` (sample everything); a string: a regular expression matched in full
        against each leaf's path (``"layers_0/attn/.*"``, see :func:`path_string`), else a path
        prefix (``"blocks/0/attn"``), else an attention head (``"blocks/0/attn/head/1"``); a
        :class:`slt_jax.selectors.Selector` (``head(0, 1) | "unembed"``); or a pytree with the
        structure of ``params`` whose leaves are booleans or arrays broadcastable to the leaf
        (True/1 = sampled). :mod:`slt_jax.selectors` has the grammar.
      params: the parameter pytree.

    Returns:
      ``None`` or the float mask pytree.
    """
    if param_mask is None:
        return None
    from slt_jax import selectors  # selectors builds on path_string above

    if isinstance(param_mask, (str, selectors.Selector)):
        chosen = selectors.selection(param_mask, params)
        return jax.tree.map(lambda m, x: jnp.asarray(m, jnp.result_type(x)), chosen, params)
    if jax.tree.structure(param_mask) != jax.tree.structure(params):
        raise ValueError(
            "param_mask must be a regular expression, a selector or a pytree with the structure of params: got "
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


def mask_label(param_mask):
    """How a result records ``param_mask``: None, the string or selector as written, or ``"pytree"``."""
    from slt_jax import selectors

    if param_mask is None or isinstance(param_mask, str):
        return param_mask
    return str(param_mask) if isinstance(param_mask, selectors.Selector) else "pytree"


def num_sampled(mask, params) -> int:
    """How many coordinates the sampler moves."""
    if mask is None:
        return sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return int(sum(float(jnp.sum(m != 0)) for m in jax.tree.leaves(mask)))
