"""Keyed Latent Transform (hospital side only): per-pixel T(z) = P·Qᵀ·z + b on the channel axis.

Built from a hospital's 32-byte secret key. HKDF-SHA256 (``cryptography``) derives, for every
modality ("image", "mask") and scale ("s3", "s4", "b"), independent seeds for

- Q: a Haar-random orthogonal matrix (QR of a standard Gaussian, columns sign-fixed by diag(R)),
- P: a channel permutation,
- b: a bias vector (standard normal times ``bias_scale``).

Each seed drives its own local ``numpy`` generator; nothing global is touched. The transform is
plain maths, not an ``nn.Module``: it has no parameters to save, so it can never end up in a
checkpoint. The inverse is exact up to float32 rounding: z = Q·Pᵀ·(z' − b).

This module is imported only by hospital code; the server never sees it (an import test checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
MODALITIES = ("image", "mask")
_SALT = b"ppcmi-klt-v1"


def _derive_seed(key: bytes, label: str) -> int:
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=label.encode("ascii")).derive(key)
    return int.from_bytes(okm, "big")


def haar_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed n×n orthogonal matrix: QR of a Gaussian with the sign of diag(R) folded into Q."""
    g = rng.standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


@dataclass(frozen=True)
class _ScaleKey:
    q: torch.Tensor      # (C, C) orthogonal, float32
    perm: torch.Tensor   # (C,) int64 channel permutation
    inv_perm: torch.Tensor
    bias: torch.Tensor   # (C,) float32


class KeyedLatentTransform:
    """Forward and inverse keyed transform for one hospital.

    ``channels`` maps scale name to channel count, e.g. ``{"s3": 64, "s4": 128, "b": 256}``.
    ``forward(z, modality)`` and ``inverse(zt, modality)`` take and return ``{scale: (B, C, H, W)}``.
    The matrices are always derived on the CPU in float64 from the key's own generators and only then moved to
    ``device`` (default the CPU) as float32, so one key gives the same transform on every device.
    """

    def __init__(self, key: bytes, channels: dict[str, int], *, bias_scale: float = 1.0, device: torch.device | str | None = None):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"key: expected {KEY_BYTES} bytes, got {len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__}")
        self._keys: dict[tuple[str, str], _ScaleKey] = {}
        for modality in MODALITIES:
            for scale, c in channels.items():
                label = f"{modality}/{scale}/{c}"
                q = haar_orthogonal(c, np.random.default_rng(_derive_seed(bytes(key), f"Q/{label}")))
                perm = np.random.default_rng(_derive_seed(bytes(key), f"P/{label}")).permutation(c)
                bias = np.random.default_rng(_derive_seed(bytes(key), f"b/{label}")).standard_normal(c) * bias_scale
                self._keys[(modality, scale)] = _ScaleKey(
                    q=torch.from_numpy(q.astype(np.float32)).to(device),
                    perm=torch.from_numpy(perm).to(device),
                    inv_perm=torch.from_numpy(np.argsort(perm)).to(device),
                    bias=torch.from_numpy(bias.astype(np.float32)).to(device),
                )

    def _get(self, modality: str, scale: str) -> _ScaleKey:
        try:
            return self._keys[(modality, scale)]
        except KeyError:
            raise KeyError(f"no keyed transform for modality={modality!r} scale={scale!r}") from None

    def forward(self, z: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
        out = {}
        for scale, x in z.items():
            k = self._get(modality, scale)
            y = torch.einsum("ji,bjhw->bihw", k.q.to(x.dtype), x)  # Qᵀ z at every pixel
            out[scale] = y[:, k.perm] + k.bias.to(x.dtype)[None, :, None, None]
        return out

    def inverse(self, zt: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
        out = {}
        for scale, y in zt.items():
            k = self._get(modality, scale)
            u = (y - k.bias.to(y.dtype)[None, :, None, None])[:, k.inv_perm]
            out[scale] = torch.einsum("ij,bjhw->bihw", k.q.to(y.dtype), u)  # Q u
        return out

    def matrix(self, modality: str, scale: str) -> torch.Tensor:
        """The full channel map M = P·Qᵀ (for tests and the privacy audit's positive controls)."""
        k = self._get(modality, scale)
        return k.q.t()[k.perm]

    def bias(self, modality: str, scale: str) -> torch.Tensor:
        return self._get(modality, scale).bias
