"""Chains and data over devices: a ``Mesh`` with a ``"chains"`` axis and an optional ``"data"`` axis.

The chain runner is one program for any number of devices: :func:`shard_chains` splits the
chain axis over the mesh's ``"chains"`` axis with ``jax.shard_map``; each device ``vmap``s
its own chains and scans over steps. Chain ``i`` draws its random numbers from
``fold_in(key, i)`` alone, so the same key gives the same chains on 1, 2, 4 or 8 devices (to
float rounding: XLA may fuse a vmap over one chain differently from one over eight). When the
chains do not divide over the devices, padding chains run beside them and are dropped.

The ``"data"`` axis shards the dataset's rows when it is too large to replicate. Each data
shard draws ``batch_size / D`` of the minibatch's rows, uniformly with replacement from its own
``n / D`` rows, with the key ``fold_in(key, shard)``: a stratified minibatch. With equal shards
the mean of the D shard means is unbiased for L_n (and its variance is at most that of a
uniform draw of ``batch_size`` rows). That mean is formed with ``lax.pmean`` *inside* the
differentiated loss: the gradient with respect to the position (the same on every data shard)
is then the mean of the shard gradients, because JAX transposes the position's implicit
broadcast over the data axis into a ``psum``. ``check_vma=True`` turns a wrong recipe — say,
differentiating one shard's own loss — into a type error instead of one shard's gradient.
Minibatches with a data axis differ from those on one device, so runs with D > 1 agree with
single-device runs statistically, not draw by draw.
"""

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slt_jax.data import batches

CHAINS = "chains"
DATA = "data"
REPLICATED = PartitionSpec()


def make_mesh(devices: int | Sequence[Any] | None = None, *, data: int = 1) -> Mesh:
    """A mesh with axes ``("chains", "data")`` over ``devices``.

    Args:
      devices: a device count (the first that many of this process's
        ``jax.local_devices()``), a sequence of devices, or ``None`` for the first device only.
      data: how many devices share one group of chains by splitting the dataset; must divide
        the number of devices. With ``data=1`` the mesh has the ``"chains"`` axis alone.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(devices / data, data)``.
    """
    # Local devices: a run gathers its draws on this host, which needs every shard addressable.
    available = jax.local_devices()
    if devices is None:
        chosen = available[:1]
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices={devices} must be between 1 and the {len(available)} available")
        chosen = available[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices is an empty sequence")
    if not isinstance(data, (int, np.integer)) or data < 1 or len(chosen) % data:
        raise ValueError(f"data={data!r} must be a positive divisor of the {len(chosen)} devices")
    if data == 1:
        return Mesh(np.array(chosen), (CHAINS,))
    return Mesh(np.array(chosen).reshape(len(chosen) // data, data), (CHAINS, DATA))


def resolve_mesh(mesh: Mesh | None = None, devices: int | Sequence[Any] | None = None) -> Mesh:
    """The mesh a run uses: ``mesh`` as given (checked), else :func:`make_mesh` of ``devices``."""
    if mesh is not None and devices is not None:
        raise ValueError("pass either mesh or devices, not both")
    if mesh is None:
        mesh = make_mesh(devices)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = set(mesh.axis_names) - {CHAINS, DATA}
    if unknown:
        raise ValueError(f"mesh has axes {sorted(unknown)}; its axes must be named {CHAINS!r} and/or {DATA!r}")
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError("the mesh spans devices of other processes: a run gathers its draws on one host, "
                         "so run one estimate per host (keys fold_in(key, jax.process_index())) and pool them")
    return mesh


def axis_size(mesh: Mesh, name: str) -> int:
    """The size of mesh axis ``name`` (1 when the mesh lacks it)."""
    return dict(mesh.shape).get(name, 1)


def chain_spec(mesh: Mesh) -> PartitionSpec:
    """Leading (chain) axis split over ``"chains"``, when the mesh has it."""
    return PartitionSpec(CHAINS) if CHAINS in mesh.axis_names else REPLICATED


def data_spec(mesh: Mesh) -> PartitionSpec:
    """Leading (row) axis split over ``"data"``, when the mesh has it."""
    return PartitionSpec(DATA) if DATA in mesh.axis_names else REPLICATED


def padded_num_chains(num_chains: int, mesh: Mesh) -> int:
    """``num_chains`` rounded up to a multiple of the ``"chains"`` axis (padding chains run and are dropped)."""
    per_device = math.ceil(num_chains / axis_size(mesh, CHAINS))
    return per_device * axis_size(mesh, CHAINS)


def check_data_split(mesh: Mesh, n: int, batch_size: int, name: str = "data"):
    """Raise ValueError unless ``n`` rows and ``batch_size`` divide over the ``"data"`` axis."""
    shards = axis_size(mesh, DATA)
    if n % shards:
        raise ValueError(f"{name} has {n} rows, which do not divide over the {shards} data shards of the mesh")
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} does not divide over the {shards} data shards of the mesh")


def put_data(data, mesh: Mesh):
    """Place ``data`` on the mesh once: rows split over ``"data"``, one copy per chain group."""
    return jax.device_put(data, NamedSharding(mesh, data_spec(mesh)))


def put_replicated(tree, mesh: Mesh):
    """Place ``tree`` (e.g. w*) on every device of the mesh: parameters restored onto one
    device (a checkpoint) then meet the data wherever it lives."""
    return jax.device_put(tree, NamedSharding(mesh, REPLICATED))


def minibatch(key, data, batch_size: int, mesh: Mesh):
    """This data shard's part of a ``batch_size``-row minibatch (all of it without a data axis).

    Each of the D data shards draws ``batch_size / D`` rows uniformly with replacement from
    its own rows, with key ``fold_in(key, shard)``: a stratified, unbiased minibatch.

    Returns:
      ``(batch, indices)`` as :func:`slt_jax.data.batches.minibatch`; the indices are
      shard-local (into this shard's rows), so a table sharded like the data reads them as is.
    """
    shards = axis_size(mesh, DATA)
    if shards == 1:
        return batches.minibatch(key, data, batch_size)
    key = jax.random.fold_in(key, jax.lax.axis_index(DATA))
    return batches.minibatch(key, data, batch_size // shards)


def global_mean(value, mesh: Mesh):
    """The mean of a per-shard mean over the ``"data"`` axis (itself without a data axis).

    Called inside the differentiated loss, so that gradients average over data shards once.
    """
    return jax.lax.pmean(value, DATA) if DATA in mesh.axis_names else value


def shard_chains(f, mesh: Mesh, in_specs, out_specs):
    """``f`` on each device's block of chains (``jax.shard_map`` with ``check_vma=True``)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)


def devices_of(mesh: Mesh) -> list[str]:
    """The mesh's devices, as strings, in mesh order (for a result's settings)."""
    return [str(d) for d in mesh.devices.flat]
