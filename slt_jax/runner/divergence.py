"""Divergent chains: how they are detected, and how they are reported (never averaged in)."""

import warnings
from typing import NamedTuple

import jax

from slt_jax.errors import DivergenceError, DivergenceWarning


class Divergence(NamedTuple):
    """A chain diverges at its first step whose minibatch loss is non-finite or runs away:
    ``nβ·(L_B(w_t) − ref_loss) > threshold``.

    Attributes:
      ref_loss: L_n(w*) of the gradient data.
      threshold: the largest plausible ``nβ·(L_B(w_t) − L_n(w*))``.
    """

    ref_loss: jax.Array
    threshold: jax.Array


def default_threshold(num_params: int, nbeta: float, batch_std: float) -> float:
    """A runaway bound no healthy chain reaches.

    λ ≤ d/2 for every model, so healthy draws of ``nβ·(L(w_t) − L(w*))`` stay within a few
    multiples of d; minibatch noise adds ``nβ·std(L_B(w*))``. The bound is
    ``10·d + 100 + 20·nβ·std(L_B(w*))``: far above both, far below a blow-up.
    """
    return 10.0 * num_params + 100.0 + 20.0 * nbeta * batch_std


def report(diverged_chains, diverged_at, num_chains: int, step_size, on_divergence: str):
    """Warn (or raise) naming the diverged chains and suggesting a smaller step size."""
    if not diverged_chains:
        return
    where = ", ".join(f"chain {c} at step {t}" for c, t in zip(diverged_chains, diverged_at))
    what = "All" if len(diverged_chains) == num_chains else f"{len(diverged_chains)} of"
    message = (
        f"{what} {num_chains} chains diverged ({where}): the loss became NaN/inf or ran away. "
        f"They are excluded from λ̂. Lower step_size (now {step_size:g}) or raise localization."
    )
    if on_divergence == "raise":
        raise DivergenceError(message)
    warnings.warn(message, DivergenceWarning, stacklevel=3)
