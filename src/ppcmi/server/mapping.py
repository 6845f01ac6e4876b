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

import logging
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..config import CONFIG_VERSION, MappingTrainConfig, build
from ..device import Device, autocast, channels_last, resolve_device, to_numpy
from ..errors import CheckpointError, PpcmiError, ProtocolError
from ..fileio import Record, atomic_write_json, read_json
from ..models import SCALES, Frame, MappingConfig, MappingNet, mapping_loss, set_frames
from ..latent import lstsq_1x1, principal_frame, principal_frame_streamed
from ..protocol import LatentBatch, validate
from ..training import FitConfig, FitResult, fit, load_weights, save_weights, seeded_init
from .inbox import Column, TrainingSet, pool_sets, row_blocks, sets_from_batches

log = logging.getLogger(__name__)

# A hospital's rows of one latent up to this many float32 bytes get their canonical frame computed in memory
# at once (exactly as before training sets were chunked); larger ones are streamed in blocks of FRAME_BLOCK_ROWS.
# Both depend only on what the hospital sent, never on how it was chunked.
FRAME_EXACT_BYTES = 128 * 1024 * 1024  # (at least protocol.CHUNK_BYTES: a set of one chunk is always exact)
FRAME_BLOCK_ROWS = 256


def mapping_config(cfg: MappingTrainConfig) -> MappingConfig:
    """The network part of the ``[mapping]`` settings."""
    return MappingConfig(**{f.name: getattr(cfg, f.name) for f in fields(MappingConfig)})


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


def _as_sets(batches: list[LatentBatch] | list[TrainingSet]) -> list[TrainingSet]:
    if batches and all(isinstance(b, TrainingSet) for b in batches):
        return sorted(batches, key=lambda s: s.client)
    if any(isinstance(b, TrainingSet) for b in batches):
        raise ProtocolError("inbox: training sets and messages mixed in one call")
    return sets_from_batches(batches)


def _take(t, idx: torch.Tensor):
    return t.subset(idx) if isinstance(t, Column) else t[idx]


