"""Attacks on keyed latents (attacker maths, no trust side): PCA maps, Procrustes key recovery, linear
inversion, linkage, and the image and mask scores they are judged by.

Pure functions over numpy arrays. Latents are (N, C, H, W); the keyed transform is modelled, as in
DESIGN.md section 4, as the same affine map at every pixel, ``zt = M z + b`` with M orthogonal
(M = P·Qᵀ in :mod:`ppcmi.klt`). Nothing here imports hospital code or key handling.
"""

from __future__ import annotations

import numpy as np

from ..latent import pixels, skew_signs, unpixels

# ----------------------------------------------------------------------------- A1: principal-component maps


def pca_fit(z: np.ndarray, k: int):
    """Fit a PCA over channels on every pixel of ``z`` (N, C, H, W); returns a fitted sklearn PCA."""
    from sklearn.decomposition import PCA

    x = pixels(z)
    return PCA(n_components=min(k, x.shape[1], x.shape[0]), svd_solver="full").fit(x)


def pca_maps(z: np.ndarray, k: int, pca=None) -> np.ndarray:
    """Principal-component maps (N, k, H, W): each pixel's coordinates on the leading components.

    With ``pca=None`` the PCA is fitted on ``z`` itself (ciphertext-only: the attacker needs nothing
    but the latents it holds). An orthogonal map plus bias changes neither the centred covariance's
    spectrum nor the coordinates, up to the sign of each component.
    """
    pca = pca if pca is not None else pca_fit(z, k)
    n, _, h, w = z.shape
    return unpixels(pca.transform(pixels(z)), n, h, w)


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W) or (N, K, H, W) maps to ``size`` x ``size``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(maps, np.float32))
    squeeze = t.ndim == 3
    if squeeze:
        t = t[:, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).numpy()
    return out[:, 0] if squeeze else out


def standardise(maps: np.ndarray) -> np.ndarray:
    """Sign-fixed (by :func:`skew_signs`) and z-scored maps, pooled over all images, per component."""
    s = skew_signs(maps)[None, :, None, None]
    m = maps * s
    mu = m.mean(axis=(0, 2, 3), keepdims=True)
    sd = m.std(axis=(0, 2, 3), keepdims=True)
    return (m - mu) / np.maximum(sd, 1e-12)


THRESHOLDS = np.round(np.arange(-1.0, 3.01, 0.1), 2)


def fit_threshold_rule(maps: np.ndarray, fg: np.ndarray) -> dict:
    """Choose (component, z-threshold) maximising mean Dice of ``standardise(maps) > t`` against ``fg``.

    ``maps`` (N, K, h, w) and ``fg`` (N, S, S) boolean. This is run on the attacker's auxiliary data
    only; the rule is then applied, unchanged, to the victim's maps.
    """
    z = upsample(standardise(maps), fg.shape[-1])
    best = {"component": 0, "threshold": 0.0, "aux_dice": -1.0}
    for c in range(z.shape[1]):
        for t in THRESHOLDS:
            d = float(np.mean(dice(z[:, c] > t, fg)))
            if d > best["aux_dice"]:
                best = {"component": int(c), "threshold": float(t), "aux_dice": d}
    return best


def apply_threshold_rule(maps: np.ndarray, rule: dict, size: int) -> np.ndarray:
    z = upsample(standardise(maps)[:, [rule["component"]]], size)[:, 0]
    return z > rule["threshold"]


# ----------------------------------------------------------------------------- A5: Procrustes key recovery


