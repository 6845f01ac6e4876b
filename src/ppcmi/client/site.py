"""A hospital's site folder (hospital side): local autoencoder training, encode+protect, unprotect+decode.

Layout of a site folder (it never leaves the hospital)::

    SITE/klt.key                      32-byte secret key, mode 0600
    SITE/site.json                    site name, label map, preprocessing, autoencoder config (no secret)
    SITE/image_ae/model.safetensors   + config.json, and train/ (resumable state)
    SITE/mask_ae/model.safetensors    + config.json, and train/

Plain latents are named ``z_*`` and exist only in this module; what leaves is a keyed
``LatentBatch`` (``zt_*``). With ``klt = false`` in the run config (the "no KLT" ablation) the
latents leave in the clear; the site folder records that choice.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CONFIG_VERSION, AutoencoderConfig, Config, DataConfig, build, from_dict
from ..errors import CheckpointError, PpcmiError
from ..fileio import Record, atomic_write_json, read_json
from ..labels import LabelMap
from ..klt import KeyedLatentTransform
from ..models import AEConfig, Autoencoder, resample_scores
from ..protocol import LatentBatch
from ..augment import augment_batch, batch_augmenter
from ..training import FitConfig, FitResult, bce_dice_loss, fit, load_weights, save_weights, seeded_init
from .keys import key_fingerprint, key_path, load_key

log = logging.getLogger(__name__)


def one_hot(masks: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, H, W) int class indices -> (N, K, H, W) float one-hot."""
    return F.one_hot(masks.long(), n_classes).permute(0, 3, 1, 2).float()


def _ae_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    (x,) = batch
    return bce_dice_loss(model(x), x)