def _frame(col: Column, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The principal frame of rows ``rows`` of ``col``: at once when they fit FRAME_EXACT_BYTES, else streamed."""
    if len(rows) * 4 * int(np.prod(col.row_shape)) <= FRAME_EXACT_BYTES:
        return principal_frame(col.numpy(rows))
    return principal_frame_streamed(lambda: row_blocks(col, rows, FRAME_BLOCK_ROWS))


def train_mapping(batches: list[LatentBatch] | list[TrainingSet], cfg: MappingTrainConfig, out_dir: str | Path, *, seed: int = 0,
                  resume: bool = False, progress: bool = True, device: Device = None) -> tuple[MappingNet, FitResult]:
    """Stage 2: train the mapping network on pooled keyed pairs from every hospital.

    ``batches``: whole messages or chunks in memory, or training sets opened from chunk files
    (:func:`ppcmi.server.inbox.open_sets`), whose rows are read from disk batch by batch as training
    needs them. The rows are pooled in the order of the hospitals' site ids (each hospital's in the
    order of its set), whatever order the messages arrived in and however they were chunked, so every
    runner trains the same network. ``device``: where the coordinator trains (:func:`ppcmi.device.resolve_device`;
    None is the CPU); the canonical frames are computed on the CPU before the network moves."""
    out = Path(out_dir)
    if (out / "mapping.safetensors").exists() and not resume:
        raise CheckpointError(f"{out}: a trained mapping network already exists; pass --resume or choose another --out")
    clients, img_shapes, mask_shapes, tensors = pool_sets(_as_sets(batches))
    scales = [s for s in SCALES if s in img_shapes]
    k = len(scales)
    mcfg = mapping_config(cfg)
    model = seeded_init(lambda: MappingNet({s: img_shapes[s][0] for s in scales}, {s: mask_shapes[s][0] for s in scales}, clients, mcfg), seed)

    cid = tensors[0].numpy()
    tr, va = (torch.from_numpy(i) for i in mapping_split(cid, cfg.val_frac, seed))
    resuming = resume and (out / "train" / "state.json").exists()
    if cfg.adapter_init == "pca" and not resuming:  # (a resumed run restores its frames with its weights)
        # every row of the hospital's message (as a re-fit after a key rotation sees it), so both give the same frame
        for i, c in enumerate(clients):
            rows = np.flatnonzero(cid == i)
            set_frames(model, c, {s: _frame(tensors[1 + j], rows) for j, s in enumerate(scales)},
                       {s: _frame(tensors[1 + k + j], rows) for j, s in enumerate(scales)})
    loss_fn = _loss_fn(scales)
    fc = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience, seed=seed, schedule=cfg.lr_schedule)
    dp_report = None
    if cfg.dp:
        from .dp import fit_dp

        if resume:
            raise CheckpointError(f"{out}: mapping.dp: --resume is not supported for DP-SGD training; train into a new folder")
        held = [t if isinstance(t, torch.Tensor) else t[torch.arange(len(t))] for t in tensors]  # (DP-SGD holds its rows in memory)
        res, dp_report = fit_dp(model, [t[tr] for t in held], [t[va] for t in held] if len(va) else None, scales, cfg, fc,
                                progress=progress, device=device)
    else:
        res = fit(model, loss_fn, [_take(t, tr) for t in tensors], [_take(t, va) for t in tensors] if len(va) else None, fc,
                  out / "train", resume=resuming, desc="server mapping", progress=progress,
                  about=f"{len(cid)} pairs from {', '.join(f'{c} ({int((cid == i).sum())})' for i, c in enumerate(clients))}",
                  device=device)
    for t in tensors[1:]:
        t.close()
    save_weights(model, out / "mapping.safetensors")
    atomic_write_json(out / "config.json", {
        "version": CONFIG_VERSION, "mapping": asdict(mcfg), "train": asdict(cfg), "clients": clients,
        "image_shapes": img_shapes, "mask_shapes": mask_shapes, "n_pairs": {c: int((cid == i).sum()) for i, c in enumerate(clients)},
        "n_train_rows": int(len(tr)), "n_val_rows": int(len(va)),
        "best_epoch": res.best_epoch, "best_val_loss": res.best_val, "epochs_run": len(res.history),
        "history": res.history, "train_seconds": res.seconds, "seed": seed, "dp": dp_report})
    return model, res


def mapping_split(cid: np.ndarray, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded per-hospital split of pooled training rows into (train rows, validation rows), sorted.

    A pure function of the hospital index of each row, so the privacy audit can tell exactly which
    rows the network was fitted on (members) and which only steered early stopping.
    """
    rng = np.random.default_rng(seed)
    val_idx, tr_idx = [], []
    for c in range(int(cid.max()) + 1 if len(cid) else 0):
        idx = np.flatnonzero(cid == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_frac)) if len(idx) >= 4 else 0
        val_idx.extend(idx[:n_val].tolist())
        tr_idx.extend(idx[n_val:].tolist())
    return np.array(sorted(tr_idx), dtype=np.int64), np.array(sorted(val_idx), dtype=np.int64)


_loss_fn = mapping_loss  # (one definition, in the neutral ppcmi.models: a hospital's federated round trains with it too)


@torch.no_grad()
def row_losses(model: MappingNet, batch: LatentBatch, *, batch_size: int = 64) -> np.ndarray:
    """Per-row sum over scales of the mean squared error of the mapped image latents against the
    sent mask latents, through the sender's adapters: the loss each training row contributes (computed on the
    model's device, in float32)."""
    model.eval()
    scales = model.scales
    dev = next(model.parameters()).device
    img = {s: torch.from_numpy(np.asarray(a, np.float32)) for s, a in batch.latents("zt_img_").items()}
    msk = {s: torch.from_numpy(np.asarray(a, np.float32)) for s, a in batch.latents("zt_msk_").items()}
    out = []
    for i in range(0, batch.n, batch_size):
        pred = model({s: img[s][i:i + batch_size].to(dev) for s in scales}, batch.client)
        out.append(to_numpy(sum(((pred[s] - msk[s][i:i + batch_size].to(dev)) ** 2).mean(dim=(1, 2, 3)) for s in scales)))
    return np.concatenate(out).astype(np.float64)


