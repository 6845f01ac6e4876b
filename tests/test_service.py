"""The HTTPS inference service end to end: a real uvicorn server on loopback with real mutual TLS.

One tiny trained model (two synthetic hospitals) and one set of certificates are built per
module; certificates and keys are generated here, in temporary folders, never stored.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from ppcmi import certs, protocol
from ppcmi.cli import app as cli_app
from ppcmi.client.remote import ServiceClient, tls_context
from ppcmi.client.site import Hospital
from ppcmi.config import AutoencoderConfig, Config, DataConfig, MappingTrainConfig
from ppcmi.experiment import synth
from ppcmi.errors import PpcmiError, ServiceError
from ppcmi.server.mapping import MappingServer
from ppcmi.simulate import run_simulation

uvicorn = pytest.importorskip("uvicorn")
from ppcmi.server.service import create_app, require_extra, uvicorn_config  # noqa: E402

runner = CliRunner()
MAX_BYTES = 64 * 1024
OCTET = {"content-type": "application/octet-stream"}


def cli(*args, code: int = 0) -> str:
    r = runner.invoke(cli_app, [str(a) for a in args])
    assert r.exit_code == code, f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r.output


class LiveServer:
    """uvicorn with the service's mutual-TLS configuration, in a thread, on a free loopback port."""

    def __init__(self, app, tls: Path, **timeouts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn_config(app, cert=tls / "server.pem", key=tls / "server.key", client_ca=tls / "ca.pem",
                                port=self.port, log_level="warning", **timeouts)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two trained hospitals and their server model, a CA with client certificates, a rogue CA, a live service."""
    root = tmp_path_factory.mktemp("service")
    data = synth(root / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=1)
    cfg = Config(seed=0, clients=2,
                 data=DataConfig(size=32, group_csv=str(data / "groups.csv"), test_frac=0.25, partition="site"),
                 autoencoder=AutoencoderConfig(width=0.25, epochs=1),
                 mapping=MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=1))
    run_simulation(cfg, data, root / "run", progress=False)
    tls, rogue = root / "tls", root / "rogue"
    certs.init_ca(tls)
    for name in ("hospital1", "hospital2", "hospital9"):  # hospital9: trusted CA, but not served by the model
        certs.issue_client(name, tls)
    certs.init_ca(rogue)
    certs.issue_client("hospital1", rogue)
    live = LiveServer(create_app(root / "run" / "server", max_bytes=MAX_BYTES), tls)
    w = {"root": root, "data": data, "model": root / "run" / "server", "tls": tls, "rogue": rogue, "live": live,
         "site": {h: root / "run" / "sites" / h for h in ("hospital1", "hospital2")}}
    yield w
    live.stop()


def client_for(w, name: str | None = "hospital1", ca_dir: Path | None = None, ca: Path | None = None) -> httpx.Client:
    """An httpx client presenting ``ca_dir/clients/name`` (or no certificate) and trusting ``ca``."""
    ca_dir = ca_dir or w["tls"]
    ca = ca or w["tls"] / "ca.pem"
    if name is None:
        ctx = ssl.create_default_context(cafile=str(ca))
    else:
        ctx = tls_context(ca_dir / "clients" / f"{name}.pem", ca_dir / "clients" / f"{name}.key", ca)
    return httpx.Client(base_url=w["live"].url, verify=ctx, timeout=30)


@pytest.fixture(scope="module")
def http(world):
    with client_for(world) as c:
        yield c


@pytest.fixture(scope="module")
def query(world) -> bytes:
    """Protocol bytes of a valid 3-image query from hospital1."""
    h = Hospital(world["site"]["hospital1"])
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    return protocol.encode(h.protect(x))


def assert_healthy(http) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION, "clients": 2}


# ----------------------------------------------------------------------------- the round trip


def test_round_trip_equals_local_mapping(world, http, query):
    r = http.post("/v1/map", content=query, headers=OCTET)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    local = MappingServer(world["model"]).handle(protocol.decode(query), client="hospital1")
    reply = protocol.decode(r.content)
    assert (reply.kind, reply.client, reply.n) == ("reply", "hospital1", 3)
    assert reply.arrays.keys() == local.arrays.keys()
    for name, a in local.arrays.items():  # exactly equal: same model, same arithmetic
        assert reply.arrays[name].dtype == a.dtype and np.array_equal(reply.arrays[name], a), name
    h = Hospital(world["site"]["hospital1"])
    assert np.array_equal(h.unprotect(reply), h.unprotect(local))


def test_predict_over_mutual_tls_writes_the_same_label_maps(world, tmp_path):
    images = sorted((world["data"] / "images").glob("site1_*.png"))[:4]
    tls = world["tls"]
    out = cli("predict", *images, "--site-dir", world["site"]["hospital1"], "--server", world["live"].url,
              "--cert", tls / "clients" / "hospital1.pem", "--key", tls / "clients" / "hospital1.key", "--ca", tls / "ca.pem",
              "--out", tmp_path / "remote")
    assert len(out.split()) == 4
    cli("predict", *images, "--site-dir", world["site"]["hospital1"], "--model", world["model"], "--out", tmp_path / "local")
    for p in images:
        remote, local = (np.asarray(Image.open(tmp_path / d / p.name)) for d in ("remote", "local"))
        assert remote.shape == (32, 32) and np.array_equal(remote, local)


def test_openapi_describes_both_endpoints(http):
    spec = http.get("/openapi.json").json()
    post = spec["paths"]["/v1/map"]["post"]
    assert "application/octet-stream" in post["requestBody"]["content"]
    assert "application/octet-stream" in post["responses"]["200"]["content"]
    assert {"400", "403", "413", "415"} <= set(post["responses"])
    assert "get" in spec["paths"]["/healthz"]


# ----------------------------------------------------------------------------- who may connect


def _refused(w, version: ssl.TLSVersion, name: str | None = "hospital1", ca_dir: Path | None = None) -> None:
    """Connect with raw TLS; the server must refuse before any HTTP exchange.

    With TLS 1.2 the client certificate is checked inside the handshake, so the client's
    handshake fails. With TLS 1.3 the client finishes its side first and the server drops the
    connection when it checks the certificate: the client's first read fails or sees EOF.
    """
    ctx = ssl.create_default_context(cafile=str(w["tls"] / "ca.pem"))
    ctx.minimum_version = ctx.maximum_version = version
    if name is not None:
        d = ca_dir or w["tls"]
        ctx.load_cert_chain(d / "clients" / f"{name}.pem", d / "clients" / f"{name}.key")
    with socket.create_connection(("127.0.0.1", w["live"].port), timeout=10) as sock:
        if version == ssl.TLSVersion.TLSv1_2:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(sock, server_hostname="localhost")
            return
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            try:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = tls.recv(64)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                answer = b""
            assert answer == b"", answer


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLS1.2", "TLS1.3"])
def test_client_without_certificate_fails_the_handshake(world, http, version):
    _refused(world, version, name=None)
    with client_for(world, name=None) as c, pytest.raises(httpx.TransportError):
        c.get("/healthz")
    assert_healthy(http)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLS1.2", "TLS1.3"])
def test_certificate_from_an_untrusted_ca_fails_the_handshake(world, http, version):
    _refused(world, version, ca_dir=world["rogue"])  # a "hospital1" certificate signed by another CA
    with client_for(world, ca_dir=world["rogue"]) as c, pytest.raises(httpx.TransportError):
        c.get("/healthz")
    assert_healthy(http)


def test_server_certificate_from_another_ca_is_not_trusted_by_the_hospital(world, tmp_path):
    tls = world["tls"]
    line = cli("predict", world["data"] / "images", "--site-dir", world["site"]["hospital1"], "--server", world["live"].url,
               "--cert", tls / "clients" / "hospital1.pem", "--key", tls / "clients" / "hospital1.key",
               "--ca", world["rogue"] / "ca.pem", "--out", tmp_path / "p", code=2).strip().splitlines()[-1]
    assert line.startswith("error: ") and "TLS failure" in line and "not trusted by --ca" in line


def test_cli_names_a_refused_certificate(world, tmp_path):
    rogue = world["rogue"]
    line = cli("predict", world["data"] / "images", "--site-dir", world["site"]["hospital1"], "--server", world["live"].url,
               "--cert", rogue / "clients" / "hospital1.pem", "--key", rogue / "clients" / "hospital1.key",
               "--ca", world["tls"] / "ca.pem", "--out", tmp_path / "p", code=2).strip().splitlines()[-1]
    assert line.startswith("error: ") and "refused this hospital's certificate" in line, line


def test_certificate_for_hospital_a_posting_for_hospital_b_is_forbidden(world, query):
    with client_for(world, "hospital2") as c:
        r = c.post("/v1/map", content=query, headers=OCTET)  # hospital1's query, hospital2's certificate
        assert r.status_code == 403
        assert r.json()["error"].startswith("client:") and "'hospital1'" in r.json()["error"]
        assert_healthy(c)


def test_hospital_not_served_by_the_model_is_forbidden(world, query):
    with client_for(world, "hospital9") as c:
        r = c.post("/v1/map", content=query, headers=OCTET)
        assert r.status_code == 403 and "not served by this model" in r.json()["error"]
        assert_healthy(c)


# ----------------------------------------------------------------------------- bad input


def _raw(arrays: dict, **meta) -> bytes:
    from safetensors.numpy import save

    return save(arrays, metadata={"ppcmi.version": "1", "kind": "query", "client": "hospital1", **meta})


def _arrays(query: bytes, **changes) -> dict:
    arrays = dict(protocol.decode(query).arrays)
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _with_nan(query: bytes, value: float) -> bytes:
    arrays = _arrays(query)
    b = arrays["zt_img_b"].copy()
    b[0, 0, 0, 0] = value
    arrays["zt_img_b"] = b
    return _raw(arrays)


BAD = {
    "malformed body": (lambda q: b"\x00\x01not a protocol message", 400, "header"),
    "empty body": (lambda q: b"", 400, "body"),
    "truncated": (lambda q: q[: len(q) // 2], 400, "body"),
    "wrong protocol version": (lambda q: _raw(_arrays(q), **{"ppcmi.version": "2"}), 400, "version"),
    "unknown array name": (lambda q: _raw(_arrays(q, patient_id=np.zeros((3, 1, 1, 1), np.float32))), 400, "arrays.patient_id"),
    "wrong shape": (lambda q: _raw(_arrays(q, zt_img_b=np.zeros((3, 1, 1, 1), np.float32))), 400, "arrays.zt_img_b: shape"),
    "wrong dtype": (lambda q: _raw(_arrays(q, zt_img_b=protocol.decode(q).arrays["zt_img_b"].astype(np.float64))), 400, "dtype"),
    "NaN": (lambda q: _with_nan(q, np.nan), 400, "NaN or Inf"),
    "Inf": (lambda q: _with_nan(q, -np.inf), 400, "NaN or Inf"),
    "reply instead of query": (lambda q: _raw({k.replace("img", "msk"): v for k, v in _arrays(q).items()}, kind="reply"), 400,
                               "kind: expected a 'query'"),
    "over --max-bytes": (lambda q: b"\x00" * (MAX_BYTES + 1), 413, "exceeds the limit"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_keeps_serving(http, query, case):
    make, status, field = BAD[case]
    r = http.post("/v1/map", content=make(query), headers=OCTET)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and field in r.json()["error"], r.json()
    assert_healthy(http)


def test_streamed_body_over_the_limit_is_cut_off(world, http):
    def chunks():
        for _ in range(MAX_BYTES // 8192 + 2):
            yield b"\x00" * 8192

    with client_for(world) as c:  # no Content-Length: chunked transfer, counted while streaming
        r = c.post("/v1/map", content=chunks(), headers=OCTET)
    assert r.status_code == 413 and "more than the limit" in r.json()["error"]
    assert_healthy(http)


def test_wrong_content_type_method_and_path(http, query):
    r = http.post("/v1/map", content=query, headers={"content-type": "application/json"})
    assert r.status_code == 415 and r.json()["error"].startswith("content-type:")
    r = http.get("/v1/map")
    assert r.status_code == 405 and "error" in r.json()
    r = http.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    assert_healthy(http)


def _mutations(query: bytes):
    (hlen,) = struct.unpack("<Q", query[:8])
    header = query[8:8 + hlen]

    def rehead(new: bytes) -> bytes:
        return struct.pack("<Q", len(new)) + new + query[8 + hlen:]

    dtypes = st.sampled_from([b"F64", b"F16", b"I32", b"U8", b"BOOL", b"BF16", b"", b"F32 "])
    shape_text = st.lists(st.integers(-2, 2 ** 33), min_size=0, max_size=5).map(lambda s: json.dumps(s).encode())
    return st.one_of(
        st.binary(max_size=4096),
        st.tuples(st.integers(0, 8 + hlen - 1), st.integers(1, 255)).map(
            lambda t: query[:t[0]] + bytes([query[t[0]] ^ t[1]]) + query[t[0] + 1:]),
        st.integers(0, len(query) - 1).map(lambda n: query[:n]),
        st.tuples(dtypes, st.booleans()).map(
            lambda t: rehead(header.replace(b'"F32"', b'"' + t[0] + b'"', 1)) if t[1]
            else query[:8] + header.replace(b'"F32"', b'"' + t[0] + b'"', 1) + query[8 + hlen:]),
        shape_text.map(lambda s: rehead(header.replace(b'"shape":[3,', b'"shape":' + s[:-1] + (b"," if s != b"[]" else b""), 1))),
        st.binary(min_size=8, max_size=8).map(lambda p: p + query[8:]),
    )


def test_fuzzed_bodies_never_get_a_5xx(world, query):
    seen: dict[int, int] = {}

    with client_for(world) as c:
        @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(body=_mutations(query))
        def post(body: bytes) -> None:
            r = c.post("/v1/map", content=body, headers=OCTET)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400, 403, 413), (r.status_code, r.text[:300])  # 403: a flipped client id
            if r.status_code != 200:
                assert r.json()["error"]

        post()
        assert_healthy(c)
    assert seen.get(400, 0) > 50, seen


# ----------------------------------------------------------------------------- scale sets the model serves


def _scale_query(query: bytes, scales, kind: str = "query", prefix: str = "zt_img_", change=None) -> bytes:
    """hospital1's query carrying only ``scales`` (under ``prefix``), as a ``kind`` message; ``change``
    maps (name, array) to a replacement array (a wrong shape, say)."""
    base = protocol.decode(query).latents("zt_img_")
    arrays = {prefix + sc: base[sc] for sc in scales}
    if change is not None:
        arrays = {k: change(k, a) for k, a in arrays.items()}
    return _raw(arrays, kind=kind)


@pytest.mark.parametrize("scales", [set(c) for r in range(4) for c in itertools.combinations(("s3", "s4", "b"), r)],
                         ids=lambda c: "+".join(sorted(c)) or "none")
def test_every_scale_subset_is_mapped_only_when_complete(http, query, scales):
    """The model serves s3, s4, b; a query with fewer (even the protocol's allowed {b}) is a 400 naming what is missing."""
    r = http.post("/v1/map", content=_scale_query(query, scales), headers=OCTET)
    if scales == {"s3", "s4", "b"}:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    error = r.json()["error"]
    if scales == {"b"}:  # valid protocol, but not this model's layout: the check at the service
        assert error.startswith("arrays: missing zt_img_s3, zt_img_s4;"), error
    else:
        assert error.startswith("arrays"), error
    assert_healthy(http)


_SHAPE_CHANGES = {
    "none": lambda k, a: a,
    "batch": lambda k, a: a[:1] if k.endswith("_b") else a,  # one array's N differs
    "channels": lambda k, a: np.concatenate([a, a], axis=1),
    "height": lambda k, a: a[:, :, :-1],
    "3d": lambda k, a: a[0],
    "float64": lambda k, a: a.astype(np.float64),
    "float16": lambda k, a: a.astype(np.float16),  # allowed: mapped, answered in float16
    "nan": lambda k, a: np.where(np.arange(a.size).reshape(a.shape) == a.size // 2, np.nan, a).astype(a.dtype),
    "-inf": lambda k, a: np.where(np.arange(a.size).reshape(a.shape) == 0, -np.inf, a).astype(a.dtype),
}


def test_scale_subsets_kinds_and_shapes_never_get_a_5xx(world, query):
    seen: dict[int, int] = {}

    with client_for(world) as c:
        @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(scales=st.sets(st.sampled_from(("s3", "s4", "b"))), kind=st.sampled_from(("query", "reply", "train", "nope", "")),
               prefix=st.sampled_from(("zt_img_", "zt_msk_", "zt_")), change=st.sampled_from(sorted(_SHAPE_CHANGES)))
        @example(scales={"s3", "s4", "b"}, kind="query", prefix="zt_img_", change="none")
        @example(scales={"s3", "s4", "b"}, kind="query", prefix="zt_img_", change="float16")
        @example(scales={"b"}, kind="query", prefix="zt_img_", change="none")  # valid protocol, not this model's
        def post(scales, kind, prefix, change) -> None:
            r = c.post("/v1/map", content=_scale_query(query, scales, kind, prefix, _SHAPE_CHANGES[change]), headers=OCTET)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            ok = scales == {"s3", "s4", "b"} and kind == "query" and prefix == "zt_img_" and change in ("none", "float16")
            assert r.status_code == (200 if ok else 400), (scales, kind, prefix, change, r.status_code, r.text[:300])
            if not ok:
                assert r.json()["error"]

        post()
        assert_healthy(c)
    assert seen.get(400, 0) > 30 and seen.get(200, 0) >= 2, seen


def _fuzz_script():
    """benchmarks/fuzz_service.py as a module (registered first: its dataclasses look themselves up there)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_service.py"
    spec = importlib.util.spec_from_file_location("fuzz_service", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_service", mod)
    spec.loader.exec_module(mod)
    return sys.modules["fuzz_service"]


def test_seeded_fuzz_of_every_scale_subset_meta_bytes_oversize_and_http_gets_no_5xx(world):
    """The fuzz benchmark's families, shorter and without the slow ones (the timeout tests below cover those):
    every subset of the six array names, each well formed and mutated (dtypes, shapes, NaN, infinities), as a
    query and as other kinds, and seeded meta, byte, oversize and HTTP-level mutations. Each gets exactly the
    outcome its family expects (a 200 only for a complete, finite query), never a 5xx or an unanswered close."""
    from ppcmi.server.service import DRAIN_BYTES

    fz = _fuzz_script()
    shapes = world["live"].app.state.mapping.image_shapes
    query = fz.raw_message(fz._valid_arrays(shapes, np.random.default_rng(5)), fz._meta())
    cases = fz.all_cases(shapes, query, max_bytes=MAX_BYTES, drain=DRAIN_BYTES, timeouts=None, seed=3, n_flips=60,
                         n_truncations=20, n_garbage=10, n_garbage_lines=5)
    cases = [c for c in cases if 408 not in c.expect]  # those wait for this service's 60 s body timeout
    ctx = tls_context(world["tls"] / "clients" / "hospital1.pem", world["tls"] / "clients" / "hospital1.key", world["tls"] / "ca.pem")
    outcomes = fz.run_cases(fz.Target(world["live"].port, ctx), cases, world["live"].url)
    t = fz.tally(outcomes)
    assert t["n_5xx"] == 0 and t["n_unexpected"] == 0, t["unexpected"][:5]
    assert len(outcomes) >= 64 * len(fz.VARIANTS), len(outcomes)
    subsets = [o for o in outcomes if o.family == "scale_subsets"]
    assert {o.name for o in subsets if o.outcome == 200} == {"zt_img_s3+zt_img_s4+zt_img_b well-formed", "zt_img_s3+zt_img_s4+zt_img_b float16"}
    assert len({o.name.split()[0] for o in subsets}) == 2 ** 6  # every subset, the empty one included
    with client_for(world) as c:
        assert_healthy(c)


# ----------------------------------------------------------------------------- failures inside a request


def _tls(w, port: int | None = None, name: str = "hospital1") -> ssl.SSLSocket:
    """A raw TLS connection presenting ``name``'s certificate (to the module's service, or to ``port``)."""
    ctx = tls_context(w["tls"] / "clients" / f"{name}.pem", w["tls"] / "clients" / f"{name}.key", w["tls"] / "ca.pem")
    sock = socket.create_connection(("127.0.0.1", port or w["live"].port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def _read_response(sock) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length from a raw socket: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full response head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed_after(sock, limit: float) -> float:
    """Seconds until the server closes ``sock`` (EOF or reset), reading and dropping anything it sends first."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {limit} s")
    return time.monotonic() - start


def _request(method: str, path: str, body: bytes = b"", content_type: str = "application/octet-stream") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_unexpected_exception_is_a_logged_json_500_and_the_connection_stays(world, query, monkeypatch, caplog):
    server = world["live"].app.state.mapping

    def boom(*a, **k):
        raise RuntimeError("secret detail of the failure")

    monkeypatch.setattr(server, "handle", boom)
    caplog.set_level(logging.INFO, logger="ppcmi.server.service")
    with _tls(world) as sock:
        sock.sendall(_request("POST", "/v1/map", query))
        status, headers, body = _read_response(sock)
        assert status == 500 and headers["content-type"] == "application/json", (status, headers)
        assert json.loads(body) == {"error": "internal error"}
        assert headers.get("connection") != "close"
        monkeypatch.undo()
        sock.sendall(_request("POST", "/v1/map", query))  # the same connection serves the next request
        status, _, body = _read_response(sock)
        assert status == 200 and protocol.decode(body).kind == "reply"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name == "ppcmi.server.service" and errors[0].exc_info is not None, errors
    assert "secret detail of the failure" in caplog.text  # logged on the server only


def test_client_hanging_up_mid_body_is_one_info_line(world, http, query, caplog):
    caplog.set_level(logging.INFO)
    with _tls(world) as sock:
        sock.sendall(_request("POST", "/v1/map", query)[:-len(query) // 2])  # headers and half the body
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not any("hung up" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    time.sleep(0.2)
    hung = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert len(hung) == 1 and hung[0].levelno == logging.INFO and hung[0].exc_info is None, hung
    assert "\n" not in hung[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert_healthy(http)


# ----------------------------------------------------------------------------- timeouts

QUICK = 0.5  # seconds: the header and body timeouts of the `quick` service
MARGIN = 2.0  # seconds a close may take beyond its timeout on a loaded machine


@pytest.fixture(scope="module")
def quick(world):
    """A second service on the same model with sub-second header and body timeouts."""
    live = LiveServer(create_app(world["model"], max_bytes=MAX_BYTES, body_timeout=QUICK), world["tls"],
                      header_timeout=QUICK, keep_alive_timeout=QUICK)
    yield live
    live.stop()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/map HTTP/1.1\r\nHost: localhost\r\nContent-Ty"], ids=["nothing", "half headers"])
def test_incomplete_request_headers_are_cut_off_after_the_header_timeout(world, quick, sent):
    with _tls(world, quick.port) as sock:
        sock.sendall(sent)
        assert QUICK * 0.8 <= _closed_after(sock, QUICK + MARGIN) <= QUICK + MARGIN


def test_trickled_headers_do_not_extend_the_header_timeout(world, quick):
    line = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200
    with _tls(world, quick.port) as sock:
        start = time.monotonic()
        sock.settimeout(0.02)
        for byte in line:  # one byte every 20 ms or so: 4 s in all, far past the timeout
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    break
            except TimeoutError:  # nothing from the server yet
                continue
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                break
        else:
            pytest.fail("the trickled request was not cut off")
        assert QUICK * 0.8 <= time.monotonic() - start <= QUICK + MARGIN


def test_header_timeout_applies_to_the_next_request_on_a_kept_alive_connection(world, quick):
    with _tls(world, quick.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, _ = _read_response(sock)
        assert status == 200
        sock.sendall(b"GET /heal")  # keeps the connection past the keep-alive timer, not past the header timer
        assert _closed_after(sock, QUICK + MARGIN) <= QUICK + MARGIN


def test_idle_keep_alive_connection_is_closed(world, quick):
    with _tls(world, quick.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _read_response(sock)[0] == 200
        assert _closed_after(sock, QUICK + MARGIN) <= QUICK + MARGIN


def test_slow_body_is_a_408_and_the_connection_closed_after_the_body_timeout(world, quick, query, caplog):
    caplog.set_level(logging.INFO, logger="ppcmi.server.service")
    with _tls(world, quick.port) as sock:
        start = time.monotonic()
        sock.sendall(_request("POST", "/v1/map", query)[:-len(query) + 100])  # headers and 100 bytes, then silence
        status, headers, body = _read_response(sock)
        took = time.monotonic() - start
        assert status == 408 and headers["connection"] == "close", (status, headers)
        assert json.loads(body)["error"].startswith("body: not received within the body timeout of 0.5 s (100 bytes arrived)")
        assert QUICK * 0.8 <= took <= QUICK + MARGIN
        assert _closed_after(sock, MARGIN) <= MARGIN
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_timeouts_must_be_positive(world):
    with pytest.raises(PpcmiError, match=r"--body-timeout: must be a positive number"):
        create_app(world["model"], body_timeout=0)
    tls = world["tls"]
    for bad in (-1, float("inf"), "5"):
        with pytest.raises(PpcmiError, match=r"--header-timeout: must be a positive number"):
            uvicorn_config(None, cert=tls / "server.pem", key=tls / "server.key", client_ca=tls / "ca.pem", header_timeout=bad)


# ----------------------------------------------------------------------------- the commands around it


def test_cli_errors_connection_refused_wrong_certificate_and_server_4xx(world, tmp_path):
    tls, site = world["tls"], world["site"]["hospital1"]
    images = sorted((world["data"] / "images").glob("site1_*.png"))[:1]

    def predict(url, cert="hospital1", **kw) -> str:
        return cli("predict", *images, "--site-dir", site, "--server", url, "--cert", tls / "clients" / f"{cert}.pem",
                   "--key", tls / "clients" / f"{cert}.key", "--ca", tls / "ca.pem", "--out", tmp_path / "p", code=2, **kw
                   ).strip().splitlines()[-1]

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert "connection refused" in predict(f"https://127.0.0.1:{port}")
    assert "--cert" in predict(world["live"].url, cert="hospital2") and "'hospital2'" in predict(world["live"].url, cert="hospital2")
    small = LiveServer(create_app(world["model"], max_bytes=64), tls)
    try:
        line = predict(small.url)
        assert "HTTP 413" in line and "exceeds the limit of 64 bytes" in line
        # far over the limit: answered at once and the connection closed; the client may see the
        # reset before the 413, and then says what most likely happened
        with ServiceClient(small.url, cert=tls / "clients" / "hospital1.pem", key=tls / "clients" / "hospital1.key",
                           ca=tls / "ca.pem") as c:
            with pytest.raises(ServiceError, match=r"HTTP 413|probably larger than its --max-bytes"):
                c.map(b"\0" * (3 * 1024 * 1024))
            assert c.health()["status"] == "ok"
    finally:
        small.stop()
    assert "--server needs --key, --ca" in cli("predict", *images, "--site-dir", site, "--server", "https://x:1",
                                                "--cert", "c", "--out", tmp_path / "q", code=2)
    assert "exactly one of --model" in cli("predict", *images, "--site-dir", site, "--out", tmp_path / "q", code=2)


def test_serve_command_runs_with_mutual_tls(world, tmp_path, query):
    """`ppcmi server serve` as a process: answers /healthz to a hospital, keeps the header, body and keep-alive
    timeouts given on its command line, stops on SIGTERM."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    tls = world["tls"]
    proc = subprocess.Popen([sys.executable, "-m", "ppcmi.cli", "server", "serve", "--model", world["model"], "--cert",
                             tls / "server.pem", "--key", tls / "server.key", "--client-ca", tls / "ca.pem", "--port", str(port),
                             "--header-timeout", str(QUICK), "--body-timeout", str(QUICK), "--keep-alive-timeout", str(QUICK),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ctx = tls_context(tls / "clients" / "hospital2.pem", tls / "clients" / "hospital2.key", tls / "ca.pem")
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://localhost:{port}/healthz", verify=ctx, timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["clients"] == 2
        with _tls(world, port) as sock:  # --header-timeout: a silent connection is closed
            assert _closed_after(sock, QUICK + MARGIN) < QUICK + MARGIN
        with _tls(world, port) as sock:  # --body-timeout: half a body is a 408
            sock.sendall(_request("POST", "/v1/map", query)[:-len(query) // 2])
            sock.settimeout(QUICK + MARGIN)
            assert _read_response(sock)[0] == 408
        with _tls(world, port) as sock:  # --keep-alive-timeout: an idle connection after an answer is closed
            sock.sendall(_request("GET", "/healthz"))
            assert _read_response(sock)[0] == 200
            assert _closed_after(sock, QUICK + MARGIN) < QUICK + MARGIN
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_timeout_flags_default_to_the_services_and_refuse_non_positive_values(world):
    import inspect

    from ppcmi.cli import server_serve
    from ppcmi.server import service

    params = inspect.signature(server_serve).parameters
    assert params["header_timeout"].default.default == service.DEFAULT_HEADER_TIMEOUT
    assert params["body_timeout"].default.default == service.DEFAULT_BODY_TIMEOUT
    assert params["keep_alive_timeout"].default.default == service.DEFAULT_KEEP_ALIVE_TIMEOUT
    tls = world["tls"]
    args = ["server", "serve", "--model", world["model"], "--cert", tls / "server.pem", "--key", tls / "server.key",
            "--client-ca", tls / "ca.pem", "--port", "1"]
    for flag in ("--header-timeout", "--body-timeout", "--keep-alive-timeout"):
        out = cli(*args, flag, "0", code=2)
        assert out.strip().splitlines()[-1].startswith(f"error: {flag}: must be a positive number of seconds"), out
    help_text = cli("server", "serve", "--help")
    assert all(f in help_text for f in ("--header-timeout", "--body-timeout", "--keep-alive-timeout"))


def test_serve_refuses_a_key_that_does_not_match_the_certificate(world):
    tls = world["tls"]
    out = cli("server", "serve", "--model", world["model"], "--cert", tls / "server.pem", "--key", tls / "ca.key",
              "--client-ca", tls / "ca.pem", "--port", "1", code=2)
    assert out.strip().splitlines()[-1].startswith("error: --cert/--key/--client-ca: cannot build the TLS context")


def test_missing_service_extra_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # an import of fastapi now fails as if it were not installed
    with pytest.raises(PpcmiError, match=r"needs the 'service' extra \(fastapi is not installed\).*\[service\]"):
        require_extra()


# ----------------------------------------------------------------------------- ppcmi certs


def test_certs_init_and_issue_client_layout_modes_and_identity(tmp_path):
    d = tmp_path / "tls"
    cli("certs", "init", "--out", d, "--host", "coordinator.example.org", "--host", "10.1.2.3")
    cli("certs", "issue-client", "hospital1", "--ca-dir", d)
    cli("certs", "issue-client", "h.2-b_c", "--ca-dir", d, "--out", tmp_path / "elsewhere")
    keys = [d / "ca.key", d / "server.key", d / "clients" / "hospital1.key", tmp_path / "elsewhere" / "h.2-b_c.key"]
    for k in keys:
        assert (k.stat().st_mode & 0o777) == 0o600, k
    for c in (d / "ca.pem", d / "server.pem", d / "clients" / "hospital1.pem"):
        assert (c.stat().st_mode & 0o077) != 0o077 and c.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert certs.site_id_of((d / "clients" / "hospital1.pem").read_bytes()) == "hospital1"
    assert certs.site_id_of(certs.load_cert(tmp_path / "elsewhere" / "h.2-b_c.pem")) == "h.2-b_c"
    from cryptography import x509

    san = certs.load_cert(d / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example.org"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}


def test_certs_never_overwrite(tmp_path):
    d = tmp_path / "tls"
    cli("certs", "init", "--out", d)
    cli("certs", "issue-client", "hospital1", "--ca-dir", d)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert "already exists; refusing to overwrite" in cli("certs", "init", "--out", d, code=2)
    assert "hospital1.pem: already exists" in cli("certs", "issue-client", "hospital1", "--ca-dir", d, code=2)
    (d / "clients" / "hospital1.pem").unlink()  # the key alone still blocks a reissue
    assert "hospital1.key: already exists" in cli("certs", "issue-client", "hospital1", "--ca-dir", d, code=2)
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == {p: b for p, b in before.items() if p.name != "hospital1.pem"}


@pytest.mark.parametrize("name", ["../evil", "a b", "-lead", "x" * 65, "h1/../h2", "é"])
def test_certs_refuse_a_bad_site_id(tmp_path, name):
    d = tmp_path / "tls"
    certs.init_ca(d)
    line = cli("certs", "issue-client", "--ca-dir", d, "--", name, code=2).strip().splitlines()[-1]
    assert line.startswith("error: NAME:") and "not a valid site id" in line
    assert not (d / "clients").exists()


def test_certs_refuse_bad_hosts_and_unsafe_or_foreign_ca_keys(tmp_path):
    assert "--host: 'bad host!'" in cli("certs", "init", "--out", tmp_path / "x", "--host", "bad host!", code=2)
    assert "--host: 'coord.example.org\\n'" in cli("certs", "init", "--out", tmp_path / "x", "--host", "coord.example.org\n", code=2)
    assert not (tmp_path / "x").exists()
    a, b = tmp_path / "a", tmp_path / "b"
    certs.init_ca(a)
    certs.init_ca(b)
    (a / "ca.key").chmod(0o644)
    assert "readable by group or others" in cli("certs", "issue-client", "h1", "--ca-dir", a, code=2)
    (a / "ca.key").chmod(0o600)
    (a / "ca.key").unlink()
    (a / "ca.key").write_bytes((b / "ca.key").read_bytes())
    (a / "ca.key").chmod(0o600)
    assert "does not belong to the certificate" in cli("certs", "issue-client", "h1", "--ca-dir", a, code=2)
    with pytest.raises(PpcmiError, match="not an X.509 certificate"):
        certs.site_id_of(b"garbage")
