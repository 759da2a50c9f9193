"""Weight restrictions that speak transformer: which coordinates a refined LLC samples.

The weight-refined LLC (Wang et al., arXiv:2410.02984) samples a subset V of the parameters
with the rest frozen at w*; for transformers V is an attention head, a layer's attention or MLP,
or the (un)embedding (Hoogland et al. arXiv:2402.02364; Wang et al. arXiv:2410.02984). A selector names V and resolves, against a parameter
pytree, to a boolean mask shaped like it — also *inside* arrays, since a head is a slice.

Grammar of ``param_mask`` (``estimate_llc`` and everything that takes one):

- a regular expression matched in full against leaf paths (:func:`slt_jax.masks.path_string`),
  e.g. ``"blocks/0/attn/.*"`` or ``".*kernel"``;
- if it matches no leaf, a path prefix selecting a subtree: ``"blocks/0/attn"``,
  ``"blocks/1/mlp"``, ``"embed"``, ``"unembed"`` (whole path components: ``"embed"`` is not
  ``"pos_embed"``);
- if neither, ``"<attention>/head/<h>"`` (``"blocks/0/attn/head/1"``): head h of the
  multi-head attention at that path — ``[:, h, :]`` of the query/key/value kernels
  ``(d_model, heads, head_dim)``, ``[h]`` of their biases ``(heads, head_dim)`` and of the
  output kernel ``(heads, head_dim, d_model)``; the output bias belongs to no head;
- a :class:`Selector` from :func:`head`, :func:`attention`, :func:`mlp`, :func:`embedding`,
  :func:`unembedding` or :func:`select`, combined with ``|`` (union), ``&`` (intersection)
  and ``~`` (complement), also with strings (``head(0, 1) | "unembed"``);
- a boolean pytree with the structure of the parameters (leaves broadcastable to theirs).

A selector that matches nothing is an error (each part of a combination on its own too, so a
typo inside a union is not lost), as are a head index beyond the layer's head count and a
layer that does not exist; :func:`describe_mask` counts what a selection covers before
anything runs.

Its length: the selector kinds and their algebra (``|``, ``&``, ``~``) resolve through one
walk of the parameter pytree.
"""

import abc
import dataclasses
import re

import jax
import numpy as np

from slt_jax.masks import path_string

_HEAD = re.compile(r"(?P<attn>.+)/head/(?P<index>\d+)")
_LAYER = re.compile(r"blocks/(\d+)(/|$)")
_HEAD_LEAVES = {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1,  # axis of the head index
                "query/bias": 0, "key/bias": 0, "value/bias": 0, "out/kernel": 0}
_MAX_LISTED = 24


