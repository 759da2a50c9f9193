"""Datasets larger than device memory: rows stay on the host and reach the devices chunk by chunk.

``streamed(data)`` marks a pytree of host arrays — typically ``numpy.memmap`` views of files
(``np.load(path, mmap_mode="r")``, :func:`slt_jax.data.load_tokens`) — as host-resident. Every
entry point that takes ``data`` accepts it. What changes, and what does not:

- the draws: the minibatch row indices of a chunk of steps are computed on device from the
  chain keys by the same function the in-memory run draws with
  (:func:`slt_jax.runner.sharding.batch_rows`), fetched, gathered from the host arrays and sent
  to the devices, one chunk ahead on a background thread (:mod:`slt_jax.runner.feed`). The same
  key gives *the same draws*, hence the same per-chain λ̂, as the data held on device;
- L_n(w*) and the spread of its batch means come from one streamed pass over the rows
  (:func:`full_batch_loss`), block by block, with the same batch boundaries as the in-memory
  :func:`slt_jax.data.batches.full_batch_loss`;
- what needs every row at every step cannot stream: ``loss_estimator="full_batch"``, NUTS and
  the MALA check raise a ``ValueError``. Curvature probes (the calibration grid, the stiffness
  check, the free-energy ladder's curvature, the Laplace value) use a fixed resident sample of
  :data:`RESIDENT_ROWS` rows (:meth:`Streamed.resident`).

Seam for per-row tables (the control variate's ℓ_i(w*) read by index): the pass over the data
is :meth:`Streamed.blocks` (device blocks in row order), and every streamed step carries its
rows' indices (:class:`slt_jax.runner.chain.Fed` ``rows``), shard-local like
:func:`slt_jax.runner.sharding.minibatch`'s, so a table computed in that pass is read exactly as
for data on device.
"""

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax.data.batches import FullBatchLoss, accumulation_dtype, per_sample_losses

DEFAULT_CHUNK_BYTES = 256 * 2**20
# Rows of the fixed sample that curvature probes run on (the calibration grid takes at most 4096,
# the Laplace value at most 8192).
RESIDENT_ROWS = 8192


