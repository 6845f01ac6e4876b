"""The HTTPS inference service with mutual TLS (coordinator side): hospitals post keyed queries, get keyed replies.

Endpoints (the OpenAPI schema is served at ``/openapi.json``):

- ``POST /v1/map``: body = protocol bytes of a ``query`` :class:`~ppcmi.protocol.LatentBatch`
  (``application/octet-stream``); response = protocol bytes of the ``reply``.
- ``GET /healthz``: ``{"status": "ok", "protocol_version": 1, "clients": N}``.

Every connection must present a client certificate signed by the project CA
(:mod:`ppcmi.certs`); the TLS layer refuses any other before HTTP starts. The hospital's
identity is the verified certificate's subject CN; it selects that hospital's adapters, and a
query whose ``client`` differs is refused with 403. Client mistakes get a 4xx with a JSON body
``{"error": "<field>: <what is wrong>"}`` and never stop the service: 400 for a malformed or
invalid message, 403 for an identity mismatch or a hospital this model does not serve, 413 for a
body over ``max_bytes`` (checked on ``Content-Length`` before reading, and again while
streaming; never buffered past the limit), 415 for another content type. Parsing and mapping run in a worker thread (the event
loop keeps serving), at most ``concurrency`` at a time, on one shared model instance. A query
must carry exactly the scales the loaded model serves (``zt_img_<scale>`` for each; checked by
``protocol.decode``); a missing one is a 400 naming the missing arrays.

Timeouts (all configurable, in seconds): a connection must deliver a request's complete headers
within ``header_timeout`` (default :data:`DEFAULT_HEADER_TIMEOUT`) of its first byte (of the
connection's opening, for the first request), or it is closed without an answer; a request's body
must arrive completely within ``body_timeout`` (default :data:`DEFAULT_BODY_TIMEOUT`) of the
handler starting to read it, or the answer is a 408 and the connection is closed; an idle
keep-alive connection is closed after ``keep_alive_timeout`` (default
:data:`DEFAULT_KEEP_ALIVE_TIMEOUT`, uvicorn's ``timeout_keep_alive``). A client that hangs up
mid-body is logged as one INFO line. Any other exception in a request is logged at ERROR with its
traceback on the server and answered ``500 {"error": "internal error"}`` (its text never leaves
the server); the connection stays usable when the request's body had been read.

FastAPI and uvicorn come with the optional ``service`` extra and are imported only when a
service is built.
"""

import functools
import logging
import ssl
from pathlib import Path
from typing import Any

from .. import protocol
from ..certs import site_id_of
from ..device import Device
from ..errors import SERVICE_EXTRA_HINT, CertError, PpcmiError, ProtocolError
from .mapping import MappingServer

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # 36 images of 256 x 256 at full autoencoder width, float32
DEFAULT_PORT = 8443
# A body at most this much over the limit is read to its end and dropped before the 413, so
# the client surely gets the answer; a larger one is answered at once and the connection closed
# (the client may then see the connection reset before it reads the 413: HTTP/1.1 has no better way).
DRAIN_BYTES = 1024 * 1024
OCTET = "application/octet-stream"
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
DEFAULT_BODY_TIMEOUT = 60.0  # seconds to read a whole body (16 MiB at >= 280 kB/s)
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)


