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

The ``"model"`` axis shards each chain's parameters and sampler state (FSDP-style): every leaf
of w* lies on the mesh with a ``PartitionSpec`` over ``"model"`` (:func:`param_specs`: by
default its largest dimension the axis divides; small and indivisible leaves replicated), each
chain's state with ``P("chains", *spec)``. ``shard_map`` makes only ``"chains"`` and
``"data"`` manual (:func:`manual_axes`); inside a chain, XLA partitions the model's matmuls
over ``"model"`` and inserts its collectives, so ``loss_fn`` knows nothing of the sharding.
Results equal the unsharded run to float rounding (XLA reorders some sums), not bit for bit.

Across processes (:mod:`slt_jax.distributed`) the mesh spans every process's devices; host
data become global arrays through :func:`put` (``make_array_from_callback`` for large ones:
``device_put`` of a host array would first compare it across processes), and results come back
complete on every process through :func:`to_host`.

Its length: the mesh, the placements of the chain, data and model axes and the gathers back to
the host are one layout that the runner uses together.
"""

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from slt_jax import keys
from slt_jax.data import batches

CHAINS = "chains"
DATA = "data"
MODEL = "model"
AXES = (CHAINS, DATA, MODEL)
REPLICATED = PartitionSpec()
# Leaves with fewer elements than this stay replicated over "model" by default: splitting them
# saves little memory and costs a collective per use.
MIN_SHARDED_ELEMENTS = 2**14


def ordered_devices() -> list:
    """Every device of the job, process by process (each process's devices contiguous)."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def make_mesh(devices: int | Sequence[Any] | None = None, *, data: int = 1, model: int = 1) -> Mesh:
    """A mesh with axes ``("chains", "data", "model")`` over ``devices`` (axes of size 1 left out,
    except ``"chains"``).

    Args:
      devices: a device count (the first that many devices of the job, process by process), a
        sequence of devices, or ``None``: the first device in a single process, every device of
        every process in a multi-process job (:mod:`slt_jax.distributed`).
      data: how many devices share one group of chains by splitting the dataset's rows.
      model: how many devices share one group of chains by splitting each chain's parameters
        and sampler state (:func:`param_specs`).

    ``data × model`` must divide the number of devices; each group of ``data × model``
    neighbouring devices must lie in one process, so the per-step collectives of the data and
    model axes never leave a host (only the chain axis crosses hosts, and chains never talk to
    each other). The axes are ``Auto`` (not ``Explicit``): XLA places the model axis's work.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(devices / (data·model), data, model)``.
    """
    available = ordered_devices()
    if devices is None:
        chosen = available if jax.process_count() > 1 else available[:1]
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices={devices} must be between 1 and the {len(available)} available")
        chosen = available[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices is an empty sequence")
    for name, size in (("data", data), ("model", model)):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name}={size!r} must be a positive integer")
    group = data * model
    if len(chosen) % group:
        named = " × ".join(f"{k}={v}" for k, v in (("data", data), ("model", model)) if v > 1)
        raise ValueError(f"{named}{f' = {group}' if data > 1 and model > 1 else ''} must be a positive divisor "
                         f"of the {len(chosen)} devices")
    for start in range(0, len(chosen), group):
        if len({d.process_index for d in chosen[start:start + group]}) > 1:
            raise ValueError(f"data={data} × model={model} devices of one chain group would span processes: "
                             "keep data × model within one process's devices")
    shape, names = [len(chosen) // group], [CHAINS]
    for name, size in ((DATA, data), (MODEL, model)):
        if size > 1:
            shape.append(size)
            names.append(name)
    return Mesh(np.array(chosen, dtype=object).reshape(shape), tuple(names),
                axis_types=(AxisType.Auto,) * len(names))


def resolve_mesh(mesh: Mesh | None = None, devices: int | Sequence[Any] | None = None) -> Mesh:
    """The mesh a run uses: ``mesh`` as given (checked), else :func:`make_mesh` of ``devices``."""
    if mesh is not None and devices is not None:
        raise ValueError("pass either mesh or devices, not both")
    if mesh is None:
        mesh = make_mesh(devices)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = set(mesh.axis_names) - set(AXES)
    if unknown:
        raise ValueError(f"mesh has axes {sorted(unknown)}; its axes must be named from {AXES}")
    if MODEL in mesh.axis_names and any(t == AxisType.Explicit for t in mesh.axis_types):
        raise ValueError("the mesh has Explicit axis types (jax.make_mesh's default): build it with "
                         "slt_jax.make_mesh or axis_types=(AxisType.Auto, ...) so XLA can place the model axis")
    processes = {d.process_index for d in mesh.devices.flat}
    if len(processes) < jax.process_count():
        raise ValueError(f"the mesh spans processes {sorted(processes)} of {jax.process_count()}: in a multi-process "
                         "run every process must hold devices of the mesh (slt_jax.make_mesh() spans them all)")
    return mesh


def manual_axes(mesh: Mesh) -> frozenset:
    """The axes ``shard_map`` splits by hand (``"chains"``, ``"data"``); ``"model"`` is left to XLA."""
    return frozenset(name for name in mesh.axis_names if name != MODEL)


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
    return put(data, NamedSharding(mesh, data_spec(mesh)))


def put_replicated(tree, mesh: Mesh):
    """Place ``tree`` (e.g. w*) on every device of the mesh: parameters restored onto one
    device (a checkpoint) then meet the data wherever it lives."""
    return put(tree, NamedSharding(mesh, REPLICATED))


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when the mesh spans processes.

    ``shardings`` is a sharding or a pytree of them, a prefix of ``tree``. In one process this
    is ``device_put``. Across processes, arrays already global are resharded, and host arrays
    (and arrays on one local device) are built from each process's own copy with
    ``jax.make_array_from_callback`` — no cross-process comparison, which costs seconds per
    64 MiB; typed PRNG keys travel as their key data. Every process must pass equal values
    (:func:`slt_jax.distributed.check_consistent` checks what it can first).
    """
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put_global(x, s), sub), shardings, tree)


def _put_global(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """``tree``'s arrays as numpy arrays, complete on every process.

    Arrays spread over processes are gathered (``multihost_utils.process_allgather``: a
    collective, so every process must call this in the same order); replicated and local ones
    are read where they are.
    """
    from jax.experimental import multihost_utils

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


@dataclasses.dataclass(frozen=True)
class ParamSpecs:
    """A pytree of ``PartitionSpec`` over ``"model"``, one per parameter leaf, kept hashable (a
    static part of a run's config: the layout is compiled into the program).

    Attributes:
      treedef: the parameters' tree structure.
      specs: one ``PartitionSpec`` per leaf, in ``jax.tree.leaves`` order.
      shapes: the leaves' shapes (to recognise parameter-shaped parts of a sampler's state).
    """

    treedef: Any
    specs: tuple
    shapes: tuple

    @property
    def tree(self):
        """The specs as a pytree like the parameters."""
        return self.treedef.unflatten(self.specs)

    @property
    def sharded(self) -> bool:
        """Whether any leaf is split over ``"model"``."""
        return any(MODEL in spec for spec in self.specs)


def model_spec(shape, size: int, min_elements: int = MIN_SHARDED_ELEMENTS) -> PartitionSpec:
    """The default spec of one leaf over a ``"model"`` axis of ``size`` devices.

    FSDP-style: the leaf's largest dimension that ``size`` divides (the first of equals) is
    split; a leaf with fewer than ``min_elements`` elements, or with no dimension ``size``
    divides, is replicated — every device of the chain's model group holds all of it, and
    XLA computes with it there (correct, only not memory-saving).
    """
    if size == 1 or math.prod(shape) < min_elements:
        return REPLICATED
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    for dim in order:
        if shape[dim] % size == 0:
            return PartitionSpec(*([None] * dim + [MODEL]))
    return REPLICATED


def param_specs(params, mesh: Mesh, specs=None, *, min_elements: int = MIN_SHARDED_ELEMENTS) -> ParamSpecs:
    """How each leaf of ``params`` lies over the mesh's ``"model"`` axis.

    Args:
      params: the parameters (arrays or shape-dtype structs).
      mesh: the run's mesh; without a ``"model"`` axis every leaf is replicated.
      specs: ``None`` for :func:`model_spec`'s default per leaf, or a pytree like ``params``
        of ``PartitionSpec`` (or ``None`` for replicated) naming only ``"model"``; each split
        dimension must be divisible by the axis size.
      min_elements: the default rule's size below which a leaf stays replicated.

    Raises:
      ValueError: naming the leaf whose spec does not fit.
    """
    size = axis_size(mesh, MODEL)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = tuple(tuple(np.shape(leaf)) for _, leaf in leaves)
    if specs is None:
        chosen = tuple(model_spec(shape, size, min_elements) for shape in shapes)
        return ParamSpecs(treedef, chosen, shapes)
    try:
        given = treedef.flatten_up_to(specs)
    except (ValueError, TypeError) as error:
        raise ValueError(f"param_specs must be a pytree like params with a PartitionSpec (or None) per leaf: "
                         f"{error}") from error
    chosen = []
    for (path, _), shape, spec in zip(leaves, shapes, given):
        where = "param_specs" + jax.tree_util.keystr(path)
        spec = REPLICATED if spec is None else spec
        if not isinstance(spec, PartitionSpec):
            raise ValueError(f"{where} must be a PartitionSpec or None, got {type(spec).__name__}")
        if len(spec) > len(shape):
            raise ValueError(f"{where}={spec} has more entries than the leaf's {len(shape)} dimensions")
        for dim, entry in enumerate(spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            if any(name not in (None, MODEL) for name in names):
                raise ValueError(f"{where}={spec} may name only {MODEL!r} (chains and data are the runner's)")
            if MODEL in names and (size == 1 or shape[dim] % size):
                if size == 1:
                    raise ValueError(f"{where}={spec} splits over {MODEL!r}, but the mesh has no model axis")
                raise ValueError(f"{where}={spec} splits dimension {dim} of shape {shape} over {size} devices, "
                                 "which do not divide it; replicate this leaf (None)")
        chosen.append(spec)
    return ParamSpecs(treedef, tuple(chosen), shapes)


def put_params(params, mesh: Mesh, specs: ParamSpecs):
    """Place w* on the mesh: each leaf split over ``"model"`` by its spec, replicated elsewhere."""
    shardings = specs.treedef.unflatten([NamedSharding(mesh, spec) for spec in specs.specs])
    return put(params, shardings)


def state_shardings(mesh: Mesh, state, specs: ParamSpecs | None):
    """Shardings for a pytree with a leading chain axis (chain state, masks…): its subtrees
    shaped like the parameters (the position, a momentum, RMSProp's average) follow ``specs``
    behind the chain axis; every other leaf is split over chains only (every leaf, without
    ``specs``)."""
    chain = chain_spec(mesh)
    if specs is None:
        return jax.tree.map(lambda _: NamedSharding(mesh, chain), state)

    def like_params(node):
        leaves, treedef = jax.tree.flatten(node)
        return treedef == specs.treedef and tuple(tuple(np.shape(x))[1:] for x in leaves) == specs.shapes

    def place(node):
        if like_params(node):
            return specs.treedef.unflatten([NamedSharding(mesh, PartitionSpec(*chain, *spec)) for spec in specs.specs])
        return NamedSharding(mesh, chain)

    return jax.tree.map(place, state, is_leaf=like_params)


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
    return batches.minibatch(shard_key(key, jax.lax.axis_index(DATA), mesh), data, batch_size // shards)


def shard_key(key, shard, mesh: Mesh):
    """The key data shard ``shard`` draws its rows with (``key`` itself without a data axis)."""
    return key if axis_size(mesh, DATA) == 1 else keys.fold_in(key, shard)


def batch_rows(key, n: int, batch_size: int, mesh: Mesh):
    """The rows :func:`minibatch` draws with ``key``, for every data shard at once (outside
    ``shard_map``: what a streamed run gathers on the host).

    Returns:
      ``(rows, local)``, both ``(batch_size,)``: indices into all ``n`` rows, and into each
      shard's own ``n / D`` rows; data shard d's part is the d-th block of ``batch_size / D``.
    """
    shards = axis_size(mesh, DATA)
    local_n, per_shard = n // shards, batch_size // shards
    local = jnp.concatenate([batches.row_indices(shard_key(key, d, mesh), per_shard, local_n) for d in range(shards)])
    offsets = jnp.repeat(jnp.arange(shards, dtype=local.dtype) * local_n, per_shard)
    return local + offsets, local


def global_mean(value, mesh: Mesh):
    """The mean of a per-shard mean over the ``"data"`` axis (itself without a data axis).

    Called inside the differentiated loss, so that gradients average over data shards once.
    """
    return jax.lax.pmean(value, DATA) if DATA in mesh.axis_names else value


def shard_chains(f, mesh: Mesh, in_specs, out_specs):
    """``f`` on each device's block of chains (``jax.shard_map`` with ``check_vma=True``; the
    ``"model"`` axis, if any, stays automatic)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(manual_axes(mesh)),
                         check_vma=True)


def devices_of(mesh: Mesh) -> list[str]:
    """The mesh's devices, as strings, in mesh order (for a result's settings)."""
    return [str(d) for d in mesh.devices.flat]