class _AdaptersOnly(torch.nn.Module):
    """Training wrapper for :func:`refit_adapters`: only one hospital's adapters learn; the shared
    core and every other adapter stay frozen, normalisation statistics and dropout included."""

    def __init__(self, net: MappingNet, client: str):
        super().__init__()
        self.net = net
        for p in net.parameters():
            p.requires_grad_(False)
        for m in (net.in_adapters[client], net.out_adapters[client]):
            for p in m.parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True):
        self.training = mode
        self.net.eval()
        return self


def _centred_norms(a: np.ndarray) -> np.ndarray:
    """Per-row signature invariant to any per-pixel orthogonal map plus bias: centred per-pixel norms, flattened."""
    a = np.asarray(a, np.float64)
    return np.linalg.norm(a - a.mean(axis=(0, 2, 3), keepdims=True), axis=1).reshape(len(a), -1)


def match_rows(new: LatentBatch, old: LatentBatch, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Pair the rows of two messages that carry the same inputs under different keys: mutual nearest
    neighbours of the key-invariant signatures, kept when their distance is below ``tol`` relative."""
    s = next(iter(new.latents("zt_img_")))
    a, b = _centred_norms(new.latents("zt_img_")[s]), _centred_norms(old.latents("zt_img_")[s])
    d = ((a[:, None] - b[None]) ** 2).sum(-1)
    fwd, back = d.argmin(1), d.argmin(0)
    scale = np.maximum((a ** 2).sum(1), 1e-12)
    keep = np.flatnonzero((back[fwd] == np.arange(len(a))) & (d[np.arange(len(a)), fwd] <= tol ** 2 * scale))
    return keep, fwd[keep]


@torch.no_grad()
def _compose(frame: Frame, pre: tuple[np.ndarray, np.ndarray] | None = None, post: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Replace a frame y = W x + b by y = W (A x + c) + b (``pre``) or by y = A (W x + b) + c (``post``)."""
    w = frame.weight.double().cpu().numpy()
    b = frame.bias.double().cpu().numpy()
    if pre is not None:
        a, c = pre
        w, b = w @ a, w @ c + b
    if post is not None:
        a, c = post
        w, b = a @ w, a @ b + c
    frame.weight.copy_(torch.from_numpy(w).float())
    frame.bias.copy_(torch.from_numpy(b).float())


@torch.no_grad()
def set_canonical_frames(net: MappingNet, client: str, img: dict[str, np.ndarray], msk: dict[str, np.ndarray]) -> None:
    """Set ``client``'s frames to its canonical frames (``mapping.adapter_init = "pca"``): the input frame
    takes keyed image latents to principal coordinates, the output frame takes principal coordinates
    of mask latents back to the hospital's keyed frame. The adapters and the shared core then see every
    hospital in coordinates that do not depend on its key (training follows the same path under any
    keys, optimiser included), instead of the core having to absorb each key. The server learns
    nothing it could not compute anyway: the audit's A1 is this PCA."""
    set_frames(net, client, {s: principal_frame(img[s]) for s in net.scales}, {s: principal_frame(msk[s]) for s in net.scales})


def refit_adapters(model_dir: str | Path, batch: LatentBatch, cfg: MappingTrainConfig, out_dir: str | Path, *, seed: int = 0,
                   previous: LatentBatch | None = None, progress: bool = True, device: Device = None) -> tuple[MappingNet, FitResult]:
    """Re-fit one hospital's 1x1 adapters on its new ``train`` message (after a key rotation) with the
    shared core frozen; writes a new model folder ``out_dir`` and never touches ``model_dir``.

    With ``previous``, the hospital's earlier ``train`` message, the exact old-to-new change of frame,
    fitted by least squares on the rows both messages carry (matched by key-invariant signatures), is
    composed into that hospital's fixed frames and the trained adapters are kept; this works for any
    model. Without it, a network trained with ``mapping.adapter_init = "pca"`` takes the new key's
    canonical frames, which lead into the key-independent coordinates its adapters and core were
    trained in (up to axes of nearly equal variance, which a new PCA does not pin down). A network with
    identity-initialised adapters gets fresh identity adapters, which does not work in practice: the
    shared core, not the adapters, absorbed each hospital's old key during stage 2 (PRIVACY.md).
    With ``previous``, the server learns the relation between the old and the new key; it could link the two
    messages anyway, so a rotation protects only against holders of the old key who do not also hold
    the server's records. ``device``: where the coordinator trains.
    """
    src, out = Path(model_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: --out must differ from the model folder; the old model is kept as it is")
    if (out / "mapping.safetensors").exists():
        raise CheckpointError(f"{out}: a trained mapping network already exists; choose another --out")
    if batch.kind != "train":
        raise ProtocolError(f"kind: expected a 'train' message for refitting adapters, got {batch.kind!r}")
    server = MappingServer(src)  # (on the CPU: the frames are composed there; fit moves the network to ``device``)
    if batch.client not in server.clients:
        raise ProtocolError(f"client: {batch.client!r} is not a hospital of {src} (known: {', '.join(server.clients)})")
    validate(LatentBatch("query", batch.client, {k: v for k, v in batch.arrays.items() if k.startswith("zt_img_")}), server.image_shapes)
    net = server.model.to(memory_format=torch.contiguous_format)
    ch_in = {s: v[0] for s, v in server.image_shapes.items()}
    ch_out = {s: v[0] for s, v in server.mask_shapes.items()}
    scales = net.scales
    init = "identity"
    if previous is not None:
        if previous.client != batch.client or previous.kind != "train":
            raise ProtocolError(f"previous: expected {batch.client!r}'s earlier 'train' message, got {previous.kind!r} from {previous.client!r}")
        new_idx, old_idx = match_rows(batch, previous)
        if len(new_idx) < 2:
            raise ProtocolError("previous: no rows of the new message match the previous one; re-encode the same training pairs")
        with torch.no_grad():
            for s in scales:  # in: new key's frame -> old key's, then the old frame; out: the old frame, then old -> new
                _compose(net.in_frames[batch.client][s], pre=lstsq_1x1(batch.latents("zt_img_")[s][new_idx],
                                                                      previous.latents("zt_img_")[s][old_idx]))
                _compose(net.out_frames[batch.client][s], post=lstsq_1x1(previous.latents("zt_msk_")[s][old_idx],
                                                                        batch.latents("zt_msk_")[s][new_idx]))
        init = f"least squares from {len(new_idx)} rows matched with the previous message"
    elif server.meta.get("train", {}).get("adapter_init") == "pca":
        # the adapters and core were trained in key-independent coordinates: the new key's frames lead into them
        set_canonical_frames(net, batch.client, batch.latents("zt_img_"), batch.latents("zt_msk_"))
        init = "canonical frames (pca) of the new message; adapters kept"
    else:
        with torch.random.fork_rng():  # identity adapters, as at the start of training
            net.add_client(batch.client, ch_in, ch_out)
    clients, _, _, tensors = pool_batches([batch])
    tensors[0] = torch.full_like(tensors[0], net.clients.index(batch.client))
    tr, va = (torch.from_numpy(i) for i in mapping_split(np.zeros(batch.n, np.int64), cfg.val_frac, seed))
    wrapper = _AdaptersOnly(net, batch.client)
    fc = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience, seed=seed, schedule=cfg.lr_schedule)
    loss = _loss_fn(scales)
    res = fit(wrapper, lambda m, b: loss(m.net, b), [t[tr] for t in tensors], [t[va] for t in tensors] if len(va) else None, fc,
              out / "train", desc=f"refit adapters {batch.client}", progress=progress, device=device)
    for p in net.parameters():
        p.requires_grad_(True)
    save_weights(net, out / "mapping.safetensors")
    refit = {"client": batch.client, "n_rows": batch.n, "init": init, "best_epoch": res.best_epoch, "best_val_loss": res.best_val,
             "epochs_run": len(res.history), "from": src.name}
    meta = {**server.meta, "refits": server.meta.get("refits", []) + [refit]}
    atomic_write_json(out / "config.json", meta)
    return net, res


def migrate_state(model: MappingNet, meta: dict):
    """How to read the weights of a mapping folder saved by an older ppcmi (its ``config.json`` ``version``), or None.

    Version 1 (no ``version``): weights saved before the per-hospital frames existed hold none; those
    frames were the identity, as a new network's are, so they are taken from ``model``. Version 1 runs
    also predate ``mapping.adapter_init``, which :func:`ppcmi.config.migrate` reads as ``"identity"``."""
    if meta.get("version", 1) >= 2:
        return None
    own = model.state_dict()
    return lambda sd: {**{k: v for k, v in own.items() if "_frames." in k}, **sd}


def _saved_shapes(rec: Record, key: str) -> dict[str, tuple[int, int, int]]:
    """A model record's latent shapes: ``{scale: [C, H, W]}`` for known scales, positive sizes."""
    shapes = rec.get(key, dict, ok=lambda v: v and set(v) <= set(SCALES) and all(
        isinstance(d, list) and len(d) == 3 and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 65536 for n in d)
        for d in v.values()), expect=f"an object of scales ({', '.join(SCALES)}) to [C, H, W]")
    return {s: tuple(shapes[s]) for s in SCALES if s in shapes}


