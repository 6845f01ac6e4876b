"""The only vocabulary that crosses between a hospital and the server (both sides; imports nothing of ppcmi but errors).

A message is a :class:`LatentBatch`: a kind, the sending hospital's pseudonymous site id, and
named float arrays from a fixed allow-list, each (N, C, H, W). On the wire it is a safetensors
blob (no pickle): an 8-byte little-endian header length, a JSON header, raw array bytes. Its
metadata holds exactly ``ppcmi.version``, ``kind`` and ``client``; any other metadata key, array
name, dtype, rank, inconsistent batch size, non-finite value or oversized payload is refused
with a :class:`~ppcmi.errors.ProtocolError` naming the field. There is no room for file names or
patient ids: the header is checked before any array is read.

Kinds and the arrays they carry (``zt_`` = keyed latents; scale set {s3, s4, b} or {b} only):

- ``train``: ``zt_img_<scale>`` and ``zt_msk_<scale>`` (a hospital's keyed training pairs)
- ``query``: ``zt_img_<scale>`` (keyed image latents to map)
- ``reply``: ``zt_msk_<scale>`` (the server's keyed mask latents)
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_BYTES = 256 * 1024 * 1024
SCALE_SETS = ({"s3", "s4", "b"}, {"b"})
KIND_PREFIXES = {"train": ("zt_img_", "zt_msk_"), "query": ("zt_img_",), "reply": ("zt_msk_",)}
ALLOWED_NAMES = frozenset(p + s for p in ("zt_img_", "zt_msk_") for s in ("s3", "s4", "b"))
_DTYPES = {"F32": np.float32, "F16": np.float16}
_META_KEYS = {"ppcmi.version", "kind", "client"}
CLIENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class LatentBatch:
    """A validated protocol message. ``arrays`` maps allowed names to (N, C, H, W) float arrays."""

    kind: str
    client: str
    arrays: dict[str, np.ndarray] = field(repr=False)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        validate(self)

    @property
    def n(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    @property
    def scales(self) -> list[str]:
        order = ("s3", "s4", "b")
        return [s for s in order if any(name.endswith("_" + s) for name in self.arrays)]

    def latents(self, prefix: str) -> dict[str, np.ndarray]:
        """``{scale: array}`` for ``prefix`` "zt_img_" or "zt_msk_"."""
        return {name[len(prefix):]: a for name, a in self.arrays.items() if name.startswith(prefix)}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def validate(msg: LatentBatch, expected: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Check a message; ``expected`` optionally gives the (C, H, W) each scale must have."""
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(f"version: unsupported protocol version {msg.version!r} (this side speaks {PROTOCOL_VERSION})")
    if msg.kind not in KIND_PREFIXES:
        raise ProtocolError(f"kind: unknown message kind {msg.kind!r}; allowed {sorted(KIND_PREFIXES)}")
    if not isinstance(msg.client, str) or not CLIENT_RE.match(msg.client):
        raise ProtocolError(f"client: invalid site id {msg.client!r} (letters, digits, '_', '.', '-'; at most 64)")
    if not msg.arrays:
        raise ProtocolError("arrays: message carries no arrays")
    prefixes = KIND_PREFIXES[msg.kind]
    for name in msg.arrays:
        if name not in ALLOWED_NAMES or not name.startswith(prefixes):
            raise ProtocolError(f"arrays.{name}: name not allowed in a {msg.kind!r} message")
    scale_sets = [{n[len(p):] for n in msg.arrays if n.startswith(p)} for p in prefixes]
    for p, ss in zip(prefixes, scale_sets):
        if ss not in SCALE_SETS:
            raise ProtocolError(f"arrays: {p}* must cover scales {{s3,s4,b}} or {{b}} only, got {sorted(ss)}")
    if len(scale_sets) == 2 and scale_sets[0] != scale_sets[1]:
        raise ProtocolError(f"arrays: image scales {sorted(scale_sets[0])} differ from mask scales {sorted(scale_sets[1])}")
    n = None
    for name, a in msg.arrays.items():
        if not isinstance(a, np.ndarray):
            raise ProtocolError(f"arrays.{name}: expected a numpy array, got {type(a).__name__}")
        if a.dtype not in (np.float32, np.float16):
            raise ProtocolError(f"arrays.{name}: dtype {a.dtype} not allowed (float32 or float16)")
        if a.ndim != 4 or min(a.shape) < 1:
            raise ProtocolError(f"arrays.{name}: expected shape (N, C, H, W), got {tuple(a.shape)}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ProtocolError(f"arrays.{name}: batch size {a.shape[0]} differs from {n}")
        if expected is not None:
            scale = name.rsplit("_", 1)[1]
            if scale not in expected:
                raise ProtocolError(f"arrays.{name}: scale {scale!r} not served (expected {sorted(expected)})")
            if tuple(a.shape[1:]) != tuple(expected[scale]):
                raise ProtocolError(f"arrays.{name}: shape {tuple(a.shape[1:])} per item, expected {tuple(expected[scale])}")
        if not np.isfinite(a).all():
            raise ProtocolError(f"arrays.{name}: contains NaN or Inf")


def encode(msg: LatentBatch) -> bytes:
    """Serialise to the wire format (safetensors bytes with the three metadata keys)."""
    from safetensors.numpy import save

    validate(msg)
    meta = {"ppcmi.version": str(msg.version), "kind": msg.kind, "client": msg.client}
    return save({k: np.ascontiguousarray(v) for k, v in msg.arrays.items()}, metadata=meta)


def decode(data: bytes, *, max_bytes: int = MAX_BYTES, expected: dict[str, tuple[int, int, int]] | None = None) -> LatentBatch:
    """Parse and validate wire bytes. The header is checked before any array is materialised."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"body: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(f"body: {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 8:
        raise ProtocolError("body: too short to be a protocol message")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8 or hlen > 1_000_000:
        raise ProtocolError(f"header: declared length {hlen} does not fit the {len(data)}-byte body")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, or nesting deep enough to exhaust the parser
        raise ProtocolError(f"header: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header: expected a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise ProtocolError("header.__metadata__: missing")
    if not all(isinstance(v, str) for v in meta.values()):
        raise ProtocolError("header.__metadata__: every value must be a string")
    extra = set(meta) - _META_KEYS
    if extra:
        raise ProtocolError(f"header.__metadata__: unexpected keys {sorted(extra)}")
    missing = _META_KEYS - set(meta)
    if missing:
        raise ProtocolError(f"header.__metadata__: missing keys {sorted(missing)}")
    try:
        version = int(meta["ppcmi.version"])
    except (TypeError, ValueError):
        raise ProtocolError(f"version: not an integer: {meta['ppcmi.version']!r}") from None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"version: unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})")
    for name, info in header.items():
        if name not in ALLOWED_NAMES:
            raise ProtocolError(f"arrays.{name}: name not allowed")
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise ProtocolError(f"arrays.{name}: dtype {info.get('dtype') if isinstance(info, dict) else info!r} not allowed (F32 or F16)")
    try:
        from safetensors.numpy import load

        arrays = load(data)
    except Exception as e:  # malformed offsets, truncated data
        raise ProtocolError(f"body: malformed safetensors payload ({str(e).splitlines()[0][:120]})") from None
    msg = LatentBatch(kind=meta["kind"], client=meta["client"], arrays=arrays, version=version)
    if expected is not None:
        validate(msg, expected)
    return msg
