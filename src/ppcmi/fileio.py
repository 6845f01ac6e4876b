"""Atomic, no-clobber file writes used by every side (temporary file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import PpcmiError


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` and its parents if missing; a file in the way, or a folder that cannot be
    created, is one PpcmiError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        if blocker == path:
            raise PpcmiError(f"{path}: is a file, not a folder") from None
        raise PpcmiError(f"{path}: cannot create this folder: {blocker} is a file") from None
    except OSError as e:
        raise PpcmiError(f"{path}: cannot create this folder ({e.strerror or type(e).__name__})") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    With ``overwrite=False`` an existing file is an error and is left untouched.
    ``mode`` (for example ``0o600``) is applied to the temporary file before the rename,
    so the final file never exists with wider permissions.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise PpcmiError(f"{path}: already exists; refusing to overwrite it")
    if path.is_dir():
        raise PpcmiError(f"{path}: is a folder; cannot write a file there")
    try:
        ensure_dir(path.parent)
    except PpcmiError as e:
        raise PpcmiError(f"{path}: cannot write: {e}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PpcmiError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if not overwrite:
            # link() fails if the target appeared meanwhile: no silent clobbering.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PpcmiError(f"{path}: already exists; refusing to overwrite it") from None
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, a folder in the way, ...: name the file meant
            raise PpcmiError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", **kwargs)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames into it) to disk, where the platform allows it.

    A rename is visible to other processes at once, but only a synced folder keeps the order of
    renames across a power loss; callers that commit several files sync between the steps.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
