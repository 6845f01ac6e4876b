"""Fuzz the HTTPS inference service: thousands of mutated requests over loopback mutual TLS, zero 5xx allowed.

In a temporary folder it builds a tiny mapping model (seeded untrained weights, 32x32 inputs at a
quarter of the autoencoder widths, two hospitals), a CA, the server certificate and client
certificates, and starts the real ``ppcmi server serve`` in its own process with short timeouts
(``--header-timeout``, ``--body-timeout``, ``--keep-alive-timeout``) and a small ``--max-bytes``. Then it
sends, as hospital1 (its own certificate), seeded mutations in these families:

- ``scale_subsets``: every one of the 2^6 subsets of the protocol's six array names (the three
  ``zt_img_*`` a query carries and the three ``zt_msk_*`` it must not), each well formed and with
  every mutation of :data:`VARIANTS` (dtypes, shapes, NaN and infinities), as a ``query``;
- ``kinds``: every subset, well formed, as a ``reply``, a ``train`` and an unknown kind;
- ``meta``: protocol version, kind, client (another hospital, one the model does not serve, invalid
  ids), query ids (missing, wrong length, upper case, not hex), extra or missing metadata keys;
- ``bytes``: seeded byte flips anywhere in a valid query, truncated bodies (at every region), garbage
  bodies, lying header-length prefixes, bad JSON and bad UTF-8 in the header, deep JSON nesting;
- ``oversize``: bodies and Content-Length just over, far over and absurdly over ``--max-bytes``,
  chunked bodies over it, array shapes declaring 2^40 elements;
- ``http``: content types, methods, paths, bad Content-Length and Transfer-Encoding, chunked bodies,
  pipelined requests, HTTP/1.0, many headers, a huge header, garbage request lines;
- ``slow``: a silent connection, half-sent request lines, trickled headers, a half-sent body, a
  trickled body, a client hanging up mid-body, an idle keep-alive connection (these wait for the
  timeouts, so there are few and they run in parallel).

Each request's outcome is its HTTP status, ``closed`` (the server closed the connection without an
answer) or ``client-error`` (the client side failed). Every family states what it expects; any 5xx,
any unexpected close and any unexpected status is listed. The server's stderr is scanned for ERROR
lines and tracebacks, and ``/healthz`` must answer at the end. Writes ``fuzz-service.json`` and
``fuzz-service.md`` into --out (default benchmarks/results); exits 1 when the requirement (zero 5xx,
zero unexpected outcomes, no server error) is not met.

    .venv/bin/python benchmarks/fuzz_service.py              # the full run (>= 2,000 requests)
    .venv/bin/python benchmarks/fuzz_service.py --quick      # fewer byte mutations -> runs/fuzz-quick/
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ppcmi import certs, protocol
from ppcmi.experiment import machine, untrained_model, wait_for_service
from ppcmi.client.remote import tls_context
from ppcmi.fileio import atomic_write_json, atomic_write_text

OCTET = "application/octet-stream"
SCALES = ("s3", "s4", "b")
NAMES = tuple(p + s for p in ("zt_img_", "zt_msk_") for s in SCALES)
QUERY_ID = "0123456789abcdef0123456789abcdef"
OK_4XX = (400, 403, 404, 405, 408, 413, 415)


# ----------------------------------------------------------------------------- messages, byte by byte

def raw_message(arrays: dict[str, tuple[str, list[int], bytes]], meta: dict | None, *, header_extra: dict | None = None) -> bytes:
    """A safetensors blob written by hand (so that it can be wrong): ``arrays`` maps a name to (dtype tag,
    shape, data bytes); offsets follow the data as given, whatever the shape says."""
    header: dict = {}
    if meta is not None:
        header["__metadata__"] = meta
    offset, data = 0, []
    for name, (dtype, shape, blob) in arrays.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        data.append(blob)
    header.update(header_extra or {})
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(data)


def _meta(client: str = "hospital1", kind: str = "query", query: str | None = QUERY_ID, version: str = "1") -> dict:
    m = {"ppcmi.version": version, "kind": kind, "client": client}
    if query is not None:
        m["query"] = query
    return m


_TAGS = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64", np.dtype(np.int32): "I32",
         np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def _entry(a: np.ndarray, tag: str | None = None) -> tuple[str, list[int], bytes]:
    return (tag or _TAGS[a.dtype], list(a.shape), np.ascontiguousarray(a).tobytes())


def _poison(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.flat[a.size // 2] = value
        return a
    return f


# name -> (mutation of one array, whether a query of the right arrays stays acceptable)
VARIANTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray] | str, bool]] = {
    "well-formed": (lambda a: a, True),
    "float16": (lambda a: a.astype(np.float16), True),
    "float64": (lambda a: a.astype(np.float64), False),
    "int32": (lambda a: a.astype(np.int32), False),
    "uint8": (lambda a: a.astype(np.uint8), False),
    "bool": (lambda a: a > 0, False),
    "bf16-tag": ("BF16", False),
    "nan": (_poison(float("nan")), False),
    "+inf": (_poison(float("inf")), False),
    "-inf": (_poison(float("-inf")), False),
    "channels-x2": (lambda a: np.concatenate([a, a], axis=1), False),
    "height-1": (lambda a: a[:, :, :-1], False),
    "width+1": (lambda a: np.concatenate([a, a[:, :, :, :1]], axis=3), False),
    "3d": (lambda a: a[0], False),
    "5d": (lambda a: a[None], False),
    "zero-batch": (lambda a: a[:0], False),
    "batch-mismatch": ("batch", False),  # the first array of the message has one row fewer
}


@dataclass
class Case:
    family: str
    name: str
    body: bytes | None = None  # sent with httpx as one POST /v1/map (octet-stream)
    raw: Callable | None = None  # or a function(sock) -> outcome over its own raw TLS connection
    expect: tuple = OK_4XX  # acceptable outcomes (statuses, "closed", "hung-up")


def scale_cases(shapes: dict[str, tuple[int, int, int]], rng: np.random.Generator, batch: int = 2) -> list[Case]:
    """Every subset of the six array names, well formed and with each of :data:`VARIANTS`, as a query; and
    every subset well formed as a reply, a train message and an unknown kind."""
    base = {s: rng.standard_normal((batch, *shapes[s])).astype(np.float32) for s in SCALES}
    cases = []
    for r in range(len(NAMES) + 1):
        for subset in itertools.combinations(NAMES, r):
            complete_query = set(subset) == {"zt_img_" + s for s in SCALES}
            label = "+".join(subset) or "none"
            for vname, (change, acceptable) in VARIANTS.items():
                arrays = {}
                for i, name in enumerate(subset):
                    a = base[name.rsplit("_", 1)[1]]
                    if change == "batch":
                        arrays[name] = _entry(a[:-1] if i == 0 else a)
                    elif change == "BF16":
                        arrays[name] = _entry(a.astype(np.float16), "BF16")
                    else:
                        arrays[name] = _entry(change(a))
                ok = complete_query and acceptable
                cases.append(Case("scale_subsets", f"{label} {vname}", raw_message(arrays, _meta()), expect=(200,) if ok else (400,)))
            arrays = {name: _entry(base[name.rsplit("_", 1)[1]]) for name in subset}
            for kind in ("reply", "train", "nope"):
                meta = _meta(kind=kind, query=None if kind == "train" else QUERY_ID)
                cases.append(Case("kinds", f"{label} as {kind}", raw_message(arrays, meta), expect=(400,)))
    return cases


def _valid_arrays(shapes, rng, batch: int = 2) -> dict:
    return {"zt_img_" + s: _entry(rng.standard_normal((batch, *shapes[s])).astype(np.float32)) for s in SCALES}


def meta_cases(shapes, rng) -> list[Case]:
    arrays = _valid_arrays(shapes, rng)
    m = lambda **kw: raw_message(arrays, _meta(**kw))  # noqa: E731
    cases = [
        Case("meta", "no query id (an unbound query)", m(query=None), expect=(200,)),
        Case("meta", "client = another served hospital", m(client="hospital2"), expect=(403,)),
        Case("meta", "client = a hospital the model does not serve", m(client="hospital9"), expect=(403,)),
        Case("meta", "no metadata", raw_message(arrays, None), expect=(400,)),
        Case("meta", "metadata not an object", raw_message(arrays, None, header_extra={"__metadata__": ["query"]}), expect=(400,)),
        Case("meta", "metadata value a number", raw_message(arrays, {**_meta(), "ppcmi.version": 1}), expect=(400,)),
        Case("meta", "extra metadata key (a file name)", raw_message(arrays, {**_meta(), "file": "patient1.png"}), expect=(400,)),
        Case("meta", "unknown array name", raw_message({**arrays, "patient_id": arrays["zt_img_b"]}, _meta()), expect=(400,)),
        Case("meta", "array entry not an object", raw_message(arrays, _meta(), header_extra={"zt_img_b": [1, 2]}), expect=(400,)),
        Case("meta", "header a list", struct.pack("<Q", 8) + b"[1,2,3] ", expect=(400,)),
    ]
    for key in ("ppcmi.version", "kind", "client"):
        meta = _meta()
        del meta[key]
        cases.append(Case("meta", f"missing {key}", raw_message(arrays, meta), expect=(400,)))
    for v in ("0", "2", "-1", "1.0", "one", "", "99999999999999999999999"):
        cases.append(Case("meta", f"version {v!r}", m(version=v), expect=(400,)))
    for k in ("reply", "train", "", "QUERY", "query "):
        cases.append(Case("meta", f"kind {k!r}", m(kind=k, query=None if k == "train" else QUERY_ID), expect=(400,)))
    for c in ("", "../hospital1", "hospital1/..", "h" * 65, "-h", "hospital 1", "höspital", "hospital1\n"):
        cases.append(Case("meta", f"client {c!r}", m(client=c), expect=(400,)))
    for q in ("", QUERY_ID.upper(), QUERY_ID[:-1], QUERY_ID + "0", QUERY_ID + "\n", "g" * 32, "0x" + QUERY_ID[2:], QUERY_ID[:16] + "-" + QUERY_ID[17:]):
        cases.append(Case("meta", f"query id {q!r}", m(query=q), expect=(200,) if q == "" else (400,)))
    return cases


def byte_cases(query: bytes, rng: np.random.Generator, n_flips: int, n_truncations: int, n_garbage: int) -> list[Case]:
    (hlen,) = struct.unpack("<Q", query[:8])
    header = query[8:8 + hlen]
    data = query[8 + hlen:]
    cases = []
    for _ in range(n_flips):  # half in the prefix + header (where refusals happen), half anywhere
        end = 8 + hlen if rng.random() < 0.5 else len(query)
        i, x = int(rng.integers(0, end)), int(rng.integers(1, 256))
        cases.append(Case("bytes", f"flip byte {i} ^ {x}", query[:i] + bytes([query[i] ^ x]) + query[i + 1:], expect=(200, 400, 403)))
    cuts = sorted(set(int(c) for c in rng.integers(0, len(query), n_truncations)) | {0, 1, 7, 8, 9, 8 + hlen - 1, 8 + hlen, len(query) - 1})
    for n in cuts:
        cases.append(Case("bytes", f"truncated to {n} bytes", query[:n], expect=(400,)))
    for k in range(n_garbage):
        cases.append(Case("bytes", f"garbage body {k}", rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes(),
                          expect=(400,)))
    for v in (0, 1, hlen - 1, hlen + 1, len(query), 2 ** 32, 2 ** 63, 2 ** 64 - 1):
        cases.append(Case("bytes", f"header length prefix {v}", struct.pack("<Q", v) + query[8:], expect=(400,)))
    rehead = lambda h: struct.pack("<Q", len(h)) + h + data  # noqa: E731
    bad_headers = {
        "not JSON": b"{not json" + b" " * 7,
        "bad UTF-8": b'{"\xff\xfe":1}   ',
        "deep nesting": b"[" * 20_000 + b"]" * 20_000,
        "empty object": b"{}      ",
        "null": b"null    ",
        "a string": b'"query" ',
        "duplicate keys": header[:-1].rstrip() + b',"__metadata__":{"kind":"train"}}',
        "NaN literal": header.replace(b'"shape":[', b'"shape":[NaN,', 1),
        "huge integer": header.replace(b'"shape":[', b'"shape":[' + b"9" * 5000 + b",", 1),
        "negative shape": header.replace(b'"shape":[2,', b'"shape":[-2,', 1),
        "float shape": header.replace(b'"shape":[2,', b'"shape":[2.5,', 1),
        "shape as a string": header.replace(b'"shape":[2,', b'"shape":["2",', 1),
        "offsets reversed": header.replace(b'"data_offsets":[0,', b'"data_offsets":[999999,', 1),
    }
    for name, h in bad_headers.items():
        cases.append(Case("bytes", f"header {name}", rehead(h), expect=(400,)))
    return cases


def oversize_cases(shapes, rng, max_bytes: int, drain: int) -> list[Case]:
    arrays = _valid_arrays(shapes, rng, batch=1)
    small = raw_message(arrays, _meta())
    huge_shape = {k: ("F32", [2 ** 40, *v[1][1:]], v[2]) for k, v in arrays.items()}
    overflow = {k: ("F32", [2 ** 62, 2 ** 62, *v[1][2:]], v[2]) for k, v in arrays.items()}
    cases = [
        Case("oversize", "array shape declaring 2^40 rows", raw_message(huge_shape, _meta()), expect=(400,)),
        Case("oversize", "array shape whose size overflows 64 bits", raw_message(overflow, _meta()), expect=(400,)),
        Case("oversize", "offsets past the end of the body", raw_message(arrays, _meta(), header_extra={
            "zt_img_b": {"dtype": "F32", "shape": [1, *shapes["b"]], "data_offsets": [0, 2 ** 40]}}), expect=(400,)),
        Case("oversize", "body max_bytes + 1", small + b"\0" * (max_bytes + 1 - len(small)), expect=(413,)),
        Case("oversize", "body exactly max_bytes", small + b"\0" * (max_bytes - len(small)), expect=(400,)),
    ]
    for name, declared, sent in (("Content-Length max + drain + 1", max_bytes + drain + 1, 4096),
                                 ("Content-Length 10^18", 10 ** 18, 4096),
                                 ("Content-Length max + 1, body cut short", max_bytes + 1, 1024)):
        # a small excess is drained before the 413, so a body that stops short waits for the body timeout
        cases.append(Case("oversize", name, raw=_declared(declared, b"\0" * sent),
                          expect=(413, 408) if declared <= max_bytes + drain else (413,)))
    cases.append(Case("oversize", "chunked body over the limit", raw=_chunked([b"\0" * 65536] * (max_bytes // 65536 + 2)), expect=(413,)))
    return cases


# ----------------------------------------------------------------------------- raw HTTP over TLS

def _read_response(sock: ssl.SSLSocket, limit: float) -> tuple[int | str, dict, bytes]:
    """One response from ``sock``: (status, headers, body), or ("closed", {}, b"") if the server closed it first."""
    sock.settimeout(limit)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed", {}, b""
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:] if ":" in h)}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError) as e:
        return ("closed" if not data else f"client-error:{type(e).__name__}"), {}, b""


def _head(method: str = "POST", path: str = "/v1/map", extra: str = "", length: int | None = None, ctype: str | None = OCTET,
          version: str = "HTTP/1.1") -> bytes:
    h = f"{method} {path} {version}\r\nHost: localhost\r\n"
    if ctype is not None:
        h += f"Content-Type: {ctype}\r\n"
    if length is not None:
        h += f"Content-Length: {length}\r\n"
    return (h + extra + "\r\n").encode("latin-1")


def _send(sock: ssl.SSLSocket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
        return False


def _readable(sock: ssl.SSLSocket, wait: float) -> bool:
    """Whether the server sent something (an answer, or the end of the connection) within ``wait`` seconds."""
    return bool(sock.pending() or select.select([sock], [], [], wait)[0])


def _exchange(data: bytes, limit: float = 30.0):
    def run(sock):
        _send(sock, data)
        return _read_response(sock, limit)[0]
    return run


def _declared(declared: int, sent: bytes):
    return _exchange(_head(length=declared) + sent)


def _chunked(chunks: list[bytes]):
    body = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
    return _exchange(_head(extra="Transfer-Encoding: chunked\r\n") + body)


def http_cases(query: bytes, rng: np.random.Generator, n_garbage_lines: int) -> list[Case]:
    q = query
    cases = [
        Case("http", "valid query (raw)", raw=_exchange(_head(length=len(q)) + q), expect=(200,)),
        Case("http", "HTTP/1.0", raw=_exchange(_head(length=len(q), version="HTTP/1.0") + q), expect=(200,)),
        Case("http", "chunked query", raw=_chunked([q[:100], q[100:]]), expect=(200,)),
        Case("http", "two pipelined queries", raw=_pipelined(q), expect=(200,)),
        Case("http", "content type text/plain", raw=_exchange(_head(length=len(q), ctype="text/plain") + q), expect=(415,)),
        Case("http", "no content type", raw=_exchange(_head(length=len(q), ctype=None) + q), expect=(415,)),
        Case("http", "content type json", raw=_exchange(_head(length=len(q), ctype="application/json") + q), expect=(415,)),
        Case("http", "GET /v1/map", raw=_exchange(_head("GET", length=0)), expect=(405,)),
        Case("http", "PUT /v1/map", raw=_exchange(_head("PUT", length=len(q)) + q), expect=(405,)),
        Case("http", "POST /healthz", raw=_exchange(_head("POST", "/healthz", length=len(q)) + q), expect=(405,)),
        Case("http", "POST /nope", raw=_exchange(_head("POST", "/nope", length=len(q)) + q), expect=(404,)),
        Case("http", "GET /../../etc/passwd", raw=_exchange(_head("GET", "/../../etc/passwd", length=0)), expect=(404, 400)),
        Case("http", "GET /healthz", raw=_exchange(_head("GET", "/healthz", length=0, ctype=None)), expect=(200,)),
        Case("http", "Content-Length not a number", raw=_exchange(_head(extra="Content-Length: abc\r\n") + q), expect=(400,)),
        Case("http", "Content-Length negative", raw=_exchange(_head(extra="Content-Length: -5\r\n") + q), expect=(400,)),
        Case("http", "two different Content-Lengths", raw=_exchange(_head(extra=f"Content-Length: {len(q)}\r\nContent-Length: 7\r\n") + q),
             expect=(400,)),
        Case("http", "Content-Length and chunked", raw=_exchange(_head(length=len(q), extra="Transfer-Encoding: chunked\r\n") + q),
             expect=(400, 408)),  # h11 lets chunked win (RFC 9112); the query is no chunk: the body never completes
        Case("http", "Transfer-Encoding gzip", raw=_exchange(_head(extra="Transfer-Encoding: gzip\r\n") + q), expect=(400, 501)),
        Case("http", "malformed chunk size", raw=_exchange(_head(extra="Transfer-Encoding: chunked\r\n") + b"zz\r\nabc\r\n0\r\n\r\n"),
             expect=(400,)),
        Case("http", "no Content-Length (empty body)", raw=_exchange(_head()), expect=(400,)),
        Case("http", "200 extra headers", raw=_exchange(_head(length=len(q), extra="".join(f"X-F{i}: {i}\r\n" for i in range(200))) + q),
             expect=(200,)),
        Case("http", "one 8 KiB header", raw=_exchange(_head(length=len(q), extra=f"X-Big: {'a' * 8192}\r\n") + q), expect=(200,)),
        # h11 limits only a header block still incomplete after a read (16 KiB): one that arrives in a single read may pass
        Case("http", "one 64 KiB header", raw=_exchange(_head(length=len(q), extra=f"X-Big: {'a' * 65536}\r\n") + q),
             expect=(200, 400, 431, "closed")),
        Case("http", "1 MiB of headers", raw=_exchange(_head(length=len(q), extra="".join(f"X-{i}: {'b' * 1000}\r\n" for i in range(1024))) + q),
             expect=(400, 431, "closed")),
        Case("http", "header with NUL", raw=_exchange(_head(length=len(q), extra="X-Bad: a\0b\r\n") + q), expect=(400,)),
        Case("http", "header without colon", raw=_exchange(_head(length=len(q), extra="NoColonHere\r\n") + q), expect=(400,)),
        Case("http", "request line lower-case method", raw=_exchange(b"post /v1/map HTTP/1.1\r\nHost: x\r\n\r\n"), expect=(400, 405)),
        Case("http", "HTTP/2 preface", raw=_exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), expect=(400, 404, "closed")),
        Case("http", "HTTP/9.9", raw=_exchange(b"POST /v1/map HTTP/9.9\r\nHost: x\r\n\r\n"), expect=(400, 415, 505)),
    ]
    for k in range(n_garbage_lines):
        blob = rng.integers(0, 256, int(rng.integers(16, 512)), dtype=np.uint8).tobytes() + b"\r\n\r\n"
        cases.append(Case("http", f"garbage request {k}", raw=_exchange(blob), expect=(400, "closed")))
    return cases


def _pipelined(q: bytes):
    def run(sock):
        _send(sock, (_head(length=len(q)) + q) * 2)
        first = _read_response(sock, 30)[0]
        second = _read_response(sock, 30)[0]
        return first if first != 200 else second
    return run


def slow_cases(query: bytes, timeouts: dict) -> list[Case]:
    """Requests that wait for a timeout: few, run in parallel."""
    ht, bt, kt = timeouts["header"], timeouts["body"], timeouts["keep_alive"]
    limit = max(ht, bt, kt) + 10

    def silent(sock):
        return _read_response(sock, limit)[0]

    def half_line(sock):
        _send(sock, b"POST /v1/ma")
        return _read_response(sock, limit)[0]

    def trickled_headers(sock):
        for b in _head(length=len(query)):
            if not _send(sock, bytes([b])) or _readable(sock, ht / 8):  # the server answered or closed
                break
        return _read_response(sock, limit)[0]

    def half_body(sock):
        _send(sock, _head(length=len(query)) + query[:len(query) // 2])
        return _read_response(sock, limit)[0]

    def trickled_body(sock):
        _send(sock, _head(length=len(query)))
        end = time.monotonic() + bt + 2
        i = 0
        while time.monotonic() < end and i < len(query) - 1:
            if not _send(sock, query[i:i + 16]) or _readable(sock, 0.1):
                break
            i += 16
        return _read_response(sock, limit)[0]

    def hang_up(sock):
        _send(sock, _head(length=len(query)) + query[:100])
        time.sleep(0.2)
        return "hung-up"

    def idle_keep_alive(sock):
        _send(sock, _head(length=len(query)) + query)
        first = _read_response(sock, limit)[0]
        if first != 200:
            return first
        return _read_response(sock, limit)[0]  # nothing more is sent: the server closes the idle connection

    return [Case("slow", "silent connection", raw=silent, expect=("closed",)),
            Case("slow", "half a request line", raw=half_line, expect=("closed",)),
            Case("slow", "headers trickled one byte at a time", raw=trickled_headers, expect=("closed",)),
            Case("slow", "half the body, then silence", raw=half_body, expect=(408,)),
            Case("slow", "body trickled slower than the body timeout", raw=trickled_body, expect=(408,)),
            Case("slow", "client hangs up mid-body", raw=hang_up, expect=("hung-up",)),
            Case("slow", "idle keep-alive connection", raw=idle_keep_alive, expect=("closed",))]


# ----------------------------------------------------------------------------- running the cases

@dataclass
class Outcome:
    family: str
    name: str
    outcome: int | str
    expected: bool
    error: str = ""
    seconds: float = 0.0


@dataclass
class Target:
    """Where the service listens and how hospital1 connects to it."""

    port: int
    ctx: ssl.SSLContext
    extra: dict = field(default_factory=dict)

    def connect(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return self.ctx.wrap_socket(sock, server_hostname="localhost")


def run_case(target: Target, case: Case, client=None) -> Outcome:
    t = time.perf_counter()
    error = ""
    if case.body is not None:
        import httpx

        try:
            r = client.post("/v1/map", content=case.body, headers={"content-type": OCTET})
            outcome: int | str = r.status_code
            if r.status_code != 200:
                try:
                    error = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    error = f"not a JSON error body: {r.text[:120]!r}"
                    outcome = f"{r.status_code}-not-json"
            else:
                reply = protocol.decode(r.content)
                if reply.kind != "reply":
                    outcome, error = "bad-reply", reply.kind
        except httpx.RemoteProtocolError as e:
            outcome, error = "closed", str(e)[:200]
        except httpx.HTTPError as e:
            outcome, error = f"client-error:{type(e).__name__}", str(e)[:200]
    else:
        try:
            with target.connect() as sock:
                outcome = case.raw(sock)
        except (OSError, ssl.SSLError) as e:
            outcome, error = f"client-error:{type(e).__name__}", str(e)[:200]
    return Outcome(case.family, case.name, outcome, outcome in case.expect, error, time.perf_counter() - t)


def run_cases(target: Target, cases: list[Case], url: str, progress: bool = False) -> list[Outcome]:
    """The httpx cases over one keep-alive connection (reconnecting when the server closes it), the raw ones
    each on its own connection, the slow ones in parallel threads."""
    import httpx

    slow = [c for c in cases if c.family == "slow"]
    results: list[Outcome] = []
    slow_results: list[Outcome] = []
    threads = [threading.Thread(target=lambda c=c: slow_results.append(run_case(target, c))) for c in slow]
    for th in threads:
        th.start()
    with httpx.Client(base_url=url, verify=target.ctx, timeout=30) as client:
        for i, c in enumerate(x for x in cases if x.family != "slow"):
            results.append(run_case(target, c, client))
            if progress and (i + 1) % 500 == 0:
                print(f"  {i + 1} requests", flush=True)
    for th in threads:
        th.join()
    return results + sorted(slow_results, key=lambda o: o.name)


def all_cases(shapes: dict, query: bytes, *, max_bytes: int, drain: int, timeouts: dict | None, seed: int, n_flips: int,
              n_truncations: int, n_garbage: int, n_garbage_lines: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = scale_cases(shapes, rng) + meta_cases(shapes, rng) + byte_cases(query, rng, n_flips, n_truncations, n_garbage)
    cases += oversize_cases(shapes, rng, max_bytes, drain) + http_cases(query, rng, n_garbage_lines)
    if timeouts is not None:
        cases += slow_cases(query, timeouts)
    return cases


def tally(outcomes: list[Outcome]) -> dict:
    by_family: dict[str, Counter] = {}
    seconds: Counter = Counter()
    for o in outcomes:
        by_family.setdefault(o.family, Counter())[str(o.outcome)] += 1
        seconds[o.family] += o.seconds
    statuses = Counter(str(o.outcome) for o in outcomes)
    five = [o for o in outcomes if str(o.outcome).startswith("5")]
    unexpected = [o for o in outcomes if not o.expected]
    return {"requests": len(outcomes), "by_outcome": dict(sorted(statuses.items())),
            "by_family": {f: dict(sorted(c.items())) for f, c in by_family.items()},
            "seconds_by_family": {f: round(seconds[f], 2) for f in by_family},
            "n_5xx": len(five), "n_unexpected": len(unexpected),
            "unexpected": [asdict(o) for o in unexpected[:50]],
            "slow": [asdict(o) for o in outcomes if o.family == "slow"]}


# ----------------------------------------------------------------------------- the benchmark


def build_model(root: Path, hospitals: list[str], size: int, width: float) -> tuple[Path, dict]:
    """A server model folder with seeded untrained weights (a query's cost and checks do not depend on them)."""
    from ppcmi.models import AEConfig, MappingConfig

    shapes = {kind: AEConfig(in_channels=cin, width=width).latent_shapes(size) for kind, cin in (("image", 1), ("mask", 2))}
    model, _ = untrained_model(root, hospitals, shapes, MappingConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8)))
    return model, shapes["image"]


