"""Atomic, no-clobber file writes used by every side (temporary file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import PpcmiError


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    With ``overwrite=False`` an existing file is an error and is left untouched.
    ``mode`` (for example ``0o600``) is applied to the temporary file before the rename,
    so the final file never exists with wider permissions.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise PpcmiError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def json_text(obj: Any) -> str:
    """The JSON text every ppcmi file holds (indented, numpy scalars and arrays and paths as plain JSON)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    return atomic_write_text(path, json_text(obj), **kwargs)


def refuse_existing(paths: Iterable[str | os.PathLike], hint: str = "") -> None:
    """Raise, naming the first of ``paths`` that exists (``hint`` says how to replace it), before anything is written."""
    for p in paths:
        if os.path.lexists(p):
            raise PpcmiError(f"{p}: already exists; refusing to overwrite it{hint}")


def write_files(files: dict[Path, bytes], *, overwrite: bool = False, hint: str = "") -> list[Path]:
    """Write several files as one step: each atomically (temporary file + rename), in the given order.

    Without ``overwrite`` an existing file is refused before any is written, and if one appears
    meanwhile the files this call already created are removed again, so a refusal leaves nothing
    half-written. With ``overwrite`` each file is replaced atomically (a reader sees the old or the new
    file, never a mix); files the call had created are removed if a later write fails.
    """
    paths = list(files)
    if len(set(map(os.path.abspath, paths))) != len(paths):
        dup = next(p for i, p in enumerate(paths) if os.path.abspath(p) in map(os.path.abspath, paths[:i]))
        raise PpcmiError(f"{dup}: two outputs would be written to this path")
    if not overwrite:
        refuse_existing(paths, hint)
    created: list[Path] = []
    try:
        for p, data in files.items():
            existed = os.path.lexists(p)
            try:
                atomic_write_bytes(p, data, overwrite=overwrite)
            except PpcmiError as e:
                raise PpcmiError(f"{e}{hint}") from None
            if not existed:
                created.append(Path(p))
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        raise
    return [Path(p) for p in paths]


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


def atomic_write_folder(path: str | os.PathLike, files, *, mode: int | None = None) -> Path:
    """Write the ``(name, bytes)`` pairs of the iterable ``files`` into a new folder ``path`` as one commit:
    they go into a temporary folder beside it, one at a time (so only one is held in memory), which is then
    renamed to ``path``. An existing ``path`` is an error and is left untouched; after a failure nothing is left.
    """
    import shutil

    path = Path(path)
    if path.exists():
        raise PpcmiError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, data in files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise PpcmiError(f"{path}: {name!r} is not a plain file name")
            with open(tmp / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if mode is not None:
                os.chmod(tmp / name, mode)
        fsync_dir(tmp)
        if path.exists():  # (rename would replace an empty folder that appeared meanwhile)
            raise PpcmiError(f"{path}: already exists; refusing to overwrite it")
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
