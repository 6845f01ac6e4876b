"""Atomic, no-clobber file writes used by every side (temporary file + rename), and checked reads of the JSON
records ppcmi writes (a missing, truncated or incomplete record is one error naming the file and the field)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

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


def read_text(path: str | os.PathLike, what: str, error: type[PpcmiError] = PpcmiError) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is one ``error`` naming it as ``what``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a {what} (not UTF-8 text)") from None
    except OSError as e:
        raise error(f"{path}: unreadable {what} ({e.strerror or type(e).__name__})") from None


def read_json(path: str | os.PathLike, what: str, error: type[PpcmiError] = PpcmiError) -> Any:
    """The JSON value in ``path``; ``what`` names the record in errors ("site record", "case list").

    A missing, unreadable, non-UTF-8 or truncated file is one ``error`` naming it."""
    path = Path(path)
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: truncated or corrupt {what} (invalid JSON at line {e.lineno}, column {e.colno})") from None



def read_record(path: str | os.PathLike, what: str, error: type[PpcmiError] = PpcmiError) -> "Record":
    """The JSON object in ``path`` as a :class:`Record` (:func:`read_json`, then checked to be an object)."""
    return Record(read_json(path, what, error), path, what, error)

_REQUIRED = object()
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", list: "a list",
               dict: "an object"}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class Record:
    """The fields of one JSON object read from ``path``, checked on access.

    ``get("n_classes", int, ok=lambda v: v >= 2, expect="an integer >= 2")`` returns the field or raises
    one ``error`` naming the file and the field (``labels.values`` for a nested one) when it is missing
    (and has no ``default``), of another type, or fails ``ok``."""

    def __init__(self, value: Any, path: str | os.PathLike, what: str, error: type[PpcmiError] = PpcmiError,
                 prefix: str = ""):
        self.path, self.what, self.error, self.prefix = Path(path), what, error, prefix
        if not isinstance(value, dict):
            where = f"field {prefix[:-1]!r}" if prefix else f"not a {what}"
            raise error(f"{self.path}: {where}{' must be an object' if prefix else ' (expected a JSON object)'}, "
                        f"got {type(value).__name__}")
        self.raw: dict = value

    def fail(self, key: str, why: str) -> PpcmiError:
        return self.error(f"{self.path}: field {self.prefix + key!r} {why} (a damaged {self.what}?)")

    def get(self, key: str, kind: type | tuple[type, ...], *, default: Any = _REQUIRED,
            ok: Callable[[Any], bool] | None = None, expect: str | None = None) -> Any:
        if key not in self.raw:
            if default is _REQUIRED:
                raise self.fail(key, "is missing")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not any(_is(value, k) for k in kinds) or (ok is not None and not ok(value)):
            want = expect or " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(key, f"must be {want}, got {json.dumps(value, default=str)[:60]}")
        return value

    def sub(self, key: str, *, default: Any = _REQUIRED) -> "Record":
        """The nested object ``key`` as a Record (``{}`` when missing and ``default`` is given)."""
        if key not in self.raw and default is not _REQUIRED:
            return Record(default, self.path, self.what, self.error, f"{self.prefix}{key}.")
        if key not in self.raw:
            raise self.fail(key, "is missing")
        return Record(self.raw[key], self.path, self.what, self.error, f"{self.prefix}{key}.")
