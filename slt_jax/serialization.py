"""One JSON policy for every result, curve, calibration and store.

:func:`json_safe` turns a record into plain JSON types — containers recursed, arrays as lists,
numpy and JAX scalars as Python numbers, objects with ``to_dict`` by that — and names the path of
anything JSON cannot hold. Non-finite numbers become ``null`` (standard JSON), except where a
store must give back exactly what it was given (``keep_nonfinite=True``: Python's ``NaN`` and
``Infinity`` tokens). :func:`dump_json` writes the text, resolving the path as users write it.
"""

import json
import math
from typing import Any

import numpy as np

from slt_jax.distributed import is_primary
from slt_jax.paths import local_path


def json_safe(value: Any, *, keep_nonfinite: bool = False, where: str = "value") -> Any:
    """``value`` as plain JSON types.

    Args:
      value: numbers, strings, booleans, None, arrays, dicts (string or integer keys), lists,
        tuples, and objects with a ``to_dict()`` method, nested.
      keep_nonfinite: keep NaN and infinities (else they become None).
      where: the name of ``value``, for the error message.

    Raises:
      ValueError: naming the path of a value JSON cannot hold.
    """
    recurse = lambda item, path: json_safe(item, keep_nonfinite=keep_nonfinite, where=path)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if keep_nonfinite or math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, np.integer)) or isinstance(key, bool):
                raise ValueError(f"{where} has the key {key!r}; JSON keys must be strings")
            out[str(key)] = recurse(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [recurse(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if hasattr(value, "to_dict"):
        return recurse(value.to_dict(), where)
    if hasattr(value, "__array__"):
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return recurse(array.tolist(), where)
    raise ValueError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable; use numbers, "
                     "strings, booleans, None, lists and dicts with string keys")


def dump_json(record: dict, path=None, indent: int = 2) -> str:
    """``record`` as JSON text; also written (UTF-8) to ``path`` if given (relative and ``~``
    paths resolved; in a multi-process run by process 0 only). Every result's ``to_json``."""
    text = json.dumps(record, indent=indent)
    if path is not None and is_primary():
        with open(local_path(path), "w", encoding="utf-8") as file:
            file.write(text)
    return text