def procrustes_key(z: np.ndarray, zt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recover (M, b) with ``zt ≈ M z + b`` per pixel from paired plain and keyed latents (N, C, H, W).

    Bias by centring both sides; M by orthogonal Procrustes on the centred pixel samples.
    """
    from scipy.linalg import orthogonal_procrustes

    x, y = pixels(z), pixels(zt)
    mx, my = x.mean(0), y.mean(0)
    r, _ = orthogonal_procrustes(x - mx, y - my)  # (x - mx) @ r ≈ y - my, so M = rᵀ
    m = r.T
    return m, my - m @ mx


def apply_key(z: np.ndarray, m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """zt = M z + b at every pixel."""
    return np.einsum("ij,njhw->nihw", m, np.asarray(z, np.float64)) + b[None, :, None, None]


def invert_key(zt: np.ndarray, m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z = Mᵀ (zt − b) at every pixel (M orthogonal)."""
    return np.einsum("ji,njhw->nihw", m, np.asarray(zt, np.float64) - b[None, :, None, None])


def relative_error(est: np.ndarray, true: np.ndarray) -> float:
    """‖est − true‖ / ‖true‖ (Frobenius)."""
    return float(np.linalg.norm(np.asarray(est, np.float64) - true) / max(np.linalg.norm(true), 1e-12))


def latent_error(est: np.ndarray, true: np.ndarray) -> float:
    """‖est − true‖ / ‖true − per-channel mean‖: 0 is exact, 1 is as bad as predicting the mean."""
    t = np.asarray(true, np.float64)
    centred = t - t.mean(axis=(0, 2, 3), keepdims=True)
    return float(np.linalg.norm(np.asarray(est, np.float64) - t) / max(np.linalg.norm(centred), 1e-12))


# ----------------------------------------------------------------------------- A6: learned linear inversion


def fit_linear_map(src: np.ndarray, dst: np.ndarray, ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares 1x1 map with bias, ``dst ≈ W src + c`` per pixel; (N, C, H, W) -> (N, C', H, W).

    A small ridge (relative to the mean input variance) keeps it defined when there are fewer
    pixel samples than channels.
    """
    x, y = pixels(src), pixels(dst)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    g = xc.T @ xc
    lam = ridge * max(np.trace(g) / g.shape[0], 1e-12)
    w = np.linalg.solve(g + lam * np.eye(g.shape[0]), xc.T @ yc).T  # (C', C)
    return w, my - w @ mx


def apply_linear_map(src: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.einsum("ij,njhw->nihw", w, np.asarray(src, np.float64)) + c[None, :, None, None]


# ----------------------------------------------------------------------------- A7: linkage


def _downsample(images: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    return F.adaptive_avg_pool2d(t, (h, w))[:, 0].numpy().astype(np.float64)


def linkage_scores_pca(zt: np.ndarray, candidates: np.ndarray, k: int = 8) -> np.ndarray:
    """(N targets, M candidates) scores: R² of each candidate image, average-pooled to the latent
    grid, regressed on an intercept and the target's ``k`` leading principal-component maps.

    Ciphertext plus candidate images only: no key, no encoder. R² is invariant to the components'
    signs and to any affine change of intensity.
    """
    n, _, h, w = zt.shape
    maps = pca_maps(zt, k).reshape(n, -1, h * w)                     # (N, k, P)
    y = _downsample(candidates, h, w).reshape(len(candidates), -1)   # (M, P)
    y = y - y.mean(1, keepdims=True)
    ynorm = np.maximum((y ** 2).sum(1), 1e-12)
    out = np.empty((n, len(candidates)))
    for i in range(n):
        a = np.concatenate([np.ones((1, h * w)), maps[i]], 0).T     # (P, k+1)
        q, _ = np.linalg.qr(a)
        proj = y @ q                                                 # (M, k+1)
        out[i] = (proj ** 2).sum(1) / ynorm
    return out


def centred_norm_maps(z: np.ndarray) -> np.ndarray:
    """Per-pixel norm of the latent minus its pooled per-channel mean: (N, H, W). Invariant to any
    orthogonal map plus bias applied to every pixel of the whole set."""
    z = np.asarray(z, np.float64)
    return np.linalg.norm(z - z.mean(axis=(0, 2, 3), keepdims=True), axis=1)


def linkage_scores_norm(zt: np.ndarray, z_candidates: np.ndarray) -> np.ndarray:
    """(N, M) Pearson correlations between the targets' centred norm maps and the candidates'
    (the candidates encoded by the attacker's own encoder at the same scale)."""
    a = centred_norm_maps(zt).reshape(len(zt), -1)
    b = centred_norm_maps(z_candidates).reshape(len(z_candidates), -1)
    a = (a - a.mean(1, keepdims=True)) / np.maximum(a.std(1, keepdims=True), 1e-12)
    b = (b - b.mean(1, keepdims=True)) / np.maximum(b.std(1, keepdims=True), 1e-12)
    return a @ b.T / a.shape[1]


def topk_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of rows whose true column (``truth``) is among the ``k`` highest scores (ties count against)."""
    true_score = scores[np.arange(len(truth)), truth]
    rank = (scores > true_score[:, None]).sum(1) + (scores == true_score[:, None]).sum(1) - 1
    return float(np.mean(rank < k))


# ----------------------------------------------------------------------------- scores


def dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image Dice of boolean (N, H, W) masks; both empty counts as 1."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    inter = (p & t).sum(axis=(1, 2))
    tot = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    return np.where(tot == 0, 1.0, 2.0 * inter / np.maximum(tot, 1))


def affine_fit(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per image, the least-squares ``a·est + c`` closest to ``true``, clipped to [0, 1].

    Applied alike to attacks and baselines, so neither gains from an intensity scale or sign."""
    e = np.asarray(est, np.float64).reshape(len(est), -1)
    t = np.asarray(true, np.float64).reshape(len(true), -1)
    em, tm = e.mean(1, keepdims=True), t.mean(1, keepdims=True)
    a = ((e - em) * (t - tm)).sum(1, keepdims=True) / np.maximum(((e - em) ** 2).sum(1, keepdims=True), 1e-12)
    return np.clip(a * (e - em) + tm, 0.0, 1.0).reshape(true.shape)


def image_scores(est: np.ndarray, true: np.ndarray, *, affine: bool = True) -> dict[str, np.ndarray]:
    """Per-image SSIM and PSNR (dB) of (N, S, S) estimates against images in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    est = affine_fit(est, true) if affine else np.clip(np.asarray(est, np.float64), 0, 1)
    ssim = np.array([structural_similarity(t.astype(np.float64), e, data_range=1.0) for e, t in zip(est, true)])
    psnr = np.array([peak_signal_noise_ratio(t.astype(np.float64), e, data_range=1.0) for e, t in zip(est, true)])
    return {"ssim": ssim, "psnr": np.minimum(psnr, 100.0)}


def best_component_scores(maps: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, the best SSIM over the leading components (the affine fit absorbs the sign), with the
    PSNR of that same component. Selecting with the victim's truth makes this an upper bound on
    what an attacker picking one component could reach."""
    size = images.shape[-1]
    up = upsample(maps, size)
    per = [image_scores(up[:, c], images) for c in range(up.shape[1])]
    ssim = np.stack([p["ssim"] for p in per], 1)
    psnr = np.stack([p["psnr"] for p in per], 1)
    best = ssim.argmax(1)
    idx = np.arange(len(images))
    return {"ssim": ssim[idx, best], "psnr": psnr[idx, best], "component": best}


def mean_ci(values: np.ndarray, *, seed: int = 0, reps: int = 2000) -> tuple[float, float, float]:
    """Mean and a 95 % percentile-bootstrap interval over the per-image values."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
