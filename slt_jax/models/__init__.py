"""Model adapters and reference models (deep linear networks, toy singular potentials, a transformer)."""

from slt_jax.models.adapters import (cross_entropy, from_function, from_linen, from_nnx, gaussian_nll, mse,
                                     per_token_loss)
from slt_jax.models.dln import DLNArchitecture, dln_data, dln_forward, dln_loss, dln_teacher, random_dln
from slt_jax.models.toys import TOY_NAMES, ToyModel, ToyPotential, toy_model, toy_potential
from slt_jax.models.transformer import (
    Transformer,
    TransformerConfig,
    next_token_loss,
    next_token_losses,
    sequence_losses,
    target_weights,
)

__all__ = [
    "DLNArchitecture", "TOY_NAMES", "ToyModel", "ToyPotential", "Transformer", "TransformerConfig",
    "cross_entropy", "dln_data", "dln_forward", "dln_loss", "dln_teacher", "from_function", "from_linen",
    "from_nnx", "gaussian_nll", "mse", "next_token_loss", "next_token_losses", "per_token_loss", "random_dln",
    "sequence_losses", "target_weights", "toy_model", "toy_potential",
]
