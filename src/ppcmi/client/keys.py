"""Hospital key files (hospital side): 32 random bytes from ``secrets``, mode 0600, never overwritten."""

from __future__ import annotations

import secrets
import stat
from pathlib import Path

from ..errors import KeyFileError, PpcmiError
from ..fileio import atomic_write_bytes
from ..klt import KEY_BYTES

KEY_FILENAME = "klt.key"


def keygen(path: str | Path) -> Path:
    """Create a new key file with mode 0600; an existing file is never overwritten."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path}: key file already exists; refusing to overwrite it (delete it yourself if you mean to)")
    try:
        return atomic_write_bytes(path, secrets.token_bytes(KEY_BYTES), overwrite=False, mode=0o600)
    except PpcmiError as e:
        raise KeyFileError(str(e)) from None


def load_key(path: str | Path) -> bytes:
    """Read a key file, refusing one that others can read or that has the wrong length."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found (create one with 'ppcmi client keygen')") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: key file is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{path}: key file is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it")
    data = path.read_bytes()
    if len(data) != KEY_BYTES:
        raise KeyFileError(f"{path}: key file holds {len(data)} bytes, expected {KEY_BYTES}")
    return data


def key_path(site_dir: str | Path) -> Path:
    return Path(site_dir) / KEY_FILENAME


def rotate_key(site_dir: str | Path) -> tuple[Path, Path]:
    """Replace a site's key with a fresh one, keeping the old key as ``klt.key.<n>.bak`` (mode 0600).

    The backup is written (never over an existing file) and read back before the new key replaces
    the old one, so no key is ever lost. Returns (new key path, backup path).
    """
    path = key_path(site_dir)
    old = load_key(path)
    n = 1
    while path.with_name(f"{KEY_FILENAME}.{n}.bak").exists():
        n += 1
    backup = path.with_name(f"{KEY_FILENAME}.{n}.bak")
    try:
        atomic_write_bytes(backup, old, overwrite=False, mode=0o600)
    except PpcmiError as e:
        raise KeyFileError(str(e)) from None
    if load_key(backup) != old:  # pragma: no cover - a failing disk
        raise KeyFileError(f"{backup}: backup does not read back; the old key is left in place")
    new = secrets.token_bytes(KEY_BYTES)
    while new == old:  # pragma: no cover - probability 2^-256
        new = secrets.token_bytes(KEY_BYTES)
    atomic_write_bytes(path, new, overwrite=True, mode=0o600)
    return path, backup


def undo_rotation(site_dir: str | Path, backup: str | Path) -> Path:
    """Put back the key :func:`rotate_key` kept in ``backup`` (when what the new key was for could not be
    written) and remove the backup; the site's key file then holds its old bytes again."""
    path, backup = key_path(site_dir), Path(backup)
    old = load_key(backup)
    atomic_write_bytes(path, old, overwrite=True, mode=0o600)
    backup.unlink()
    return path


def key_fingerprint(key: bytes) -> str:
    """A public name for a key (hex): HKDF-SHA256 of the key under its own label, so it reveals nothing of the
    key or of the transform derived from it. A case list records it to refuse a reply decoded under another key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"ppcmi key fingerprint v1").derive(key).hex()


__all__ = ["keygen", "load_key", "key_path", "rotate_key", "KEY_FILENAME", "key_fingerprint"]
