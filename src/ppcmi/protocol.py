"""The only vocabulary that crosses between a hospital and the server (both sides; imports nothing of ppcmi but errors).

A message is a :class:`LatentBatch`: a kind, the sending hospital's pseudonymous site id, and
named float arrays from a fixed allow-list, each (N, C, H, W). On the wire it is a safetensors
blob (no pickle): an 8-byte little-endian header length, a JSON header, raw array bytes. Its
metadata holds exactly ``ppcmi.version``, ``kind`` and ``client``, and for a query or reply its
``query`` id (a reply echoes its query's, so a hospital can bind it to its case list); any other metadata key, array
name, dtype, rank, inconsistent batch size, non-finite value or oversized payload is refused
with a :class:`~ppcmi.errors.ProtocolError` naming the field. There is no room for file names or
patient ids: the header is checked before any array is read.

Kinds and the arrays they carry (``zt_`` = keyed latents; scale set {s3, s4, b} or {b} only):

- ``train``: ``zt_img_<scale>`` and ``zt_msk_<scale>`` (a hospital's keyed training pairs)
- ``query``: ``zt_img_<scale>`` (keyed image latents to map)
- ``reply``: ``zt_msk_<scale>`` (the server's keyed mask latents)

A federation's steps (:data:`STAGE1` ...), the records a hospital may answer each with, the site
record and the metric summary (numbers only, under fixed names) are defined here too: the Flower
adapters in :mod:`ppcmi.flower` carry this vocabulary and refuse anything outside it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_BYTES = 256 * 1024 * 1024
SCALE_SETS = ({"s3", "s4", "b"}, {"b"})
KIND_PREFIXES = {"train": ("zt_img_", "zt_msk_"), "query": ("zt_img_",), "reply": ("zt_msk_",)}
ALLOWED_NAMES = frozenset(p + s for p in ("zt_img_", "zt_msk_") for s in ("s3", "s4", "b"))
_DTYPES = {"F32": np.float32, "F16": np.float16}
_META_KEYS = {"ppcmi.version", "kind", "client"}
_OPTIONAL_META = {"query"}
# \Z, not $: "$" also matches before a final newline, which would let "hospital1\n" pass as a site id
CLIENT_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
QUERY_RE = re.compile(r"\A[0-9a-f]{32}\Z")  # a query's random id (128 bits, hex); a reply echoes it


@dataclass(frozen=True)
class LatentBatch:
    """A validated protocol message. ``arrays`` maps allowed names to (N, C, H, W) float arrays."""

    kind: str
    client: str
    arrays: dict[str, np.ndarray] = field(repr=False)
    query: str = ""  # a query's random id, echoed by its reply ("" for train messages and unbound queries)
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
    if not isinstance(msg.query, str) or (msg.query and not QUERY_RE.match(msg.query)):
        raise ProtocolError(f"query: invalid query id {msg.query!r} (32 lowercase hex digits)")
    if msg.query and msg.kind == "train":
        raise ProtocolError("query: a 'train' message carries no query id")
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
    if expected is not None:
        for p, ss in zip(prefixes, scale_sets):
            if ss != set(expected):  # (an array of a scale not served is refused below, by name)
                missing = [p + s for s in ("s3", "s4", "b") if s in expected and s not in ss]
                if missing:
                    raise ProtocolError(f"arrays: missing {', '.join(missing)}; the receiver serves scales "
                                        f"{', '.join(s for s in ('s3', 's4', 'b') if s in expected)}, so a message must carry "
                                        f"exactly {', '.join(p + s for s in ('s3', 's4', 'b') if s in expected)}")
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
    meta = {"ppcmi.version": str(msg.version), "kind": msg.kind, "client": msg.client, **({"query": msg.query} if msg.query else {})}
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
    extra = set(meta) - _META_KEYS - _OPTIONAL_META
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
    msg = LatentBatch(kind=meta["kind"], client=meta["client"], arrays=arrays, query=meta.get("query", ""), version=version)
    if expected is not None:
        validate(msg, expected)
    return msg


# ----------------------------------------------------------------------------- a federation's vocabulary

STAGE1 = "train.autoencoders"          # train your autoencoders on your own data (stage 1)
TRAIN_LATENTS = "query.train_latents"  # send your keyed training pairs (stage 2)
TEST_LATENTS = "query.test_latents"    # send keyed latents of your test images
SCORE = "evaluate.score"               # decode the mapped reply and score it locally

WIRE, SITE, METRICS = "ppcmi", "site", "metrics"  # a protocol message; the site record; numbers
SITE_STATUSES = ("trained", "existing", "no-test-data")
REPLY_RECORDS = {STAGE1: ({SITE, METRICS},), TRAIN_LATENTS: ({WIRE},), TEST_LATENTS: ({WIRE}, {SITE}), SCORE: ({METRICS},)}
STAGE1_METRICS = ("image_epochs", "mask_epochs", "n_train", "seconds")  # the numbers of a stage-1 reply

# a metric summary: per structure (a class name or "fg") these columns, each with these statistics,
# and per structure the number of cases in each scoring status
METRIC_COLUMNS = ("dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm", "hd95_pooled_px")
SUMMARY_STATS = ("mean", "std", "n", "n_undefined", "ci95")
CASE_STATUSES = ("ok", "both_empty", "pred_empty", "gt_empty")


def check_site(site: str, status: str) -> None:
    """A site record holds a valid site id and one of :data:`SITE_STATUSES`."""
    if status not in SITE_STATUSES:
        raise ProtocolError(f"site.status: {status!r} not one of {SITE_STATUSES}")
    if not isinstance(site, str) or not CLIENT_RE.match(site):
        raise ProtocolError(f"site.site: invalid site id {site!r}")


def flatten_summary(summary: dict) -> dict[str, int | float | list[float]]:
    """A ``metrics.summarize`` result as numbers only, keys joined with '.' (what a Flower MetricRecord holds)."""
    flat: dict[str, Any] = {"n_cases": int(summary["n_cases"])}
    for col, v in summary.items():
        if isinstance(v, dict) and "mean" in v:
            flat[f"{col}.mean"] = float(v["mean"])
            flat[f"{col}.std"] = float(v["std"])
            flat[f"{col}.n"] = int(v["n"])
            flat[f"{col}.n_undefined"] = int(v["n_undefined"])
            flat[f"{col}.ci95"] = [float(x) for x in v["ci95"]]
    for structure, by_status in summary.get("counts", {}).items():
        for status, k in by_status.items():
            flat[f"counts.{structure}.{status}"] = int(k)
    return flat


def unflatten_summary(flat: dict[str, Any], structures: set[str] | None = None) -> dict:
    """Inverse of :func:`flatten_summary`; refuses keys outside that layout, and with ``structures`` (the
    structures the shared label map defines) any other structure, so no other name can ride along."""
    out: dict[str, Any] = {"n_cases": int(flat.get("n_cases", 0)), "counts": {}}
    cols = None if structures is None else {f"{s}_{m}" for s in structures for m in METRIC_COLUMNS}
    counts = None if structures is None else {f"{s}.{st}" for s in structures for st in CASE_STATUSES}
    for key, v in flat.items():
        if key == "n_cases":
            continue
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "counts" and (counts is None or f"{parts[1]}.{parts[2]}" in counts):
            out["counts"].setdefault(parts[1], {})[parts[2]] = int(v)
        elif len(parts) == 2 and parts[1] in SUMMARY_STATS and (cols is None or parts[0] in cols):
            out.setdefault(parts[0], {})[parts[1]] = [float(x) for x in v] if parts[1] == "ci95" else (
                int(v) if parts[1] in ("n", "n_undefined") else float(v))
        else:
            raise ProtocolError(f"metrics: unexpected key {key!r}")
    for col, v in out.items():
        if isinstance(v, dict) and col != "counts" and set(v) != set(SUMMARY_STATS):
            raise ProtocolError(f"metrics: column {col!r} is incomplete ({sorted(v)})")
    return out
