"""The hospital's HTTPS client for the inference service (hospital side): mutual TLS with the hospital's own certificate.

The hospital trusts only the project CA (``--ca ca.pem``) for the server's certificate and
proves who it is with ``clients/NAME.pem`` + ``NAME.key`` from ``ppcmi certs issue-client``.
Failures become one line: connection refused, TLS failure (which side refused, and why), or
the server's JSON error for a refused request. httpx comes with the optional ``service`` extra.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import SERVICE_EXTRA_HINT, CertError, PpcmiError, ServiceError


def tls_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` only and presents ``cert``/``key``."""
    for what, p in (("--cert", cert), ("--key", key), ("--ca", ca)):
        if not Path(p).is_file():
            raise CertError(f"{what}: {p}: no such file")
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as e:
        raise CertError(f"--ca: {ca}: not a usable CA certificate ({e.reason or e})") from None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise CertError(f"--cert/--key: {cert}, {key}: cannot load the client certificate and key ({e.reason or e})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


_REFUSED_HINT = ("the server ended the connection before answering: it most likely refused this hospital's certificate "
                 "(is --cert signed by the CA the server trusts, and not expired?)")


def _explain(exc: BaseException, url: str) -> str:
    """One line for a transport failure, from the innermost cause that says what happened.

    A server that refuses a client certificate closes the connection without a TLS alert (in
    TLS 1.3 the client has already finished its side of the handshake), so an end of file
    before any answer is reported as the likely refusal it is.
    """
    import httpx

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"{url}: TLS failure: the server's certificate is not trusted by --ca ({e.verify_message})"
    for e in chain:
        if isinstance(e, ssl.SSLEOFError):
            return f"{url}: TLS failure: {_REFUSED_HINT}"
        if isinstance(e, ssl.SSLError):
            reason = e.reason or str(e)
            if "ALERT" in reason.upper():
                return f"{url}: TLS failure: the server refused this hospital's certificate ({reason})"
            return f"{url}: TLS failure ({reason})"
    for e in chain:
        if isinstance(e, ConnectionRefusedError) or "connection refused" in str(e).lower():
            return f"{url}: connection refused (is 'ppcmi server serve' running there?)"
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" in str(exc):
        return f"{url}: {_REFUSED_HINT}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{url}: timed out ({type(exc).__name__})"
    return f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'transport failure'}"


class ServiceClient:
    """``map(query_bytes) -> reply_bytes`` and ``health() -> dict`` against ``https://HOST:PORT``."""

    def __init__(self, url: str, *, cert: str | Path, key: str | Path, ca: str | Path, timeout: float = 120.0):
        try:
            import httpx
        except ImportError:
            raise PpcmiError(f"--server needs the 'service' extra (httpx is not installed): {SERVICE_EXTRA_HINT}") from None
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ServiceError(f"--server: expected https://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, verify=tls_context(cert, key, ca), timeout=timeout)

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            if method == "POST" and not isinstance(e, (httpx.ConnectError, httpx.TimeoutException)) and self._healthy():
                # the connection was dropped mid-request, yet the certificate is accepted: a body far over the limit
                raise ServiceError(f"{self.url}{path}: the server closed the connection without answering, although it accepts "
                                   f"this hospital's certificate; the request ({len(kwargs.get('content') or b'')} bytes) is "
                                   "probably larger than its --max-bytes") from None
            raise ServiceError(_explain(e, self.url)) from None
        if r.status_code >= 400:
            try:
                detail = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                detail = r.text.strip().splitlines()[0][:200] if r.text.strip() else r.reason_phrase
            what = "refused the request" if r.status_code < 500 else "failed"
            raise ServiceError(f"{self.url}{path}: the server {what} (HTTP {r.status_code}): {detail}")
        return r

    def _healthy(self) -> bool:
        import httpx

        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def map(self, query: bytes) -> bytes:
        """Post protocol bytes of a query; return the reply's protocol bytes."""
        return self._request("POST", "/v1/map", content=query, headers={"content-type": "application/octet-stream"}).content

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
