"""The localized tempered posterior p(w | w*, β, γ) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²).

Lau et al., arXiv:2308.12108 (docs/mathematics.md §1). The posterior owns its maths: the
gradient of its potential ``U(w) = nβ·L(w) + γ/2·‖w − w*‖²`` (what every kernel's drift is
made of), the potential itself relative to w* (for Metropolis checks and NUTS), and which
coordinates are sampled (the mask of a weight-refined LLC). Kernels call these and keep only
their update rule, as blackjax's ``sgmcmc`` splits gradient estimators from integrators.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class LocalPosterior(NamedTuple):
    """Traced parameters of the localized tempered posterior.

    Attributes:
      center: w*, where the LLC is measured.
      nbeta: nβ, the inverse temperature times n (default n / log n).
      localization: γ, the strength of the Gaussian pull towards w*.
      mask: optional 0/1 pytree like ``center``: which coordinates are sampled.
    """

    center: PyTree
    nbeta: jax.Array
    localization: jax.Array
    mask: PyTree = None

    def force(self, position, loss_grad):
        """``∇U(w) = nβ·∇L(w) + γ·(w − w*)`` given the loss gradient ``∇L`` at ``position``.

        Not masked: kernels mask their increments (:meth:`masked`), since some (RMSProp-SGLD)
        scale the force per coordinate first.
        """
        return jax.tree.map(lambda w, w0, g: self.nbeta * g + self.localization * (w - w0),
                            position, self.center, loss_grad)

    def potential(self, loss, center_loss, position):
        """``U(w) − U(w*) = nβ·(L(w) − L(w*)) + γ/2·‖w − w*‖²`` (relative to w*, which keeps
        float32 energies small)."""
        return self.nbeta * (loss - center_loss) + 0.5 * self.localization * self.sq_distance(position)

    def masked(self, tree):
        """``tree`` with the frozen coordinates zeroed (itself when everything is sampled)."""
        if self.mask is None:
            return tree
        return jax.tree.map(jnp.multiply, tree, self.mask)

    def sampled(self):
        """The 0/1 pytree of sampled coordinates (ones when there is no mask)."""
        return jax.tree.map(jnp.ones_like, self.center) if self.mask is None else self.mask

    def num_sampled(self):
        """How many coordinates are sampled (a traced count when the mask is traced)."""
        return sum(jnp.sum(m != 0) for m in jax.tree.leaves(self.sampled()))

    def sq_distance(self, position):
        """``‖w − w*‖²`` over every coordinate."""
        sq = jax.tree.map(lambda w, c: jnp.sum(jnp.square(w - c)), position, self.center)
        return sum(jax.tree.leaves(sq))


def default_nbeta(n: int) -> float:
    """nβ = n / log n, i.e. β* = 1/log n (Watanabe's WBIC temperature, arXiv:1208.6338); 1 for n ≤ 1."""
    return n / math.log(n) if n > 1 else 1.0
