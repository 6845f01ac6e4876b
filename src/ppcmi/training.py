"""Training loop and checkpoints (neutral code, used by hospitals for the autoencoders and by the server for mapping).

``fit`` trains with Adam, early stopping on a validation loss and best-weights restoration. Every
epoch is one atomic commit into ``work_dir``: the epoch's files are written under new names
(``last-<epoch>.safetensors`` with the model and optimiser tensors, and ``best-<epoch>.safetensors``
when the validation loss improved), then the manifest ``state.json`` (epoch, history, patience
counter, and the names and SHA-256 of the files of that epoch) replaces the old one by a rename,
and only then are the files it no longer names removed. A kill at any point leaves either the
complete old epoch or the complete new one. ``fit(..., resume=True)`` continues from the epoch the
manifest records and reads only the files it names. Each epoch's shuffling and dropout are seeded
from ``(seed, epoch)`` inside ``torch.random.fork_rng``, so an interrupted-and-resumed run equals an
uninterrupted one bit for bit.

``fit(..., device=...)`` trains on that device (:mod:`ppcmi.device`): the model and the training tensors
are moved there once (rows read from disk batch by batch, on CUDA by DataLoader workers a few batches ahead
into pinned memory: :func:`loader_workers`), the batch order
and augmentation draws still come from CPU generators, and on CUDA the forward passes run under mixed
precision and channels-last by default. Checkpoints are written from host copies and load onto any device,
so a run begun on a GPU resumes on a CPU and the other way round. ``device=None`` (or ``"cpu"``) leaves
everything on the CPU in float32, exactly as before devices existed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.utils.data
from safetensors.torch import load, load_file, save
from torch import nn
from tqdm.auto import tqdm

from .device import Device, autocast, channels_last, grad_scaler, resolve_device
from .errors import CheckpointError, PpcmiError
from .fileio import atomic_write_bytes, atomic_write_json, ensure_dir, fsync_dir

log = logging.getLogger(__name__)

Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    patience: int = 15
    seed: int = 0
    schedule: str = "constant"  # "constant" | "cosine" (lr decays to 2 % of ``lr`` over ``epochs``)
    workers: int | None = None  # loader processes reading disk-backed rows ahead of the step; None: see loader_workers

    def lr_at(self, epoch: int) -> float:
        """The learning rate for a 1-based ``epoch``: a pure function of the epoch, so resuming needs no state."""
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine":
            t = (epoch - 1) / max(1, self.epochs - 1)
            return self.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))
        raise PpcmiError(f"schedule: must be constant or cosine, got {self.schedule!r}")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = math.inf
    stopped_early: bool = False
    seconds: float = 0.0


def _weights_bytes(module: nn.Module, metadata: dict | None = None) -> bytes:
    """A module's state dict as safetensors bytes."""
    return save(host_state(module), metadata=metadata)


def host_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous CPU copies (what every checkpoint holds, whatever the device)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(module: nn.Module, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Atomically write a module's state dict as safetensors."""
    return atomic_write_bytes(path, _weights_bytes(module, metadata))


def load_weights(module: nn.Module, path: str | Path, *, migrate: Callable[[dict], dict] | None = None) -> None:
    """Load safetensors weights into ``module``, on whatever device it is; ``migrate`` first brings an older
    checkpoint's tensors up to date. The tensors are mapped onto the module's device as they are read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        sd = load_file(str(path), device=str(_device_of(module)))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if migrate is not None:
        sd = migrate(sd)
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the configured network ({str(e).splitlines()[0][:160]})") from None


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            out[f"optim.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().clone().contiguous()
    return out


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return [idx[i:i + batch_size] for i in range(0, n, batch_size)]


MANIFEST_FORMAT = 2
_EPOCH_FILE = re.compile(r"(last|best)-([0-9]+)\.safetensors")
# leftovers of a kill: epoch files no manifest names, the old format's fixed names, atomic_write_* temporaries
_OURS = re.compile(r"(?:(?:last|best)-[0-9]+\.safetensors|last\.safetensors|best\.safetensors"
                   r"|\.(?:(?:last|best)-[0-9]+\.safetensors|last\.safetensors|best\.safetensors|state\.json)\..+\.tmp)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DIGEST_ROWS = 1024  # rows hashed at a time, so a column streamed from disk is never held whole


def data_digest(tensors: Sequence) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors``: what a resumed run checks it trains on.

    Each is a tensor or a column that gives a tensor for an array of row indices (the coordinator's
    chunk-backed columns); both are read ``DIGEST_ROWS`` rows at a time and give the same digest for the
    same rows."""
    h = hashlib.sha256()
    for t in tensors:
        n = len(t)
        for start in range(0, max(n, 1), DIGEST_ROWS):
            stop = min(n, start + DIGEST_ROWS)
            part = t[start:stop] if isinstance(t, torch.Tensor) else t[np.arange(start, stop)]
            a = part.detach().contiguous().numpy()
            if start == 0:
                h.update(f"{a.dtype.str}{tuple(t.shape)};".encode())
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _read_named(work: Path, entry: dict, state_path: Path) -> tuple[Path, bytes, dict[str, torch.Tensor]]:
    """The tensors of a file the manifest names, after checking that it is there and is the file it recorded."""
    path = work / entry["name"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found (named by {state_path.name})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e.strerror or type(e).__name__})") from None
    if entry.get("sha256") is not None and _sha256(data) != entry["sha256"]:
        raise CheckpointError(f"{path}: truncated or altered checkpoint (its SHA-256 differs from the one {state_path.name} records)")
    try:
        return path, data, load(data)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None


