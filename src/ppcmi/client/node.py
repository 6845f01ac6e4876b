"""A hospital's SuperNode work (hospital side), free of any framework: each request answered from local folders.

A SuperNode is started with a ``node_config`` naming only local things; none of it is ever sent::

    site-dir   the hospital's site folder (klt.key, site.json, autoencoders); created if missing
    data-dir   its training data in the images/ + masks/ layout
    test-dir   optional: held-out images/ + masks/ for the evaluation round
    name       its site id (the protocol's ``client``); must match site.json when that exists
    threads    optional: torch threads for this node's work
    device     optional: where this node computes, auto (default: CUDA, then MPS, then the CPU), cpu, cuda, cuda:N
               or mps (:func:`ppcmi.device.resolve_device`); each hospital its own, never a shared setting
    seed       optional: this hospital's site seed (split and batch order; :mod:`ppcmi.client.stages`)
    send-noise optional: ``autoencoder.send_noise``, the noise it adds to its latents before they leave
               (a hospital setting: :func:`ppcmi.config.reader`)
    modality   optional: CT, MR, US, ... where the data (dataset.json, DICOM headers) do not say it

What leaves is the :class:`~ppcmi.protocol.Fingerprint` of its training data (aggregates only), a
:class:`~ppcmi.protocol.LatentBatch` of keyed latents, the numbers of stage 1
(epochs, seconds, number of training images) and a metric summary; the key, file names, case ids
and per-case results stay here (per-case results in ``site-dir/eval/<tag>/``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import protocol
from ..config import Config
from ..data import Case, discover_cases
from ..device import resolve_device
from ..labels import LabelMap, parse_labels
from ..errors import PpcmiError
from ..fileio import atomic_write_json, ensure_dir, read_record
from ..metrics import evaluate_cases, summarize, write_evaluation
from ..protocol import CLIENT_RE, Fingerprint, LatentBatch
from . import stages
from .site import Hospital
from .stages import default_site_seed

log = logging.getLogger(__name__)

OUTBOX = "outbox/train"  # the chunks of the training set this site sends in stage 2
PENDING = "eval/query.json"  # the query id and key fingerprint of the test query this site last sent
_KEYS = {"site-dir", "data-dir", "test-dir", "name", "threads", "seed", "send-noise", "modality", "device"}


@dataclass(frozen=True)
class NodeSite:
    """What a SuperNode's ``node_config`` names (see the module docstring)."""

    site_dir: Path
    data_dir: Path
    name: str
    test_dir: Path | None = None
    threads: int | None = None
    seed: int | None = None
    send_noise: float = 0.0
    modality: str | None = None
    device: str = "auto"

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> NodeSite:
        unknown = sorted(set(nc) - _KEYS)
        if unknown:
            raise PpcmiError(f"node_config: unknown keys {unknown}; allowed {sorted(_KEYS)}")
        for k in ("site-dir", "data-dir", "name"):
            if not isinstance(nc.get(k), str) or not nc[k]:
                raise PpcmiError(f"node_config: {k} must be given as a string (e.g. --node-config '{k}=\"...\"')")
        if not CLIENT_RE.match(nc["name"]):
            raise PpcmiError(f"node_config: name {nc['name']!r} is not a valid site id (letters, digits, '_', '.', '-'; at most 64)")
        threads = nc.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise PpcmiError(f"node_config: threads must be a positive integer, got {threads!r}")
        seed = nc.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise PpcmiError(f"node_config: seed must be a non-negative integer, got {seed!r}")
        noise = nc.get("send-noise", 0.0)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise PpcmiError(f"node_config: send-noise must be a number >= 0, got {noise!r}")
        modality = nc.get("modality")
        if modality is not None and (not isinstance(modality, str) or not modality):
            raise PpcmiError(f"node_config: modality must be a name such as CT, MR or US, got {modality!r}")
        device = nc.get("device", "auto")
        resolve_device(device, where="node_config: device")  # a device this machine lacks fails here, in one line
        test = nc.get("test-dir")
        return cls(Path(nc["site-dir"]), Path(nc["data-dir"]), nc["name"], Path(test) if test else None, threads, seed, float(noise),
                   modality, device)

    def settings(self, cfg: Config) -> Config:
        """The run configuration (shared settings) with this hospital's own settings applied."""
        return replace(cfg, autoencoder=replace(cfg.autoencoder, send_noise=self.send_noise))

    def site_seed(self, cfg: Config) -> int:
        return self.seed if self.seed is not None else default_site_seed(cfg.seed, self.name)

    def hospital(self) -> Hospital:
        h = Hospital(self.site_dir, device=self.device)
        if h.name != self.name:
            raise PpcmiError(f"{self.site_dir / 'site.json'}: belongs to site {h.name!r}, not {self.name!r}")
        return h


