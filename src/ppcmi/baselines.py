"""Privacy-agnostic reference (no trust boundary): a MONAI ``UNet`` trained on pooled images and masks.

This is the comparison the demo and benchmarks print next to PPCMI-SF; it needs the raw data
in one place, which is exactly what PPCMI-SF avoids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from .augment import batch_augmenter
from .config import Config
from .data import PlaneGeometry, restore_labels
from .device import Device, autocast, channels_last, resolve_device
from .errors import PpcmiError
from .models import make_unet
from .training import FitConfig, FitResult, fit, seeded_init


def reference_schedule(cfg: Config) -> tuple[int, int]:
    """Epochs and patience of the centralized reference: ``unet.epochs`` / ``unet.patience`` (a plan sets them to the
    run's time budget), else as many augmented training pairs as the mapping network sees (``mapping.epochs`` x
    ``autoencoder.send_copies`` epochs over the pooled data, patience likewise)."""
    k = cfg.autoencoder.send_copies
    return (cfg.unet.epochs if cfg.unet.epochs is not None else cfg.mapping.epochs * k,
            cfg.unet.patience if cfg.unet.patience is not None else cfg.mapping.patience * k)


def train_reference_unet(cfg: Config, parts: list[dict], n_classes: int, work_dir: str | Path, *, desc: str = "centralized U-Net",
                         progress: bool = True, device: Device = None) -> tuple[UNet, FitResult]:
    """A privacy-agnostic reference on the pooled ``parts`` (arrays from ``load_arrays``) for
    :func:`reference_schedule`'s epochs, with the mapping network's batch size, schedule and augmentation, on ``device``."""
    epochs, patience = reference_schedule(cfg)
    return train_unet(np.concatenate([p["images"] for p in parts]), np.concatenate([p["masks"] for p in parts]), n_classes,
                      work_dir, epochs=epochs, patience=patience,
                      batch_size=cfg.mapping.batch_size, seed=cfg.seed, augment=cfg.autoencoder.augment,
                      schedule=cfg.mapping.lr_schedule, desc=desc, progress=progress, device=device)


def train_unet(images: np.ndarray, masks: np.ndarray, n_classes: int, work_dir: str | Path, *, epochs: int, patience: int,
               batch_size: int = 16, lr: float = 1e-3, val_frac: float = 0.2, seed: int = 0, augment: bool = False,
               schedule: str = "constant", desc: str = "centralized U-Net", progress: bool = True,
               device: Device = None) -> tuple[UNet, FitResult]:
    """Train on (N, C, S, S) images and (N, S, S) class-index masks with a seeded validation split, on ``device``
    (:func:`ppcmi.device.resolve_device`; None is the CPU)."""
    n = images.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_frac))) if n >= 4 else 0
    va, tr = order[:n_val], order[n_val:]
    x = torch.from_numpy(images).float()
    y = torch.from_numpy(masks).long()[:, None]
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    model = seeded_init(lambda: make_unet(images.shape[1], n_classes), seed)
    res = fit(model, lambda m, b: loss(m(b[0]), b[1]), [x[tr], y[tr]], [x[va], y[va]] if n_val else None,
              FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, schedule=schedule), work_dir,
              desc=desc, progress=progress, augment=batch_augmenter(["image", "label"]) if augment else None, device=device)
    return model, res


@torch.inference_mode()
def predict_unet(model: UNet, images: np.ndarray, geometries: Sequence[PlaneGeometry], batch_size: int = 16, *,
                 device: Device = None, mixed: bool | None = None) -> list[np.ndarray]:
    """Label maps on each plane's native grid for network inputs (N, C, S, S): the softmax of the U-Net's logits
    restored by :func:`ppcmi.data.restore_labels`, the path ``Hospital.segment`` takes. ``device``: where it runs
    (None is the CPU; the model is moved there); ``mixed``: its precision (None: mixed on CUDA only)."""
    if len(geometries) != len(images):
        raise PpcmiError(f"predict_unet: {len(images)} images but {len(geometries)} geometries")
    dev = resolve_device(device)
    channels_last(model, dev).eval()
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch_size):
        with autocast(dev, mixed):
            logits = model(torch.from_numpy(images[i:i + batch_size]).float().to(dev))
        probs = torch.softmax(logits.float(), dim=1).cpu()
        out += restore_labels(probs, geometries[i:i + batch_size])
    return out
