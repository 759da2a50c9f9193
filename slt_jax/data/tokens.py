"""Token datasets: integer arrays ``(sequences, length)`` and an optional loss mask, as a data pytree.

A token dataset is ``{"tokens": (n, T) integers, "mask": (n, T)}`` (``"mask"`` optional), held in
memory or memory-mapped from a ``.npy`` file. Its leading axis is the sequence axis, so the
samplers draw minibatches of sequences like rows of any data pytree, and n — hence the default
nβ = n / log n — counts sequences (:mod:`slt_jax.models.transformer` explains why).

``mask[i, t] = 1`` marks token t of sequence i as a target to score; ``mask[:, 0]`` is ignored,
since token 0 is never predicted.

Also here: a byte-level tokenizer (vocabulary 256: the bytes of UTF-8 text, nothing to
download) and :func:`tokens_from_text`, which cuts a text file into sequences.
"""

import os
from pathlib import Path

import jax
import numpy as np

BYTE_VOCAB_SIZE = 256


def encode_bytes(text: str) -> np.ndarray:
    """Byte-level tokens of ``text``: its UTF-8 bytes as int32 ids in ``[0, 256)``."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode_bytes(ids) -> str:
    """The text of byte-level ``ids`` (invalid UTF-8, e.g. a cut multi-byte character, as U+FFFD)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB_SIZE):
        raise ValueError(f"ids must lie in [0, {BYTE_VOCAB_SIZE}) for byte-level decoding, "
                         f"got values in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_token_arrays(tokens, mask=None, *, vocab_size: int | None = None, context_length: int | None = None,
                       name: str = "data"):
    """Check a token array (and loss mask) before anything runs; raise a ValueError naming them.

    Shapes and dtypes are checked always (also on tracers, so a loss's abstract trace raises);
    the range of the ids only on concrete arrays (reading the data; a ``numpy.memmap`` is read
    through once).

    Args:
      tokens: integer ``(sequences, length)``.
      mask: optional loss mask of the same shape (bool or numeric weights).
      vocab_size: if given, every id must lie in ``[0, vocab_size)``.
      context_length: if given, ``length`` must be at most this.
      name: how the error names ``tokens`` (e.g. ``"data['tokens']"``).
    """
    mask_name = name.replace("tokens", "mask") if "tokens" in name else f"{name} mask"
    dtype = np.dtype(tokens.dtype) if hasattr(tokens, "dtype") else np.asarray(tokens).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {dtype}")
    shape = np.shape(tokens)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (sequences, length), got shape {shape}")
    if context_length is not None and shape[1] > context_length:
        raise ValueError(f"{name} has sequences of length {shape[1]}, longer than context_length={context_length}")
    if shape[1] < 2:
        raise ValueError(f"{name} has sequences of length {shape[1]}; next-token prediction needs at least 2")
    if mask is not None:
        if np.shape(mask) != shape:
            raise ValueError(f"{mask_name} has shape {np.shape(mask)} but {name} has shape {shape}: the loss mask "
                             "marks target positions and must match")
        mask_dtype = np.dtype(mask.dtype) if hasattr(mask, "dtype") else np.asarray(mask).dtype
        if not (mask_dtype == np.bool_ or np.issubdtype(mask_dtype, np.number)):
            raise ValueError(f"{mask_name} must be boolean or numeric, got dtype {mask_dtype}")
    if vocab_size is not None and not _is_traced(tokens) and np.size(tokens):
        ids = np.asarray(tokens)  # on the host: jnp reductions would be staged inside a trace
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds token id {bad}, outside [0, vocab_size={vocab_size})")