def labels_of(cfg: Config) -> LabelMap:
    """The shared label map: every hospital must use the same classes, so it comes from the run config."""
    lm = parse_labels(cfg.data.labels, cfg.data.class_names)
    if lm is None:
        raise PpcmiError("data.labels: must be set in the run configuration (e.g. 0,1) so that every hospital uses the same classes")
    return lm


def cases_of(folder: Path, cfg: Config) -> list[Case]:
    """The cases of one of this hospital's folders, with the shared classes: RTSTRUCT masks need ``data.rois`` in the
    run configuration, as each hospital's own default (its ROIs, sorted) could give its classes other meanings."""
    cases = discover_cases(folder, rois=cfg.data.roi_names())
    if cfg.data.rois is None and cases and cases[0].rois:
        raise PpcmiError(f"data.rois: {cases[0].mask_path} is an RTSTRUCT; the run configuration must name its ROIs in class "
                         f"order (e.g. --set data.rois={','.join(cases[0].rois)}) so that every hospital uses the same classes")
    return cases


def _arrays(folder: Path, cfg: Config, *, native: bool = False) -> dict:
    return stages.prepare(cases_of(folder, cfg), cfg, labels_of(cfg), native=native)


def _trained(node: NodeSite) -> bool:
    s = node.site_dir
    return all((s / p).exists() for p in ("site.json", "image_ae/model.safetensors", "mask_ae/model.safetensors"))


def fingerprint(node: NodeSite, cfg: Config) -> Fingerprint:
    """The fingerprint of this hospital's training data (:func:`ppcmi.client.stages.fingerprint`)."""
    return stages.fingerprint(cases_of(node.data_dir, cfg), cfg, labels_of(cfg), client=node.name,
                              modality=node.modality, data_dir=node.data_dir)


def train_autoencoders(node: NodeSite, cfg: Config) -> dict[str, Any]:
    """Stage 1 on this hospital's data only (or report the autoencoders it already has).

    Creates the key on first use. An interrupted run continues from its last completed epoch.
    Returns ``{"status": "trained" | "existing", "image_epochs", "mask_epochs", "seconds", "n_train"}``.
    """
    site = node.site_dir
    ensure_dir(site)
    if (site / "site.json").exists():
        meta = read_record(site / "site.json", "site record")
        owner = meta.get("site", str)
        if owner != node.name:
            raise PpcmiError(f"{site / 'site.json'}: belongs to site {owner!r}, not {node.name!r}")
    if _trained(node):
        runs = {k: read_record(p, "autoencoder record").get("epochs_run", int)
                for k, p in ((k, site / f"{k}_ae" / "config.json") for k in ("image", "mask"))}
        return {"status": "existing", "image_epochs": runs["image"], "mask_epochs": runs["mask"],
                "seconds": 0.0, "n_train": meta.get("n_train", int)}
    arr = _arrays(node.data_dir, cfg)
    res = stages.train_autoencoders(site, node.name, arr, cfg, labels_of(cfg), seed=node.site_seed(cfg), resume=True, progress=False,
                                    device=node.device)
    return {"status": "trained", "image_epochs": len(res["image"].history), "mask_epochs": len(res["mask"].history),
            "seconds": float(sum(r.seconds for r in res.values())), "n_train": int(len(arr["images"]))}


