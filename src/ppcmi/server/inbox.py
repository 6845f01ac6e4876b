"""The coordinator's inbox (coordinator side): the hospitals' training sets, checked, and their rows read on demand.

A hospital sends its keyed training pairs as a numbered set of ``train`` chunks (:mod:`ppcmi.protocol`).
:func:`open_sets` takes chunk files (or folders of them) in any order, checks every chunk once in full
(:func:`ppcmi.protocol.decode`: names, dtypes, shapes, finiteness, size) and each hospital's set as a whole
(:func:`ppcmi.protocol.check_set`: no chunk repeated, none missing, one set per hospital), and keeps only
where each chunk's arrays lie in its file. Stage 2 then reads the rows of a batch from disk as it needs
them (:class:`Column`), so the coordinator never holds every latent of every hospital in one array:
its memory is bounded by a chunk while checking and by a batch while training.

Messages already in memory (:class:`~ppcmi.protocol.LatentBatch`) go through the same path
(:func:`sets_from_batches`), so a set gives the same rows, in the same order, from disk or from memory.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .. import protocol
from ..errors import PpcmiError, ProtocolError
from ..models import SCALES

CHUNK_SUFFIX = ".ppcmi"


class _Files:
    """Open chunk files shared by the columns of one pool, at most ``limit`` at a time (least recently used closed)."""

    def __init__(self, limit: int = 64):
        self.limit, self.open = limit, OrderedDict()

    def get(self, path: Path):
        f = self.open.pop(path, None)
        if f is None:
            if len(self.open) >= self.limit:
                self.open.popitem(last=False)[1].close()
            f = open(path, "rb")
        self.open[path] = f
        return f

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1].close()

    def __getstate__(self) -> dict:  # a loader worker started by spawn opens its own files
        return {"limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.limit, self.open = state["limit"], OrderedDict()


def _pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes from ``offset`` (fewer only at the end of the file). ``os.pread`` keeps no shared file position, so
    training-loader workers forked with these files open cannot move each other's reads."""
    parts, got = [], 0
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


@dataclass
class _FilePiece:
    """Rows of one array in one chunk file: ``n`` rows of ``row_bytes`` from byte ``offset``."""

    path: Path
    offset: int
    n: int
    row_shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, rows: np.ndarray, handles: _Files) -> np.ndarray:
        f = handles.get(self.path)
        width = self.dtype.itemsize * int(np.prod(self.row_shape))
        out = np.empty((len(rows),) + self.row_shape, np.float32)
        # one read per run of consecutive rows
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            buf = _pread(f.fileno(), width * (j - i), self.offset + int(rows[i]) * width)
            if len(buf) != width * (j - i):
                raise ProtocolError(f"{self.path}: shorter than its header says (changed after it was checked?)")
            out[i:j] = np.frombuffer(buf, self.dtype).reshape((j - i,) + self.row_shape)
            i = j
        return out


@dataclass
class _MemPiece:
    array: np.ndarray

    @property
    def n(self) -> int:
        return self.array.shape[0]

    def read(self, rows: np.ndarray, handles: _Files) -> np.ndarray:
        return np.asarray(self.array[rows], dtype=np.float32)


@dataclass
class TrainingSet:
    """One hospital's checked training set: per array name, its pieces (one per chunk, in index order)."""

    client: str
    set_id: str
    n: int
    shapes: dict[str, tuple[int, int, int]]  # array name -> (C, H, W)
    pieces: dict[str, list] = field(repr=False)
    chunks: int = 1
    nbytes: int = 0

    def scales(self, prefix: str) -> dict[str, tuple[int, int, int]]:
        return {name[len(prefix):]: s for name, s in self.shapes.items() if name.startswith(prefix)}


