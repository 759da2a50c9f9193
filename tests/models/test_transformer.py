"""The decoder-only transformer (slt_jax.models.transformer): layout, loss, input checks, and λ̂ on it.

One tiny model (1 attention-only layer, 2 heads, d_model 16, layer norms and biases) is trained
for a few hundred Adam steps on a random Markov chain over 8 tokens; every λ̂ below samples it
with the same settings (``RUN``) and a parameter mask, so one compiled program serves them all
(a mask is a traced input; ``".*"`` gives the full λ̂ through the same program).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import slt_jax
from slt_jax.groundtruth import regular_llc
from slt_jax.masks import path_string
from slt_jax.models import Transformer, TransformerConfig, from_nnx
from slt_jax.models.transformer import next_token_loss, next_token_losses, sequence_losses
from slt_jax.selectors import head

VOCAB, LENGTH, N = 8, 8, 1000
CONFIG = TransformerConfig(vocab_size=VOCAB, context_length=LENGTH, d_model=16, num_heads=2, num_layers=1,
                           attention_only=True)
NBETA = N / math.log(N)  # the default: n counts sequences
GAMMA = 100.0
# ε·(nβ·h_max + γ) ≈ 2e-4·(145·1.27 + 100) ≈ 0.06 on the unembedding (measured h_max = 1.27): a
# step-size bias of ~ε·a/4 ≈ 1.5 %; the slowest confined direction relaxes as exp(−ε·γ·t), so 250
# burn-in steps leave e^−5 of it. One program for every λ̂ here (see the module docstring).
RUN = dict(step_size=2e-4, localization=GAMMA, num_chains=8, num_burnin=250, num_draws=250, batch_size=16,
           chunk_size=250, progress=False)


def markov_tokens(seed, n, length, vocab):
    """Sequences of a Markov chain whose transition rows are Dirichlet(1) draws (numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.ones(vocab), vocab)
    tokens = np.empty((n, length), np.int32)
    tokens[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, length):
        cumulative = trans[tokens[:, t - 1]].cumsum(axis=1)
        tokens[:, t] = np.minimum((rng.random((n, 1)) > cumulative).sum(axis=1), vocab - 1)
    return jnp.asarray(tokens)


def adam(loss_fn, params, data, steps=300, learning_rate=1e-2):
    opt = optax.adam(learning_rate)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, state = carry
            grads = jax.grad(loss_fn)(p, data)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[0][0]

    return run(params)


@pytest.fixture(scope="module")
def trained():
    """(model, loss_fn, trained params, data)."""
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    loss_fn, params = from_nnx(model, loss="next_token")
    data = {"tokens": markov_tokens(1, N, LENGTH, VOCAB)}
    return model, loss_fn, adam(loss_fn, params, data), data


@pytest.fixture(scope="module")
def jitted_loss(trained):
    return jax.jit(trained[1])  # direct evaluations: one compiled program instead of op-by-op dispatch


def swap_heads(tree):
    """Heads 0 and 1 of layer 0 exchanged: q/k/v kernels on axis 1, their biases and the output kernel on 0."""
    tree = jax.tree.map(lambda x: x, tree)
    attn = tree["blocks"][0]["attn"]
    for name in ("query", "key", "value"):
        attn[name]["kernel"] = attn[name]["kernel"][:, ::-1]
        attn[name]["bias"] = attn[name]["bias"][::-1]
    attn["out"]["kernel"] = attn["out"]["kernel"][::-1]
    return tree


# --- layout and configuration -------------------------------------------------------------------

