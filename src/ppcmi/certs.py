"""X.509 certificates for mutual TLS (both sides): a project CA, a server certificate, one client certificate per hospital.

The coordinator runs ``init`` once; it signs one client certificate per hospital with
``issue_client``. A hospital's identity on the wire is its certificate's subject common name
(CN), which must be the pseudonymous site id it uses as ``client`` in protocol messages (the
``site`` of its ``site.json``); no other name or SAN carries identity. The layout is generic, so
the same files serve the HTTPS inference service and Flower's TLS (``flower-superlink
--ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key``)::

    DIR/ca.pem             CA certificate: give it to every hospital and to the server
    DIR/ca.key             CA private key (0600): stays with the coordinator, ideally offline
    DIR/server.pem         server certificate, SANs localhost, 127.0.0.1 and every --host
    DIR/server.key         server private key (0600)
    DIR/clients/NAME.pem   hospital NAME's certificate (CN = NAME)
    DIR/clients/NAME.key   hospital NAME's private key (0600): hand it to that hospital only

Keys are ECDSA P-256, stored unencrypted as PKCS#8 PEM with mode 0600; certificates are
SHA-256 signed. No file is ever overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertError, PpcmiError
from .fileio import atomic_write_bytes
from .protocol import CLIENT_RE

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENTS_DIR = "clients"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825
_DNS_RE = re.compile(r"\A(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def _san(host: str) -> x509.GeneralName:
    """An IP address or DNS name for the server certificate's subjectAltName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise CertError(f"--host: {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _refuse_existing(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.exists():
            raise CertError(f"{p}: already exists; refusing to overwrite it (choose another folder or remove it yourself)")


MAX_DAYS = 36525  # a validity far beyond any CA's; also keeps the end date inside what X.509 and datetime can hold


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days: must be a number of days from 1 to {MAX_DAYS} (100 years), got {days!r}")
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _leaf(subject_cn: str, purpose: x509.ObjectIdentifier, ca_cert: x509.Certificate, ca_key, days: int,
          sans: list[x509.GeneralName] | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]), ca_cert.subject, key.public_key(), days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def init_ca(out: str | Path, hosts: Iterable[str] = (), *, days: int = LEAF_DAYS, ca_days: int = CA_DAYS) -> dict[str, Path]:
    """Create ``ca.pem``/``ca.key`` and ``server.pem``/``server.key`` in ``out``.

    The server certificate's subjectAltNames are ``localhost``, ``127.0.0.1`` and ``hosts``
    (IP addresses or DNS names). Nothing is written if any of the four files already exists.
    """
    out = Path(out)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    sans = [_san(h) for h in names]
    paths = {k: out / k for k in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _refuse_existing(paths.values())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppcmi"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "ppcmi certificate authority")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), ca_days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    srv_cert, srv_key = _leaf(names[0], ExtendedKeyUsageOID.SERVER_AUTH, ca_cert, ca_key, days, sans)

    # keys first, each 0600 from the moment it exists; certificates last
    atomic_write_bytes(paths[CA_KEY], _key_pem(ca_key), overwrite=False, mode=0o600)
    atomic_write_bytes(paths[SERVER_KEY], _key_pem(srv_key), overwrite=False, mode=0o600)
    atomic_write_bytes(paths[CA_CERT], ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=False, mode=0o644)
    atomic_write_bytes(paths[SERVER_CERT], srv_cert.public_bytes(serialization.Encoding.PEM), overwrite=False, mode=0o644)
    return paths


def check_site_id(name: str, where: str = "NAME") -> str:
    if not isinstance(name, str) or not CLIENT_RE.match(name):
        raise CertError(f"{where}: {name!r} is not a valid site id (letters, digits, '_', '.', '-'; at most 64; "
                        "it must be the hospital's 'site' in site.json)")
    return name


def issue_client(name: str, ca_dir: str | Path, out: str | Path | None = None, *, days: int = LEAF_DAYS) -> tuple[Path, Path]:
    """Sign a client certificate for hospital ``name`` (CN = ``name``); returns (cert, key) paths.

    ``out`` defaults to ``ca_dir/clients``. Refuses an invalid site id, an existing file, a CA
    key readable by group or others, and a CA key that does not match ``ca.pem``.
    """
    check_site_id(name)
    ca_dir = Path(ca_dir)
    out = Path(out) if out is not None else ca_dir / CLIENTS_DIR
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    _refuse_existing((cert_path, key_path))
    ca_cert = load_cert(ca_dir / CA_CERT)
    ca_key = _load_private_key(ca_dir / CA_KEY)
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise CertError(f"{ca_dir / CA_KEY}: does not belong to the certificate {ca_dir / CA_CERT}")
    cert, key = _leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, ca_cert, ca_key, days)
    atomic_write_bytes(key_path, _key_pem(key), overwrite=False, mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite=False, mode=0o644)
    return cert_path, key_path


def load_cert(path: str | Path) -> x509.Certificate:
    """Read one PEM certificate, with a one-line error naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertError(f"{path}: cannot read certificate ({e.strerror})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{path}: not a PEM certificate") from None


def _load_private_key(path: Path):
    try:
        st = path.stat()
    except OSError as e:
        raise CertError(f"{path}: cannot read private key ({e.strerror})") from None
    if st.st_mode & 0o077:
        raise CertError(f"{path}: private key is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CertError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: expected an EC private key (as 'ppcmi certs' writes)")
    return key


def site_id_of(cert: x509.Certificate | bytes | str, where: str = "certificate") -> str:
    """The hospital site id a certificate stands for: its single subject CN, checked against the protocol's rule.

    ``cert`` is a certificate object, PEM text/bytes or DER bytes.
    """
    if isinstance(cert, str):
        cert = cert.encode("ascii")
    if isinstance(cert, (bytes, bytearray)):
        try:
            cert = (x509.load_pem_x509_certificate(bytes(cert)) if bytes(cert).lstrip().startswith(b"-----")
                    else x509.load_der_x509_certificate(bytes(cert)))
        except ValueError:
            raise CertError(f"{where}: not an X.509 certificate") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CertError(f"{where}: subject must hold exactly one common name (the site id), found {len(cns)}")
    cn = cns[0].value
    try:
        return check_site_id(cn if isinstance(cn, str) else cn.decode("utf-8", "replace"), f"{where} CN")
    except PpcmiError as e:
        raise CertError(str(e)) from None
