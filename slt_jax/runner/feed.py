"""Streamed minibatches: a chunk's rows drawn on device from the chain keys, gathered on the host,
sent to the devices one chunk ahead.

For a :class:`~slt_jax.data.streaming.Streamed` dataset the chain program cannot gather its
minibatch on device. :class:`Feeder` computes, for a chunk of ``S`` steps, every chain's row
indices ``(chains, S, batch)`` with the draw the in-memory step makes —
``batch_rows(step_keys(fold_in(key, i), t)[0], …)``, one function for both
(:func:`slt_jax.runner.sharding.batch_rows`, :func:`slt_jax.runner.chain.step_keys`) — so a
streamed run samples exactly what the in-memory run samples. The indices are fetched (each
process only its own chains'), the rows gathered from the host arrays and placed on the mesh
as ``(chains, S, batch, …)``, chains over ``"chains"`` and the batch over ``"data"``; the
scan then reads step t's batch from that block (:class:`~slt_jax.runner.chain.Fed`).

Overlap: chunk i+1's indices are dispatched before chunk i's sampling program, so fetching
them never waits for sampling, and a background thread gathers and transfers its rows while
the devices sample chunk i. The chunk's steps are capped so that one device receives at most
``chunk_bytes`` of rows per chunk (:meth:`Feeder.steps_per_chunk`).
"""

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from slt_jax.data.streaming import Streamed
from slt_jax.keys import chain_key
from slt_jax.runner import sharding
from slt_jax.runner.chain import Fed, step_keys


@partial(jax.jit, static_argnames=("num_steps", "n", "batch_size", "mesh"))
def chunk_rows(key, chain_index, start, *, num_steps: int, n: int, batch_size: int, mesh):
    """Every chain's minibatch rows for steps ``start … start+num_steps−1``: ``(rows, local)``,
    each ``(chains, num_steps, batch_size)`` (global indices; indices into each data shard)."""

    def chain(index):
        at = lambda t: sharding.batch_rows(step_keys(chain_key(key, index), t)[0], n, batch_size, mesh)
        return jax.vmap(at)(start + jnp.arange(num_steps, dtype=jnp.int32))

    rows, local = jax.vmap(chain)(chain_index)
    on_chains = NamedSharding(mesh, sharding.chain_spec(mesh))
    return jax.lax.with_sharding_constraint((rows, local), on_chains)


def fed_spec(mesh) -> PartitionSpec:
    """How a chunk's batches lie: chains over ``"chains"``, each batch's rows over ``"data"``."""
    return PartitionSpec(sharding.CHAINS, None, sharding.DATA) if sharding.DATA in mesh.axis_names \
        else sharding.chain_spec(mesh)


class Feeder:
    """Gathers and places a streamed run's minibatches, chunk by chunk (module docstring).

    Args:
      data: the streamed dataset.
      key, chain_index: the root key (replicated) and the chains' global indices ``(chains,)``,
        placed over the mesh's ``"chains"`` axis (chain i's key is ``fold_in(key, i)``).
      batch_size: rows per minibatch.
      mesh: the run's mesh.
    """

    def __init__(self, data: Streamed, key, chain_index, batch_size: int, mesh):
        self.data, self.key, self.chain_index, self.batch_size, self.mesh = data, key, chain_index, batch_size, mesh
        self.sharding = NamedSharding(mesh, fed_spec(mesh))
        self.num_chains = chain_index.shape[0]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slt_jax-feed") if data.prefetch else None

    def steps_per_chunk(self, steps: int) -> int:
        """``steps`` halved until one device's share of a chunk's rows fits ``chunk_bytes``."""
        per_device = (self.num_chains // sharding.axis_size(self.mesh, sharding.CHAINS)) * (
            self.batch_size // sharding.axis_size(self.mesh, sharding.DATA)) * (self.data.row_bytes + 4)
        while steps > 1 and steps * per_device > self.data.chunk_bytes:
            steps = (steps + 1) // 2
        return steps

    def start(self, start: int, num_steps: int):
        """Begin preparing steps ``start …``: dispatch their indices now, gather and place them
        (on the background thread when prefetching); returns a call that hands back the
        :class:`~slt_jax.runner.chain.Fed`."""
        rows = chunk_rows(self.key, self.chain_index, jnp.int32(start), num_steps=num_steps, n=self.data.n,
                          batch_size=self.batch_size, mesh=self.mesh)
        if self._pool is None:
            return lambda: self.load(rows)
        return self._pool.submit(self.load, rows).result

    def load(self, rows) -> Fed:
        """The chunk's batches on the mesh, from its ``(rows, local)`` indices (each process
        gathers the rows of its own chains only)."""
        global_rows, local_rows = (self._local_part(x) for x in rows)
        shape = rows[0].shape
        batch = jax.tree.map(lambda x: self._place(x, shape), self.data.gather(global_rows))
        return Fed(batch, self._place(local_rows, shape))

    def _local_part(self, x) -> np.ndarray:
        """This process's chains of a chain-sharded array, on the host, in chain order."""
        blocks = {}
        for shard in x.addressable_shards:
            chains = shard.index[0]
            blocks.setdefault((chains.start or 0, chains.stop), shard.data)
        ordered = sorted(blocks.items())
        for ((_, stop), _), ((start, _), _) in zip(ordered, ordered[1:]):
            if stop != start:
                raise ValueError("this process's chains are not contiguous on the mesh: build it with "
                                 "slt_jax.make_mesh (each process's devices together)")
        return np.concatenate([np.asarray(data) for _, data in ordered])

    def _place(self, local: np.ndarray, chunk_shape):
        global_shape = (*chunk_shape, *local.shape[len(chunk_shape):])
        return jax.make_array_from_process_local_data(self.sharding, local, global_shape)

    def close(self):
        """Stop the background thread (after the last chunk)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