def abstract_paths(config):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {path_string(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_parameter_paths_read_naturally():
    config = TransformerConfig(vocab_size=11, context_length=6, d_model=12, num_heads=3, num_layers=2, head_dim=5,
                               mlp_width=20)
    paths = abstract_paths(config)
    block = {
        "attn_norm/scale": (12,), "attn_norm/bias": (12,),
        "attn/query/kernel": (12, 3, 5), "attn/query/bias": (3, 5),
        "attn/key/kernel": (12, 3, 5), "attn/key/bias": (3, 5),
        "attn/value/kernel": (12, 3, 5), "attn/value/bias": (3, 5),
        "attn/out/kernel": (3, 5, 12), "attn/out/bias": (12,),
        "mlp_norm/scale": (12,), "mlp_norm/bias": (12,),
        "mlp/fc_in/kernel": (12, 20), "mlp/fc_in/bias": (20,),
        "mlp/fc_out/kernel": (20, 12), "mlp/fc_out/bias": (12,),
    }
    expected = {"embed/embedding": (11, 12), "pos_embed/embedding": (6, 12), "final_norm/scale": (12,),
                "final_norm/bias": (12,), "unembed/kernel": (12, 11), "unembed/bias": (11,)}
    expected |= {f"blocks/{layer}/{k}": v for layer in (0, 1) for k, v in block.items()}
    assert paths == expected


def test_attention_only_without_norms_or_biases():
    config = TransformerConfig(vocab_size=7, context_length=4, d_model=8, num_heads=2, num_layers=1,
                               attention_only=True, layer_norm=False, use_bias=False)
    assert config.head_dim == 4 and config.mlp_width == 32
    assert abstract_paths(config) == {
        "embed/embedding": (7, 8), "pos_embed/embedding": (4, 8), "unembed/kernel": (8, 7),
        **{f"blocks/0/attn/{n}/kernel": (8, 2, 4) for n in ("query", "key", "value")},
        "blocks/0/attn/out/kernel": (2, 4, 8)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=10, num_heads=3), r"head_dim: d_model=10 is not divisible by num_heads=3"),
    (dict(num_layers=0), r"TransformerConfig.num_layers must be a positive integer, got 0"),
    (dict(vocab_size=2.5), r"TransformerConfig.vocab_size must be a positive integer, got 2.5"),
])
def test_bad_configurations_name_the_field(kwargs, match):
    settings = dict(vocab_size=8, context_length=8, d_model=16, num_heads=2, num_layers=1) | kwargs
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**settings)


# --- the loss ------------------------------------------------------------------------------------

@jax.jit
def losses_under_test(logits, tokens, mask, second_half):
    return dict(per_token=next_token_losses(logits, tokens), mean=next_token_loss(logits, tokens),
                per_sequence=sequence_losses(logits, tokens, mask), masked=next_token_loss(logits, tokens, mask),
                second_half=next_token_loss(logits, tokens, second_half))


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_optax_with_and_without_a_mask(seed):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3 * rng.normal(size=(5, 7, 6)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 6, (5, 7)), jnp.int32)
    mask = rng.random((5, 7)) < 0.6
    mask[0] = False  # row 0 scores nothing
    second_half = np.zeros((5, 7), bool)
    second_half[:, 4:] = True  # equal counts in every row
    got = losses_under_test(logits, tokens, mask, second_half)
    reference = np.asarray(jax.jit(optax.softmax_cross_entropy_with_integer_labels)(logits[:, :-1], tokens[:, 1:]))
    np.testing.assert_allclose(got["per_token"], reference, rtol=1e-6, atol=1e-6)  # (B, T − 1)
    np.testing.assert_allclose(got["mean"], reference.mean(), rtol=1e-6)

    weights = mask[:, 1:].astype(np.float64)  # mask[:, t] marks token t as a target
    per_sequence = (weights * reference).sum(1) / np.maximum(weights.sum(1), 1)
    np.testing.assert_allclose(got["per_sequence"], per_sequence, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["masked"], per_sequence.mean(), rtol=1e-6)
    assert got["per_sequence"][0] == 0.0
    np.testing.assert_allclose(got["second_half"], reference[:, 3:].mean(), rtol=1e-6)  # the pooled token mean


def test_the_loss_reduces_in_float32_and_an_out_of_range_target_is_nan():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5)), jnp.bfloat16)
    tokens = jnp.array([[0, 1, 2, 3], [4, 3, 2, 1]])
    assert jax.eval_shape(next_token_losses, logits, tokens).dtype == jnp.float32
    assert jax.eval_shape(next_token_loss, logits, tokens).dtype == jnp.float32
    bad = np.asarray(jax.jit(next_token_losses)(logits.astype(jnp.float32), tokens.at[1, 2].set(5)))
    assert np.isnan(bad[1, 1]) and np.isfinite(np.delete(bad.ravel(), 4)).all()


