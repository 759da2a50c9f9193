"""A resumable, crash-safe store of per-checkpoint results.

Layout of a store at `path` (a directory on the local filesystem):

    path/settings.json            {"format": ..., "version": 1, "settings": {...}}
    path/step_0000000300.json     one row per finished checkpoint step

Every file is written atomically (temporary file in the same directory, fsync,
`os.replace`, fsync of the directory), so a process killed mid-write loses at most the
step it was writing; the stray temporary files it may leave (`.step_*.tmp`) are ignored.
One process writes to a store at a time: in a multi-process run (slt_jax.distributed),
process 0; the others open the store read-only.
"""

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slt_jax.distributed import is_primary
from slt_jax.paths import local_path
from slt_jax.serialization import json_safe

_FORMAT = "slt-jax results store"
_VERSION = 1
_SETTINGS_FILE = "settings.json"
_ROW_FILE = re.compile(r"^step_(\d+)\.json$")


def _canonical(value: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace (NaN and infinities kept)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _write_atomically(path: Path, value: Any) -> None:
    """Writes `value` as JSON to `path` so that readers see the old file or the new one."""
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory entry is synced (POSIX).
    if hasattr(os, "O_DIRECTORY"):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from error


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of the leaves of nested dicts: {"a.b": 1}; an inner empty dict is a leaf."""
    if isinstance(value, dict) and (value or not prefix):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: value}


def _settings_difference(old: dict, new: dict) -> str:
    """'key: stored X, now Y' for every setting that differs."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    parts = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        before = _canonical(old_flat[key]) if key in old_flat else "(absent)"
        after = _canonical(new_flat[key]) if key in new_flat else "(absent)"
        if before != after:
            parts.append(f"{key}: stored {before}, now {after}")
    return "; ".join(parts)


class ResultsStore:
    """One JSON row per finished checkpoint step, plus the settings that produced them.

    Opening a store that exists resumes it: `completed()` tells which steps are done.
    Opening it with settings that differ from the stored ones raises, so results computed
    under different settings never mix.

    Example:
      >>> store = ResultsStore("results/run1", {"nbeta": 100.0, "num_chains": 4})
      >>> for step in list_steps(ckpt_dir):
      ...     if step not in store.completed():
      ...         store.write(step, {"llc": float(estimate)})
      >>> table = store.rows()
    """

    def __init__(self, path, settings: Mapping[str, Any]):
        """Opens the store at `path`, creating it if absent.

        Args:
          path: a directory (created if missing; an existing one must be empty or a
            store written by this class).
          settings: everything that determines the results (nβ, γ, step size, seeds,
            ...): a dict of JSON-serialisable values; numpy/jax scalars and arrays are
            converted. Compared as canonical JSON, so 10 and 10.0 differ.

        Raises:
          ValueError: if `settings` is not JSON-serialisable, `path` is not a store, or
            the store was written with different settings (the message lists them).

        In a multi-process run only process 0 creates and writes the store; the other
        processes check and read what exists.
        """
        if not isinstance(settings, Mapping):
            raise ValueError(f"settings must be a dict, got {type(settings).__name__}")
        self.path = local_path(path, "results_path")
        self.settings = json_safe(settings, keep_nonfinite=True, where="settings")
        settings_file = self.path / _SETTINGS_FILE
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"results_path {str(self.path)!r} is a file, not a directory")
        if settings_file.exists():
            stored = _read(settings_file)
            if not isinstance(stored, dict) or stored.get("format") != _FORMAT:
                raise ValueError(f"{str(settings_file)!r} was not written by ResultsStore")
            if _canonical(stored["settings"]) != _canonical(self.settings):
                raise ValueError(
                    f"results_path {str(self.path)!r} holds results computed with different "
                    f"settings: {_settings_difference(stored['settings'], self.settings)}. "
                    "Use a new results_path (or delete this one) to compute with the new "
                    "settings."
                )
            return
        if not is_primary():
            return
        if self.path.is_dir() and any(
            not entry.name.startswith(".") for entry in self.path.iterdir()
        ):
            raise ValueError(
                f"results_path {str(self.path)!r} is a non-empty directory without "
                f"{_SETTINGS_FILE}; choose a new results_path"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomically(
            settings_file, {"format": _FORMAT, "version": _VERSION, "settings": self.settings}
        )

    def _row_path(self, step: int) -> Path:
        return self.path / f"step_{step:010d}.json"

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        """Records the results of one checkpoint step atomically (replacing any earlier row).

        Args:
          step: the checkpoint step, a non-negative integer.
          row: a dict of JSON-serialisable values (numpy/jax scalars are converted;
            NaN and infinities are kept); stored with `"step"` added.

        Raises:
          ValueError: if `step` is not a non-negative integer, or `row` is not
            JSON-serialisable or carries a different `"step"`.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        if not isinstance(row, Mapping):
            raise ValueError(f"row must be a dict, got {type(row).__name__}")
        converted = json_safe(row, keep_nonfinite=True, where="row")
        if converted.get("step", step) != step:
            raise ValueError(f"row['step'] is {converted['step']!r}, but step is {step}")
        if not is_primary():
            return
        _write_atomically(self._row_path(step), {"step": step, **converted})

    def completed(self) -> dict[int, dict[str, Any]]:
        """Returns the stored rows by step (each row includes its `"step"`)."""
        rows = {}
        if not self.path.is_dir():  # another process creates it (multi-process runs)
            return rows
        for entry in self.path.iterdir():
            match = _ROW_FILE.match(entry.name)
            if match is not None:
                rows[int(match.group(1))] = _read(entry)
        return dict(sorted(rows.items()))

    def rows(self) -> list[dict[str, Any]]:
        """Returns the stored rows sorted by step."""
        return list(self.completed().values())