def _read_manifest(state_path: Path) -> dict:
    """``state.json``, checked for the keys and the consistency resuming relies on (one-line CheckpointError otherwise)."""
    try:
        st = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: truncated or unreadable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]})") from None
    except OSError as e:
        raise CheckpointError(f"{state_path}: unreadable training state ({e.strerror or type(e).__name__})") from None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{state_path}: inconsistent training state ({why}); train into a new folder")

    if not isinstance(st, dict):
        raise bad("not a JSON object")
    for k, types in (("epoch", int), ("history", list), ("best_epoch", int), ("best_val", (int, float)), ("bad_epochs", int)):
        if not isinstance(st.get(k), types) or isinstance(st.get(k), bool):
            raise bad(f"{k!r} missing or of the wrong type")
    epoch, history = st["epoch"], st["history"]
    if epoch < 1 or len(history) != epoch or not all(isinstance(h, dict) for h in history) \
            or [h.get("epoch") for h in history] != list(range(1, epoch + 1)):
        raise bad(f"history does not list epochs 1..{epoch}")
    if not 0 <= st["best_epoch"] <= epoch:
        raise bad(f"best_epoch {st['best_epoch']} outside 0..{epoch}")
    fmt = st.get("format")
    if fmt is None:  # written before per-epoch commits: fixed file names, no checksums
        log.warning("%s: written by an older ppcmi (no per-epoch commit); resuming from last.safetensors and best.safetensors",
                    state_path)
        st["files"] = {"last": {"name": "last.safetensors"},
                       "best": {"name": "best.safetensors"} if st["best_epoch"] else None}
        return st
    if fmt != MANIFEST_FORMAT:
        raise bad(f"format {fmt!r}, expected {MANIFEST_FORMAT}")
    files = st.get("files")
    if not isinstance(files, dict):
        raise bad("'files' missing")
    for role, want in (("last", epoch), ("best", st["best_epoch"])):
        entry = files.get(role)
        if role == "best" and want == 0 and entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("sha256"), str):
            raise bad(f"files.{role} missing")
        m = _EPOCH_FILE.fullmatch(entry["name"])
        if m is None or m.group(1) != role or int(m.group(2)) != want:
            raise bad(f"files.{role} is {entry['name']!r}, expected {role}-{want}.safetensors")
    return st


def _remove_unnamed(work: Path, keep: set[str]) -> None:
    """Delete the checkpoint files (and temporaries) of ``work`` that the committed manifest does not name."""
    for p in sorted(work.iterdir()):
        if p.name not in keep and _OURS.fullmatch(p.name) and p.is_file():
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _commit_epoch(work: Path, state: dict, last: bytes, best: tuple[int, bytes] | None, files: dict) -> dict:
    """Write one epoch: its new files first, the manifest that names them last (the commit), then the clean-up.

    ``best`` is ``(epoch, safetensors bytes)`` when the best weights changed; ``files`` is the previous
    manifest's ``files``, and the returned one replaces it.
    """
    epoch = state["epoch"]
    files = dict(files)
    name = f"last-{epoch}.safetensors"
    atomic_write_bytes(work / name, last)
    files["last"] = {"name": name, "sha256": _sha256(last)}
    if best is not None:
        name = f"best-{best[0]}.safetensors"
        atomic_write_bytes(work / name, best[1])
        files["best"] = {"name": name, "sha256": _sha256(best[1])}
    fsync_dir(work)  # the files reach the disk before the manifest that names them
    atomic_write_json(work / "state.json", {"format": MANIFEST_FORMAT, **state, "files": files})
    fsync_dir(work)
    _remove_unnamed(work, {e["name"] for e in files.values() if e is not None})
    return files


