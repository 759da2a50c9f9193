"""Read parameter trajectories from Orbax checkpoint directories, one step at a time.

A directory written by `orbax.checkpoint.CheckpointManager` holds one subdirectory per
step; each step holds one or more items. Three layouts are read:

(a) the parameters saved as the default item: `manager.save(step, args=StandardSave(params))`;
(b) a composite checkpoint with named items, read with `item="params"`:
    `manager.save(step, args=Composite(params=StandardSave(p), opt_state=StandardSave(o)))`;
(c) a training-state tree saved as one item, from which `select` picks the parameters:
    `manager.save(step, args=StandardSave({"params": p, "opt_state": o, "step": s}))`.

Steps are found and restored with Orbax's step-path helpers and a `Checkpointer` rather
than a `CheckpointManager`: Orbax documents the manager as unsafe to share a directory
with another job (a reader may run while training still writes), and a manager asked for
one item of a composite step logs a warning for every other item at every step. Nothing
here writes to the checkpoint directory.

Its length: three checkpoint layouts behind one reader, with the error messages that name
what a directory holds.
"""

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from slt_jax.paths import checkpoint_path

_DEFAULT_ITEM = "default"
_MAX_REPORTED_PROBLEMS = 5
_PREFETCH_THREAD_PREFIX = "slt_jax-checkpoint-prefetch"


def _step_paths(directory) -> dict[int, epath.Path]:
    """Maps each finalised checkpoint step under `directory` to its path."""
    root = checkpoint_path(directory, "directory")
    if not root.is_dir():
        raise ValueError(f"directory {str(root)!r} does not exist or is not a directory")
    # Orbax names steps `300`, `00000300` or `<prefix>_300`; unfinished saves are skipped.
    paths: dict[int, epath.Path] = {}
    for path in ocp.utils.checkpoint_steps_paths(root):
        step = ocp.utils.step_from_checkpoint_name(path.name)
        if step in paths:
            raise ValueError(
                f"directory {str(root)!r} holds step {step} twice: "
                f"{paths[step].name!r} and {path.name!r}"
            )
        paths[step] = path
    if not paths:
        raise ValueError(f"directory {str(root)!r} holds no finished Orbax checkpoints")
    return dict(sorted(paths.items()))


def list_steps(directory) -> list[int]:
    """Returns the steps of the finished checkpoints in an Orbax directory, sorted.

    Args:
      directory: the root directory given to `orbax.checkpoint.CheckpointManager`
        (a local path or any path `etils.epath` understands, e.g. `gs://...`).

    Returns:
      The checkpoint steps in increasing order.

    Raises:
      ValueError: if `directory` does not exist or holds no finished checkpoint.
    """
    return list(_step_paths(directory))


