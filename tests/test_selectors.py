"""Weight restrictions for transformers (slt_jax.selectors): grammar, head slices, errors, counts.

All on abstract parameters (``nnx.eval_shape``): selectors need shapes only, so nothing compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slt_jax
from slt_jax import masks, selectors
from slt_jax.models.transformer import Transformer, TransformerConfig
from slt_jax.selectors import attention, describe_mask, embedding, head, mlp, unembedding

CONFIG = TransformerConfig(vocab_size=11, context_length=6, d_model=12, num_heads=3, num_layers=2, head_dim=5)
ATTN_ONLY = TransformerConfig(vocab_size=7, context_length=4, d_model=8, num_heads=2, num_layers=1,
                              attention_only=True, layer_norm=False, use_bias=False)


def abstract_params(config):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def params():
    return abstract_params(CONFIG)


def by_path(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {masks.path_string(p): np.asarray(x) for p, x in leaves}


def selected(selector, params):
    return {p: m for p, m in by_path(selectors.selection(selector, params)).items() if m.any()}


def test_a_head_is_its_slice_of_query_key_value_and_output(params):
    chosen = selected(head(1, 2), params)
    assert sorted(chosen) == [f"blocks/1/attn/{n}/{k}" for n, k in
                              [("key", "bias"), ("key", "kernel"), ("out", "kernel"), ("query", "bias"),
                               ("query", "kernel"), ("value", "bias"), ("value", "kernel")]]
    for name in ("query", "key", "value"):
        kernel = chosen[f"blocks/1/attn/{name}/kernel"]  # (d_model, heads, head_dim)
        assert kernel.shape == (12, 3, 5) and kernel[:, 2].all() and not kernel[:, :2].any()
        bias = chosen[f"blocks/1/attn/{name}/bias"]  # (heads, head_dim)
        assert bias[2].all() and not bias[:2].any()
    out = chosen["blocks/1/attn/out/kernel"]  # (heads, head_dim, d_model)
    assert out.shape == (3, 5, 12) and out[2].all() and not out[:2].any()


@pytest.mark.parametrize("layer", [0, 1])
def test_the_heads_and_the_rest_partition_every_parameter_exactly_once(params, layer):
    heads = [by_path(head(layer, h).mask(params)) for h in range(CONFIG.num_heads)]
    rest = by_path((~(head(layer, 0) | head(layer, 1) | head(layer, 2))).mask(params))
    for path, other in rest.items():
        total = sum(h[path].astype(int) for h in heads) + other.astype(int)
        np.testing.assert_array_equal(total, 1, err_msg=path)
    # Within the layer's attention only the output bias belongs to no head.
    attn = by_path(attention(layer).mask(params))
    for path, inside in attn.items():
        covered = sum(h[path].astype(int) for h in heads)
        expected = 0 if path.endswith("attn/out/bias") else inside.astype(int)
        np.testing.assert_array_equal(covered, expected, err_msg=path)


def test_describe_mask_counts_match_the_masks(params):
    selector = head(0, 1) | mlp(1) | "unembed"
    counts = selectors.coverage(selector, params)
    sums = {p: int(m.sum()) for p, m in by_path(selectors.selection(selector, params)).items()}
    assert {p: c for p, (c, _) in counts.items()} == sums
    assert all(size == int(np.prod(np.shape(x))) for (_, size), x in zip(counts.values(), jax.tree.leaves(params)))
    d, hd = CONFIG.d_model, CONFIG.head_dim
    w = CONFIG.mlp_width
    head_size = 3 * (d * hd + hd) + hd * d
    expected = head_size + (d * w + w + w * d + d) + (d * CONFIG.vocab_size + CONFIG.vocab_size)
    text = describe_mask(selector, params)
    total = sum(size for _, size in counts.values())
    assert text.splitlines()[0] == f"(({selector.left.left} | mlp(1)) | 'unembed'): {expected:,} of {total:,} " \
                                   f"parameters ({100 * expected / total:.1f} %)"
    assert sum(sums.values()) == expected
    assert "  blocks/0/attn/out/kernel" in text and f"{hd * d:>9,} / {CONFIG.num_heads * hd * d:,}" in text


def test_strings_regex_then_prefix_then_head(params):
    regex = selected("blocks/0/attn/.*/kernel", params)
    assert sorted(regex) == [f"blocks/0/attn/{n}/kernel" for n in ("key", "out", "query", "value")]
    assert selected("blocks/1/mlp", params).keys() == selected(mlp(1), params).keys()
    assert sorted(selected("embed", params)) == ["embed/embedding"]  # a path component, not pos_embed
    assert sorted(selected(embedding(), params)) == ["embed/embedding", "pos_embed/embedding"]
    assert sorted(selected(embedding(positional=False), params)) == ["embed/embedding"]
    assert sorted(selected("unembed", params)) == sorted(selected(unembedding(), params)) == \
        ["unembed/bias", "unembed/kernel"]
    for path, m in by_path(selectors.selection("blocks/1/attn/head/2", params)).items():
        np.testing.assert_array_equal(m, by_path(head(1, 2).mask(params))[path])


def test_composition_with_and_or_not_and_strings(params):
    kernels = selected(attention(0) & ".*kernel", params)
    assert sorted(kernels) == [f"blocks/0/attn/{n}/kernel" for n in ("key", "out", "query", "value")]
    assert all(m.all() for m in kernels.values())
    left = selected("unembed" | head(0, 0), params)  # a string on the left
    assert sorted(left) == sorted(selected(head(0, 0) | unembedding(), params))
    nothing_but_embed = selected(~(~embedding()), params)
    assert sorted(nothing_but_embed) == ["embed/embedding", "pos_embed/embedding"]
    everything_else = by_path((~embedding()).mask(params))
    assert not everything_else["embed/embedding"].any() and everything_else["unembed/kernel"].all()


def test_a_boolean_pytree_still_works_and_composes(params):
    tree = jax.tree.map(lambda x: False, params)
    tree["unembed"]["bias"] = True
    assert sorted(selected(tree, params)) == ["unembed/bias"]
    with pytest.raises(ValueError, match="selects no parameter"):
        selectors.selection(head(0, 1) & tree, params)
    assert sorted(selected(selectors.select(tree) | "embed", params)) == ["embed/embedding", "unembed/bias"]
    assert sorted(selected(tree | head(0, 1), params)) == sorted(selected(head(0, 1), params)) + ["unembed/bias"]


def test_resolve_mask_turns_selectors_into_float_masks_inside_arrays():
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(ATTN_ONLY))
    resolved = masks.resolve_mask(head(0, 1), params)
    kernel = resolved["blocks"][0]["attn"]["query"]["kernel"]
    assert kernel.dtype == jnp.float32 and float(kernel[:, 1].min()) == 1.0 and float(kernel[:, 0].max()) == 0.0
    assert masks.num_sampled(resolved, params) == 4 * ATTN_ONLY.d_model * ATTN_ONLY.head_dim
    assert masks.num_sampled(masks.resolve_mask("blocks/0/attn/head/1", params), params) == \
        masks.num_sampled(resolved, params)


@pytest.mark.parametrize("selector, match", [
    ("blocks/0/atn", r"param_mask='blocks/0/atn' matches no parameter path, as a regular expression or as a "
                     r"path prefix; the paths are blocks/0/attn/key/bias"),
    (head(0, 3), r"head\(0, 3\): head index 3 is out of range; 'blocks/0/attn' has 3 heads \(0…2\)"),
    ("blocks/1/attn/head/7", r"'blocks/1/attn/head/7': head index 7 is out of range; 'blocks/1/attn' has 3 heads"),
    (head(2, 0), r"head\(2, 0\): layer 2 does not exist; the model has layers \[0, 1\]"),
    (attention(5), r"attention\(5\): layer 5 does not exist; the model has layers \[0, 1\]"),
    ("blocks/4/mlp", r"param_mask='blocks/4/mlp' matches no parameter path"),
    (head(0, 1) | "typo", r"param_mask='typo' matches no parameter path"),  # a bad part of a union
    (attention(0) & mlp(0), r"param_mask=\(attention\(0\) & mlp\(0\)\) selects no parameter"),
    ("embed/embedding/head/0", r"'embed/embedding' is not a multi-head attention"),
])
def test_selection_errors_name_the_selector(params, selector, match):
    with pytest.raises(ValueError, match=match):
        selectors.selection(selector, params)


def test_an_mlp_of_an_attention_only_model_is_an_error():
    with pytest.raises(ValueError, match=r"mlp\(0\) selects nothing: no parameter path is or starts with "
                                         r"'blocks/0/mlp/'"):
        selectors.selection(mlp(0), abstract_params(ATTN_ONLY))


@pytest.mark.parametrize("make, match", [
    (lambda: head(-1, 0), r"layer must be a non-negative integer, got -1"),
    (lambda: head(0, 1.5), r"index must be a non-negative integer, got 1.5"),
    (lambda: mlp("0"), r"layer must be a non-negative integer, got '0'"),
])
def test_helpers_check_their_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_mask_pytree_of_the_wrong_structure_is_an_error(params):
    with pytest.raises(ValueError, match="param_mask must be a regular expression, a selector or a pytree with "
                                         "the structure of params"):
        selectors.selection({"unembed": True}, params)


def test_public_names():
    assert slt_jax.head is head and slt_jax.describe_mask is describe_mask and slt_jax.selectors is selectors
    assert {"head", "attention", "mlp", "embedding", "unembedding", "describe_mask", "select"} <= set(slt_jax.__all__)


def test_none_selects_everything_as_param_mask_none_samples_everything(params):
    counts = selectors.coverage(None, params)
    assert all(c == size for c, size in counts.values())
    assert describe_mask(None, params).startswith("'.*': ")
