"""Mapping-network training and inference (coordinator side): keyed image latents -> keyed mask latents.

The server only ever sees :class:`~ppcmi.protocol.LatentBatch` messages. It pools every
hospital's keyed pairs, trains one :class:`~ppcmi.models.MappingNet` (shared core, per-hospital
1x1 adapters) with the sum over scales of MSE, and at inference maps a hospital's query with
that hospital's adapters. It holds no key and cannot undo any hospital's transform.

Model folder::

    MODEL/mapping.safetensors   weights (core + adapters)
    MODEL/config.json           mapping config, hospitals, latent shapes, training history
    MODEL/train/                resumable training state
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import MappingTrainConfig
from ..errors import CheckpointError, ProtocolError
from ..fileio import atomic_write_json
from ..models import SCALES, MappingConfig, MappingNet
from ..protocol import LatentBatch, validate
from ..training import FitConfig, FitResult, fit, load_weights, save_weights, seeded_init

log = logging.getLogger(__name__)


def mapping_config(cfg: MappingTrainConfig) -> MappingConfig:
    return MappingConfig(widen=tuple(cfg.widen), mid=tuple(cfg.mid), down=tuple(cfg.down), pyramid=cfg.pyramid,
                         dropout=cfg.dropout, norm=cfg.norm)


def _shapes(msg: LatentBatch, prefix: str) -> dict[str, tuple[int, int, int]]:
    return {s: tuple(int(d) for d in a.shape[1:]) for s, a in msg.latents(prefix).items()}


def pool_batches(batches: list[LatentBatch]) -> tuple[list[str], dict[str, tuple], dict[str, tuple], list[torch.Tensor]]:
    """Check that every hospital sent the same latent layout and stack the pairs.

    Returns (hospitals, image shapes, mask shapes, tensors) where tensors are
    [client_index, img_<scale>..., msk_<scale>...] indexed together along dim 0.
    """
    if not batches:
        raise ProtocolError("inbox: no training messages received")
    clients: list[str] = []
    img_shapes = mask_shapes = None
    for b in batches:
        if b.kind != "train":
            raise ProtocolError(f"kind: expected 'train' messages for mapping training, got {b.kind!r} from {b.client!r}")
        if img_shapes is None:
            img_shapes, mask_shapes = _shapes(b, "zt_img_"), _shapes(b, "zt_msk_")
        elif _shapes(b, "zt_img_") != img_shapes or _shapes(b, "zt_msk_") != mask_shapes:
            raise ProtocolError(f"arrays: latent shapes from {b.client!r} differ from the other hospitals'")
        if b.client not in clients:
            clients.append(b.client)
    scales = [s for s in SCALES if s in img_shapes]
    cid = torch.cat([torch.full((b.n,), clients.index(b.client), dtype=torch.long) for b in batches])
    tensors = [cid]
    for prefix in ("zt_img_", "zt_msk_"):
        for s in scales:
            tensors.append(torch.cat([torch.from_numpy(np.asarray(b.latents(prefix)[s], dtype=np.float32)) for b in batches]))
    return clients, img_shapes, mask_shapes, tensors


def mixed_forward(model: MappingNet, zt: dict[str, torch.Tensor], cid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward a batch mixing hospitals: each sample goes through its own hospital's adapters,
    and the shared core sees the whole batch (so normalisation statistics pool all hospitals)."""
    out = {}
    present = cid.unique().tolist()
    for s in model.scales:
        x = zt[s]
        h = torch.zeros_like(x)
        for c in present:
            m = cid == c
            h = h.index_put((m,), model.in_adapters[model.clients[c]][s](x[m]))
        y = model.cores[s](h)
        o = torch.zeros_like(y)
        for c in present:
            m = cid == c
            o = o.index_put((m,), model.out_adapters[model.clients[c]][s](y[m]))
        out[s] = o
    return out


