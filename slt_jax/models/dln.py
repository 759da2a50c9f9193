"""Deep linear networks: the reference model with an exact learning coefficient.

Parameters are a list ``[W_1, …, W_L]`` with ``W_s`` of shape ``(H_s, H_{s-1})`` and
``f(x) = W_L ⋯ W_1 x``; the ground truth is `slt_jax.groundtruth.dln_learning_coefficient`
(Aoyagi 2024, used by Furman & Lau, arXiv:2402.03698).
"""

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax.groundtruth import _architecture


class DLNArchitecture(NamedTuple):
    """Widths ``(H_0, …, H_L)`` of a deep linear network and the rank r of its true product."""

    widths: tuple[int, ...]
    rank: int


def dln_forward(params, x):
    """Apply ``f(x) = W_L ⋯ W_1 x`` to a batch of inputs.

    Args:
      params: list ``[W_1, …, W_L]``, ``W_s`` of shape ``(H_s, H_{s-1})``.
      x: inputs of shape ``(batch, H_0)``.

    Returns:
      Outputs of shape ``(batch, H_L)``.
    """
    if len(params) == 0:
        raise ValueError("params must be a non-empty list of weight matrices")
    for s, w in enumerate(params):
        if jnp.ndim(w) != 2 or (s > 0 and w.shape[1] != params[s - 1].shape[0]):
            raise ValueError(
                f"params[{s}] has shape {jnp.shape(w)}: expected a matrix (H_{s + 1}, H_{s}) whose "
                "column count equals the previous layer's row count"
            )
    if jnp.ndim(x) != 2 or x.shape[1] != params[0].shape[1]:
        raise ValueError(f"x must have shape (batch, {params[0].shape[1]}), got {jnp.shape(x)}")
    for w in params:
        x = x @ w.T
    return x


def dln_loss(params, batch, sigma=1.0):
    """Mean Gaussian negative log-likelihood (nats) of a deep linear network on a batch.

    Per sample ``½‖y − f(x)‖²/σ² + (H_L/2)·log(2πσ²)``, so free energies and WBIC come out
    in nats; use ``functools.partial(dln_loss, sigma=...)`` for a ``loss_fn(params, batch)``.

    Args:
      params: list ``[W_1, …, W_L]``.
      batch: ``{"x": (batch, H_0), "y": (batch, H_L)}``.
      sigma: noise standard deviation σ.

    Returns:
      Scalar mean loss.
    """
    residual = batch["y"] - dln_forward(params, batch["x"])
    constant = 0.5 * residual.shape[1] * jnp.log(2 * jnp.pi * sigma**2)
    return 0.5 * jnp.mean(jnp.sum(residual**2, axis=1)) / sigma**2 + constant


