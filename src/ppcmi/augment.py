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


def random_theta(n: int, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Affine matrices (N, 2, 3) of one random similarity transform per sample."""
    angle = _uniform(n, -cfg.rotate, cfg.rotate, gen)
    scale = _uniform(n, *cfg.scale, gen)
    flip = torch.where(torch.rand(n, generator=gen) < cfg.flip, -1.0, 1.0)
    shift = _uniform(2 * n, -cfg.shift, cfg.shift, gen).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                        torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)


def random_grid(n: int, h: int, w: int, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Sampling grids (N, H, W, 2) of one random similarity transform per sample."""
    return F.affine_grid(random_theta(n, gen, cfg), [n, 1, h, w], align_corners=False)


def _draw_jitter(n: int, gen: torch.Generator, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _uniform(n, *cfg.gamma, gen), _uniform(n, *cfg.contrast, gen), _uniform(n, -cfg.brightness, cfg.brightness, gen)


def _apply_jitter(x: torch.Tensor, gamma: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return (x.clamp(0, 1).pow(gamma.view(shape)) * gain.view(shape) + bias.view(shape)).clamp(0, 1)


def jitter_intensity(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Per-sample gamma, contrast and brightness for images in [0, 1]; the result stays in [0, 1]."""
    return _apply_jitter(x, *_draw_jitter(x.shape[0], gen, cfg))


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of :func:`augment_batch` for N samples, drawn once (:func:`draw_augment`) and applied to
    any rows later (:func:`apply_augment`): one affine matrix per sample, and per "image" tensor its intensity jitter."""

    theta: torch.Tensor                                    # (N, 2, 3)
    jitter: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]  # per image tensor: gamma, gain, bias, each (N,)

    def rows(self, start: int, stop: int) -> AugmentDraw:
        return AugmentDraw(self.theta[start:stop], tuple(tuple(t[start:stop] for t in j) for j in self.jitter))


def draw_augment(n: int, kinds: Sequence[str], gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> AugmentDraw:
    """The parameters :func:`augment_batch` draws for ``n`` samples of tensors of ``kinds``, in the same order from ``gen``."""
    theta = random_theta(n, gen, cfg)
    return AugmentDraw(theta, tuple(_draw_jitter(n, gen, cfg) for k in kinds if k == "image"))


def apply_augment(batch: Sequence[torch.Tensor], kinds: Sequence[str], d: AugmentDraw) -> list[torch.Tensor]:
    """Apply drawn parameters (one row of ``d`` per sample of ``batch``) to every tensor of ``batch``."""
    if len(batch) != len(kinds):
        raise ValueError(f"augment: {len(batch)} tensors but {len(kinds)} kinds")
    ref = next(t for t, k in zip(batch, kinds) if k != "none")
    n, (h, w) = ref.shape[0], ref.shape[-2:]
    # the parameters are drawn on the CPU (the same draws on every device) and applied where the batch is
    grid = F.affine_grid(d.theta.to(ref.device), [n, 1, h, w], align_corners=False)
    out, images = [], iter(d.jitter)
    for t, kind in zip(batch, kinds):
        if kind == "none":
            out.append(t)
        elif kind == "image":
            y = F.grid_sample(t.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            out.append(_apply_jitter(y, *(j.to(y.device) for j in next(images))))
        elif kind == "mask":
            out.append(F.grid_sample(t.float(), grid, mode="nearest", padding_mode="border", align_corners=False))
        elif kind == "label":
            y = F.grid_sample(t.float(), grid, mode="nearest", padding_mode="border", align_corners=False)
            out.append(y.round().to(t.dtype))
        else:
            raise ValueError(f"augment: unknown tensor kind {kind!r}")
    return out


def augment_batch(batch: Sequence[torch.Tensor], kinds: Sequence[str], gen: torch.Generator,
                  cfg: AugmentConfig = AugmentConfig()) -> list[torch.Tensor]:
    """Apply one random transform per sample to every tensor of ``batch`` (see the module doc for ``kinds``)."""
    if len(batch) != len(kinds):
        raise ValueError(f"augment: {len(batch)} tensors but {len(kinds)} kinds")
    bad = [k for k in kinds if k not in ("none", "image", "mask", "label")]
    if bad:
        raise ValueError(f"augment: unknown tensor kind {bad[0]!r}")
    ref = next(t for t, k in zip(batch, kinds) if k != "none")
    return apply_augment(batch, kinds, draw_augment(ref.shape[0], kinds, gen, cfg))


def batch_augmenter(kinds: Sequence[str], cfg: AugmentConfig = AugmentConfig()):
    """A ``fit(..., augment=...)`` callback applying :func:`augment_batch` to each training batch."""
    kinds = list(kinds)

    def aug(batch: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        return augment_batch(batch, kinds, gen, cfg)

    return aug


__all__ = ["AugmentConfig", "AugmentDraw", "random_theta", "random_grid", "jitter_intensity", "draw_augment", "apply_augment",
           "augment_batch", "batch_augmenter"]