class MappingServer:
    """A trained mapping network loaded for inference. ``handle(query) -> reply``.

    ``device``: where it maps (None is the CPU); ``mixed``: its precision (:func:`ppcmi.device.mixed_dtype`; None:
    mixed on CUDA only). Replies are float32 (or the query's dtype) on the host whatever the device."""

    def __init__(self, model_dir: str | Path, *, device: Device = None, mixed: bool | None = None):
        self.dir = Path(model_dir)
        self.device = resolve_device(device)
        self.mixed = mixed
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: not a trained mapping model folder (run 'ppcmi server train' first)")
        self.meta = meta = read_json(cfg_path, "mapping model record", CheckpointError)  # as train_mapping wrote it
        rec = Record(meta, cfg_path, "mapping model record", CheckpointError)
        mc = rec.get("mapping", dict)
        try:
            self.cfg = build(MappingConfig, mc, "mapping")
        except PpcmiError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        self.image_shapes, self.mask_shapes = (_saved_shapes(rec, k) for k in ("image_shapes", "mask_shapes"))
        if set(self.image_shapes) != set(self.mask_shapes):
            raise rec.fail("mask_shapes", f"names the scales {sorted(self.mask_shapes)}, image_shapes {sorted(self.image_shapes)}")
        self.clients = list(rec.get("clients", list, ok=lambda v: v and len(set(v)) == len(v) and all(isinstance(c, str) and c for c in v),
                                    expect="a list of distinct site ids"))
        rec.get("version", int, default=1)
        rec.get("train", dict, default={})
        self.model = MappingNet({s: v[0] for s, v in self.image_shapes.items()}, {s: v[0] for s, v in self.mask_shapes.items()},
                                self.clients, self.cfg)
        load_weights(self.model, self.dir / "mapping.safetensors", migrate=migrate_state(self.model, meta))
        # channels-last: faster convolutions on the CPU (benchmarks/latency.py) and on CUDA
        channels_last(self.model.eval().to(memory_format=torch.channels_last), self.device)

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
        zt = {s: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(self.device) for s, a in query.latents("zt_img_").items()}
        with autocast(self.device, self.mixed):
            out = self.model(zt, query.client)
        return LatentBatch("reply", query.client, {f"zt_msk_{s}": to_numpy(v).astype(dtype) for s, v in out.items()},
                           query=query.query)