def test_from_nnx_next_token_gives_a_plain_dict_and_a_causal_model(trained, jitted_loss):
    model, _, params, data = trained
    assert type(params) is dict and type(params["blocks"]) is dict
    graphdef, state = nnx.split(model)
    logits_of = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = data["tokens"]  # the whole dataset: the shapes jitted_loss compiles for anyway
    logits = logits_of(state, tokens)
    changed = logits_of(state, tokens.at[:, 5].set((tokens[:, 5] + 1) % VOCAB))
    np.testing.assert_array_equal(changed[:, :5], logits[:, :5])  # positions before 5 cannot see it
    assert not np.allclose(changed[:, 5:], logits[:, 5:])
    init = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # the module itself is never trained
    np.testing.assert_allclose(jitted_loss(init, data), next_token_loss(logits, tokens), rtol=1e-6)
    assert float(jitted_loss(init, data)) > float(jitted_loss(params, data))


# --- bad input: clear errors before any sampling ----------------------------------------------------

@pytest.mark.parametrize("data, match", [
    ({"tokens": np.zeros((16, LENGTH), np.int32), "mask": np.ones((16, LENGTH + 1))},
     r"mask has shape \(16, 9\) but tokens have shape \(16, 8\)"),
    ({"tokens": np.zeros((16, LENGTH + 2), np.int32)},
     r"tokens has sequences of length 10, longer than context_length=8"),
    ({"tokens": np.zeros((16, LENGTH), np.float32)}, r"tokens must hold integer token ids, got dtype float32"),
    ({"x": np.zeros((16, LENGTH), np.int32)}, r"loss='next_token' takes batches \{'tokens'"),
])
def test_bad_batches_fail_before_sampling_naming_the_argument(trained, data, match):
    _, loss_fn, params, _ = trained
    with pytest.raises(ValueError, match=r"loss_fn\(params, batch\) failed on a batch of data: ValueError: " + match):
        slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(0), step_size=1e-4, localization=1.0,
                             batch_size=16, num_chains=1, num_draws=1, num_burnin=0, progress=False)


def test_out_of_range_ids_are_caught_on_concrete_data_and_poison_the_loss_under_jit(trained):
    model, loss_fn, params, data = trained
    bad = {"tokens": data["tokens"].at[3, 2].set(VOCAB)}  # data's shape: L_n(w*) reuses RUN's program
    with pytest.raises(ValueError, match=r"tokens holds token id 8, outside \[0, vocab_size=8\)"):
        model(bad["tokens"])  # eager: the ids are checked
    with pytest.raises(ValueError, match=r"data\['tokens'\] holds token id 8, outside \[0, vocab_size=8\)"):
        slt_jax.data.check_tokens(bad, CONFIG.vocab_size, CONFIG.context_length)
    with pytest.raises(ValueError, match=r"loss_fn is not finite at params"):  # traced: NaN, not a wrapped id
        slt_jax.estimate_llc(loss_fn, params, bad, jax.random.key(0), **RUN)


# --- λ̂ on the trained transformer -------------------------------------------------------------------

@pytest.fixture(scope="module")
def distinct_heads(trained):
    """The trained point with head 1's values ×3 and its output rows ÷3: the same function (so still
    trained), but at finite γ a different local geometry, so the two heads' refined λ̂ differ."""
    _, loss_fn, params, data = trained
    params = jax.tree.map(lambda x: x, params)
    attn = params["blocks"][0]["attn"]
    attn["value"]["kernel"] = attn["value"]["kernel"].at[:, 1].multiply(3.0)
    attn["value"]["bias"] = attn["value"]["bias"].at[1].multiply(3.0)
    attn["out"]["kernel"] = attn["out"]["kernel"].at[1].divide(3.0)
    return params