@dataclasses.dataclass(frozen=True, eq=False)
class Streamed:
    """A dataset kept on the host and streamed to the devices (see the module docstring).

    Attributes:
      source: a pytree of host arrays (``numpy.ndarray`` or ``numpy.memmap``) sharing a leading
        row axis.
      chunk_bytes: the most bytes of rows one device receives at a time — a chunk of
        minibatches (which bounds the steps per compiled chunk) or a block of the full pass.
        Two chunks are in flight (the one sampled and the one prefetched).
      prefetch: gather the next chunk on a background thread while the devices sample.
    """

    source: Any
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    prefetch: bool = True

    def __post_init__(self):
        leaves = jax.tree_util.tree_leaves_with_path(self.source)
        if not leaves:
            raise ValueError("streamed data has no arrays: pass a pytree of host arrays with a leading row axis")
        for path, leaf in leaves:
            if isinstance(leaf, jax.Array):
                raise ValueError(f"streamed data{jax.tree_util.keystr(path)} is a jax.Array, already on a device: "
                                 "stream numpy arrays or memmaps (np.load(path, mmap_mode='r')), or pass the "
                                 "array itself as data")
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or len(leaf.shape) == 0:
                raise ValueError(f"streamed data{jax.tree_util.keystr(path)} must be an array with a leading "
                                 f"row axis, got {type(leaf).__name__}")
        if not (isinstance(self.chunk_bytes, int) and self.chunk_bytes > 0):
            raise ValueError(f"chunk_bytes must be a positive integer, got {self.chunk_bytes!r}")

    @property
    def n(self) -> int:
        """Rows."""
        return jax.tree.leaves(self.source)[0].shape[0]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row on device (all leaves, at their device dtypes)."""
        return sum(math.prod(x.shape[1:]) * _device_dtype(x).itemsize for x in jax.tree.leaves(self.source))

    def abstract(self, rows: int):
        """``ShapeDtypeStruct`` leaves of a batch of ``rows`` rows, at their device dtypes."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *x.shape[1:]), _device_dtype(x)), self.source)

    def gather(self, index):
        """The rows ``index`` (any integer array shape, host) as host arrays of shape
        ``index.shape + row shape``, at their device dtypes."""
        index = np.asarray(index)
        flat = index.reshape(-1)
        return jax.tree.map(lambda x: np.asarray(x[flat], _device_dtype(x)).reshape(index.shape + x.shape[1:]),
                            self.source)

    def slice(self, start: int, stop: int):
        """Rows ``start … stop−1`` as host arrays at their device dtypes."""
        return jax.tree.map(lambda x: np.asarray(x[start:stop], _device_dtype(x)), self.source)

    def blocks(self, rows: int, sharding):
        """``(start, block)`` over the rows in order, ``rows`` at a time (the last block shorter),
        each block placed with ``sharding``; the next block is read on a background thread
        while the caller works on this one."""
        from slt_jax.runner.sharding import put

        starts = list(range(0, self.n, rows))
        load = lambda start: put(self.slice(start, min(start + rows, self.n)), sharding)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slt_jax-stream") as pool:
            pending = pool.submit(load, starts[0]) if self.prefetch else None
            for i, start in enumerate(starts):
                block = pending.result() if self.prefetch else load(start)
                if self.prefetch and i + 1 < len(starts):
                    pending = pool.submit(load, starts[i + 1])
                yield start, block

    def resident(self, mesh, rows: int = RESIDENT_ROWS):
        """A fixed sample of up to ``rows`` rows — and at most ``chunk_bytes`` of them, the
        memory the dataset may take on a device — without replacement, seed 0, in row order, on
        every device of ``mesh``: what curvature probes run on in place of all n rows."""
        from jax.sharding import NamedSharding, PartitionSpec

        from slt_jax.runner.sharding import put

        rows = max(1, min(rows, self.chunk_bytes // max(1, self.row_bytes)))
        index = np.arange(self.n) if self.n <= rows else np.sort(
            np.random.default_rng(0).choice(self.n, size=rows, replace=False))
        return put(self.gather(index), NamedSharding(mesh, PartitionSpec()))


def _device_dtype(x):
    return jax.dtypes.canonicalize_dtype(x.dtype)


def streamed(data, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, prefetch: bool = True) -> Streamed:
    """Mark ``data`` — a pytree of host arrays, e.g. ``numpy.memmap`` s — as streamed from the host.

    Args:
      data: arrays with a leading row axis (the same pytree one would pass as ``data``).
      chunk_bytes: the most bytes of rows one device receives at a time (default 256 MiB).
      prefetch: gather the next chunk on a background thread.

    Returns:
      A :class:`Streamed`, accepted as ``data`` by ``estimate_llc``, ``calibrate`` and
      ``llc_trajectory`` (see the module docstring for what cannot stream).
    """
    if isinstance(data, Streamed):
        return dataclasses.replace(data, chunk_bytes=chunk_bytes, prefetch=prefetch)
    return Streamed(data, chunk_bytes, prefetch)


def is_streamed(data) -> bool:
    """Whether ``data`` is a :class:`Streamed` dataset."""
    return isinstance(data, Streamed)


@partial(jax.jit, static_argnums=(0, 3))
def _block_losses(loss_fn, params, block, batch_size):
    """``loss_fn`` on each ``batch_size``-row batch of ``block`` (whose rows it divides)."""
    batches = jax.tree.map(lambda x: x.reshape(-1, batch_size, *x.shape[1:]), block)
    return jax.lax.map(lambda b: loss_fn(params, b), batches).astype(accumulation_dtype())


_tail_loss = jax.jit(lambda loss_fn, params, rows: loss_fn(params, rows).astype(accumulation_dtype()),
                     static_argnums=0)


def full_batch_loss(loss_fn, params, data: Streamed, batch_size: int, sharding, *, per_row: bool = False):
    """L_n(params) and the spread of its batch means in one streamed pass over ``data``.

    The batches are those of :func:`slt_jax.data.batches.full_batch_loss` — ``batch_size``
    rows each in row order, a final partial batch on its own — read in blocks of whole batches
    up to ``data.chunk_bytes`` and placed with ``sharding``; the batch losses are summed on
    the host in float64.

    With ``per_row`` the same pass also evaluates ``loss_fn`` on one-row batches
    (:func:`slt_jax.data.batches.per_sample_losses`) and returns ``(FullBatchLoss, rows,
    first)``: ℓ_i(params) for every row ``(n,)`` on the host, and ``loss_fn`` on the first batch
    (for the check that the loss is a mean of per-row terms).
    """
    from slt_jax.runner.sharding import to_host

    n = data.n
    batches_per_block = max(1, data.chunk_bytes // max(1, batch_size * data.row_bytes))
    num_full, rest = divmod(n, batch_size)
    losses, tail, rows_out = [], None, []
    for start, block in data.blocks(batches_per_block * batch_size, sharding):
        rows = jax.tree.leaves(block)[0].shape[0]
        whole = (rows // batch_size) * batch_size
        if whole:
            part = block if whole == rows else jax.tree.map(lambda x: x[:whole], block)
            losses.append(np.asarray(to_host(_block_losses(loss_fn, params, part, batch_size)), np.float64))
        if whole < rows:
            tail = float(_tail_loss(loss_fn, params, jax.tree.map(lambda x: x[whole:], block)))
        if per_row:
            rows_out.append(np.asarray(to_host(_row_losses(loss_fn, params, block, batch_size)), np.float64))
    losses = np.concatenate(losses) if losses else np.zeros(0)
    total = batch_size * losses.sum() + (rest * tail if rest else 0.0)
    batch_std = float(np.std(losses, ddof=1)) if num_full > 1 else 0.0
    dtype = accumulation_dtype()
    result = FullBatchLoss(jnp.asarray(total / n, dtype), jnp.asarray(batch_std, dtype))
    if not per_row:
        return result
    return result, np.concatenate(rows_out), float(losses[0]) if num_full else tail


_row_losses = jax.jit(per_sample_losses, static_argnums=(0, 3))
