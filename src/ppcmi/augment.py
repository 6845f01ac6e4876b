"""Random augmentation of training batches (neutral code, used at hospitals and by the U-Net baseline).

One random similarity transform per sample (any rotation, a flip with probability 1/2, scale,
a small shift) is applied to every spatial tensor of a batch alike, so an image and its mask
stay aligned; images also get a random gamma, contrast and brightness. Everything is drawn from
the ``torch.Generator`` passed in, so a seeded training run is reproducible.

Tensor kinds: ``"image"`` float in [0, 1] (bilinear, reflected at the border, intensity jitter),
``"mask"`` one-hot float (nearest, border-replicated), ``"label"`` integer class indices of shape
(N, 1, H, W) (nearest), ``"none"`` left alone (e.g. a client-index vector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotate: float = math.pi    # rotation angle drawn from [-rotate, rotate] radians (pi: any angle)
    flip: float = 0.5          # probability of a horizontal flip
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.05        # fraction of the half-size
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.05


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def random_grid(n: int, h: int, w: int, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Sampling grids (N, H, W, 2) of one random similarity transform per sample."""
    angle = _uniform(n, -cfg.rotate, cfg.rotate, gen)
    scale = _uniform(n, *cfg.scale, gen)
    flip = torch.where(torch.rand(n, generator=gen) < cfg.flip, -1.0, 1.0)
    shift = _uniform(2 * n, -cfg.shift, cfg.shift, gen).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    return F.affine_grid(theta, [n, 1, h, w], align_corners=False)


def jitter_intensity(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Per-sample gamma, contrast and brightness for images in [0, 1]; the result stays in [0, 1]."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    gamma = _uniform(n, *cfg.gamma, gen).view(shape)
    gain = _uniform(n, *cfg.contrast, gen).view(shape)
    bias = _uniform(n, -cfg.brightness, cfg.brightness, gen).view(shape)
    return (x.clamp(0, 1).pow(gamma) * gain + bias).clamp(0, 1)


def augment_batch(batch: Sequence[torch.Tensor], kinds: Sequence[str], gen: torch.Generator,
                  cfg: AugmentConfig = AugmentConfig()) -> list[torch.Tensor]:
    """Apply one random transform per sample to every tensor of ``batch`` (see the module doc for ``kinds``)."""
    if len(batch) != len(kinds):
        raise ValueError(f"augment: {len(batch)} tensors but {len(kinds)} kinds")
    ref = next(t for t, k in zip(batch, kinds) if k != "none")
    n, (h, w) = ref.shape[0], ref.shape[-2:]
    grid = random_grid(n, h, w, gen, cfg)
    out = []
    for t, kind in zip(batch, kinds):
        if kind == "none":
            out.append(t)
        elif kind == "image":
            y = F.grid_sample(t.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            out.append(jitter_intensity(y, gen, cfg))
        elif kind == "mask":
            out.append(F.grid_sample(t.float(), grid, mode="nearest", padding_mode="border", align_corners=False))
        elif kind == "label":
            y = F.grid_sample(t.float(), grid, mode="nearest", padding_mode="border", align_corners=False)
            out.append(y.round().to(t.dtype))
        else:
            raise ValueError(f"augment: unknown tensor kind {kind!r}")
    return out


def batch_augmenter(kinds: Sequence[str], cfg: AugmentConfig = AugmentConfig()):
    """A ``fit(..., augment=...)`` callback applying :func:`augment_batch` to each training batch."""
    kinds = list(kinds)

    def aug(batch: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        return augment_batch(batch, kinds, gen, cfg)

    return aug


__all__ = ["AugmentConfig", "random_grid", "jitter_intensity", "augment_batch", "batch_augmenter"]
