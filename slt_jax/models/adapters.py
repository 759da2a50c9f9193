"""Turn a model into the pure ``(loss_fn, params)`` pair the samplers need, in one call.

``loss_fn(params, batch)`` returns the mean per-sample loss over ``batch``; ``params`` is a
plain nested dict of arrays (what Orbax saves and restores without surprises).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from slt_jax.models.transformer import next_token_loss, next_token_losses


def mse(pred, target):
    """Per-sample squared error, averaged over the output dimensions."""
    err = jnp.square(pred - target)
    return err.reshape(err.shape[0], -1).mean(axis=1)


def gaussian_nll(sigma: float = 1.0) -> Callable:
    """Per-sample Gaussian negative log-likelihood in nats, ``½‖y − f‖²/σ² + (D/2)·log 2πσ²``."""

    def nll(pred, target):
        err = jnp.square(pred - target).reshape(pred.shape[0], -1)
        dim = err.shape[1]
        return 0.5 * err.sum(axis=1) / sigma**2 + 0.5 * dim * math.log(2 * math.pi * sigma**2)

    return nll


def cross_entropy(logits, labels):
    """Per-sample softmax cross-entropy with integer labels, in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


LOSSES = {"mse": mse, "gaussian_nll": gaussian_nll(1.0), "cross_entropy": cross_entropy}


def _per_sample(loss) -> Callable:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {sorted(LOSSES)} (or pass a callable; from_nnx also "
                         "takes 'next_token')")
    return LOSSES[loss]


def from_function(apply_fn, params, loss="mse", *, inputs="x", targets="y"):
    """A plain ``apply_fn(params, x) -> predictions`` and a per-sample loss.

    Args:
      apply_fn: the model as a pure function.
      params: its parameters (any pytree of float arrays).
      loss: ``"mse"``, ``"gaussian_nll"`` (σ = 1, nats), ``"cross_entropy"``, or a callable
        ``loss(pred, target) -> (batch,)`` of per-sample losses.
      inputs, targets: where the batch keeps inputs and targets (dict keys or tuple indices).

    Returns:
      ``(loss_fn, params)``.
    """
    per_sample = _per_sample(loss)

    def loss_fn(p, batch):
        return jnp.mean(per_sample(apply_fn(p, batch[inputs]), batch[targets]))

    return loss_fn, params


def _next_token(model, batch):
    if not isinstance(batch, dict) or "tokens" not in batch:
        kind = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"loss='next_token' takes batches {{'tokens': (B, T) ids, 'mask'?: (B, T)}}, got {kind}")
    return next_token_loss(model(batch["tokens"]), batch["tokens"], batch.get("mask"))


def from_nnx(module: nnx.Module, loss="mse", *, inputs="x", targets="y"):
    """A flax nnx module; its ``nnx.Param`` variables are sampled, everything else is fixed.

    The module is switched to evaluation mode (dropout off, batch-norm statistics frozen) so
    the loss is a pure function of the parameters.

    Args:
      module: the model.
      loss: as for :func:`from_function`, or ``"next_token"`` for a language model
        ``tokens (B, T) -> logits (B, T, vocab)`` on token batches ``{"tokens", "mask"?}``
        (``inputs`` and ``targets`` unused): the mean over sequences of each sequence's mean
        next-token cross-entropy in nats, reduced in float32
        (:func:`slt_jax.models.transformer.next_token_loss`; there n counts sequences).
      inputs, targets: where the batch keeps inputs and targets.

    Returns:
      ``(loss_fn, params)`` with ``params`` a plain nested dict.
    """
    module.eval()
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    if loss == "next_token":
        batch_loss = _next_token
    else:
        per_sample = _per_sample(loss)
        batch_loss = lambda model, batch: jnp.mean(per_sample(model(batch[inputs]), batch[targets]))

    def loss_fn(p, batch):
        params = jax.tree.map(lambda x: x, state)  # a fresh copy: the template is never mutated
        nnx.replace_by_pure_dict(params, p)
        return batch_loss(nnx.merge(graphdef, params, rest), batch)

    return loss_fn, nnx.to_pure_dict(state)


def per_token_loss(module: nnx.Module) -> Callable:
    """Per-token next-token losses of a language model, for per-token observables.

    ``fn(params, batch) -> (B, T − 1)`` float32 cross-entropies in nats
    (:func:`slt_jax.models.transformer.next_token_losses`) with the parameters of
    ``from_nnx(module, loss="next_token")``: the ``per_sample_loss`` of
    :func:`slt_jax.susceptibilities` (per-token probe sets and attribution scores) and of
    :func:`slt_jax.bayesian_influence` (per-token queries). No loss mask is applied: on an
    unmasked batch the mean of the entries is the ``next_token`` loss.
    """
    module.eval()
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)

    def fn(p, batch):
        if not isinstance(batch, dict) or "tokens" not in batch:
            kind = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"per_token_loss takes batches {{'tokens': (B, T) ids}}, got {kind}")
        params = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(params, p)
        return next_token_losses(nnx.merge(graphdef, params, rest)(batch["tokens"]), batch["tokens"])

    return fn


def from_linen(module, variables, loss="mse", *, inputs="x", targets="y", method=None):
    """A flax linen module and its variables; the ``"params"`` collection is sampled.

    Other collections (e.g. ``batch_stats``) are held fixed; call ``module.apply`` in
    inference mode through ``method`` or module attributes if it has a training flag.

    Returns:
      ``(loss_fn, params)``.
    """
    if "params" not in variables:
        raise ValueError(f"variables has no 'params' collection (found {sorted(variables)})")
    rest = {k: v for k, v in variables.items() if k != "params"}
    per_sample = _per_sample(loss)

    def loss_fn(p, batch):
        pred = module.apply({"params": p, **rest}, batch[inputs], method=method)
        return jnp.mean(per_sample(pred, batch[targets]))

    return loss_fn, variables["params"]