@pytest.mark.parametrize("seed", [0, 1])
def test_permuting_two_heads_permutes_their_refined_llc_and_keeps_the_full_llc(trained, jitted_loss,
                                                                              distinct_heads, seed):
    _, loss_fn, params, data = trained
    a = distinct_heads
    b = swap_heads(a)
    # Exact: the same loss, and head 1 of b is head 0 of a moved.
    np.testing.assert_allclose(jitted_loss(a, data), jitted_loss(params, data), rtol=1e-6)  # ×3, ÷3: no change
    np.testing.assert_allclose(jitted_loss(b, data), jitted_loss(a, data), rtol=1e-6)
    for mask_b, mask_a in zip(jax.tree.leaves(head(0, 1).mask(b)), jax.tree.leaves(swap_heads(head(0, 0).mask(a)))):
        np.testing.assert_array_equal(mask_b, mask_a)
    # Statistical: SGLD's noise is drawn per coordinate, so the same key does not give the same
    # chains once the coordinates are permuted — each pair below is two estimates of one number
    # with different noise, so their difference is bounded by 4 combined standard errors.
    def llc(params, mask):
        return slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(seed), param_mask=mask, **RUN)

    def assert_same(x, y):
        assert abs(x.llc_mean - y.llc_mean) < 4 * math.hypot(x.llc_se, y.llc_se), (x.llc_mean, y.llc_mean)

    a0, a1, b1 = llc(a, head(0, 0)), llc(a, head(0, 1)), llc(b, head(0, 1))
    assert a0.settings["num_sampled"] == 3 * (16 * 8 + 8) + 8 * 16
    assert_same(a0, b1)
    # The heads do differ (by more than 2 combined standard errors; measured: ~13 against ~16,
    # se ≈ 0.3), so the agreement above is the permutation and not two equal numbers.
    assert abs(a0.llc_mean - a1.llc_mean) > 2 * math.hypot(a0.llc_se, a1.llc_se), (a0.llc_mean, a1.llc_mean)
    assert_same(llc(a, ".*"), llc(b, ".*"))


@pytest.fixture(scope="module")
def unembedding_minimum(trained):
    """The trained point with the unembedding moved to the exact minimum of the restricted loss
    (convex in it: the logits are linear in it), and that loss's Hessian there."""
    _, loss_fn, params, data = trained
    flat, unravel = ravel_pytree(params["unembed"])
    restricted = lambda v: loss_fn({**params, "unembed": unravel(v)}, data)
    derivatives = jax.jit(lambda v: (jax.grad(restricted)(v), jax.hessian(restricted)(v)))
    for _ in range(4):  # Newton; lstsq steps along the softmax's null directions (a shift of every logit)
        grad, hess = (np.asarray(x, np.float64) for x in derivatives(flat))
        flat = flat - jnp.asarray(np.linalg.lstsq(hess, grad, rcond=1e-6)[0], flat.dtype)
    grad, hess = (np.asarray(x, np.float64) for x in derivatives(flat))
    assert np.linalg.norm(grad) < 1e-5
    return {**params, "unembed": unravel(flat)}, np.linalg.eigvalsh(0.5 * (hess + hess.T))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_unembedding_alone_reads_its_laplace_value(trained, unembedding_minimum, seed):
    _, loss_fn, _, data = trained
    params, eigenvalues = unembedding_minimum
    laplace = regular_llc(eigenvalues, NBETA, GAMMA)  # ½·Σ nβh/(nβh + γ), the restricted Hessian
    r = slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(seed), param_mask="unembed", **RUN)
    assert r.settings["num_sampled"] == 16 * VOCAB + VOCAB and r.nbeta == pytest.approx(NBETA)
    # The restricted loss is smooth and convex at its minimum, so its λ̂ is the Laplace value up
    # to the sampler's biases (step ~1.5 %, minibatch noise a few %, the loss's cubic terms) — the
    # 5 % — and the estimate's own noise, 4 standard errors.
    assert abs(r.llc_mean - laplace) < 4 * r.llc_se + 0.05 * laplace, (r.llc_mean, r.llc_se, laplace)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_compute_reads_the_float32_llc(trained, seed):
    _, loss_fn, params, data = trained
    full = slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(seed), param_mask=".*", **RUN)
    low = slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(seed), param_mask=".*",
                               compute_dtype=jnp.bfloat16, **RUN)
    assert low.settings["compute_dtype"] == "bfloat16" and not low.diverged_chains
    # Same key, so the chains differ only by bfloat16 rounding in the model: 4 combined standard
    # errors for the estimates' noise and 5 % for a precision bias.
    se = math.hypot(full.llc_se, low.llc_se)
    assert abs(low.llc_mean - full.llc_mean) < 4 * se + 0.05 * full.llc_mean, (low.llc_mean, full.llc_mean, se)
