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

import json
import logging
import secrets
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CONFIG_VERSION, AutoencoderConfig, Config, DataConfig, Preprocess, build, from_dict, migrate
from ..errors import CheckpointError, PpcmiError
from ..fileio import Record, atomic_write_json, fsync_dir, json_text, read_json, read_record
from ..labels import LabelMap
from ..klt import KeyedLatentTransform
from ..data import PlaneGeometry, restore_labels
from ..device import Device, autocast, channels_last, resolve_device, to_numpy
from ..models import AEConfig, AEShape, Autoencoder
from ..protocol import CHUNK_BYTES, LatentBatch, chunk_ranges, new_set_id, rows_per_chunk
from ..augment import apply_augment, batch_augmenter, draw_augment
from ..training import FitConfig, FitResult, autoencoder_loss, fit, load_weights, save_weights, seeded_init
from .keys import key_fingerprint, key_path, load_key

log = logging.getLogger(__name__)


def one_hot(masks: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, H, W) int class indices -> (N, K, H, W) float one-hot."""
    return F.one_hot(masks.long(), n_classes).permute(0, 3, 1, 2).float()


RETRAIN_DIR = ".retrain"  # where ``overwrite`` trains the new autoencoders until they are complete


def _same_model(old: dict, meta: dict) -> list[str]:
    """The fields of a site record that make its autoencoders what they are and that differ between ``old`` and ``meta``
    (an older record is read as its version ran, :func:`ppcmi.config.migrate`; a field it lacks is not compared)."""
    keys = [k for k in ("site", "n_classes", "labels", "in_channels", "klt") if k in old and old[k] != meta.get(k)]
    ran = migrate({"version": old.get("version", 1), **{s: old[s] for s in ("data", "autoencoder") if isinstance(old.get(s), dict)}})
    for section, names in (("data", [f.name for f in fields(Preprocess)]), ("autoencoder", [f.name for f in fields(AEShape)])):
        was = ran.get(section, {})
        keys += [f"{section}.{n}" for n in names if n in was and was[n] != meta[section].get(n)]
    return keys


def _read_site_record(path: Path) -> dict:
    return read_record(path, "site record", CheckpointError).raw


def train_site(site_dir: str | Path, name: str, images: np.ndarray, masks: np.ndarray, *, n_classes: int,
               labels: dict, data_cfg: DataConfig, ae_cfg: AutoencoderConfig, klt: bool = True, seed: int = 0,
               init_seed: int | None = None, resume: bool = False, overwrite: bool = False,
               progress: bool = True, device: Device = None) -> dict[str, FitResult]:
    """Stage 1 at one hospital: train the image and mask autoencoders on its own data only.

    ``images`` (N, C, S, S) float32 in [0, 1]; ``masks`` (N, S, S) int class indices. A seeded
    ``ae_cfg.val_frac`` of the samples is held out for early stopping. The key must already exist.
    ``seed`` drives the split and the batch order; ``init_seed`` (default ``seed``) the initial
    weights. Hospitals that share a public ``init_seed`` start from the same weights, which keeps
    their latent spaces close and eases the shared mapping core's work; it is no secret.

    ``site.json`` is written when the site has none yet, and otherwise only after the training
    succeeded (and only if it changed): a failed or refused ``resume`` leaves it as it was, and a resume
    with other data settings, labels or topology is refused by field. Autoencoders already trained
    are refused unless ``resume`` (continue) or ``overwrite`` (start over: the new autoencoders train
    in ``SITE/.retrain/`` and replace the old ones, and ``site.json``, only once both are complete; the
    key stays). ``device`` is where this hospital trains (:func:`ppcmi.device.resolve_device`; None is the CPU).
    """
    site = Path(site_dir)
    load_key(key_path(site))  # fail early on a missing or unsafe key
    if resume and overwrite:
        raise PpcmiError("--resume and --overwrite: choose one (continue the run here, or start over)")
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
    meta = json.loads(json_text(meta))  # as it reads back (tuples as lists), so that records compare
    site_json = site / "site.json"
    old = _read_site_record(site_json) if site_json.exists() else None
    trained = (site / "image_ae" / "model.safetensors").exists() and (site / "mask_ae" / "model.safetensors").exists()
    if overwrite and (old is not None or trained or any((site / f"{k}_ae").exists() for k in ("image", "mask"))):
        return _retrain(site, name, images, masks, n_classes=n_classes, labels=labels, data_cfg=data_cfg, ae_cfg=ae_cfg,
                        klt=klt, seed=seed, init_seed=init_seed, progress=progress, device=device)
    if old is not None:
        if old.get("site") != name:
            raise PpcmiError(f"{site_json}: belongs to site {old.get('site')!r}, not {name!r}")
        if trained and not resume:
            raise PpcmiError(f"{site}: autoencoders already trained here; pass --resume to continue, --overwrite to "
                             "train them again from scratch (the key stays), or use another site folder")
        changed = _same_model(old, meta) if resume else []
        if changed:
            raise PpcmiError(f"{site_json}: {changed[0]} differs from the interrupted run's ({len(changed)} setting(s)); "
                             "--resume continues the same training: give its settings, or --overwrite to start over")
    else:  # a new site (``resume`` then simply trains from the start): its record first, so that a resume can check it
        atomic_write_json(site_json, meta, overwrite=False)
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
        loss = autoencoder_loss(kind, noise=ae_cfg.mask_noise if kind == "mask" else 0.0)
        res = fit(model, loss, [x[tr_idx]], [x[val_idx]] if n_val else None, fc, d / "train",
                  resume=resume and (d / "train" / "state.json").exists(), desc=f"{name} {kind} AE", progress=progress,
                  augment=batch_augmenter([kind]) if ae_cfg.augment else None, device=device)
        save_weights(model, final)
        atomic_write_json(d / "config.json", {"autoencoder": asdict(cfg), "best_epoch": res.best_epoch,
                                              "best_val_loss": res.best_val, "epochs_run": len(res.history),
                                              "history": res.history, "train_seconds": res.seconds})
        results[kind] = res
    if old is not None and old != meta:
        atomic_write_json(site_json, meta)  # only now, after both autoencoders succeeded
    return results


def _retrain(site: Path, name: str, images: np.ndarray, masks: np.ndarray, **kw) -> dict[str, FitResult]:
    """``train_site(..., overwrite=True)`` on a trained site: train in ``SITE/.retrain/`` (the key hard-linked, never
    copied), then move the new autoencoders and ``site.json`` into place; the old ones go only after that."""
    import os
    import shutil

    stage = site / RETRAIN_DIR
    if stage.exists():
        shutil.rmtree(stage)  # what an interrupted --overwrite left: it starts over
    stage.mkdir()
    try:
        os.link(key_path(site), key_path(stage))
        results = train_site(stage, name, images, masks, **kw)
        old_dirs = []
        for kind in ("image", "mask"):
            d = site / f"{kind}_ae"
            if d.exists():
                aside = site / f".{kind}_ae.replaced"
                if aside.exists():
                    shutil.rmtree(aside)
                d.rename(aside)
                old_dirs.append(aside)
            (stage / f"{kind}_ae").rename(d)
        (stage / "site.json").replace(site / "site.json")
        fsync_dir(site)
        for d in old_dirs:
            shutil.rmtree(d)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return results


def training_inputs(images: np.ndarray, masks: np.ndarray, n_classes: int, *, copies: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and one-hot masks behind a ``train`` message, in its row order: the N originals first,
    then ``copies - 1`` blocks of N augmented copies (row r comes from original r mod N)."""
    return next(training_input_ranges(images, masks, n_classes, [(0, len(images) * copies)], seed=seed))


