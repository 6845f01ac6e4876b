"""The only vocabulary that crosses between a hospital and the server (both sides; imports nothing of ppcmi but errors).

A message is a :class:`LatentBatch`: a kind, the sending hospital's pseudonymous site id, and
named float arrays from a fixed allow-list, each (N, C, H, W). On the wire it is a safetensors
blob (no pickle): an 8-byte little-endian header length, a JSON header, raw array bytes. Its
metadata holds exactly ``ppcmi.version``, ``kind`` and ``client``, and for a query or reply its
``query`` id (a reply echoes its query's, so a hospital can bind it to its case list), and for one chunk of a
chunked ``train`` set its ``set`` id, ``index`` and ``count``; any other metadata key, array
name, dtype, rank, inconsistent batch size, non-finite value or oversized payload is refused
with a :class:`~ppcmi.errors.ProtocolError` naming the field. There is no room for file names or
patient ids: the header is checked before any array is read.

Kinds and the arrays they carry (``zt_`` = keyed latents; scale set {s3, s4, b} or {b} only):

- ``train``: ``zt_img_<scale>`` and ``zt_msk_<scale>`` (a hospital's keyed training pairs)
- ``query``: ``zt_img_<scale>`` (keyed image latents to map)
- ``reply``: ``zt_msk_<scale>`` (the server's keyed mask latents)

Chunks. One message is capped at :data:`MAX_BYTES`, so a hospital sends its training pairs as a numbered
set of ``train`` messages (chunks), each at most about :data:`CHUNK_BYTES`: a random 128-bit set id, the
chunk's ``index`` (from 0) and the set's ``count``; nothing else, no name, no row range. The rows of a set
are its chunks' rows in index order. :func:`rows_per_chunk` sizes chunks from the bytes of one row,
:func:`split` cuts a message into a set, :func:`check_set` refuses (one line naming the chunk) a duplicate,
a missing chunk or a chunk of another set, and :func:`assemble` joins a checked set into one message.
A ``train`` message without a set id is a whole set of one (as written before chunks existed).

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
CHUNK_BYTES = 64 * 1024 * 1024  # the target size of one chunk of a training set (well under MAX_BYTES)
QUERY_BYTES = 8 * 1024 * 1024  # a hospital's queries to the inference service stay under this (its default limit: 16 MiB)
SCALE_SETS = ({"s3", "s4", "b"}, {"b"})
KIND_PREFIXES = {"train": ("zt_img_", "zt_msk_"), "query": ("zt_img_",), "reply": ("zt_msk_",)}
ALLOWED_NAMES = frozenset(p + s for p in ("zt_img_", "zt_msk_") for s in ("s3", "s4", "b"))
_DTYPES = {"F32": np.float32, "F16": np.float16}
_META_KEYS = {"ppcmi.version", "kind", "client"}
_OPTIONAL_META = {"query"}
_CHUNK_META = {"set", "index", "count"}  # all three or none, on a 'train' message only
MAX_CHUNKS = 100_000  # chunks in one set
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
    set_id: str = ""  # a chunked train set's random id ("" for a train message that is a whole set of one)
    index: int = 0    # this chunk's place in its set, from 0
    count: int = 1    # the number of chunks in its set

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
    if not isinstance(msg.set_id, str) or (msg.set_id and not QUERY_RE.match(msg.set_id)):
        raise ProtocolError(f"set: invalid set id {msg.set_id!r} (32 lowercase hex digits)")
    if msg.set_id and msg.kind != "train":
        raise ProtocolError(f"set: a {msg.kind!r} message is never chunked")
    for k in ("index", "count"):
        v = getattr(msg, k)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProtocolError(f"{k}: expected an integer, got {v!r}")
    if not msg.set_id and (msg.index, msg.count) != (0, 1):
        raise ProtocolError(f"set: chunk {msg.index} of {msg.count} carries no set id")
    if not 1 <= msg.count <= MAX_CHUNKS or not 0 <= msg.index < msg.count:
        raise ProtocolError(f"index: chunk {msg.index} of {msg.count} is outside 0..count-1 (count 1..{MAX_CHUNKS})")
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
    meta = {"ppcmi.version": str(msg.version), "kind": msg.kind, "client": msg.client, **({"query": msg.query} if msg.query else {}),
            **({"set": msg.set_id, "index": str(msg.index), "count": str(msg.count)} if msg.set_id else {})}
    return save({k: np.ascontiguousarray(v) for k, v in msg.arrays.items()}, metadata=meta)


def decode(data: bytes, *, max_bytes: int = MAX_BYTES, expected: dict[str, tuple[int, int, int]] | None = None) -> LatentBatch:
    """Parse and validate wire bytes. The header is checked before any array is materialised."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"body: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(f"body: {len(data)} bytes exceeds the limit of {max_bytes}")
    meta, header = _parse_header(data[:8 + min(len(data) - 8, 1_000_000)] if len(data) >= 8 else data, len(data))
    version = int(meta["ppcmi.version"])
    try:
        from safetensors.numpy import load

        arrays = load(data)
    except Exception as e:  # malformed offsets, truncated data
        raise ProtocolError(f"body: malformed safetensors payload ({str(e).splitlines()[0][:120]})") from None
    msg = LatentBatch(kind=meta["kind"], client=meta["client"], arrays=arrays, query=meta.get("query", ""), version=version,
                      **_chunk_fields(meta))
    if expected is not None:
        validate(msg, expected)
    return msg