def require_extra() -> None:
    """Fail with one clear line when the optional ``service`` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise PpcmiError(f"the inference service needs the 'service' extra ({e.name} is not installed): {SERVICE_EXTRA_HINT}") from None


def _check_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise PpcmiError(f"{name}: must be a positive number of seconds, got {value!r}")
    return float(value)


class _Refused(Exception):
    """A client-caused refusal: HTTP status and a one-line message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _identity(scope: dict) -> str:
    """The site id of the verified client certificate, from the connection's ASGI TLS extension."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        raise _Refused(403, "certificate: no verified client certificate on this connection")
    try:
        return site_id_of(chain[0], "client certificate")
    except CertError as e:
        raise _Refused(403, str(e)) from None


class _CatchAll:
    """ASGI middleware: an exception escaping the application becomes a logged JSON 500 (or, for a
    client that hung up, one INFO line) instead of uvicorn's plain-text 500 and a dropped connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import ClientDisconnect

        started = body_done = False

        async def receive_tracked():
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_tracked, send_tracked)
        except ClientDisconnect:
            log.info("%s %s: the client hung up before the end of its request", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("%s %s: internal error", scope.get("method"), scope.get("path"))
            if started:  # nothing clean can follow a half-sent answer: uvicorn closes the connection
                raise
            headers = [(b"content-type", b"application/json")]
            if not body_done:  # the rest of an unread body would stall this connection
                headers.append((b"connection", b"close"))
            body = b'{"error":"internal error"}'
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(model_dir: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, concurrency: int = 1,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, device: Device = None):
    """The FastAPI application serving one mapping model folder (loaded once onto ``device``, see
    :func:`ppcmi.device.resolve_device`; None is the CPU; shared by all requests)."""
    require_extra()
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    if not isinstance(max_bytes, int) or max_bytes < 64:
        raise PpcmiError(f"--max-bytes: must be an integer of at least 64, got {max_bytes!r}")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise PpcmiError(f"--concurrency: must be a positive integer, got {concurrency!r}")
    body_timeout = _check_timeout("--body-timeout", body_timeout)
    server = MappingServer(model_dir, device=device)
    limiter = anyio.CapacityLimiter(concurrency)

    class ErrorBody(BaseModel):
        error: str

    class Health(BaseModel):
        status: str
        protocol_version: int
        clients: int

    binary = {"schema": {"type": "string", "format": "binary"}}
    app = FastAPI(title="ppcmi inference service", version=str(protocol.PROTOCOL_VERSION), docs_url=None, redoc_url=None,
                  description="Maps a hospital's keyed image latents to keyed mask latents with that hospital's adapters. "
                              "Mutual TLS: the client certificate's CN is the hospital's site id.")

    def error(status: int, message: str, *, close: bool = False) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"} if close else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405, ...
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/healthz", response_model=Health, summary="Liveness and what this server speaks")
    async def healthz() -> Health:
        return Health(status="ok", protocol_version=protocol.PROTOCOL_VERSION, clients=len(server.clients))

    def map_bytes(body: bytes, caller: str) -> bytes:
        """Parse, check the sender against the certificate, map, serialise (runs in a worker thread)."""
        try:
            query = protocol.decode(body, max_bytes=max_bytes, expected=server.image_shapes)
        except ProtocolError as e:
            raise _Refused(400, str(e)) from None
        if query.client != caller:
            raise _Refused(403, f"client: the message is for {query.client!r} but the certificate is for {caller!r}")
        if query.kind != "query":
            raise _Refused(400, f"kind: expected a 'query' message, got {query.kind!r}")
        try:
            return protocol.encode(server.handle(query, client=caller))
        except ProtocolError as e:
            raise _Refused(400, str(e)) from None

    responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "Protocol bytes of the 'reply' message (keyed mask latents).", "content": {OCTET: binary}},
        400: {"model": ErrorBody, "description": "Malformed or invalid message (the error names the field)."},
        403: {"model": ErrorBody, "description": "The message's client is not the certificate's, or this model does not serve it."},
        408: {"model": ErrorBody, "description": "The body did not arrive within the server's body timeout."},
        413: {"model": ErrorBody, "description": "Body larger than the server's limit."},
        415: {"model": ErrorBody, "description": "Content type other than application/octet-stream."},
        500: {"model": ErrorBody, "description": "Internal error (logged on the server; the body says only 'internal error')."},
    }

    @app.post("/v1/map", response_class=Response, responses=responses, summary="Map a keyed query to a keyed reply",
              openapi_extra={"requestBody": {"required": True, "description": "Protocol bytes of a 'query' message.",
                                             "content": {OCTET: binary}}})
    async def map_query(request: Request) -> Response:
        body_read = False
        try:
            caller = _identity(request.scope)
            if caller not in server.clients:
                raise _Refused(403, f"certificate: hospital {caller!r} is not served by this model")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != OCTET:
                raise _Refused(415, f"content-type: expected {OCTET}, got {ctype or 'none'!r}")
            declared = request.headers.get("content-length")  # h11 has already checked it is a number
            too_big = None
            if declared is not None and int(declared) > max_bytes:
                too_big = f"body: Content-Length {declared} exceeds the limit of {max_bytes} bytes"
                if int(declared) > max_bytes + DRAIN_BYTES:
                    raise _Refused(413, too_big)  # answered before reading any of it
            chunks, size = [], 0
            try:
                with anyio.fail_after(body_timeout):
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > max_bytes:
                            too_big = too_big or f"body: more than the limit of {max_bytes} bytes"
                            if size > max_bytes + DRAIN_BYTES:
                                raise _Refused(413, too_big)
                        if too_big is None:
                            chunks.append(chunk)
            except TimeoutError:
                raise _Refused(408, f"body: not received within the body timeout of {body_timeout:g} s "
                                    f"({size} bytes arrived)") from None
            except ClientDisconnect:
                log.info("client %r hung up after %d bytes of its body; nothing mapped", caller, size)
                return Response(status_code=400)  # never sent: the connection is gone
            body_read = True
            if too_big is not None:  # a small excess was read and dropped: the answer arrives and the connection stays usable
                raise _Refused(413, too_big)
            reply = await anyio.to_thread.run_sync(map_bytes, b"".join(chunks), caller, limiter=limiter)
        except _Refused as e:
            log.info("refused a request (%d): %s", e.status, e)
            # the rest of an unread body would stall this connection: close it after the answer
            return error(e.status, str(e), close=not body_read)
        return Response(reply, media_type=OCTET)

    app.add_middleware(_CatchAll)  # innermost user middleware, inside Starlette's ServerErrorMiddleware
    app.state.mapping = server
    return app


