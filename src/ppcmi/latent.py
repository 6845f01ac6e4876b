"""Latent maths both sides use (neutral: no trust side, no key): latents as pixel samples, the
skewness sign rule, principal frames and per-pixel least squares.

The coordinator uses these to set a hospital's canonical frames and to re-fit adapters after a key
rotation; the audit's attacks use the same maths on what an attacker holds. Pure numpy on
(N, C, H, W) arrays; nothing here imports hospital code, key handling, the coordinator or the
adversary, so either side can depend on it without loading the other.
"""

from __future__ import annotations

import numpy as np


def pixels(z: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N·H·W, C): every pixel's channel vector is one sample."""
    n, c, h, w = z.shape
    return np.ascontiguousarray(np.moveaxis(np.asarray(z, np.float64), 1, -1).reshape(n * h * w, c))


def unpixels(x: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`pixels`: (N·H·W, C) -> (N, C, H, W)."""
    return np.moveaxis(x.reshape(n, h, w, -1), -1, 1)


def skew_signs(maps: np.ndarray) -> np.ndarray:
    """Per component (axis 1 of (N, K, H, W)), +1 or -1 so that the pooled pixel distribution has
    non-negative skewness: a key-independent rule (a foreground that covers a minority of pixels
    sits in the long tail)."""
    x = np.moveaxis(maps, 1, 0).reshape(maps.shape[1], -1)
    x = x - x.mean(1, keepdims=True)
    skew = (x ** 3).mean(1) / np.maximum((x ** 2).mean(1) ** 1.5, 1e-12)
    return np.where(skew >= 0, 1.0, -1.0)


def principal_frame(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes ``U`` (columns, by decreasing variance) and mean ``mu`` of the per-pixel channel
    vectors of ``z`` (N, C, H, W); each axis's sign makes the third moment of its coordinate positive.

    For ``z' = M z + b`` with ``M`` orthogonal (a keyed transform) the frame follows the key:
    ``U' = M U``, ``mu' = M mu + b``, so ``U'ᵀ (z' - mu') = Uᵀ (z - mu)``: coordinates in the frame
    do not depend on the key (up to ties between equal variances or a zero third moment)."""
    x = pixels(z)
    mu = x.mean(0)
    xc = x - mu
    _, u = np.linalg.eigh(xc.T @ xc / len(xc))
    u = u[:, ::-1]
    return u * skew_signs((xc @ u).T[None, :, :, None]), mu  # the same sign rule as the audit's component maps (A1)


def principal_frame_streamed(blocks) -> tuple[np.ndarray, np.ndarray]:
    """:func:`principal_frame` of rows that come in blocks, in two passes, holding one block at a time.

    ``blocks()`` returns a fresh iterator over (n, C, H, W) arrays whose concatenation is ``z``. The mean
    and covariance come from float64 sums of the first pass, the signs from the third central moments
    of the second; the frame equals :func:`principal_frame`'s up to rounding."""
    total, s1, s2 = 0, None, None
    for z in blocks():
        x = pixels(z)
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = x.T @ x if s2 is None else s2 + x.T @ x
        total += len(x)
    mu = s1 / total
    _, u = np.linalg.eigh(s2 / total - np.outer(mu, mu))
    u = u[:, ::-1]
    m1 = m2 = m3 = 0.0
    for z in blocks():
        c = (pixels(z) - mu) @ u
        m1, m2, m3 = m1 + c.sum(0), m2 + (c ** 2).sum(0), m3 + (c ** 3).sum(0)
    e1, e2, e3 = m1 / total, m2 / total, m3 / total
    var, third = e2 - e1 ** 2, e3 - 3 * e1 * e2 + 2 * e1 ** 3
    skew = third / np.maximum(var ** 1.5, 1e-12)
    return u * np.where(skew >= 0, 1.0, -1.0), mu


def lstsq_1x1(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``dst ≈ A src + c`` per pixel over (N, C, H, W) arrays; returns (A, c)."""
    x, y = pixels(src), pixels(dst)
    mx, my = x.mean(0), y.mean(0)
    a = np.linalg.lstsq(x - mx, y - my, rcond=None)[0].T
    return a, my - a @ mx