def training_input_ranges(images: np.ndarray, masks: np.ndarray, n_classes: int, ranges: list[tuple[int, int]], *,
                          seed: int = 0):
    """The rows [start, stop) of :func:`training_inputs`, range by range (ascending ranges). The random parameters of
    each block of N augmented copies are drawn once, in block order, from the same generator, and applied to the
    rows of the range only, so only one range's inputs (and one-hot masks) are held at a time."""
    x0 = torch.as_tensor(images).float()
    m0 = torch.as_tensor(masks)
    n = len(x0)
    gen = torch.Generator().manual_seed(seed)
    kinds = ["image", "mask"]
    draws: list = [None]  # block 0 holds the originals
    for start, stop in ranges:
        xs, ys, r = [], [], start
        while r < stop:
            j = r // n
            while len(draws) <= j:
                draws.append(draw_augment(n, kinds, gen))
            a, b = r - j * n, min(stop, (j + 1) * n) - j * n
            x, y = x0[a:b], one_hot(m0[a:b], n_classes)
            if j:
                x, y = apply_augment([x, y], kinds, draws[j].rows(a, b))
            xs.append(x)
            ys.append(y)
            r += b - a
        yield torch.cat(xs), torch.cat(ys)


class Hospital:
    """A trained site loaded for inference: encode+protect and unprotect+decode.

    ``protect(images)`` -> query ``LatentBatch``; ``training_batch(images, masks)`` -> train
    ``LatentBatch``; ``scores(reply)`` -> (N, K, S, S) class probabilities; ``segment(reply, geometries)`` ->
    label maps on each plane's native grid (the prediction); ``unprotect(reply)`` -> (N, S, S) label maps on
    the network grid.

    ``device`` is where its autoencoders encode and decode (None is the CPU) and ``mixed`` their precision
    (:func:`ppcmi.device.mixed_dtype`; None: mixed on CUDA only). The keyed transform is derived on the CPU and
    then moved, and always runs in float32, so one key gives the same transform on every device; noise is drawn
    on the CPU; every array returned is on the host.
    """

    def __init__(self, site_dir: str | Path, *, device: Device = None, mixed: bool | None = None):
        self.dir = Path(site_dir)
        self.device = resolve_device(device)
        self.mixed = mixed
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
            ae = read_record(cfg_path, "autoencoder record", CheckpointError)
            raw = ae.get("autoencoder", dict)
            try:
                cfg = build(AEConfig, raw, "autoencoder")
            except PpcmiError as e:
                raise CheckpointError(f"{cfg_path}: {e}") from None
            if cin is not None and cfg.in_channels != cin:
                raise ae.fail("autoencoder.in_channels", f"is {cfg.in_channels}, but {meta_path.name} says {cin}")
            m = Autoencoder(cfg)
            load_weights(m, d / "model.safetensors")
            self.models[kind] = channels_last(m.eval().to(memory_format=torch.channels_last), self.device)  # faster convolutions
        self.ae_cfg = self.models["image"].cfg
        key = load_key(key_path(self.dir))
        self._klt = KeyedLatentTransform(key, self.ae_cfg.latent_channels(), device=self.device) if self.klt_enabled else None
        self.key_fingerprint = key_fingerprint(key)
        del key

    def latent_shapes(self, size: int | None = None) -> dict[str, tuple[int, int, int]]:
        return self.ae_cfg.latent_shapes(size or self.data_cfg.size)

    @torch.inference_mode()
    def _encode(self, x: torch.Tensor, kind: str, noise: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
        with autocast(self.device, self.mixed):
            z = self.models[kind].encode(x.to(self.device))
        z = {s: v.float() for s, v in z.items()}
        if noise > 0:  # drawn on the CPU: the same noise on every device
            g = torch.Generator().manual_seed(seed)
            z = {s: v + noise * torch.randn(v.shape, generator=g).to(v.device) for s, v in z.items()}
        zt = self._klt.forward(z, kind) if self._klt is not None else z
        return {s: to_numpy(v) for s, v in zt.items()}

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
        return next(self.training_chunks(images, masks, dtype=dtype, noise=noise, seed=seed, copies=copies, target=None))

    def row_bytes(self, size: int, dtype=np.float32) -> int:
        """Bytes of one keyed training pair (every image and mask latent) at working size ``size``."""
        per = sum(int(np.prod(s)) for kind in ("image", "mask") for s in self.models[kind].cfg.latent_shapes(size).values())
        return per * np.dtype(dtype).itemsize

    def training_chunks(self, images: np.ndarray, masks: np.ndarray, *, dtype=np.float32, noise: float = 0.0, seed: int = 0,
                        copies: int = 1, target: int | None = CHUNK_BYTES, set_id: str | None = None):
        """The rows of :meth:`training_batch` as a set of ``train`` chunks of at most about ``target`` bytes each,
        encoded one chunk at a time (``target=None``: one whole message without a set id).

        A chunk's rows are encoded in one pass, and encoding is row-wise, so the rows equal those of one
        whole message; only latent noise (``noise > 0``) is drawn per chunk (chunk 0 from ``seed``, as a
        whole message's), so with noise a chunked set differs from a whole message by its noise draws."""
        if not 1 <= copies <= 32:
            raise PpcmiError(f"send_copies: must be between 1 and 32, got {copies}")
        total = len(images) * copies
        if target is None:
            ranges, sid = [(0, total)], ""
        else:
            ranges = chunk_ranges(total, rows_per_chunk(self.row_bytes(images.shape[-1], dtype), target))
            sid = set_id or new_set_id()
        inputs = training_input_ranges(images, masks, self.n_classes, ranges, seed=seed)
        for i, (x, y) in enumerate(inputs):
            k = 1_000_003 * i  # chunk i > 0 draws its noise from its own seeds
            zt_img = self._encode(x, "image", noise, seed + k)
            zt_msk = self._encode(y, "mask", noise, seed + 1 + k)
            arrays = {f"zt_img_{s}": v.astype(dtype) for s, v in zt_img.items()}
            arrays.update({f"zt_msk_{s}": v.astype(dtype) for s, v in zt_msk.items()})
            if sid:
                yield LatentBatch("train", self.name, arrays, set_id=sid, index=i, count=len(ranges))
            else:
                yield LatentBatch("train", self.name, arrays)

    @torch.inference_mode()
    def scores(self, reply: LatentBatch, rows: slice = slice(None)) -> torch.Tensor:
        """Class probabilities (n, K, S, S) of ``rows`` of the server's reply: inverse keyed transform, mask
        decoder, softmax of its logits over the K classes (a CPU tensor, whatever the device)."""
        if reply.kind != "reply":
            raise PpcmiError(f"kind: expected a 'reply' message, got {reply.kind!r}")
        if reply.client != self.name:
            raise PpcmiError(f"client: reply is addressed to {reply.client!r}, this site is {self.name!r}")
        zt = {s: torch.from_numpy(np.asarray(a[rows], dtype=np.float32)).to(self.device) for s, a in reply.latents("zt_msk_").items()}
        z = self._klt.inverse(zt, "mask") if self._klt is not None else zt
        with autocast(self.device, self.mixed):
            logits = self.models["mask"].decode_logits(z)
        return torch.softmax(logits.float(), dim=1).cpu()

    def keyed_decoder(self):
        """``decode(zt) -> logits``: keyed mask latents ``{scale: (n, C, H, W)}`` to the mask decoder's class logits
        (n, K, S, S) on the latents' device, through this hospital's inverse keyed transform, with gradients to ``zt``
        (computed on this hospital's device in float32, no autocast). The decoder is a frozen copy of its mask autoencoder
        (its weights get no gradient); for a hospital training the federated core through its own decoder
        (``mapping.federated_loss = "decoded"``), so neither key nor decoder leaves the hospital."""
        import copy

        model = copy.deepcopy(self.models["mask"]).eval()
        for p in model.parameters():
            p.requires_grad_(False)

        def decode(zt: dict[str, torch.Tensor]) -> torch.Tensor:
            back = next(iter(zt.values())).device
            z = {s: v.float().to(self.device) for s, v in zt.items()}
            if self._klt is not None:
                z = self._klt.inverse(z, "mask")
            with torch.autocast(self.device.type, enabled=False):
                return model.decode_logits(z).float().to(back)

        return decode

    def segment(self, reply: LatentBatch, geometries: list[PlaneGeometry], *, batch: int = 16) -> list[np.ndarray]:
        """The reply's label maps on each plane's native grid (``geometries``: one per row, in order):
        probabilities restored by :func:`ppcmi.data.restore_labels`, ``batch`` rows at a time."""
        if len(geometries) != reply.n:
            raise PpcmiError(f"reply: {reply.n} rows for {len(geometries)} planes")
        out: list[np.ndarray] = []
        for s in range(0, reply.n, batch):
            out += restore_labels(self.scores(reply, slice(s, s + batch)), geometries[s:s + batch])
        return out

    def unprotect(self, reply: LatentBatch) -> np.ndarray:
        """(N, S, S) int64 label maps on the network grid (padding included): the argmax of :meth:`scores`."""
        return self.scores(reply).argmax(1).numpy().astype(np.int64)