@functools.cache
def _peer_certificate_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT):
    """uvicorn's h11 protocol, plus the verified peer certificate in ``scope["extensions"]["tls"]``
    and a request-header timeout.

    uvicorn 0.49 does not fill the ASGI TLS extension. The TLS handshake (and client
    certificate verification) is complete when ``connection_made`` runs, so the certificate is
    read once per connection and added to every request's scope under the extension's key names
    (``client_cert_chain``: PEM list, leaf first; ``client_cert_name``: RFC 4514 subject).

    uvicorn 0.49 has no header timeout either: its only timer, ``timeout_keep_alive``, starts after
    a response and is cancelled by any byte received, so a client that connects and sends half a
    request line, or trickles header bytes, holds the connection forever. Here a deadline of
    ``header_timeout`` seconds starts when the connection opens and again at the first byte after a
    response; if no complete request head has arrived by then, the connection is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCertH11Protocol(H11Protocol):
        header_timer = None

        def _start_header_timer(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _header_timed_out(self) -> None:
            self.header_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                prefix = "%s:%d - " % self.client if self.client else ""
                log.info("%sno complete request headers within the header timeout of %g s; closing the connection",
                         prefix, header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_head():
                self._start_header_timer()  # a deadline from the first byte: trickling bytes does not extend it
            super().data_received(data)
            if not self._waiting_for_head():  # a request head arrived
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts uvicorn's keep-alive timer; may start a pipelined request
            if not self._waiting_for_head():
                self._stop_header_timer()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_timer()  # a connection that sends nothing is closed too
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not der:
                return
            tls = {"server_cert": None, "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
                   "client_cert_name": _subject(der), "client_cert_error": None,
                   "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""), "cipher_suite": None}
            app = self.app

            async def with_tls(scope, receive, send):
                scope.setdefault("extensions", {}).setdefault("tls", tls)
                await app(scope, receive, send)

            self.app = with_tls

    return PeerCertH11Protocol


_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _subject(der: bytes) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def uvicorn_config(app, *, cert: str | Path, key: str | Path, client_ca: str | Path, host: str = "127.0.0.1",
                   port: int = DEFAULT_PORT, log_level: str = "info", header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT):
    """A uvicorn configuration that requires and verifies a client certificate on every connection,
    with the header and keep-alive timeouts (seconds; the body timeout is :func:`create_app`'s)."""
    require_extra()
    import uvicorn

    header_timeout = _check_timeout("--header-timeout", header_timeout)
    keep_alive_timeout = _check_timeout("--keep-alive-timeout", keep_alive_timeout)

    for what, p in (("--cert", cert), ("--key", key), ("--client-ca", client_ca)):
        if not Path(p).is_file():
            raise CertError(f"{what}: {p}: no such file")
    return uvicorn.Config(app, host=host, port=port, ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(client_ca),
                          ssl_cert_reqs=ssl.CERT_REQUIRED, http=_peer_certificate_protocol(header_timeout), ws="none", lifespan="off",
                          log_level=log_level, access_log=log_level in ("debug", "trace"), server_header=False,
                          timeout_keep_alive=keep_alive_timeout)


def serve(model_dir: str | Path, *, cert: str | Path, key: str | Path, client_ca: str | Path, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, max_bytes: int = DEFAULT_MAX_BYTES, concurrency: int = 1, log_level: str = "info",
          header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT, device: Device = None) -> None:
    """Run the service with mutual TLS until interrupted, mapping on ``device``."""
    require_extra()
    import uvicorn

    app = create_app(model_dir, max_bytes=max_bytes, concurrency=concurrency, body_timeout=body_timeout, device=device)
    config = uvicorn_config(app, cert=cert, key=key, client_ca=client_ca, host=host, port=port, log_level=log_level,
                            header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout)
    try:
        config.load()  # builds the SSL context now, so a bad certificate or key is one line, not a traceback
    except ssl.SSLError as e:
        raise CertError(f"--cert/--key/--client-ca: cannot build the TLS context ({e.reason or e})") from None
    uvicorn.Server(config).run()