def fit(model: nn.Module, loss_fn: LossFn, train: Sequence[torch.Tensor], val: Sequence[torch.Tensor] | None,
        cfg: FitConfig, work_dir: str | Path, *, resume: bool = False, desc: str = "train",
        progress: bool = True, on_epoch: Callable[[int, dict], None] | None = None,
        augment: Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]] | None = None,
        about: str | None = None, device: Device = None, mixed: bool | None = None) -> FitResult:
    """Train ``model`` on tensors ``train`` (indexed together along dim 0) with early stopping on ``val``.

    ``loss_fn(model, batch)`` returns a scalar loss. Without a validation set, the training loss is
    used for early stopping. Writes checkpoints into ``work_dir``; the model ends with the best weights.
    ``augment(batch, generator)`` optionally transforms each training batch (never validation).
    The manifest records a digest of ``train`` and ``val`` (and ``about``, what they are in words), so
    that ``resume`` on other data is an error naming both, not a silently mixed run.
    ``device`` (see :func:`ppcmi.device.resolve_device`; None is the CPU) is where it trains; ``mixed`` is its
    precision (:func:`ppcmi.device.mixed_dtype`: None is the device's default, mixed on CUDA only).
    """
    import time

    work = Path(work_dir)
    ensure_dir(work)
    n = train[0].shape[0]
    if n == 0:
        raise PpcmiError(f"{desc}: no training samples")
    cfg.lr_at(1)  # fail early on an unknown schedule
    dev = resolve_device(device)
    if dev.type != "cpu":
        channels_last(model, dev)
    res = FitResult()
    start_epoch = 1
    bad = 0
    state_path = work / "state.json"
    data = {"sha256": data_digest([*train, *(val or [])]),
            "about": about or f"{n} training and {val[0].shape[0] if val else 0} validation rows"}
    train, val = _place(train, dev), _place(val, dev) if val is not None else None  # once, not per step
    workers = loader_workers(train, dev) if cfg.workers is None else cfg.workers
    if workers < 0:
        raise PpcmiError(f"{desc}: workers must be 0 or more, got {workers}")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(dev, mixed)
    files: dict = {"last": None, "best": None}
    pending_best: tuple[int, bytes] | None = None  # a best file of the old format, committed under its new name
    if resume:
        if not state_path.exists():
            raise CheckpointError(f"{state_path}: nothing to resume (no completed epoch recorded)")
        st = _read_manifest(state_path)
        began = st.get("data")
        if isinstance(began, dict) and began.get("sha256") != data["sha256"]:
            raise CheckpointError(f"{state_path}: --resume with other training data than this run began with "
                                  f"({began.get('about')} then, {data['about']} now); train into a new folder")
        files = st["files"]
        last_path, _, tensors = _read_named(work, files["last"], state_path)
        if files["best"] is not None:
            _, best_bytes, _ = _read_named(work, files["best"], state_path)  # checked now, not after hours of training
            if "sha256" not in files["best"]:
                pending_best = (st["best_epoch"], best_bytes)
        try:
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            _load_optim(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")})
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{last_path}: weights do not match the configured network "
                                  f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
        if "sha256" in files["last"]:  # finish a clean-up a kill cut short (never for the old format: its files are live)
            _remove_unnamed(work, {e["name"] for e in files.values() if e is not None})
        res.history, res.best_epoch, res.best_val, bad = st["history"], st["best_epoch"], st["best_val"], st["bad_epochs"]
        res.seconds = st.get("seconds", 0.0)
        start_epoch = st["epoch"] + 1
        if st.get("done"):
            _load_best(model, work, files, state_path)
            res.stopped_early = st.get("stopped_early", False)
            log.info("%s: already finished at epoch %d", desc, st["epoch"])
            return res
        log.info("%s: resuming after epoch %d", desc, st["epoch"])
    elif state_path.exists():
        raise CheckpointError(f"{state_path}: a training run already exists here; pass --resume to continue it or choose a new output folder")

    t0 = time.perf_counter()
    bar = tqdm(range(start_epoch, cfg.epochs + 1), desc=desc, disable=not progress, leave=False, initial=start_epoch - 1, total=cfg.epochs)
    for epoch in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(epoch)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            model.train()
            tot, count = 0.0, 0
            # BatchNorm needs two samples: a lone last sample is folded into training next epoch
            order = [idx for idx in _batches(n, cfg.batch_size, gen) if len(idx) >= 2 or n < 2]
            for idx, batch in _epoch_rows(train, order, dev, workers):
                if augment is not None:
                    batch = augment(batch, gen)
                with autocast(dev, mixed):
                    loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise PpcmiError(f"{desc}: loss became {loss.item()} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:  # fp16: scaled gradients, steps with inf/nan gradients skipped
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                tot += loss.item() * len(idx)
                count += len(idx)
            train_loss = tot / max(count, 1)
            val_loss = (evaluate_loss(model, loss_fn, val, cfg.batch_size, device=dev, mixed=mixed)
                        if val is not None and val[0].shape[0] else train_loss)
        rec = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
        res.history.append(rec)
        best, pending_best = pending_best, None
        if val_loss < res.best_val - 1e-7:
            res.best_val, res.best_epoch, bad = val_loss, epoch, 0
            best = (epoch, _weights_bytes(model))
        else:
            bad += 1
        done = bad >= cfg.patience or epoch == cfg.epochs
        res.stopped_early = bad >= cfg.patience
        elapsed = res.seconds + time.perf_counter() - t0
        last = {f"model.{k}": v for k, v in host_state(model).items()}
        last.update(_optim_tensors(opt))
        files = _commit_epoch(work, {"epoch": epoch, "data": data, "history": res.history, "best_epoch": res.best_epoch, "best_val": res.best_val,
                                     "bad_epochs": bad, "done": done, "stopped_early": res.stopped_early, "seconds": elapsed},
                              save(last), best, files)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, rec)
        if done:
            break
    bar.close()
    res.seconds += time.perf_counter() - t0
    _load_best(model, work, files, state_path)
    model.eval()
    return res


def _load_best(model: nn.Module, work: Path, files: dict, state_path: Path) -> None:
    if files.get("best") is None:
        raise CheckpointError(f"{state_path}: no best epoch recorded (the validation loss was never finite)")
    path, _, sd = _read_named(work, files["best"], state_path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the configured network ({str(e).splitlines()[0][:160]})") from None


def _place(tensors: Sequence, dev: torch.device) -> list:
    """In-memory tensors moved to ``dev`` (no copy on the CPU); columns read from disk stay where they are."""
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in tensors]


def _rows(t, idx: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Rows ``idx`` (a CPU index) of a tensor or a disk-backed column, on ``dev``."""
    if isinstance(t, torch.Tensor):
        return t[idx] if t.device == idx.device else t[idx.to(t.device)]
    rows = t[idx]
    if dev.type == "cuda":
        return rows.pin_memory().to(dev, non_blocking=True)
    return rows.to(dev)


def loader_workers(data: Sequence, dev: torch.device) -> int:
    """How many loader processes ``fit`` uses by default: on CUDA, when some training column is read from disk
    (chunk files, :class:`ppcmi.server.inbox.Column`), half the CPU cores up to 4, so the next batches are read and
    pinned while the GPU computes; otherwise 0 (rows are read in the training thread: on a CPU the cores are
    training, and in-memory tensors are already on the device)."""
    if dev.type != "cuda" or all(isinstance(t, torch.Tensor) for t in data):
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class _DiskRows(torch.utils.data.Dataset):
    """Item ``k``: the rows of batch ``k`` of every disk-backed column (read in a loader worker)."""

    def __init__(self, columns: list, order: list[torch.Tensor]):
        self.columns, self.order = columns, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> list[torch.Tensor] | PpcmiError:
        try:
            return [c[self.order[k]] for c in self.columns]
        except PpcmiError as e:  # returned, and raised by the training process as its one line (DataLoader would wrap it)
            return e


def _epoch_rows(data: Sequence, order: list[torch.Tensor], dev: torch.device, workers: int):
    """``(idx, rows on dev)`` for each batch ``idx`` of ``order``, in order. With ``workers`` > 0 the disk-backed
    columns are read by that many DataLoader processes a few batches ahead (into pinned memory on CUDA); the
    rows, and so the training, are the same either way."""
    disk = [i for i, t in enumerate(data) if not isinstance(t, torch.Tensor)]
    if not disk or workers == 0 or not order:
        for idx in order:
            yield idx, [_rows(t, idx, dev) for t in data]
        return
    loader = torch.utils.data.DataLoader(_DiskRows([data[i] for i in disk], order), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=dev.type == "cuda")
    for idx, read in zip(order, loader):
        if isinstance(read, PpcmiError):
            raise read
        rows = dict(zip(disk, read))
        yield idx, [rows[i].to(dev, non_blocking=True) if i in rows else _rows(t, idx, dev) for i, t in enumerate(data)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loss_fn: LossFn, data: Sequence[torch.Tensor], batch_size: int, *,
                          device: Device = None) -> int:
    """Re-estimate every BatchNorm layer's running statistics from ``data`` (one pass in order, no gradient, the rest of
    the model in evaluation mode so that the statistics are those of evaluation-time activations), as the cumulative
    average over the batches; returns the number of layers. A federated average of running statistics describes no
    one's data: a hospital recalibrates the layers on its own rows before it uses the model."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    dev = resolve_device(device)
    data = _place(data, dev)
    try:
        for idx in _batches(data[0].shape[0], batch_size, None):
            loss_fn(model, [_rows(t, idx, dev) for t in data])
    finally:
        for m, mo in zip(layers, saved):
            m.momentum = mo
        model.eval()
    return len(layers)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, data: Sequence[torch.Tensor], batch_size: int, *, device: Device = None,
                  mixed: bool | None = None) -> float:
    model.eval()
    dev = resolve_device(device)
    data = _place(data, dev)
    n = data[0].shape[0]
    tot = 0.0
    for idx in _batches(n, batch_size, None):
        with autocast(dev, mixed):
            tot += loss_fn(model, [_rows(t, idx, dev) for t in data]).item() * len(idx)
    return tot / n


