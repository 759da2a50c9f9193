"""Paths as users write them: relative, ``~``, or remote, resolved once at the API boundary.

Orbax refuses relative checkpoint paths, and a relative path kept in a result's settings means
something else from another working directory. Every path-taking entry point therefore turns
its argument into an absolute path here, once: ``~`` is expanded and a relative path is taken
against the current working directory. Remote paths (``gs://bucket/run``, any ``scheme://``)
pass through untouched as :class:`etils.epath.Path`, which Orbax reads directly.
"""

import os
import re
from pathlib import Path

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
    """Whether ``path`` names a remote location (``scheme://…``, e.g. ``gs://bucket/run``)."""
    return bool(_REMOTE.match(os.fspath(path))) if isinstance(path, (str, os.PathLike)) else False


def _checked(path, name: str) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a non-empty path (str or os.PathLike), got {path!r}")
    return path


def local_path(path, name: str = "path") -> Path:
    """``path`` as an absolute local :class:`pathlib.Path` (``~`` expanded, relative to the cwd).

    Args:
      path: a str or ``os.PathLike``.
      name: the argument's name, for the error message.

    Raises:
      ValueError: naming ``name`` if ``path`` is empty, not a path, or remote (this argument is
        written with local file operations).
    """
    text = _checked(path, name)
    if is_remote(text):
        raise ValueError(f"{name}={text!r} is a remote path; it must be a local directory")
    return Path(os.path.abspath(os.path.expanduser(text)))


def checkpoint_path(path, name: str = "checkpoint_dir"):
    """``path`` as an absolute :class:`etils.epath.Path`: local paths resolved as in
    :func:`local_path`, remote ones (``gs://…``) untouched."""
    from etils import epath  # Orbax's path type; imported with Orbax, not with slt_jax

    text = _checked(path, name)
    return epath.Path(text if is_remote(text) else local_path(text, name))