def train_latents(node: NodeSite, cfg: Config, index: int = 0, set_id: str = "", chunk_bytes: int = protocol.CHUNK_BYTES) -> LatentBatch:
    """Stage 2: chunk ``index`` of the set of keyed latent pairs of this hospital's training data (plus augmented
    copies). Chunk 0 encodes the whole set, chunk by chunk, into ``site-dir/outbox/train/`` (replacing an earlier
    one) and answers with its first chunk; a later chunk is read from there and must belong to set ``set_id``."""
    box = node.site_dir / OUTBOX
    if index == 0:
        if box.exists():
            shutil.rmtree(box)
        stages.write_training_set(stages.training_chunks(node.hospital(), _arrays(node.data_dir, cfg), node.settings(cfg),
                                                         target=chunk_bytes), box)
    path = box / protocol.chunk_name(index)
    if not path.exists():
        raise PpcmiError(f"{path}: no such chunk in this site's outbox (asked for chunk {index} of set {set_id or '(new)'})")
    msg = protocol.decode(path.read_bytes())
    if index and msg.set_id != set_id:
        raise PpcmiError(f"{path}: belongs to set {msg.set_id}, not to the set {set_id} the coordinator asked for")
    return msg


def test_latents(node: NodeSite, cfg: Config) -> LatentBatch | None:
    """Keyed latents of this hospital's test images, in a fixed order; None without a test folder."""
    if node.test_dir is None:
        return None
    h = node.hospital()
    q = stages.query(h, _arrays(node.test_dir, cfg)["images"], noise=node.send_noise)
    # the hospital's record of the query it sent, so that only its own reply is scored
    atomic_write_json(node.site_dir / PENDING, {"query": q.query, "key": h.key_fingerprint, "n": q.n})
    return q


def score(node: NodeSite, cfg: Config, reply: LatentBatch, out: str | Path) -> dict:
    """Decode the server's reply to :func:`test_latents` and score it against the local masks at their native
    resolution (the predictions restored to each plane's grid, :meth:`Hospital.segment`).

    Writes ``per_case.csv`` and ``summary.json`` into ``out`` (at the hospital) and returns the summary.
    """
    if node.test_dir is None:
        raise PpcmiError("node_config: test-dir is not set, so this site has nothing to score")
    h = node.hospital()
    pending = node.site_dir / PENDING
    if not pending.is_file():
        raise PpcmiError(f"{pending}: no record of a query sent by this site; nothing to score")
    sent = read_record(pending, "record of the query sent").raw
    if reply.query != sent.get("query") or reply.client != node.name:
        raise PpcmiError(f"reply: answers query {reply.query or '(no id)'} for {reply.client!r}, not this site's query {sent.get('query')}")
    if sent.get("key") != h.key_fingerprint:
        raise PpcmiError(f"{pending}: the query was encoded under another key than this site's current one")
    test = _arrays(node.test_dir, cfg, native=True)
    if reply.n != len(test["images"]) or reply.n != sent.get("n"):
        raise PpcmiError(f"reply: {reply.n} predictions for {len(test['images'])} test images")
    lm = labels_of(cfg)
    preds = h.segment(reply, test["geometries"])
    rows = evaluate_cases(preds, test["native_masks"], test["case_ids"], lm.n_classes, spacings=test["native_spacings"],
                          class_names=list(lm.names), extra=[{"site": node.name}] * len(preds))
    summ = summarize(rows)
    write_evaluation(rows, summ, out)
    log.info("%s: scored %d test images, merged-foreground Dice %.4f", node.name, len(rows),
             float(np.nanmean([r["fg_dice"] for r in rows])))
    return summ
