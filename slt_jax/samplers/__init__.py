"""Sampler kernels, each a pure ``(init, step)`` pair (see :mod:`slt_jax.samplers.base`)."""

from slt_jax.samplers.base import KernelFactory, SamplingAlgorithm
from slt_jax.samplers.sgld import SGLD, SGLDState, sgld

KERNELS = {SGLD.name: SGLD}


def get_kernel(sampler) -> KernelFactory:
    """Look a kernel factory up by name (or pass a :class:`KernelFactory` through)."""
    if isinstance(sampler, KernelFactory):
        return sampler
    if sampler not in KERNELS:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(KERNELS)}")
    return KERNELS[sampler]


__all__ = ["KERNELS", "KernelFactory", "SGLD", "SGLDState", "SamplingAlgorithm", "get_kernel", "sgld"]
