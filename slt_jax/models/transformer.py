"""A small decoder-only transformer (flax nnx) and the next-token loss, for λ̂ on token data.

The model of Hoogland et al. (arXiv:2402.02364) and of the per-head refined LLC of Wang et al.
(arXiv:2410.02984): token and learned positional embeddings, ``num_layers``
blocks of causal multi-head self-attention (``nnx.MultiHeadAttention``), each optionally followed
by an MLP and optionally pre-layer-normed, a final (optional) layer norm and an unembedding.
After ``nnx.to_pure_dict`` the parameters read::

    embed/embedding                          (vocab_size, d_model)
    pos_embed/embedding                      (context_length, d_model)
    blocks/<l>/attn_norm/{scale,bias}        (d_model,)                  layer_norm=True
    blocks/<l>/attn/{query,key,value}/kernel (d_model, num_heads, head_dim)
    blocks/<l>/attn/{query,key,value}/bias   (num_heads, head_dim)
    blocks/<l>/attn/out/kernel               (num_heads, head_dim, d_model)
    blocks/<l>/attn/out/bias                 (d_model,)
    blocks/<l>/mlp_norm/{scale,bias}         (d_model,)                  unless attention_only
    blocks/<l>/mlp/fc_in/{kernel,bias}       (d_model, mlp_width), (mlp_width,)
    blocks/<l>/mlp/fc_out/{kernel,bias}      (mlp_width, d_model), (d_model,)
    final_norm/{scale,bias}                  (d_model,)                  layer_norm=True
    unembed/{kernel,bias}                    (d_model, vocab_size), (vocab_size,)

(biases only with ``use_bias``; ``<l>`` is an integer key), so head h of layer l is the slice
``[:, h, :]`` of its query/key/value kernels, ``[h]`` of their biases and ``[h]`` of the output
kernel (:func:`slt_jax.selectors.head`).

What n counts. A batch is ``{"tokens": int (B, T), "mask"?: (B, T)}`` and its rows are
sequences: the samplers draw minibatches of sequences, so n is the number of sequences and the
default nβ = n / log n counts sequences. The loss of a sequence is its mean next-token
cross-entropy (nats per scored token), and the loss of a batch the mean over its sequences —
a per-row mean, as every sampler and ``full_batch_loss`` assume. λ̂ is invariant to the loss's
scale at a given nβ (the tempering absorbs it), so measuring per token rather than per sequence
changes nothing but the units; a user who wants nβ in tokens (n·(T−1)/log(n·(T−1)), say)
passes ``nbeta`` explicitly. Either way nβ is recorded with every estimate.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slt_jax.data.tokens import check_token_arrays


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The shape of a :class:`Transformer`.

    Attributes:
      vocab_size: number of token ids; inputs must lie in ``[0, vocab_size)``.
      context_length: the longest sequence the positional embedding covers.
      d_model: width of the residual stream.
      num_heads: attention heads per layer.
      num_layers: transformer blocks.
      head_dim: width of one head's query/key/value; default ``d_model // num_heads``.
      attention_only: no MLPs (the attention-only models of arXiv:2402.02364).
      mlp_width: hidden width of each MLP; default ``4·d_model``.
      layer_norm: pre-layer-norm before attention, MLP and unembedding.
      use_bias: biases in the attention, MLP, layer norms and unembedding.
      param_dtype: dtype of the parameters.
    """

    vocab_size: int
    context_length: int
    d_model: int
    num_heads: int
    num_layers: int
    head_dim: int | None = None
    attention_only: bool = False
    mlp_width: int | None = None
    layer_norm: bool = True
    use_bias: bool = True
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "num_heads", "num_layers"):
            _check_size(name, getattr(self, name))
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"head_dim: d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                                 "pass head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        _check_size("head_dim", self.head_dim)
        if self.mlp_width is None:
            object.__setattr__(self, "mlp_width", 4 * self.d_model)
        _check_size("mlp_width", self.mlp_width)


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")


