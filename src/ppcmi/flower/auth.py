"""SuperNode authentication key pairs (hospital side creates, coordinator registers the public half).

Flower's SuperLink started with ``--enable-supernode-auth`` only talks to SuperNodes whose public
key was registered with ``flwr supernode register KEY.pub``; each SuperNode signs its requests
with the private key given to ``flower-supernode --auth-supernode-private-key``. Flower reads both
in OpenSSH format and accepts NIST elliptic curves; we use ECDSA P-384 as Flower's own guide does::

    DIR/supernode.key   private key, OpenSSH PEM, mode 0600: never leaves the hospital
    DIR/supernode.pub   public key, one OpenSSH line: send it to the coordinator

This key pair authenticates a SuperNode to the SuperLink; it is unrelated to the hospital's
keyed-latent-transform key (``klt.key``), which nothing here reads.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import CertError
from ..fileio import atomic_write_bytes

PRIVATE, PUBLIC = "supernode.key", "supernode.pub"


def supernode_keygen(out: str | Path, comment: str = "ppcmi-supernode") -> tuple[Path, Path]:
    """Write a new SuperNode key pair into ``out``; returns (private, public). Never overwrites."""
    out = Path(out)
    priv_path, pub_path = out / PRIVATE, out / PUBLIC
    for p in (priv_path, pub_path):
        if p.exists():
            raise CertError(f"{p}: already exists; refusing to overwrite it (choose another folder or remove it yourself)")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(priv_path, priv, overwrite=False, mode=0o600)
    atomic_write_bytes(pub_path, pub + f" {comment}\n".encode("ascii"), overwrite=False, mode=0o644)
    return priv_path, pub_path