def seeded_init(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with its initial weights drawn from ``seed`` without disturbing the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def bce_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """0.5·BCE + 0.5·soft Dice on sigmoid outputs in [0, 1] (the published autoencoder loss; the image autoencoder's)."""
    with torch.autocast(pred.device.type, enabled=False):  # BCE on probabilities is float32-only under autocast
        pred, target = pred.float(), target.float()
        bce = nn.functional.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target)
        dims = tuple(range(1, pred.ndim))
        inter = (pred * target).sum(dims)
        dice = (2 * inter + eps) / (pred.sum(dims) + target.sum(dims) + eps)
        return 0.5 * bce + 0.5 * (1 - dice.mean())


def mask_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """The mask autoencoder's loss: 0.5·cross-entropy + 0.5·soft Dice of the softmax over the classes, one Dice per
    class over the whole batch, averaged over the classes. ``logits`` (N, K, H, W); ``target`` (N, K, H, W) one-hot.

    Predictions take the softmax's argmax, so the classes compete in training as they do there. The published
    loss (:func:`bce_dice_loss` on independent sigmoids, one Dice over every channel at once) is dominated by the
    background: on ACDC the mask autoencoders of a planned run dropped the right ventricle and the myocardium
    (round-trip Dice on test masks 0.00 and 0.03 after 22 epochs), where one trained with this loss on one
    hospital's masks for 24 epochs reached 0.95 and 0.87."""
    with torch.autocast(logits.device.type, enabled=False):
        logits, target = logits.float(), target.float()
        ce = nn.functional.cross_entropy(logits, target.argmax(1))
        p = torch.softmax(logits, dim=1)
        dims = (0, *range(2, p.ndim))
        dice = (2 * (p * target).sum(dims) + eps) / (p.sum(dims) + target.sum(dims) + eps)
        return 0.5 * ce + 0.5 * (1 - dice.mean())


