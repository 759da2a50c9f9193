"""slt-jax: Singular Learning Theory estimation at scale in JAX."""

from slt_jax.divergence import DivergenceError, DivergenceWarning
from slt_jax.estimate import estimate_llc
from slt_jax.results import LLCResult

__all__ = ["DivergenceError", "DivergenceWarning", "LLCResult", "estimate_llc"]