class MLP(nnx.Module):
    """``fc_out(gelu(fc_in(x)))``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=config.use_bias, param_dtype=config.param_dtype, rngs=rngs)
        self.fc_in = nnx.Linear(config.d_model, config.mlp_width, **kw)
        self.fc_out = nnx.Linear(config.mlp_width, config.d_model, **kw)

    def __call__(self, x):
        return self.fc_out(jax.nn.gelu(self.fc_in(x)))


def _norm(config: TransformerConfig, rngs: nnx.Rngs):
    return nnx.LayerNorm(config.d_model, use_bias=config.use_bias, param_dtype=config.param_dtype, rngs=rngs)


class Block(nnx.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (pre-LN; norms and MLP optional)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if config.layer_norm:
            self.attn_norm = _norm(config, rngs)
        self.attn = nnx.MultiHeadAttention(
            config.num_heads, config.d_model, qkv_features=config.num_heads * config.head_dim,
            out_features=config.d_model, use_bias=config.use_bias, param_dtype=config.param_dtype,
            decode=False, deterministic=True, keep_rngs=False, rngs=rngs)
        if not config.attention_only:
            if config.layer_norm:
                self.mlp_norm = _norm(config, rngs)
            self.mlp = MLP(config, rngs=rngs)
        self.config = config

    def __call__(self, x, causal_mask):
        h = self.attn_norm(x) if self.config.layer_norm else x
        x = x + self.attn(h, mask=causal_mask)
        if not self.config.attention_only:
            h = self.mlp_norm(x) if self.config.layer_norm else x
            x = x + self.mlp(h)
        return x


class Transformer(nnx.Module):
    """A decoder-only transformer: ``tokens (B, T) -> logits (B, T, vocab_size)``.

    Position t's logits predict token t + 1 from tokens ``0..t`` (causal self-attention).
    The parameter layout is listed in the module docstring.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=config.param_dtype, rngs=rngs)
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, **kw)
        self.pos_embed = nnx.Embed(config.context_length, config.d_model, **kw)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        if config.layer_norm:
            self.final_norm = _norm(config, rngs)
        self.unembed = nnx.Linear(config.d_model, config.vocab_size, use_bias=config.use_bias, **kw)

    def __call__(self, tokens):
        """Logits ``(B, T, vocab_size)`` of ``tokens (B, T)``.

        Raises ValueError for a non-integer or non-2-D ``tokens``, T > ``context_length``, and
        (when ``tokens`` is concrete, not inside ``jit``) ids outside ``[0, vocab_size)``. Under
        ``jit`` an out-of-range id makes the logits NaN instead of wrapping around, so a loss on
        it is NaN (``estimate_llc`` then refuses to start); check data beforehand with
        :func:`slt_jax.data.check_tokens`.
        """
        config = self.config
        check_token_arrays(tokens, None, vocab_size=config.vocab_size, context_length=config.context_length,
                           name="tokens")
        tokens = tokens.astype(jnp.int32)
        valid = (tokens >= 0) & (tokens < config.vocab_size)
        x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
        x = jnp.where(valid[..., None], x, jnp.nan)  # jnp.take would wrap negative ids around
        causal_mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, causal_mask)
        if config.layer_norm:
            x = self.final_norm(x)
        return self.unembed(x)


def next_token_losses(logits, tokens):
    """Per-token next-token cross-entropy in nats, ``(B, T − 1)``, computed in float32.

    Entry ``[b, t]`` is ``−log softmax(logits[b, t])[tokens[b, t + 1]]``: the loss of predicting
    token t + 1 from tokens ``0..t``. No mask is applied (the per-token observables of
    arXiv:2509.26544 want every position); a target id outside ``[0, vocab_size)`` gives NaN.

    Args:
      logits: ``(B, T, vocab_size)``, any floating dtype (cast to float32 before the softmax, so
        a bfloat16 model still reduces in float32).
      tokens: integer ``(B, T)``.

    Returns:
      float32 ``(B, T − 1)``.
    """
    if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits of shape {logits.shape} do not fit tokens of shape {tokens.shape}: "
                         "need logits (B, T, vocab_size) for tokens (B, T)")
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:].astype(jnp.int32)
    valid = (targets >= 0) & (targets < logits.shape[-1])
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, jnp.nan)


def target_weights(tokens, mask=None):
    """The weight of each target, ``(B, T − 1)`` float32: ``mask[:, 1:]``, or ones.

    ``mask[b, t]`` refers to token t as a *target* (1 = score it); ``mask[:, 0]`` is ignored
    because token 0 is never predicted.
    """
    if mask is None:
        return jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32)
    if jnp.shape(mask) != tokens.shape:
        raise ValueError(f"mask has shape {jnp.shape(mask)} but tokens have shape {tokens.shape}: the loss mask "
                         "marks target positions of tokens and must have its shape")
    return jnp.asarray(mask)[:, 1:].astype(jnp.float32)


def sequence_losses(logits, tokens, mask=None):
    """Per-sequence loss ``(B,)``: the mean cross-entropy over each sequence's scored targets.

    A sequence with no scored target has loss 0 (it still counts as a row of the batch).

    Args:
      logits: ``(B, T, vocab_size)``.
      tokens: integer ``(B, T)``.
      mask: optional ``(B, T)``, 1 where token t is a target to score (see :func:`target_weights`).

    Returns:
      float32 ``(B,)`` in nats per scored token.
    """
    weights = target_weights(tokens, mask)
    total = jnp.sum(weights * next_token_losses(logits, tokens), axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def next_token_loss(logits, tokens, mask=None):
    """The batch's next-token loss in nats: the mean over sequences of :func:`sequence_losses`.

    Without a mask (or with masks that score equally many tokens in every sequence) this is the
    mean cross-entropy over all scored target tokens of the batch. With masks whose counts
    differ between sequences it weighs sequences equally rather than tokens: the pooled token
    mean would be a ratio estimator whose minibatch values are biased for L_n, whereas a mean
    over rows is what the samplers and ``full_batch_loss`` assume (n counts sequences; see the
    module docstring). Reduced in float32.
    """
    return jnp.mean(sequence_losses(logits, tokens, mask))