def _leaves(params):
    """``(paths, shapes, treedef)`` of ``params`` (arrays or ``jax.ShapeDtypeStruct``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [path_string(p) for p, _ in leaves], [tuple(np.shape(x)) for _, x in leaves], treedef


def _listing(paths) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f", … ({len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else "")


def _under(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _nothing_under(label: str, prefix: str, paths) -> ValueError:
    """The error for a subtree that holds no parameter: a missing layer is named as such."""
    wanted = _LAYER.match(prefix)
    layers = sorted({int(m.group(1)) for p in paths if (m := _LAYER.match(p))})
    if wanted and int(wanted.group(1)) not in layers:
        return ValueError(f"{label}: layer {wanted.group(1)} does not exist; the model has layers {layers}")
    return ValueError(f"{label} selects nothing: no parameter path is or starts with {prefix + '/'!r}; "
                      f"the paths are {_listing(paths)}")


class Selector(abc.ABC):
    """A set of parameter coordinates; ``selector.mask(params)`` is it as a boolean pytree.

    Combine with ``|``, ``&``, ``~`` (and with strings, read by :func:`select`).
    """

    @abc.abstractmethod
    def leaf_masks(self, paths, shapes) -> list[np.ndarray]:
        """One boolean array per leaf (given as paths and shapes); raises if nothing matches."""

    def mask(self, params):
        """The boolean mask pytree of this selection over ``params`` (arrays or shapes)."""
        paths, shapes, treedef = _leaves(params)
        return jax.tree.unflatten(treedef, self.leaf_masks(paths, shapes))

    def __or__(self, other):
        return Union(self, select(other))

    def __ror__(self, other):
        return Union(select(other), self)

    def __and__(self, other):
        return Intersection(self, select(other))

    def __rand__(self, other):
        return Intersection(select(other), self)

    def __invert__(self):
        return Complement(self)


@dataclasses.dataclass(frozen=True)
class Pattern(Selector):
    """A string of the grammar above: regex over leaf paths, else a path prefix, else ``…/head/<h>``."""

    pattern: str

    def leaf_masks(self, paths, shapes):
        try:
            regex = re.compile(self.pattern)
        except re.error:
            regex = None  # not a regex, but it may still be a prefix
        hits = [regex is not None and regex.fullmatch(p) is not None for p in paths]
        if any(hits):
            return [np.full(s, h) for s, h in zip(shapes, hits)]
        prefix = self.pattern.rstrip("/")
        if prefix and any(_under(prefix, p) for p in paths):
            return Subtree(prefix, repr(self.pattern)).leaf_masks(paths, shapes)
        if (head := _HEAD.fullmatch(self.pattern)) is not None:
            return Head(head["attn"], int(head["index"]), repr(self.pattern)).leaf_masks(paths, shapes)
        raise ValueError(f"param_mask={self.pattern!r} matches no parameter path, as a regular expression or as a "
                         f"path prefix; the paths are {_listing(paths)}")

    def __str__(self):
        return repr(self.pattern)


@dataclasses.dataclass(frozen=True)
class Subtree(Selector):
    """Every parameter whose path is ``prefix`` or starts with ``prefix/``."""

    prefix: str
    label: str

    def leaf_masks(self, paths, shapes):
        hits = [_under(self.prefix, p) for p in paths]
        if not any(hits):
            raise _nothing_under(self.label, self.prefix, paths)
        return [np.full(s, h) for s, h in zip(shapes, hits)]

    def __str__(self):
        return self.label


@dataclasses.dataclass(frozen=True)
class Head(Selector):
    """Head ``index`` of the multi-head attention whose parameters live under ``attention``."""

    attention: str
    index: int
    label: str

    def leaf_masks(self, paths, shapes):
        by_path = dict(zip(paths, shapes))
        kernel = f"{self.attention}/query/kernel"
        if kernel not in by_path:
            if not any(_under(self.attention, p) for p in paths):
                raise _nothing_under(self.label, self.attention, paths)
            raise ValueError(f"{self.label}: {self.attention!r} is not a multi-head attention (no {kernel!r} of "
                             "shape (d_model, heads, head_dim))")
        num_heads = by_path[kernel][1]
        if self.index >= num_heads:
            raise ValueError(f"{self.label}: head index {self.index} is out of range; {self.attention!r} has "
                             f"{num_heads} heads (0…{num_heads - 1})")
        out = []
        for path, shape in zip(paths, shapes):
            mask = np.zeros(shape, bool)
            rest = path[len(self.attention) + 1:] if path.startswith(self.attention + "/") else None
            if rest in _HEAD_LEAVES:
                axis = _HEAD_LEAVES[rest]
                if len(shape) <= axis or shape[axis] != num_heads:
                    raise ValueError(f"{self.label}: {path} has shape {shape}, without the head axis {axis} of "
                                     f"length {num_heads}")
                index = (slice(None),) * axis + (self.index,)
                mask[index] = True
            out.append(mask)
        return out

    def __str__(self):
        return self.label


@dataclasses.dataclass(frozen=True)
class Union(Selector):
    """Coordinates in either selection."""

    left: Selector
    right: Selector

    def leaf_masks(self, paths, shapes):
        return [a | b for a, b in zip(self.left.leaf_masks(paths, shapes), self.right.leaf_masks(paths, shapes))]

    def __str__(self):
        return f"({self.left} | {self.right})"


@dataclasses.dataclass(frozen=True)
class Intersection(Selector):
    """Coordinates in both selections."""

    left: Selector
    right: Selector

    def leaf_masks(self, paths, shapes):
        return [a & b for a, b in zip(self.left.leaf_masks(paths, shapes), self.right.leaf_masks(paths, shapes))]

    def __str__(self):
        return f"({self.left} & {self.right})"


@dataclasses.dataclass(frozen=True)
class Complement(Selector):
    """Every coordinate the selection leaves out."""

    inner: Selector

    def leaf_masks(self, paths, shapes):
        return [~m for m in self.inner.leaf_masks(paths, shapes)]

    def __str__(self):
        return f"~{self.inner}"


@dataclasses.dataclass(frozen=True, eq=False)
class Given(Selector):
    """A boolean pytree with the structure of the parameters (leaves broadcast to theirs)."""

    tree: object

    def leaf_masks(self, paths, shapes):
        leaves = jax.tree.leaves(self.tree)
        if len(leaves) != len(paths):
            raise ValueError(f"param_mask has {len(leaves)} leaves but params have {len(paths)}: a mask pytree needs "
                             "the structure of params")
        out = []
        for path, shape, leaf in zip(paths, shapes, leaves):
            try:
                out.append(np.broadcast_to(np.asarray(leaf) != 0, shape))
            except ValueError:
                raise ValueError(f"param_mask at {path} has shape {np.shape(leaf)}, which does not broadcast to the "
                                 f"parameter's shape {shape}") from None
        return out

    def mask(self, params):
        if jax.tree.structure(self.tree) != jax.tree.structure(params):
            raise ValueError("param_mask must be a regular expression, a selector or a pytree with the structure of "
                             f"params: got {jax.tree.structure(self.tree)}, params have {jax.tree.structure(params)}")
        return super().mask(params)

    def __str__(self):
        return "pytree"


def select(spec) -> Selector:
    """A :class:`Selector` from a selector, a string of the module's grammar, or a boolean pytree.

    ``None`` (``param_mask``'s default: sample everything) selects every parameter.
    """
    if spec is None:
        return Pattern(".*")
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        return Pattern(spec)
    return Given(spec)


def _index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def head(layer: int, index: int) -> Selector:
    """Attention head ``index`` of block ``layer`` (``blocks/<layer>/attn``, see the module docstring)."""
    layer, index = _index("layer", layer), _index("index", index)
    return Head(f"blocks/{layer}/attn", index, f"head({layer}, {index})")


def attention(layer: int) -> Selector:
    """All of block ``layer``'s attention: query, key, value and output kernels and biases."""
    layer = _index("layer", layer)
    return Subtree(f"blocks/{layer}/attn", f"attention({layer})")


def mlp(layer: int) -> Selector:
    """Block ``layer``'s MLP (an attention-only model has none: an error)."""
    layer = _index("layer", layer)
    return Subtree(f"blocks/{layer}/mlp", f"mlp({layer})")


def embedding(positional: bool = True) -> Selector:
    """The token embedding ``embed``, and the positional embedding ``pos_embed`` unless ``positional=False``."""
    tokens = Subtree("embed", "embedding()")
    return Union(tokens, Subtree("pos_embed", "embedding() (positional)")) if positional else tokens


def unembedding() -> Selector:
    """The unembedding ``unembed`` (kernel and bias)."""
    return Subtree("unembed", "unembedding()")


def selection(param_mask, params):
    """``param_mask`` (any form the module docstring lists) as a boolean pytree like ``params``.

    Raises ValueError if the selection is empty.
    """
    selector = select(param_mask)
    masks = selector.mask(params)
    if not any(np.any(m) for m in jax.tree.leaves(masks)):
        raise ValueError(f"param_mask={selector} selects no parameter")
    return masks


def coverage(param_mask, params) -> dict[str, tuple[int, int]]:
    """Per leaf path, ``(selected, size)``: how many of the leaf's parameters ``param_mask`` covers.

    ``params`` may be arrays or shapes (``jax.eval_shape`` of an init), so this runs before
    anything is sampled.
    """
    paths, shapes, _ = _leaves(params)
    masks = jax.tree.leaves(selection(param_mask, params))
    return {p: (int(np.sum(m)), int(np.prod(s, dtype=np.int64))) for p, s, m in zip(paths, shapes, masks)}


def describe_mask(param_mask, params) -> str:
    """A table of :func:`coverage`: per leaf the parameters selected out of its size, and the total.

    For ``head(1, 1) | "unembed"`` on a 2-layer model::

        (head(1, 1) | 'unembed'): 672 of 6,984 parameters (9.6 %)
          blocks/0/attn/key/bias              0 / 16
          ...
          blocks/1/attn/key/kernel          128 / 256
          ...
          unembed/kernel                    128 / 128
    """
    counts = coverage(param_mask, params)
    width = max(len(p) for p in counts)
    selected = sum(c for c, _ in counts.values())
    total = sum(s for _, s in counts.values())
    lines = [f"{select(param_mask)}: {selected:,} of {total:,} parameters ({100 * selected / total:.1f} %)"]
    lines += [f"  {p:<{width}}  {c:>9,} / {s:,}" for p, (c, s) in counts.items()]
    return "\n".join(lines)