def _chunk_fields(meta: dict) -> dict:
    if not _CHUNK_META & set(meta):
        return {}
    if not _CHUNK_META <= set(meta):
        raise ProtocolError(f"header.__metadata__: a chunk carries all of {sorted(_CHUNK_META)}, got {sorted(_CHUNK_META & set(meta))}")
    out: dict[str, Any] = {"set_id": meta["set"]}
    for k in ("index", "count"):
        if not re.fullmatch(r"[0-9]{1,6}", meta[k]):
            raise ProtocolError(f"{k}: not a small non-negative integer: {meta[k]!r}")
        out[k] = int(meta[k])
    return out


@dataclass(frozen=True)
class Header:
    """What the header of a message file says, checked, without reading its arrays: for the coordinator,
    which reads a chunk's rows from disk as it trains. ``offsets`` maps each array to its byte range in the file."""

    kind: str
    client: str
    set_id: str
    index: int
    count: int
    shapes: dict[str, tuple[int, ...]]
    dtype: str  # "F32" or "F16"
    offsets: dict[str, tuple[int, int]]

    @property
    def n(self) -> int:
        return next(iter(self.shapes.values()))[0]


def read_header(path, *, max_bytes: int = MAX_BYTES) -> Header:
    """The checked header of the message file ``path`` (names, dtypes, shapes and offsets consistent with
    its size); the arrays are neither read nor checked for finiteness: :func:`decode` does that."""
    import os

    size = os.path.getsize(path)
    if size > max_bytes:
        raise ProtocolError(f"body: {size} bytes exceeds the limit of {max_bytes}")
    with open(path, "rb") as f:
        head = f.read(8 + 1_000_000)
    meta, header = _parse_header(head, size)
    (hlen,) = struct.unpack("<Q", head[:8])
    start = 8 + hlen
    shapes, offsets, dtypes = {}, {}, set()
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0] if isinstance(kv[1], dict) else 0):
        shape, off = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)) or \
                not (isinstance(off, list) and len(off) == 2 and all(isinstance(d, int) for d in off)):
            raise ProtocolError(f"arrays.{name}: malformed shape or offsets")
        width = 4 if info["dtype"] == "F32" else 2
        if off[0] != end or off[1] - off[0] != width * int(np.prod(shape)) or start + off[1] > size:
            raise ProtocolError(f"arrays.{name}: offsets {off} do not fit the {size}-byte file")
        end = off[1]
        shapes[name], offsets[name] = tuple(shape), (start + off[0], start + off[1])
        dtypes.add(info["dtype"])
    if start + end != size:
        raise ProtocolError(f"body: {size - start - end} bytes after the last array")
    if len(dtypes) > 1:
        raise ProtocolError(f"arrays: mixed dtypes {sorted(dtypes)}")
    chunk = {"set_id": "", "index": 0, "count": 1, **_chunk_fields(meta)}
    # the rules of a message (names per kind, scales, ranks, batch sizes, chunk fields) on empty stand-ins of its arrays
    stand_in = {k: np.zeros((1,) + s[1:] if len(s) == 4 and s[0] >= 1 else s, np.float32) for k, s in shapes.items()}
    LatentBatch(meta["kind"], meta["client"], stand_in, query=meta.get("query", ""), **chunk)
    ns = {s[0] for s in shapes.values()}
    if len(ns) != 1:
        raise ProtocolError(f"arrays: batch sizes {sorted(ns)} differ")
    return Header(meta["kind"], meta["client"], chunk["set_id"], chunk["index"], chunk["count"], shapes,
                  dtypes.pop() if dtypes else "F32", offsets)


