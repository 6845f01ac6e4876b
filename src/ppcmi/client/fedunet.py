"""One hospital's round of a federated U-Net baseline (hospital side), free of any framework.

The network, loss, augmentation, batch size and validation rule are the centralized reference's
(:func:`ppcmi.baselines.train_unet`): :func:`ppcmi.models.make_unet`, MONAI's DiceCE loss, Adam, a
seeded 20 % validation part (the hospital's own; it never trains on it). A round starts from the global
weights the coordinator sent, scores them on the validation part, trains ``local_epochs`` epochs on the
rest (a fresh Adam each round, as Flower's examples do) and returns the weights. With ``mu > 0`` the loss
gains FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` over every parameter.

The weights and the counts leave the hospital; its images, masks and case ids do not.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from monai.losses import DiceCELoss

from ..augment import batch_augmenter
from ..device import Device, resolve_device
from ..errors import PpcmiError
from ..models import make_unet
from ..training import FitConfig, evaluate_loss, fit, host_state

log = logging.getLogger(__name__)

VAL_FRAC = 0.2  # as the centralized reference holds out of its pooled data


@dataclass(frozen=True)
class RoundResult:
    state: dict[str, torch.Tensor]  # the weights after the local epochs
    n_train: int                    # the weight of this hospital in Flower's average
    n_val: int
    train_loss: float               # of the last local epoch (proximal term included)
    val_loss: float                 # of the received global weights on the validation part (nan without one)


def holdout(n: int, seed: int, val_frac: float = VAL_FRAC) -> tuple[np.ndarray, np.ndarray]:
    """(validation, training) indices of ``n`` rows: the centralized reference's seeded rule (none below 4 rows)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_frac))) if n >= 4 else 0
    return order[:n_val], order[n_val:]


def proximal_term(model: torch.nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w_global||^2`` summed over every parameter of ``model`` (``anchor``: the global values, same order)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))


def local_round(images: np.ndarray, masks: np.ndarray, n_classes: int, state: Mapping[str, torch.Tensor], *, round_: int,
                local_epochs: int, lr: float, batch_size: int, seed: int, augment: bool, mu: float = 0.0,
                work_dir: str | Path, device: Device = None) -> RoundResult:
    """Train the global weights ``state`` on this hospital's (N, C, S, S) ``images`` and (N, S, S) class-index
    ``masks`` for ``local_epochs`` epochs of round ``round_`` (1-based; it seeds the batch order and the
    augmentation together with the hospital's ``seed``, which also fixes its validation part).

    ``work_dir`` holds the round's checkpoints while it trains (a temporary folder inside it, removed after);
    ``device`` is where it trains (:func:`ppcmi.device.resolve_device`; None is the CPU); the weights come back on the CPU."""
    if images.shape[0] != masks.shape[0] or images.ndim != 4 or masks.ndim != 3:
        raise PpcmiError(f"local_round: expected (N, C, S, S) images and (N, S, S) masks, got {images.shape} and {masks.shape}")
    if not mu >= 0:
        raise PpcmiError(f"proximal-mu: must be >= 0, got {mu!r}")
    va, tr = holdout(images.shape[0], seed)
    if len(tr) == 0:
        raise PpcmiError("local_round: no training images at this hospital")
    x = torch.from_numpy(images).float()
    y = torch.from_numpy(masks).long()[:, None]
    dev = resolve_device(device)
    model = make_unet(images.shape[1], n_classes).to(dev)
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as e:
        raise PpcmiError(f"global weights do not fit this hospital's U-Net ({images.shape[1]} channels, {n_classes} classes): "
                         f"{str(e).splitlines()[0][:160]}") from None
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    plain = lambda m, b: dice_ce(m(b[0]), b[1])  # noqa: E731
    val_loss = evaluate_loss(model, plain, [x[va], y[va]], batch_size, device=dev) if len(va) else float("nan")
    if mu > 0:
        anchor = [p.detach().clone() for p in model.parameters()]
        loss_fn = lambda m, b: plain(m, b) + 0.5 * mu * proximal_term(m, anchor)  # noqa: E731
    else:
        loss_fn = plain
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=f"round-{round_}-") as tmp:
        # no validation inside the round: the hospital returns the weights its local epochs reached (fit keeps
        # the epoch of lowest training loss; with one local epoch, the default, that is the only one)
        res = fit(model, loss_fn, [x[tr], y[tr]], None,
                  FitConfig(epochs=local_epochs, batch_size=batch_size, lr=lr, patience=local_epochs,
                            seed=seed * 100_019 + round_, schedule="constant"),
                  tmp, desc=f"U-Net round {round_}", progress=False,
                  augment=batch_augmenter(["image", "label"]) if augment else None, device=dev)
    state_out = host_state(model)
    return RoundResult(state_out, int(len(tr)), int(len(va)), float(res.history[-1]["train_loss"]), float(val_loss))