def _host_rng(key) -> np.random.Generator:
    """A numpy generator seeded by a JAX key: host-side construction compiles nothing per shape."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def _orthonormal_columns(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def _log_uniform(rng: np.random.Generator, count: int, center: float) -> np.ndarray:
    """``count`` values log-uniform in ``[center/2, 2·center]``."""
    return center * np.exp(rng.uniform(-math.log(2), math.log(2), count))


def dln_teacher(key, widths, rank, *, scale=1.0, kind="aligned"):
    """True parameters of a deep linear network at which the local λ equals Aoyagi's λ.

    Aoyagi's λ is the minimum of the local one over the true parameters; the LLC at w*
    equals it only on the closure of a top-dimensional component of the fibre
    (docs/mathematics.md §5.3, arXiv:2402.03698 for the benchmark).

    - ``kind="aligned"``: the most singular point. Every layer has rank exactly r with
      aligned images, ``W_s = Q_s·diag(σ^{1/L})·Q_{s-1}ᵀ`` with ``Q_s`` random
      ``(H_s, r)`` orthonormal columns; the product ``Q_L diag(σ) Q_0ᵀ`` has singular values
      σ log-uniform in ``[scale/2, 2·scale]`` and every layer is balanced and
      well-conditioned. ``rank=0`` gives all-zero weights (the origin).
    - ``kind="generic"``: every layer full rank with random singular vectors and singular
      values log-uniform in ``scale^{1/L}·[1/2, 2]``; the product has rank ``min(widths)``,
      where the fibre is smooth and the local λ is ``r(H_0 + H_L − r)/2``. Only valid for
      ``rank == min(widths)``.

    Args:
      key: PRNG key.
      widths: ``(H_0, …, H_L)``.
      rank: rank r of the true product.
      scale: order of magnitude of the product's singular values (> 0).
      kind: ``"aligned"`` or ``"generic"``.

    Returns:
      ``[W_1, …, W_L]`` (float32, built in float64).
    """
    widths, rank = _architecture(widths, rank)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    depth = len(widths) - 1
    rng = _host_rng(key)
    if kind == "aligned":
        frames = [_orthonormal_columns(rng, h, rank) for h in widths]
        layer_values = _log_uniform(rng, rank, scale) ** (1 / depth)
        layers = [(q_out * layer_values) @ q_in.T for q_in, q_out in zip(frames, frames[1:])]
    elif kind == "generic":
        if rank != min(widths):
            raise ValueError(
                f"kind='generic' needs rank == min(widths) = {min(widths)}, got rank={rank}: full-rank "
                "layers multiply to a product of rank min(widths), and a generic point of a lower-rank "
                "fibre lies on a lower-dimensional component whose local λ exceeds Aoyagi's; use "
                "kind='aligned'"
            )
        layers = []
        for h_in, h_out in zip(widths, widths[1:]):
            inner = min(h_in, h_out)
            u, v = _orthonormal_columns(rng, h_out, inner), _orthonormal_columns(rng, h_in, inner)
            layers.append((u * _log_uniform(rng, inner, scale ** (1 / depth))) @ v.T)
    else:
        raise ValueError(f"kind must be 'aligned' or 'generic', got {kind!r}")
    return [jnp.asarray(w, dtype=jnp.float32) for w in layers]


def dln_data(key, teacher, n, *, input_scale=1.0, noise=0.0, input_dist="normal"):
    """Sample a regression dataset from a teacher deep linear network.

    Furman & Lau (arXiv:2402.03698) use ``input_dist="uniform"``, ``input_scale=10``,
    ``noise=0`` (noise-free outputs make the teacher an exact minimum of the loss).

    Args:
      key: PRNG key.
      teacher: ``[W_1, …, W_L]``.
      n: number of samples.
      input_scale: standard deviation (``"normal"``) or half-width (``"uniform"``,
        ``U(−input_scale, input_scale)``) of each input coordinate.
      noise: standard deviation of Gaussian noise added to the outputs.
      input_dist: ``"normal"`` or ``"uniform"``.

    Returns:
      ``{"x": (n, H_0), "y": (n, H_L)}``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite positive number, got {input_scale!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite non-negative number, got {noise!r}")
    key_x, key_noise = jax.random.split(key)
    shape = (n, teacher[0].shape[1])
    if input_dist == "normal":
        x = input_scale * jax.random.normal(key_x, shape)
    elif input_dist == "uniform":
        x = jax.random.uniform(key_x, shape, minval=-input_scale, maxval=input_scale)
    else:
        raise ValueError(f"input_dist must be 'normal' or 'uniform', got {input_dist!r}")
    y = dln_forward(teacher, x)
    return {"x": x, "y": y + noise * jax.random.normal(key_noise, y.shape)}


def _int_range(value, name: str) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
        or not 1 <= value[0] <= value[1]
    ):
        raise ValueError(f"{name} must be a pair (low, high) of integers with 1 <= low <= high, got {value!r}")
    return int(value[0]), int(value[1])


def random_dln(key, *, depth_range, width_range, rank_cut_prob=0.5) -> DLNArchitecture:
    """Draw a deep-linear-network architecture and true rank per Furman & Lau's protocol.

    Depth ``L ~ U{depth_range}``, each of the ``L + 1`` widths ``~ U{width_range}`` (ranges
    inclusive); each true matrix ``W_s``, with probability ``rank_cut_prob``, has its rank
    cut from ``min(H_s, H_{s-1})`` to ``U{0, …, min(H_s, H_{s-1}) − 1}``; r is the rank of
    the product of generic matrices with those ranks, i.e. the smallest layer rank
    (arXiv:2402.03698, App. E). Build the teacher with
    ``dln_teacher(key, widths, r, kind="aligned")`` so that the local λ at it equals
    ``dln_learning_coefficient(widths, r)``; a generic teacher with cut layer ranks sits on
    a lower-dimensional component of the fibre where the local λ is larger.

    Args:
      key: PRNG key.
      depth_range: ``(low, high)`` number of layers L, inclusive.
      width_range: ``(low, high)`` layer width, inclusive.
      rank_cut_prob: probability that each layer's rank is cut.

    Returns:
      ``DLNArchitecture(widths, rank)`` of Python ints.
    """
    depth_low, depth_high = _int_range(depth_range, "depth_range")
    width_low, width_high = _int_range(width_range, "width_range")
    if not 0 <= rank_cut_prob <= 1:
        raise ValueError(f"rank_cut_prob must lie in [0, 1], got {rank_cut_prob!r}")
    rng = _host_rng(key)
    depth = int(rng.integers(depth_low, depth_high + 1))
    widths = tuple(int(h) for h in rng.integers(width_low, width_high + 1, depth + 1))
    full = np.array([min(h_in, h_out) for h_in, h_out in zip(widths, widths[1:])])
    cut = rng.random(depth) < rank_cut_prob
    ranks = np.where(cut, rng.integers(0, full), full)
    return DLNArchitecture(widths, int(ranks.min()))