def noisy_latents(z: dict[str, torch.Tensor], noise: float) -> dict[str, torch.Tensor]:
    """``z`` plus Gaussian noise (from the global generator, which :func:`fit` seeds per epoch) of std ``noise`` times each
    channel's standard deviation over the batch and the pixels (that spread taken as a constant: no gradient through it)."""
    return {s: v + noise * v.detach().std(dim=(0, *range(2, v.ndim)), keepdim=True) * torch.randn_like(v) for s, v in z.items()}


def autoencoder_loss(kind: str, *, noise: float = 0.0) -> Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]:
    """``loss(model, [x])`` of an autoencoder reconstructing its own input ``x``: :func:`bce_dice_loss` on the sigmoid
    outputs for ``"image"``, :func:`mask_loss` on the logits for ``"mask"`` (one-hot class maps). ``noise`` > 0 (mask
    only; ``autoencoder.mask_noise``): in training mode the decoder reads :func:`noisy_latents`, so that it learns to
    decode latents near, not only at, the encoder's, as the mapping network's predictions are; validation decodes them
    as they are."""
    if kind == "image":
        if noise:
            raise PpcmiError("autoencoder_loss: latent noise is for the mask autoencoder only")
        return lambda model, batch: bce_dice_loss(model(batch[0]), batch[0])
    if kind == "mask":
        def loss(model, batch):
            z = model.encode(batch[0])
            return mask_loss(model.decode_logits(noisy_latents(z, noise) if noise and model.training else z), batch[0])

        return loss
    raise PpcmiError(f"autoencoder_loss: kind must be 'image' or 'mask', got {kind!r}")