def check_tokens(data, vocab_size: int | None, context_length: int | None = None, name: str = "data"):
    """Check a token dataset ``{"tokens", "mask"?}`` against a model's vocabulary and context.

    Run it on the data before estimating: inside ``jit`` ids cannot be checked, and an
    out-of-range id only shows as a NaN loss there.

    Args:
      data: ``{"tokens": (n, T) integers, "mask"?: (n, T)}``.
      vocab_size: ids must lie in ``[0, vocab_size)`` (None: unchecked).
      context_length: the longest sequence the model takes (None: unchecked).
      name: how errors name ``data``.

    Returns:
      n, the number of sequences.
    """
    if not isinstance(data, dict) or "tokens" not in data:
        kind = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{name} must be a dict with a 'tokens' array (and optionally 'mask'), got {kind}")
    extra = sorted(set(data) - {"tokens", "mask"})
    if extra:
        raise ValueError(f"{name} has keys {extra} besides 'tokens' and 'mask'")
    check_token_arrays(data["tokens"], data.get("mask"), vocab_size=vocab_size, context_length=context_length,
                       name=f"{name}['tokens']")
    return int(np.shape(data["tokens"])[0])


def token_data(tokens, mask=None, *, vocab_size: int | None = None, context_length: int | None = None) -> dict:
    """The data pytree ``{"tokens", "mask"?}`` of in-memory or memory-mapped arrays, checked.

    Arrays are kept as given (a ``numpy.memmap`` stays on disk until a sampler moves it to the
    device). See :func:`check_token_arrays` for the checks.
    """
    data = {"tokens": tokens} if mask is None else {"tokens": tokens, "mask": mask}
    check_token_arrays(tokens, mask, vocab_size=vocab_size, context_length=context_length, name="tokens")
    return data


def tokens_from_text(path, context_length: int, stride: int | None = None) -> dict:
    """Cut a UTF-8 text file into byte-level sequences of ``context_length`` tokens.

    Sequences start at bytes ``0, stride, 2·stride, …``; a final piece shorter than
    ``context_length`` is dropped. Multi-byte characters may be cut at sequence boundaries
    (the model sees bytes).

    Args:
      path: the text file.
      context_length: tokens per sequence (≥ 2).
      stride: offset between sequence starts; default ``context_length`` (no overlap).

    Returns:
      ``{"tokens": int32 (sequences, context_length)}``, ids in ``[0, 256)``.
    """
    for arg, value in (("context_length", context_length), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (next-token prediction), got {context_length}")
    stride = context_length if stride is None else stride
    ids = np.frombuffer(Path(path).read_bytes(), np.uint8)
    if ids.size < context_length:
        raise ValueError(f"path={os.fspath(path)!r} holds {ids.size} bytes, fewer than context_length={context_length}")
    windows = np.lib.stride_tricks.sliding_window_view(ids, context_length)[::stride]
    return {"tokens": windows.astype(np.int32)}


def mask_path(path) -> Path:
    """Where :func:`save_tokens` puts the mask of ``path``: ``x.npy`` → ``x.mask.npy``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".npy") + ".mask.npy")


def save_tokens(path, data) -> list[Path]:
    """Write a token dataset as ``.npy``: the tokens to ``path``, a mask to :func:`mask_path`.

    Returns:
      The paths written.
    """
    check_tokens(data, vocab_size=None)
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"path={os.fspath(path)!r} must end in .npy")
    np.save(path, np.asarray(data["tokens"]))
    written = [path]
    if "mask" in data:
        np.save(mask_path(path), np.asarray(data["mask"]))
        written.append(mask_path(path))
    elif mask_path(path).exists():
        mask_path(path).unlink()  # a stale mask would be loaded with these tokens
    return written


def load_tokens(path, *, mmap: bool = True, vocab_size: int | None = None, context_length: int | None = None) -> dict:
    """Read a token dataset written by :func:`save_tokens` (or any ``(n, T)`` integer ``.npy``).

    Args:
      path: the tokens' ``.npy`` file; a mask at :func:`mask_path` is loaded with it.
      mmap: memory-map the files (``np.load(mmap_mode="r")``) instead of reading them.
      vocab_size, context_length: optional checks (:func:`check_token_arrays`); the id range
        check reads the file once.

    Returns:
      ``{"tokens", "mask"?}``.
    """
    mode = "r" if mmap else None
    tokens = np.load(path, mmap_mode=mode)
    mask = np.load(mask_path(path), mmap_mode=mode) if mask_path(path).exists() else None
    return token_data(tokens, mask, vocab_size=vocab_size, context_length=context_length)