def _normalised_key(entry) -> str:
    """One pytree path entry as a string, so that dict, list and attribute keys compare."""
    for attribute in ("key", "idx", "name"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _path_id(path) -> tuple[str, ...]:
    return tuple(_normalised_key(entry) for entry in path)


def _leaf_signature(leaf) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of an array-like leaf, the dtype as JAX holds it; None otherwise."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None and isinstance(leaf, (bool, int, float, complex)):
        dtype = np.result_type(leaf)
    if dtype is None:
        return None
    return tuple(np.shape(leaf)), jax.dtypes.canonicalize_dtype(dtype)


def _check_and_order(step: int, params, template_paths, template_signatures, treedef):
    """Checks restored `params` against the template; returns them in the template's structure.

    Raises:
      ValueError: naming the step and every mismatching path (the first few of them).
    """
    restored = {
        _path_id(path): (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    problems = []
    for path, (shape, dtype) in zip(template_paths, template_signatures):
        where = "params" + jax.tree_util.keystr(path)
        found = restored.get(_path_id(path))
        if found is None:
            problems.append(f"{where} is missing from the checkpoint")
            continue
        signature = _leaf_signature(found[1])
        if signature is None:
            problems.append(f"{where} is a {type(found[1]).__name__}, not an array")
        elif signature[0] != shape:
            problems.append(f"{where} has shape {signature[0]}, the model expects {shape}")
        elif signature[1] != dtype:
            problems.append(f"{where} has dtype {signature[1]}, the model expects {dtype}")
    expected = {_path_id(path) for path in template_paths}
    problems += [
        f"the checkpoint has params{jax.tree_util.keystr(path)}, which the model does not"
        for key, (path, _) in restored.items()
        if key not in expected
    ]
    if problems:
        shown = "; ".join(problems[:_MAX_REPORTED_PROBLEMS])
        more = len(problems) - _MAX_REPORTED_PROBLEMS
        raise ValueError(
            f"step {step}: {shown}" + (f" (and {more} more mismatches)" if more > 0 else "")
        )
    leaves = [restored[_path_id(path)][1] for path in template_paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


class CheckpointTrajectory:
    """Iterates over `(step, params)` of an Orbax checkpoint directory, restoring lazily.

    Each step is restored only when the iteration reaches it; with `prefetch=True` the
    next step is restored in a background thread while the caller works on the current
    one (so at most two steps are in memory). Arrays are restored straight onto
    `sharding` from abstract targets (`jax.ShapeDtypeStruct`) built from the checkpoint's
    own metadata, then checked against `template`.

    Example:
      >>> for step, params in CheckpointTrajectory("runs/ckpt", template=init_params):
      ...     estimate = llc(params, ...)
    """

    def __init__(
        self,
        directory,
        *,
        template,
        item: str | None = None,
        select: Callable[[Any], Any] | None = None,
        steps: Sequence[int] | None = None,
        sharding: jax.sharding.Sharding | None = None,
        prefetch: bool = True,
    ):
        """Checks the arguments and the directory; restores nothing yet.

        Args:
          directory: the root directory given to `orbax.checkpoint.CheckpointManager`.
          template: the model's parameter pytree (arrays, or `jax.ShapeDtypeStruct`);
            restored parameters must match its structure, shapes and dtypes (dtypes as
            JAX canonicalises them: with x64 disabled a float64 checkpoint is float32).
          item: name of the item to read in a composite checkpoint (layout (b)); None
            reads the default item (layouts (a) and (c)).
          select: maps the restored item (plain nested dicts/lists of arrays) to the
            parameters, e.g. `lambda state: state["params"]` (layout (c)); None keeps
            the whole item.
          steps: the steps to read, in the order given; None reads every finished step
            in increasing order.
          sharding: where restored arrays are placed (every leaf); default the first
            local device.
          prefetch: restore the next step in a background thread.

        Raises:
          ValueError: if the directory holds no checkpoints, a requested step is absent,
            or an argument has the wrong type.
        """
        self.directory = checkpoint_path(directory, "directory")
        self._step_paths = _step_paths(self.directory)
        if steps is None:
            self.steps = list(self._step_paths)
        else:
            self.steps = [int(step) for step in steps]
            absent = [step for step in self.steps if step not in self._step_paths]
            if absent:
                raise ValueError(
                    f"steps {absent} are not finished checkpoints in {str(self.directory)!r} "
                    f"(it holds {list(self._step_paths)})"
                )
        if item is not None and not isinstance(item, str):
            raise ValueError(f"item must be a string or None, got {type(item).__name__}")
        if select is not None and not callable(select):
            raise ValueError(f"select must be callable or None, got {type(select).__name__}")
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(
                f"sharding must be a jax.sharding.Sharding, got {type(sharding).__name__}"
            )
        flat, self._treedef = jax.tree_util.tree_flatten_with_path(template)
        if not flat:
            raise ValueError("template has no array leaves")
        self._template_paths = [path for path, _ in flat]
        self._template_signatures = [_leaf_signature(leaf) for _, leaf in flat]
        for (path, leaf), signature in zip(flat, self._template_signatures):
            if signature is None:
                raise ValueError(
                    f"template{jax.tree_util.keystr(path)} is a {type(leaf).__name__}; the "
                    "template must hold arrays or jax.ShapeDtypeStruct leaves"
                )
        self.item = item
        self.select = select
        self.sharding = sharding
        self.prefetch = bool(prefetch)

    def __len__(self) -> int:
        return len(self.steps)

    def _item_directory(self, step: int) -> epath.Path:
        step_path = self._step_paths[step]
        name = _DEFAULT_ITEM if self.item is None else self.item
        item_path = step_path / name
        if item_path.is_dir():
            return item_path
        items = sorted(p.name for p in step_path.iterdir() if p.is_dir())
        if self.item is None:
            raise ValueError(
                f"step {step}: {str(step_path)!r} was saved with named items {items}; "
                "pass item=<name> to choose the one holding the parameters"
            )
        raise ValueError(
            f"step {step}: {str(step_path)!r} has no item {self.item!r} (items: {items})"
        )

    def _abstract_target(self, step: int, metadata):
        """Restore targets on `self.sharding`, shaped after the checkpoint's own metadata."""

        def target(path, leaf):
            if not isinstance(leaf, (ocp.metadata.ArrayMetadata, ocp.metadata.ScalarMetadata)):
                raise ValueError(
                    f"step {step}: item{jax.tree_util.keystr(path)} is not an array "
                    f"({type(leaf).__name__}); save parameters with ocp.args.StandardSave"
                )
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self.sharding)

        return jax.tree_util.tree_map_with_path(target, metadata)

    def _restore(self, checkpointer: ocp.Checkpointer, step: int):
        """Restores, selects and checks the parameters of one step.

        Args:
          checkpointer: an open `ocp.Checkpointer(ocp.StandardCheckpointHandler())`.
          step: a step of this trajectory's directory.

        Returns:
          The parameters: the template's tree structure, jax arrays on `self.sharding`.

        Raises:
          ValueError: naming the step and pytree path of any mismatch with the template.
        """
        item_path = self._item_directory(step)
        metadata = checkpointer.handler.metadata(item_path).tree
        state = checkpointer.restore(
            item_path, args=ocp.args.StandardRestore(self._abstract_target(step, metadata))
        )
        if self.select is None:
            params = state
        else:
            try:
                params = self.select(state)
            except (KeyError, IndexError, TypeError, AttributeError) as error:
                keys = list(state) if isinstance(state, dict) else type(state).__name__
                raise ValueError(
                    f"step {step}: select failed on the restored item "
                    f"({type(error).__name__}: {error}); the item's top level is {keys}"
                ) from error
        params = _check_and_order(
            step, params, self._template_paths, self._template_signatures, self._treedef
        )
        # `select` may hand back host arrays; the sampler needs them on `sharding`.
        return jax.tree.map(
            lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, self.sharding), params
        )

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """Yields `(step, params)` for each step, restoring one step ahead if prefetching."""
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=_PREFETCH_THREAD_PREFIX)
            if self.prefetch
            else None
        )

        def start(step):
            """Begins restoring `step`; returns the call that hands back its parameters."""
            if executor is None:
                return lambda: self._restore(checkpointer, step)
            return executor.submit(self._restore, checkpointer, step).result

        # With prefetch one worker thread does every restore, so the checkpointer is never
        # shared between threads, and a restore error surfaces at the step it belongs to.
        try:
            pending = start(self.steps[0]) if self.steps else None
            for index, step in enumerate(self.steps):
                params = pending()
                if index + 1 < len(self.steps):
                    pending = start(self.steps[index + 1])
                yield step, params
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            checkpointer.close()


def infer_template(directory, step: int, item: str | None, select):
    """The parameter shapes of one checkpoint, from its metadata (nothing is restored)."""
    paths = {ocp.utils.step_from_checkpoint_name(p.name): p
             for p in ocp.utils.checkpoint_steps_paths(checkpoint_path(directory, "directory"))}
    item_path = paths[step] / ("default" if item is None else item)
    if not item_path.is_dir():
        items = sorted(p.name for p in paths[step].iterdir() if p.is_dir())
        raise ValueError(f"step {step}: {str(paths[step])!r} has no item "
                         f"{'default' if item is None else item!r} (items: {items}); pass item=<name>")
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        metadata = checkpointer.handler.metadata(item_path).tree
    finally:
        checkpointer.close()
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
    return abstract if select is None else jax.eval_shape(select, abstract)