def _parse_header(data: bytes, size: int) -> tuple[dict, dict]:
    """(metadata, array entries) of the safetensors header at the start of ``data`` (a ``size``-byte message), checked."""
    if size < 8 or len(data) < 8:
        raise ProtocolError("body: too short to be a protocol message")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > size - 8 or hlen > 1_000_000:
        raise ProtocolError(f"header: declared length {hlen} does not fit the {size}-byte body")
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
    extra = set(meta) - _META_KEYS - _OPTIONAL_META - _CHUNK_META
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
    return meta, header


# ----------------------------------------------------------------------------- chunked training sets

_CHUNK_HEADER_BYTES = 4096  # room for a chunk's safetensors header (six arrays and the metadata take under 1 KiB)


def rows_per_chunk(row_bytes: int, target: int = CHUNK_BYTES) -> int:
    """How many rows of ``row_bytes`` each (all arrays of one row) a chunk of at most ``target`` bytes holds (at least 1)."""
    if row_bytes < 1 or target < 1:
        raise ProtocolError(f"chunk: row bytes and target must be positive, got {row_bytes} and {target}")
    if row_bytes + _CHUNK_HEADER_BYTES > MAX_BYTES:
        raise ProtocolError(f"chunk: one row takes {row_bytes} bytes, more than a message may carry ({MAX_BYTES})")
    return max(1, (min(target, MAX_BYTES) - _CHUNK_HEADER_BYTES) // row_bytes)


def chunk_name(index: int) -> str:
    """The file name of chunk ``index`` in a training-set folder (``client encode --with-masks``, ``simulate``'s and
    the Flower coordinator's ``wire/``); the order of a set comes from the chunks' headers, never from file names."""
    return f"chunk-{index:05d}.ppcmi"


def new_set_id() -> str:
    """A random 128-bit set id (hex), drawn from ``secrets``: it tells nothing about the sender or its rows."""
    import secrets

    return secrets.token_hex(16)


def chunk_ranges(n: int, rows: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of a set of ``n`` rows cut into chunks of ``rows`` (the last may be shorter)."""
    return [(s, min(s + rows, n)) for s in range(0, n, rows)] or [(0, 0)]


def split(msg: LatentBatch, target: int = CHUNK_BYTES, *, set_id: str | None = None) -> list[LatentBatch]:
    """A ``train`` message as a set of chunks of at most about ``target`` bytes each, in index order."""
    if msg.kind != "train":
        raise ProtocolError(f"kind: only 'train' messages are chunked, not {msg.kind!r}")
    rows = rows_per_chunk(msg.nbytes() // max(msg.n, 1), target)
    ranges = chunk_ranges(msg.n, rows)
    sid = set_id or new_set_id()
    return [LatentBatch("train", msg.client, {k: v[a:b] for k, v in msg.arrays.items()}, set_id=sid, index=i, count=len(ranges))
            for i, (a, b) in enumerate(ranges)]


def check_set(chunks: list, names: list[str] | None = None) -> list:
    """The chunks of one hospital's set in index order, or a one-line ProtocolError naming the chunk (by
    ``names[i]``, e.g. its file, where given) that is repeated, missing, of another set or of another sender.

    ``chunks`` are :class:`LatentBatch` or :class:`Header` objects (both have kind, client, set_id, index, count)."""
    if not chunks:
        raise ProtocolError("set: no chunks")
    names = names or [f"chunk {c.index} of {c.count}" for c in chunks]
    first = chunks[0]
    seen: dict[int, str] = {}
    for c, name in zip(chunks, names):
        if c.kind != "train":
            raise ProtocolError(f"{name}: a {c.kind!r} message, not a chunk of a 'train' set")
        if c.client != first.client:
            raise ProtocolError(f"{name}: from site {c.client!r}, but {names[0]} is from {first.client!r}")
        if (c.set_id, c.count) != (first.set_id, first.count):
            raise ProtocolError(f"{name}: chunk of set {c.set_id or '(unchunked)'} ({c.count} chunks), but {names[0]} is of set "
                                f"{first.set_id or '(unchunked)'} ({first.count} chunks) from the same site; send one set per site")
        if c.index in seen:
            if not c.set_id:
                raise ProtocolError(f"{name}: a second whole training message from {c.client!r} (also {seen[c.index]}); "
                                    "send one set per site")
            raise ProtocolError(f"{name}: repeats chunk {c.index} of set {c.set_id} (also {seen[c.index]})")
        seen[c.index] = name
    missing = [i for i in range(first.count) if i not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ProtocolError(f"set {first.set_id} from {first.client!r}: chunk {missing[0]} of {first.count} is missing{more}")
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].index)
    return [chunks[i] for i in order]


def assemble(chunks: list[LatentBatch]) -> LatentBatch:
    """One ``train`` message holding a checked set's rows in index order (in memory: for small sets)."""
    chunks = check_set(chunks)
    if len(chunks) == 1:
        c = chunks[0]
        return LatentBatch("train", c.client, c.arrays)
    names = list(chunks[0].arrays)
    for c in chunks[1:]:
        if sorted(c.arrays) != sorted(names) or any(c.arrays[k].shape[1:] != chunks[0].arrays[k].shape[1:] for k in names):
            raise ProtocolError(f"set {c.set_id}: chunk {c.index} carries other arrays than chunk 0")
    return LatentBatch("train", chunks[0].client, {k: np.concatenate([c.arrays[k] for c in chunks]) for k in names})


# ----------------------------------------------------------------------------- a federation's vocabulary

STAGE1 = "train.autoencoders"          # train your autoencoders on your own data (stage 1)
TRAIN_LATENTS = "query.train_latents"  # send your keyed training pairs (stage 2)
TEST_LATENTS = "query.test_latents"    # send keyed latents of your test images
SCORE = "evaluate.score"               # decode the mapped reply and score it locally

WIRE, SITE, METRICS = "ppcmi", "site", "metrics"  # a protocol message; the site record; numbers
CHUNK = "chunk"  # in a TRAIN_LATENTS request: which chunk of which set, and the coordinator's chunk byte target
CHUNK_KEYS = ("index", "set", "bytes")
MIN_CHUNK_BYTES = 8 * 1024  # the smallest chunk target (a test-sized set still splits into several chunks)
SITE_STATUSES = ("trained", "existing", "no-test-data")
REPLY_RECORDS = {STAGE1: ({SITE, METRICS},), TRAIN_LATENTS: ({WIRE},), TEST_LATENTS: ({WIRE}, {SITE}), SCORE: ({METRICS},)}
STAGE1_METRICS = ("image_epochs", "mask_epochs", "n_train", "seconds")  # the numbers of a stage-1 reply

# a metric summary: per structure (a class name or "fg") these columns, each with these statistics,
# and per structure the number of cases in each scoring status
METRIC_COLUMNS = ("dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm", "hd95_pooled_px")
SUMMARY_STATS = ("mean", "std", "n", "n_undefined", "ci95")
CASE_STATUSES = ("ok", "both_empty", "pred_empty", "gt_empty")


def check_chunk_request(index, set_id, target) -> None:
    """A TRAIN_LATENTS request names chunk ``index`` (0 starts a new set), the set of a later chunk, and a byte target."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHUNKS:
        raise ProtocolError(f"chunk.index: {index!r} is not a chunk index")
    if not isinstance(set_id, str) or (index and not QUERY_RE.match(set_id)) or (not index and set_id):
        raise ProtocolError(f"chunk.set: {set_id!r} is not the set id of chunk {index} (none for chunk 0)")
    if isinstance(target, bool) or not isinstance(target, int) or not MIN_CHUNK_BYTES <= target <= MAX_BYTES:
        raise ProtocolError(f"chunk.bytes: {target!r} outside {MIN_CHUNK_BYTES}..{MAX_BYTES}")


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