def train_site(site_dir: str | Path, name: str, images: np.ndarray, masks: np.ndarray, *, n_classes: int,
               labels: dict, data_cfg: DataConfig, ae_cfg: AutoencoderConfig, klt: bool = True, seed: int = 0,
               init_seed: int | None = None, resume: bool = False, progress: bool = True) -> dict[str, FitResult]:
    """Stage 1 at one hospital: train the image and mask autoencoders on its own data only.

    ``images`` (N, C, S, S) float32 in [0, 1]; ``masks`` (N, S, S) int class indices. A seeded
    ``ae_cfg.val_frac`` of the samples is held out for early stopping. The key must already exist.
    ``seed`` drives the split and the batch order; ``init_seed`` (default ``seed``) the initial
    weights. Hospitals that share a public ``init_seed`` start from the same weights, which keeps
    their latent spaces close and eases the shared mapping core's work; it is no secret.
    """
    site = Path(site_dir)
    load_key(key_path(site))  # fail early on a missing or unsafe key
    n = images.shape[0]
    if n < 2:
        raise PpcmiError(f"{site}: a hospital needs at least 2 training images, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * ae_cfg.val_frac))) if ae_cfg.val_frac > 0 and n >= 4 else 0
    val_idx, tr_idx = order[:n_val], order[n_val:]
    meta = {"version": CONFIG_VERSION, "site": name, "seed": init_seed if init_seed is not None else seed, "n_classes": n_classes,
            "labels": labels, "data": asdict(data_cfg),
            "autoencoder": asdict(ae_cfg), "klt": klt, "in_channels": int(images.shape[1]), "n_train": int(len(tr_idx)), "n_val": int(n_val)}
    site_json = site / "site.json"
    if site_json.exists() and not resume:
        old = Record(read_json(site_json, "site record", CheckpointError), site_json, "site record", CheckpointError).raw
        if (site / "image_ae" / "model.safetensors").exists() and (site / "mask_ae" / "model.safetensors").exists():
            raise PpcmiError(f"{site}: autoencoders already trained here; pass --resume to continue or use another site folder")
        if old.get("site") != name:
            raise PpcmiError(f"{site_json}: belongs to site {old.get('site')!r}, not {name!r}")
    atomic_write_json(site_json, meta)
    x_img = torch.from_numpy(images).float()
    x_msk = one_hot(torch.from_numpy(masks), n_classes)
    results = {}
    for kind, x, cin in (("image", x_img, images.shape[1]), ("mask", x_msk, n_classes)):
        cfg = AEConfig(in_channels=int(cin), width=ae_cfg.width, skips=ae_cfg.skips)
        model = seeded_init(lambda: Autoencoder(cfg), (seed if init_seed is None else init_seed) + (0 if kind == "image" else 1))
        d = site / f"{kind}_ae"
        final = d / "model.safetensors"
        fc = FitConfig(epochs=ae_cfg.epochs, batch_size=ae_cfg.batch_size, lr=ae_cfg.lr, patience=ae_cfg.patience, seed=seed,
                       schedule=ae_cfg.lr_schedule)
        res = fit(model, _ae_loss, [x[tr_idx]], [x[val_idx]] if n_val else None, fc, d / "train",
                  resume=resume and (d / "train" / "state.json").exists(), desc=f"{name} {kind} AE", progress=progress,
                  augment=batch_augmenter([kind]) if ae_cfg.augment else None)
        save_weights(model, final)
        atomic_write_json(d / "config.json", {"autoencoder": asdict(cfg), "best_epoch": res.best_epoch,
                                              "best_val_loss": res.best_val, "epochs_run": len(res.history),
                                              "history": res.history, "train_seconds": res.seconds})
        results[kind] = res
    return results


def training_inputs(images: np.ndarray, masks: np.ndarray, n_classes: int, *, copies: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and one-hot masks behind a ``train`` message, in its row order: the N originals first,
    then ``copies - 1`` blocks of N augmented copies (row r comes from original r mod N)."""
    x0 = torch.as_tensor(images).float()
    y0 = one_hot(torch.as_tensor(masks), n_classes)
    gen = torch.Generator().manual_seed(seed)
    extra = [augment_batch([x0, y0], ["image", "mask"], gen) for _ in range(copies - 1)]
    return torch.cat([x0] + [a for a, _ in extra]), torch.cat([y0] + [b for _, b in extra])


class Hospital:
    """A trained site loaded for inference: encode+protect and unprotect+decode.

    ``protect(images)`` -> query ``LatentBatch``; ``training_batch(images, masks)`` -> train
    ``LatentBatch``; ``unprotect(reply)`` -> (N, S, S) int64 label maps.
    """

    def __init__(self, site_dir: str | Path):
        self.dir = Path(site_dir)
        meta_path = self.dir / "site.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{meta_path}: not a trained site folder (run 'ppcmi client train' first)")
        self.meta = read_json(meta_path, "site record", CheckpointError)
        rec = Record(self.meta, meta_path, "site record", CheckpointError)
        self.name: str = rec.get("site", str, ok=bool, expect="a non-empty site id")
        self.n_classes: int = rec.get("n_classes", int, ok=lambda v: v >= 2, expect="an integer >= 2")
        self.klt_enabled: bool = rec.get("klt", bool, default=True)
        labels = rec.sub("labels")
        try:
            self.label_map = LabelMap(tuple(labels.get("values", list)), tuple(labels.get("names", list)))
        except PpcmiError as e:
            raise CheckpointError(f"{meta_path}: field 'labels' is not a label map ({e})") from None
        if self.label_map.n_classes != self.n_classes:
            raise rec.fail("labels", f"lists {self.label_map.n_classes} classes, but n_classes is {self.n_classes}")
        try:  # the shared settings it was trained with, read like any saved configuration (any version)
            self.settings: Config = from_dict({"version": rec.get("version", int, default=1), "seed": rec.get("seed", int, default=0),
                                               "klt": self.klt_enabled, "data": rec.get("data", dict),
                                               "autoencoder": rec.get("autoencoder", dict, default={})})
        except PpcmiError as e:
            raise CheckpointError(f"{meta_path}: not a readable site record ({e})") from None
        self.data_cfg = self.settings.data
        self.models: dict[str, Autoencoder] = {}
        for kind, cin in (("image", rec.get("in_channels", int, default=None, ok=lambda v: v >= 1)), ("mask", self.n_classes)):
            d = self.dir / f"{kind}_ae"
            cfg_path = d / "config.json"
            if not cfg_path.is_file():
                raise CheckpointError(f"{cfg_path}: missing; the {kind} autoencoder is not trained")
            ae = Record(read_json(cfg_path, "autoencoder record", CheckpointError), cfg_path, "autoencoder record", CheckpointError)
            raw = ae.get("autoencoder", dict)
            try:
                cfg = build(AEConfig, raw, "autoencoder")
            except PpcmiError as e:
                raise CheckpointError(f"{cfg_path}: {e}") from None
            if cin is not None and cfg.in_channels != cin:
                raise ae.fail("autoencoder.in_channels", f"is {cfg.in_channels}, but {meta_path.name} says {cin}")
            m = Autoencoder(cfg)
            load_weights(m, d / "model.safetensors")
            self.models[kind] = m.eval().to(memory_format=torch.channels_last)  # faster convolutions on CPU
        self.ae_cfg = self.models["image"].cfg
        key = load_key(key_path(self.dir))
        self._klt = KeyedLatentTransform(key, self.ae_cfg.latent_channels()) if self.klt_enabled else None
        self.key_fingerprint = key_fingerprint(key)
        del key

    def latent_shapes(self, size: int | None = None) -> dict[str, tuple[int, int, int]]:
        return self.ae_cfg.latent_shapes(size or self.data_cfg.size)

    @torch.inference_mode()
    def _encode(self, x: torch.Tensor, kind: str, noise: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
        z = self.models[kind].encode(x)
        if noise > 0:
            g = torch.Generator().manual_seed(seed)
            z = {s: v + noise * torch.randn(v.shape, generator=g) for s, v in z.items()}
        zt = self._klt.forward(z, kind) if self._klt is not None else z
        return {s: v.float().numpy() for s, v in zt.items()}

    def protect(self, images: np.ndarray | torch.Tensor, *, dtype=np.float32, noise: float = 0.0, seed: int = 0) -> LatentBatch:
        """Encode images (N, C, S, S) in [0, 1] and apply this hospital's keyed transform."""
        x = torch.as_tensor(images).float()
        zt = self._encode(x, "image", noise, seed)
        return LatentBatch("query", self.name, {f"zt_img_{s}": v.astype(dtype) for s, v in zt.items()}, query=secrets.token_hex(16))

    def training_batch(self, images: np.ndarray, masks: np.ndarray, *, dtype=np.float32, noise: float = 0.0, seed: int = 0,
                       copies: int = 1) -> LatentBatch:
        """Keyed latent pairs for stage 2: images (N, C, S, S) and masks (N, S, S) class indices.

        ``copies`` > 1 adds ``copies - 1`` randomly augmented copies of every pair (rotation, flip,
        scale, shift, intensity; see :mod:`ppcmi.augment`, seeded by ``seed``), so the server sees
        more variation without seeing more patients.
        """
        if not 1 <= copies <= 32:
            raise PpcmiError(f"send_copies: must be between 1 and 32, got {copies}")
        x, y = training_inputs(images, masks, self.n_classes, copies=copies, seed=seed)
        zt_img = self._encode(x, "image", noise, seed)
        zt_msk = self._encode(y, "mask", noise, seed + 1)
        arrays = {f"zt_img_{s}": v.astype(dtype) for s, v in zt_img.items()}
        arrays.update({f"zt_msk_{s}": v.astype(dtype) for s, v in zt_msk.items()})
        return LatentBatch("train", self.name, arrays)

    @torch.inference_mode()
    def unprotect(self, reply: LatentBatch, *, size: int | None = None) -> np.ndarray:
        """Invert the keyed transform of the server's reply, decode with the mask decoder, argmax.

        ``size``: resample the decoder's class probabilities (bilinear) to ``size`` x ``size``
        before the argmax, to score at a finer grid than the model's working size.
        """
        if reply.kind != "reply":
            raise PpcmiError(f"kind: expected a 'reply' message, got {reply.kind!r}")
        if reply.client != self.name:
            raise PpcmiError(f"client: reply is addressed to {reply.client!r}, this site is {self.name!r}")
        zt = {s: torch.from_numpy(np.asarray(a, dtype=np.float32)) for s, a in reply.latents("zt_msk_").items()}
        z = self._klt.inverse(zt, "mask") if self._klt is not None else zt
        probs = resample_scores(self.models["mask"].decode(z).float(), size)
        return probs.argmax(1).numpy().astype(np.int64)
