"""Sampler kernels, each a pure ``(init, step)`` pair (see :mod:`slt_jax.samplers.base`)."""

from slt_jax.samplers.base import KernelFactory, SamplingAlgorithm
from slt_jax.samplers.rmsprop_sgld import RMSPROP_SGLD, RMSPropSGLDState, rmsprop_sgld, rmsprop_sgld_kernel
from slt_jax.samplers.sgld import SGLD, SGLD_RADEMACHER, SGLDState, sgld, sgld_kernel
from slt_jax.samplers.sgnht import SGNHT, SGNHTState, sgnht, sgnht_kernel

KERNELS = {kernel.name: kernel for kernel in (SGLD, SGLD_RADEMACHER, RMSPROP_SGLD, SGNHT)}


def get_kernel(sampler) -> KernelFactory:
    """Look a kernel factory up by name (or pass a :class:`KernelFactory` through)."""
    if isinstance(sampler, KernelFactory):
        return sampler
    if sampler not in KERNELS:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(KERNELS)}")
    return KERNELS[sampler]


__all__ = [
    "KERNELS", "KernelFactory", "RMSPROP_SGLD", "RMSPropSGLDState", "SGLD", "SGLDState", "SGLD_RADEMACHER",
    "SGNHT", "SGNHTState", "SamplingAlgorithm", "get_kernel", "rmsprop_sgld", "rmsprop_sgld_kernel", "sgld",
    "sgld_kernel", "sgnht", "sgnht_kernel",
]
