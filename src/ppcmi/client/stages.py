"""A hospital's stages, defined once (hospital side): fingerprint its training data, prepare it, train its
autoencoders, send its keyed training pairs. ``ppcmi client train``, ``simulate`` (and so ``demo`` and ``bench``), the Flower SuperNode and
the audit's reference runs all call these, so one configuration and one seed train one model whatever runs it.

Seeds. The shared ``seed`` of the run configuration sets the initial weights at every hospital (a public
seed; hospitals that start alike keep their latent spaces close) and the draws of augmented copies and
latent noise for stage 2. The split and the batch order of a hospital's own training come from its *site
seed*, a hospital setting: a real hospital may choose it (``ppcmi client train --seed``, ``seed`` in a
SuperNode's ``node_config``); by default it is :func:`default_site_seed` of the site id. An experiment that
deals one dataset to hospitals numbers them and gives hospital ``i`` the seed :func:`site_seed` ``(seed, i)``;
``simulate`` and ``deploy`` both do, so they train the same autoencoders.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Config
from ..data import Case, load_arrays
from ..device import Device
from ..data.fingerprint import compute_fingerprint, dataset_modality, normalise_modality
from ..errors import DataError
from ..labels import LabelMap
from ..protocol import CHUNK_BYTES, Fingerprint, LatentBatch
from ..fileio import ensure_dir
from ..training import FitResult
from .keys import key_path, keygen
from .site import Hospital, train_site


def site_seed(seed: int, index: int) -> int:
    """The site seed of the ``index``-th (from 0) hospital of an experiment run with the shared ``seed``."""
    return seed + 17 * index


def default_site_seed(seed: int, name: str) -> int:
    """The site seed of a hospital that chose none: from the shared seed and its site id."""
    return seed + zlib.crc32(name.encode("utf-8")) % 100_003


def ensure_key(site_dir: str | Path) -> Path:
    """The hospital's key file, created (32 random bytes, mode 0600) if the site has none yet."""
    site = Path(site_dir)
    ensure_dir(site)
    return key_path(site) if key_path(site).exists() else keygen(key_path(site))


def fingerprint(cases: Sequence[Case], cfg: Config, labels: LabelMap, *, client: str, modality: str | None = None,
                data_dir: str | Path | None = None) -> Fingerprint:
    """The hospital's fingerprint of its training ``cases`` (aggregates only; see :class:`ppcmi.protocol.Fingerprint`).

    ``modality`` (``--modality CT|MR|US|...``) wins; otherwise the data's own record (``data_dir/dataset.json``,
    a DICOM header), else "UNKNOWN". Intensities are counted after ``data.offset``. A hospital whose masks are
    all background is an error naming its masks' folder: it has nothing to teach a mask autoencoder."""
    found = normalise_modality(modality) if modality else dataset_modality(data_dir, cases)
    fp = compute_fingerprint(cases, labels, client=client, modality=found, offset=cfg.data.offset)
    if fp.n_fg_planes == 0:
        folders = sorted({str(c.mask_path.parent) for c in cases})
        raise DataError(f"{', '.join(folders)}: all {fp.n_planes} training masks of {client} are empty (background only under "
                        f"data.labels={','.join(str(v) for v in labels.values)}); check the masks or data.labels")
    return fp


def prepare(cases: Sequence[Case], cfg: Config, labels: LabelMap, *, progress: bool = False, native: bool = False) -> dict:
    """A hospital's cases as network inputs under the shared preprocessing (see :func:`ppcmi.data.load_arrays`;
    ``native`` also keeps the native masks and spacings that predictions are scored against)."""
    return load_arrays(cases, cfg.data.preprocess(), labels, progress=progress, native=native)


def train_autoencoders(site_dir: str | Path, name: str, arrays: dict, cfg: Config, labels: LabelMap, *, seed: int,
                       resume: bool = False, overwrite: bool = False, progress: bool = True,
                       create_key: bool = True, device: Device = None) -> dict[str, FitResult]:
    """Stage 1 on this hospital's data only: its image and mask autoencoders (and, with ``create_key``, a
    key on first use; without it a missing key is an error, as ``ppcmi client train`` wants ``keygen`` first).

    ``seed`` is the hospital's site seed (split and batch order); the initial weights come from the
    shared ``cfg.seed``. ``overwrite`` trains them again from scratch (see :func:`ppcmi.client.site.train_site`).
    ``device`` is this hospital's own choice of where to train (:func:`ppcmi.device.resolve_device`), never a shared setting."""
    site = Path(site_dir)
    ensure_dir(site)
    if create_key:
        ensure_key(site)
    return train_site(site, name, arrays["images"], arrays["masks"], n_classes=labels.n_classes,
                      labels={"values": list(labels.values), "names": list(labels.names)}, data_cfg=cfg.data,
                      ae_cfg=cfg.autoencoder, klt=cfg.klt, seed=seed, init_seed=cfg.seed, resume=resume, overwrite=overwrite,
                      progress=progress, device=device)


def training_batch(hospital: Hospital, arrays: dict, cfg: Config, *, dtype=np.float32) -> LatentBatch:
    """Stage 2's message from this hospital: keyed image/mask latent pairs, each pair plus
    ``autoencoder.send_copies - 1`` augmented copies, with ``autoencoder.send_noise`` on the plain latents
    (copies and noise drawn from the shared ``seed``)."""
    return hospital.training_batch(arrays["images"], arrays["masks"], dtype=dtype, copies=cfg.autoencoder.send_copies,
                                   noise=cfg.autoencoder.send_noise, seed=cfg.seed)


def training_chunks(hospital: Hospital, arrays: dict, cfg: Config, *, dtype=np.float32, target: int | None = CHUNK_BYTES,
                    set_id: str | None = None):
    """:func:`training_batch` as a set of ``train`` chunks of at most about ``target`` bytes each (an iterator:
    each chunk is encoded when it is asked for, so the hospital holds one chunk's latents at a time)."""
    return hospital.training_chunks(arrays["images"], arrays["masks"], dtype=dtype, copies=cfg.autoencoder.send_copies,
                                    noise=cfg.autoencoder.send_noise, seed=cfg.seed, target=target, set_id=set_id)


def write_training_set(chunks, folder: str | Path) -> tuple[int, int, int]:
    """Write a set of chunks (any iterable of ``train`` messages of one set) into the new folder ``folder``, as one
    atomic, no-overwrite commit; returns (rows, bytes, chunks)."""
    from .. import protocol
    from ..fileio import atomic_write_folder

    totals = [0, 0, 0]

    def files():
        for c in chunks:
            blob = protocol.encode(c)
            totals[0] += c.n
            totals[1] += len(blob)
            totals[2] += 1
            yield protocol.chunk_name(c.index), blob

    atomic_write_folder(folder, files())
    return totals[0], totals[1], totals[2]


def query(hospital: Hospital, images: np.ndarray, *, noise: float, start: int = 0, dtype=np.float32) -> LatentBatch:
    """A query message for ``images``, rows ``start``, ``start + 1``, ... of the hospital's list, with
    ``noise`` (its ``autoencoder.send_noise``) on the plain latents, drawn from seed ``1000 + start``."""
    return hospital.protect(images, dtype=dtype, noise=noise, seed=1000 + start)
