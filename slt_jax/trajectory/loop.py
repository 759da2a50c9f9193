"""The loop every trajectory shares: checkpoints in, one stored row per step out, resumable.

:func:`checkpoint_rows` restores the checkpoints of an Orbax directory one at a time (the next
one prefetched while the current one computes), hands each step's parameters to a ``compute``
function, writes each row to a :class:`~slt_jax.trajectory.store.ResultsStore` as soon as it
exists, skips steps already stored by an earlier run with the same settings, and shows the
progress as checkpoint i/N, its step and an ETA. ``llc_trajectory``, the per-component refined
curves and the observable curves are this loop with different ``compute`` functions.
"""

import contextlib
import warnings
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from slt_jax import distributed
from slt_jax.trajectory.checkpoints import CheckpointTrajectory, infer_template, list_steps
from slt_jax.trajectory.store import ResultsStore


def wanted_steps(checkpoint_dir, steps: Sequence[int] | None) -> list[int]:
    """The requested steps (default every finished checkpoint), checked against the directory."""
    available = list_steps(checkpoint_dir)
    wanted = available if steps is None else sorted({int(s) for s in steps})
    absent = [s for s in wanted if s not in available]
    if absent:
        raise ValueError(f"steps {absent} are not finished checkpoints in {str(checkpoint_dir)!r} "
                         f"(it holds {available})")
    if not wanted:
        raise ValueError("steps is empty")
    return wanted


def checkpoint_rows(checkpoint_dir, compute: Callable, *, settings: dict, steps: Sequence[int] | None = None,
                    item=None, select=None, template=None, results_path=None, on_row=None, prefetch=True,
                    progress=True, before: Callable | None = None, describe: Callable | None = None,
                    sharding=None) -> dict:
    """One row per checkpoint step, computed or read back from the store.

    Args:
      checkpoint_dir: an absolute Orbax directory (see :func:`slt_jax.paths.checkpoint_path`).
      compute: ``compute(step, params) -> row`` (a JSON-ready dict).
      settings: everything that determines the rows; a store with other settings is refused.
      steps, item, select, template, results_path, on_row, prefetch, progress: as for
        :func:`slt_jax.llc_trajectory`.
      before: called once with the parameter template before the first computed step.
      describe: ``describe(row) -> str`` for the progress bar after a step.
      sharding: where checkpoints are restored (default: Orbax's choice on this process).

    Across processes (:mod:`slt_jax.distributed`) process 0 alone opens and writes the store; the
    others receive its finished rows, so every process skips the same steps. Prefetching is off
    there: every process must restore the same checkpoint in the same order.

    Returns:
      ``{step: row}`` for every wanted step, in step order.
    """
    wanted = wanted_steps(checkpoint_dir, steps)
    store, rows = (None, {}) if results_path is None else _open_store(results_path, settings, wanted)
    todo = [s for s in wanted if s not in rows]
    if todo:
        if template is None:
            template = infer_template(checkpoint_dir, todo[0], item, select)
        if before is not None:
            before(template)
        trajectory = CheckpointTrajectory(checkpoint_dir, template=template, item=item, select=select, steps=todo,
                                          sharding=sharding, prefetch=prefetch and not distributed.is_distributed())
        with tqdm(total=len(wanted), initial=len(rows), disable=None if progress else True, desc="checkpoints",
                  unit="ckpt") as bar:
            for step, params in trajectory:
                bar.set_postfix_str(f"step {step}")
                with _naming_the_step(step):
                    row = compute(step, params)
                if store is not None:
                    store.write(step, row)
                rows[step] = row
                if on_row is not None:
                    on_row(row)
                if describe is not None:
                    bar.set_postfix_str(f"step {step}: {describe(row)}")
                bar.update(1)
    return {s: rows[s] for s in wanted}


def _open_store(results_path, settings, wanted):
    """``(store, finished rows by step)``: process 0 opens (or creates) the store and reads its
    rows among ``wanted``, and every process receives them; the store object is process 0's
    alone (``None`` elsewhere: nothing else writes)."""
    opened = {}

    def read():
        opened["store"] = ResultsStore(results_path, settings)
        return [row for step, row in opened["store"].completed().items() if step in wanted]

    rows = distributed.from_primary(read, "results store")
    return opened.get("store"), {int(row["step"]): row for row in rows}


@contextlib.contextmanager
def _naming_the_step(step: int):
    """Warnings raised while a checkpoint computes are emitted again with its step in front
    ("checkpoint step 72790: λ̂ still trends …"), so a trajectory's warning says which row it is
    about. The caller's filters still decide: an "error" filter raises at the source, "ignore"
    leaves nothing to emit."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for w in caught:
            warnings.warn_explicit(w.category(f"checkpoint step {step}: {w.message}"), w.category, w.filename,
                                   w.lineno)