def start_server(model: Path, tls: Path, port: int, max_bytes: int, timeouts: dict, log: Path, probe_ctx) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ppcmi.cli", "server", "serve", "--model", str(model), "--cert", str(tls / "server.pem"),
           "--key", str(tls / "server.key"), "--client-ca", str(tls / "ca.pem"), "--port", str(port), "--max-bytes", str(max_bytes),
           "--header-timeout", str(timeouts["header"]), "--body-timeout", str(timeouts["body"]),
           "--keep-alive-timeout", str(timeouts["keep_alive"]), "--log-level", "warning"]
    # one torch thread: the model is tiny, and the fuzzer shares the machine
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    return wait_for_service(proc, f"https://127.0.0.1:{port}", probe_ctx, log.read_text)


def markdown(res: dict) -> str:
    m, c, t = res["machine"], res["config"], res["tally"]
    outcomes = sorted({k for f in t["by_family"].values() for k in f})
    lines = [f"Machine: {m['cpu']} ({m['logical_cores']} logical cores), Python {m['python']}. The real `ppcmi server serve` "
             f"in its own process on loopback with mutual TLS; model input {c['size']}x{c['size']}, seeded untrained weights; "
             f"--max-bytes {c['max_bytes']}, --header-timeout {c['timeouts']['header']:g} s, --body-timeout {c['timeouts']['body']:g} s, "
             f"--keep-alive-timeout {c['timeouts']['keep_alive']:g} s; one torch thread in the server; seed {c['seed']}; "
             f"load average {c['load_average_at_start']:.1f} when it started (the machine was shared).", "",
             f"{t['requests']} requests in {res['wall_s']:.1f} s: **{t['n_5xx']} answered 5xx**, {t['n_unexpected']} with an outcome "
             f"their family did not expect; server log: {res['server_log']['error_lines']} ERROR lines, "
             f"{res['server_log']['tracebacks']} tracebacks; /healthz at the end: {res['healthy_after']}.", "",
             "| family | requests | " + " | ".join(outcomes) + " | seconds |", "|---|---|" + "---|" * len(outcomes) + "---|"]
    for fam, counts in t["by_family"].items():
        lines.append(f"| {fam} | {sum(counts.values())} | " + " | ".join(str(counts.get(o, "")) for o in outcomes)
                     + f" | {t['seconds_by_family'][fam]:.1f} |")
    total = t["by_outcome"]
    lines.append(f"| all | {t['requests']} | " + " | ".join(str(total.get(o, "")) for o in outcomes) + " | |")
    lines += ["", "`closed`: the server closed the connection without an answer (expected only for the header and keep-alive "
                  "timeouts and for header blocks over h11's limit); `hung-up`: the client hung up on purpose; "
                  "seconds: the family's requests one after another (the slow ones ran in parallel).", "",
              "| slow request | outcome | seconds |", "|---|---|---|"]
    lines += [f"| {o['name']} | {o['outcome']} | {o['seconds']:.1f} |" for o in t["slow"]]
    if t["unexpected"]:
        lines += ["", "Unexpected outcomes:", ""] + [f"- {o['family']} / {o['name']}: {o['outcome']} {o['error'][:160]}" for o in t["unexpected"]]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, *, seed: int, n_flips: int, n_truncations: int, n_garbage: int, n_garbage_lines: int, timeouts: dict,
        max_bytes: int, size: int = 32, width: float = 0.25) -> dict:
    from ppcmi.server.service import DRAIN_BYTES

    hospitals = ["hospital1", "hospital2"]
    with tempfile.TemporaryDirectory(prefix="ppcmi-fuzz-") as tmp:
        root = Path(tmp)
        model, shapes = build_model(root, hospitals, size, width)
        tls = root / "tls"
        certs.init_ca(tls)
        for h in hospitals + ["hospital9"]:
            certs.issue_client(h, tls)
        ctx = tls_context(tls / "clients" / "hospital1.pem", tls / "clients" / "hospital1.key", tls / "ca.pem")
        port = _free_port()
        log = root / "server.log"
        rng = np.random.default_rng(seed + 1)
        query = raw_message(_valid_arrays(shapes, rng), _meta())
        cases = all_cases(shapes, query, max_bytes=max_bytes, drain=DRAIN_BYTES, timeouts=timeouts, seed=seed, n_flips=n_flips,
                          n_truncations=n_truncations, n_garbage=n_garbage, n_garbage_lines=n_garbage_lines)
        print(f"{len(cases)} requests in {len({c.family for c in cases})} families", flush=True)
        proc = start_server(model, tls, port, max_bytes, timeouts, log, ctx)
        try:
            url = f"https://127.0.0.1:{port}"
            t0 = time.perf_counter()
            outcomes = run_cases(Target(port, ctx), cases, url, progress=True)
            wall = time.perf_counter() - t0
            import httpx

            try:
                healthy = httpx.get(f"{url}/healthz", verify=ctx, timeout=10).status_code == 200
            except httpx.HTTPError:
                healthy = False
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(30)
        text = log.read_text(errors="replace")
    server_log = {"error_lines": sum(1 for line in text.splitlines() if line.startswith(("ERROR", "CRITICAL"))),
                  "tracebacks": text.count("Traceback (most recent call last)"), "tail": text[-2000:] if "Traceback" in text else ""}
    res = {"machine": machine(), "config": {"size": size, "autoencoder_width": width, "max_bytes": max_bytes, "timeouts": timeouts,
                                            "seed": seed, "transport": "HTTPS/1.1, mutual TLS, loopback", "weights": "seeded, untrained",
                                            "server_torch_threads": 1, "load_average_at_start": os.getloadavg()[0]},
           "wall_s": wall, "tally": tally(outcomes), "server_log": server_log, "healthy_after": healthy and alive}
    res["requirement_met"] = bool(res["tally"]["n_5xx"] == 0 and res["tally"]["n_unexpected"] == 0 and server_log["error_lines"] == 0
                                  and server_log["tracebacks"] == 0 and res["healthy_after"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "fuzz-service.json", res)
    atomic_write_text(out / "fuzz-service.md", markdown(res))
    t = res["tally"]
    print(f"{t['requests']} requests in {wall:.1f} s: {t['n_5xx']} 5xx, {t['n_unexpected']} unexpected; outcomes {t['by_outcome']}")
    print(f"results: {out / 'fuzz-service.json'}, {out / 'fuzz-service.md'}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; runs/fuzz-quick with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flips", type=int, default=600, help="seeded byte flips of a valid query")
    ap.add_argument("--truncations", type=int, default=100, help="seeded truncation points (plus the region boundaries)")
    ap.add_argument("--garbage", type=int, default=100, help="random bodies")
    ap.add_argument("--garbage-lines", type=int, default=40, help="random bytes instead of an HTTP request")
    ap.add_argument("--max-bytes", type=int, default=256 * 1024, help="the service's --max-bytes")
    ap.add_argument("--timeout", type=float, default=2.0, help="the service's header, body and keep-alive timeouts (s)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 50 flips, 20 truncations, 20 garbage bodies and lines")
    a = ap.parse_args()
    if a.quick:
        a.flips, a.truncations, a.garbage, a.garbage_lines = 50, 20, 20, 20
    out = a.out or (Path("runs/fuzz-quick") if a.quick else Path("benchmarks/results"))
    res = run(out, seed=a.seed, n_flips=a.flips, n_truncations=a.truncations, n_garbage=a.garbage, n_garbage_lines=a.garbage_lines,
              timeouts={"header": a.timeout, "body": a.timeout, "keep_alive": a.timeout}, max_bytes=a.max_bytes)
    if not res["requirement_met"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