def train_mapping(batches: list[LatentBatch], cfg: MappingTrainConfig, out_dir: str | Path, *, seed: int = 0,
                  resume: bool = False, progress: bool = True) -> tuple[MappingNet, FitResult]:
    """Stage 2: train the mapping network on pooled keyed pairs from every hospital."""
    out = Path(out_dir)
    if (out / "mapping.safetensors").exists() and not resume:
        raise CheckpointError(f"{out}: a trained mapping network already exists; pass --resume or choose another --out")
    clients, img_shapes, mask_shapes, tensors = pool_batches(batches)
    scales = [s for s in SCALES if s in img_shapes]
    k = len(scales)
    mcfg = mapping_config(cfg)
    model = seeded_init(lambda: MappingNet({s: img_shapes[s][0] for s in scales}, {s: mask_shapes[s][0] for s in scales}, clients, mcfg), seed)

    # per-hospital seeded validation split
    rng = np.random.default_rng(seed)
    cid = tensors[0].numpy()
    val_idx, tr_idx = [], []
    for c in range(len(clients)):
        idx = np.flatnonzero(cid == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * cfg.val_frac)) if len(idx) >= 4 else 0
        val_idx.extend(idx[:n_val].tolist())
        tr_idx.extend(idx[n_val:].tolist())
    tr, va = torch.tensor(sorted(tr_idx)), torch.tensor(sorted(val_idx), dtype=torch.long)

    def loss_fn(m: MappingNet, batch) -> torch.Tensor:
        c, rest = batch[0], batch[1:]
        zt_img = dict(zip(scales, rest[:k]))
        zt_msk = dict(zip(scales, rest[k:]))
        pred = mixed_forward(m, zt_img, c)
        return sum(torch.nn.functional.mse_loss(pred[s], zt_msk[s]) for s in scales)

    fc = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience, seed=seed, schedule=cfg.lr_schedule)
    res = fit(model, loss_fn, [t[tr] for t in tensors], [t[va] for t in tensors] if len(va) else None, fc, out / "train",
              resume=resume and (out / "train" / "state.json").exists(), desc="server mapping", progress=progress)
    save_weights(model, out / "mapping.safetensors")
    atomic_write_json(out / "config.json", {
        "mapping": asdict(mcfg), "train": asdict(cfg), "clients": clients,
        "image_shapes": img_shapes, "mask_shapes": mask_shapes, "n_pairs": {c: int((cid == i).sum()) for i, c in enumerate(clients)},
        "best_epoch": res.best_epoch, "best_val_loss": res.best_val, "epochs_run": len(res.history),
        "history": res.history, "train_seconds": res.seconds, "seed": seed})
    return model, res


class MappingServer:
    """A trained mapping network loaded for inference. ``handle(query) -> reply``."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{cfg_path}: not a trained mapping model folder (run 'ppcmi server train' first)")
        meta = json.loads(cfg_path.read_text())
        mc = meta["mapping"]
        self.cfg = MappingConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in mc.items()})
        self.image_shapes = {s: tuple(v) for s, v in meta["image_shapes"].items()}
        self.mask_shapes = {s: tuple(v) for s, v in meta["mask_shapes"].items()}
        self.clients = list(meta["clients"])
        self.model = MappingNet({s: v[0] for s, v in self.image_shapes.items()}, {s: v[0] for s, v in self.mask_shapes.items()},
                                self.clients, self.cfg)
        load_weights(self.model, self.dir / "mapping.safetensors")
        self.model.eval().to(memory_format=torch.channels_last)  # faster convolutions on CPU (benchmarks/latency.py)

    @torch.inference_mode()
    def handle(self, query: LatentBatch, *, client: str | None = None) -> LatentBatch:
        """Map a query. ``client`` (e.g. from a TLS certificate) must match the message's sender."""
        if query.kind != "query":
            raise ProtocolError(f"kind: expected a 'query' message, got {query.kind!r}")
        if client is not None and query.client != client:
            raise ProtocolError(f"client: message is for {query.client!r} but the caller is {client!r}")
        if query.client not in self.clients:
            raise ProtocolError(f"client: unknown hospital {query.client!r}")
        validate(query, self.image_shapes)
        dtype = next(iter(query.arrays.values())).dtype
        zt = {s: torch.from_numpy(np.asarray(a, dtype=np.float32)) for s, a in query.latents("zt_img_").items()}
        out = self.model(zt, query.client)
        return LatentBatch("reply", query.client, {f"zt_msk_{s}": v.float().numpy().astype(dtype) for s, v in out.items()})