class Column:
    """One array (e.g. ``zt_img_s3``) of the pooled rows of several sets, read row by row when indexed.

    ``column[idx]`` (a LongTensor or integer array of pooled row numbers) returns a float32 tensor
    (len(idx), C, H, W) holding exactly the values the sets carry; ``column.subset(idx)`` is a lazy view."""

    def __init__(self, pieces: list, row_shape: tuple[int, ...], view: np.ndarray | None = None, files: _Files | None = None):
        self.pieces = pieces
        self.row_shape = tuple(row_shape)
        self.starts = np.cumsum([0] + [p.n for p in pieces])
        self.view = view
        self._handles = files if files is not None else _Files()

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.starts[-1]) if self.view is None else len(self.view),) + self.row_shape

    def __len__(self) -> int:
        return self.shape[0]

    def subset(self, idx) -> Column:
        idx = np.asarray(idx, np.int64)
        return Column(self.pieces, self.row_shape, idx if self.view is None else self.view[idx], self._handles)

    def numpy(self, idx=None) -> np.ndarray:
        rows = np.arange(len(self), dtype=np.int64) if idx is None else np.asarray(idx, np.int64).reshape(-1)
        if self.view is not None:
            rows = self.view[rows]
        out = np.empty((len(rows),) + self.row_shape, np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            order = sel[np.argsort(rows[sel], kind="stable")]
            local = rows[order] - self.starts[k]
            out[order] = self.pieces[k].read(local, self._handles)
        return out

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        return torch.from_numpy(self.numpy(idx))

    def close(self) -> None:
        """Close the chunk files this column (and the other columns of its pool) has open; a later read reopens them."""
        self._handles.close()


def chunk_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Chunk files named directly, or every ``*.ppcmi`` file in a folder named (a set written by ``client encode``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(CHUNK_SUFFIX) and not q.name.startswith("."))
            if not found:
                raise PpcmiError(f"{p}: no '*{CHUNK_SUFFIX}' chunk files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PpcmiError(f"{p}: no such file or folder")
    return files


def open_sets(paths: Sequence[str | os.PathLike], *, max_bytes: int = protocol.MAX_BYTES) -> list[TrainingSet]:
    """Check the chunk files (any order; folders are expanded) and group them into one set per hospital.

    Every chunk is decoded and checked in full once (one chunk in memory at a time); a repeated or missing
    chunk, a chunk of a second set from the same hospital, or chunks with different latent layouts are
    refused in one line naming the file. The sets come back sorted by site id."""
    by_client: dict[str, list[tuple[Path, protocol.Header]]] = {}
    for f in chunk_files(paths):
        try:
            head = protocol.read_header(f, max_bytes=max_bytes)
            protocol.decode(f.read_bytes(), max_bytes=max_bytes)  # the full check: finiteness and all
        except PpcmiError as e:
            raise PpcmiError(f"{f}: {e}") from None
        if head.kind != "train":
            raise ProtocolError(f"{f}: a {head.kind!r} message, not a 'train' chunk")
        by_client.setdefault(head.client, []).append((f, head))
    sets = []
    for client in sorted(by_client):
        items = by_client[client]
        ordered = protocol.check_set([h for _, h in items], [str(f) for f, _ in items])
        path_of = {id(h): f for f, h in items}
        names = list(ordered[0].shapes)
        pieces: dict[str, list] = {k: [] for k in names}
        for h in ordered:
            f = path_of[id(h)]
            if sorted(h.shapes) != sorted(names) or any(h.shapes[k][1:] != ordered[0].shapes[k][1:] for k in names):
                raise ProtocolError(f"{f}: carries other arrays or shapes than chunk 0 of its set")
            for k in names:
                pieces[k].append(_FilePiece(f, h.offsets[k][0], h.n, tuple(h.shapes[k][1:]),
                                            np.dtype(np.float32 if h.dtype == "F32" else np.float16)))
        n = sum(h.n for h in ordered)
        nbytes = sum(path_of[id(h)].stat().st_size for h in ordered)
        sets.append(TrainingSet(client, ordered[0].set_id, n, {k: tuple(ordered[0].shapes[k][1:]) for k in names}, pieces,
                                chunks=len(ordered), nbytes=nbytes))
    return sets


def read_set(path: str | os.PathLike, *, max_bytes: int = protocol.MAX_BYTES) -> protocol.LatentBatch:
    """One hospital's training set (a chunk folder, or one message file) as one message in memory (for the
    adapter re-fit of one hospital after a key rotation)."""
    files = chunk_files([path])
    chunks = []
    for f in files:
        try:
            chunks.append(protocol.decode(Path(f).read_bytes(), max_bytes=max_bytes))
        except PpcmiError as e:
            raise PpcmiError(f"{f}: {e}") from None
    try:
        return protocol.assemble(chunks)
    except PpcmiError as e:
        raise PpcmiError(f"{path}: {e}") from None


def sets_from_batches(batches: Sequence[protocol.LatentBatch]) -> list[TrainingSet]:
    """In-memory messages as sets, sorted by site id: a hospital's chunks (any order) are checked as a set;
    its whole (unchunked) messages are taken in the order given, as stage 2 always did."""
    by_client: dict[str, list[protocol.LatentBatch]] = {}
    for b in batches:
        if b.kind != "train":
            raise ProtocolError(f"kind: expected 'train' messages for mapping training, got {b.kind!r} from {b.client!r}")
        by_client.setdefault(b.client, []).append(b)
    sets = []
    for client in sorted(by_client):
        group = by_client[client]
        if any(b.set_id for b in group):
            group = protocol.check_set(group)
        names = list(group[0].arrays)
        for b in group[1:]:
            if sorted(b.arrays) != sorted(names):
                raise ProtocolError(f"arrays: {client!r} sent messages with different arrays")
        pieces = {k: [_MemPiece(b.arrays[k]) for b in group] for k in names}
        sets.append(TrainingSet(client, group[0].set_id, sum(b.n for b in group),
                                {k: tuple(int(d) for d in group[0].arrays[k].shape[1:]) for k in names}, pieces,
                                chunks=len(group), nbytes=sum(b.nbytes() for b in group)))
    return sets


def pool_sets(sets: Sequence[TrainingSet]) -> tuple[list[str], dict[str, tuple], dict[str, tuple], list]:
    """Check that every hospital sent the same latent layout and pool the rows, hospitals in the order given.

    Returns (hospitals, image shapes, mask shapes, columns) where columns are [client index tensor,
    img_<scale>..., msk_<scale>...] indexed together along dim 0 (the latents as :class:`Column`)."""
    if not sets:
        raise ProtocolError("inbox: no training messages received")
    img_shapes, mask_shapes = sets[0].scales("zt_img_"), sets[0].scales("zt_msk_")
    clients: list[str] = []
    for s in sets:
        if s.scales("zt_img_") != img_shapes or s.scales("zt_msk_") != mask_shapes:
            raise ProtocolError(f"arrays: latent shapes from {s.client!r} differ from the other hospitals'")
        if s.client in clients:
            raise ProtocolError(f"client: two training sets from {s.client!r}")
        clients.append(s.client)
    scales = [sc for sc in SCALES if sc in img_shapes]
    cid = torch.cat([torch.full((s.n,), i, dtype=torch.long) for i, s in enumerate(sets)])
    cols: list = [cid]
    files = _Files()
    for prefix, shapes in (("zt_img_", img_shapes), ("zt_msk_", mask_shapes)):
        for sc in scales:
            cols.append(Column([p for s in sets for p in s.pieces[prefix + sc]], shapes[sc], files=files))
    return clients, img_shapes, mask_shapes, cols


def row_blocks(col: Column, rows: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """The rows ``rows`` of ``col`` as float32 arrays of at most ``block`` rows each."""
    for i in range(0, len(rows), block):
        yield col.numpy(rows[i:i + block])


__all__ = ["CHUNK_SUFFIX", "Column", "TrainingSet", "chunk_files", "open_sets", "read_set", "sets_from_batches", "pool_sets", "row_blocks"]
