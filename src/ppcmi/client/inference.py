"""Hospital-side file workflows: encode a folder into a message, decode a reply into label maps, predict, evaluate.

Everything that names a file or a patient stays here: a query message carries only keyed
latents, and the list of which case each row belongs to is kept beside it in a local
``<message>.cases.json`` that never leaves the hospital. The case list records the query's random
id and the fingerprint of the key it was encoded under; a reply echoes the id, and decoding refuses a
reply, case list or key that do not belong together, so a result can only land on its own patients. Label maps keep
the input's geometry (:mod:`ppcmi.data.writers`): PNG for 2D images, NIfTI for NIfTI, MHA for MetaImage, NRRD for
NRRD, and for DICOM a NIfTI on the series geometry plus a DICOM SEG that references the source instances. They are
on each plane's native grid: the mask decoder's class probabilities lose the padding and are resampled to the
plane before the argmax (:func:`ppcmi.data.restore_labels`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import protocol
from ..data import (IMAGE_EXTS, LabelMap, PlaneGeometry, Preprocess, dicom_rt_series, discover_cases, n_slices, nnunet_test_images,
                    output_format, output_names, plane_geometry, prepare_image, read_case_mask, read_image, read_mask,
                    render_prediction)
from ..device import Device
from ..errors import DataError, PpcmiError
from ..fileio import Record, atomic_write_bytes, atomic_write_json, ensure_dir, read_json, refuse_existing, write_files
from . import stages
from .site import Hospital

log = logging.getLogger(__name__)


def label_map_of(h: Hospital) -> LabelMap:
    return h.label_map


def _stem(p: Path) -> str:
    name = p.name
    for ext in sorted(IMAGE_EXTS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _is_image(p: Path) -> bool:
    return p.is_dir() or any(p.name.lower().endswith(e) for e in IMAGE_EXTS)


def list_inputs(paths: Sequence[Path]) -> list[dict]:
    """Expand image files, DICOM series folders and dataset folders (``images/``, an nnU-Net raw
    dataset's ``imagesTs/`` with its ``CASE_0000``, ``CASE_0001``, ... channels as one image, or a
    DICOM-RT export's series named after their patient folders) into planes
    to segment. A plane is ``{"source", "slice_index", "stem", "format"}`` plus ``"channels"`` (every
    channel file, ``source`` first) for an image stored one file per channel."""
    items: list[tuple[Path, tuple[Path, ...], str]] = []  # (source, channel files or (), stem)
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if p.is_dir() and not (p / "images").is_dir() and (p / "imagesTs").is_dir():
            items += [(ch[0], ch if len(ch) > 1 else (), case) for case, ch in nnunet_test_images(p)]
            continue
        rt = dicom_rt_series(p) if p.is_dir() and not (p / "images").is_dir() else []
        if rt:  # a DICOM-RT export: each patient's image series, named after the patient folder
            items += [(series, (), patient) for patient, series in rt]
            continue
        if p.is_dir() and (p / "images").is_dir():
            found = sorted(q for q in (p / "images").iterdir() if _is_image(q) and not q.name.startswith("."))
        elif p.is_dir() and not any(q.suffix.lower() in (".dcm", "") and q.is_file() for q in p.iterdir()):
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_image(q) and not q.name.startswith("."))
        else:
            found = [p]
        items += [(f, (), _stem(f)) for f in found]
    if not items:
        raise DataError(f"{', '.join(map(str, paths))}: no images found")
    planes = []
    for f, channels, stem in items:
        n = n_slices(f)
        fmt = output_format(f)  # what write_prediction will write: png, nifti, mha, nrrd or dicom (NIfTI + SEG)
        for k in ([None] if n is None else range(n)):
            plane = {"source": str(f), "slice_index": k, "stem": stem, "format": fmt}
            if channels:
                plane["channels"] = [str(c) for c in channels]
            planes.append(plane)
    return planes


def _load_planes(planes: list[dict], prep: Preprocess) -> np.ndarray:
    out = np.empty((len(planes), 3 if prep.color == "rgb" else 1, prep.size, prep.size), np.float32)
    for i, pl in enumerate(planes):
        img, spacing = read_image([Path(c) for c in pl["channels"]] if pl.get("channels") else Path(pl["source"]),
                                  pl["slice_index"])
        if not np.isfinite(img).all():
            raise DataError(f"{pl['source']}: image has NaN/Inf values")
        if img.shape[0] not in (1, 3):
            raise DataError(f"{pl['source']}: image has {img.shape[0]} channels; the networks take 1 (gray) or 3 (rgb)")
        pl["original_shape"] = list(img.shape[1:])
        pl["spacing"] = None if spacing is None else [float(v) for v in spacing]
        out[i] = prepare_image(img, prep, _geometries([pl], prep)[0])
    return out


def encode_folder(site_dir: Path, data: Path, out: Path, *, with_masks: bool = False, float16: bool = False,
                  noise: float | None = None, copies: int | None = None, chunk_bytes: int = protocol.CHUNK_BYTES,
                  device: Device = None) -> tuple[int, int]:
    """Write a query (images) message, or a train set (image+mask pairs, plus ``copies - 1`` augmented copies),
    plus the local case list; returns (N, bytes). ``copies`` and ``noise`` default to the site's own
    ``autoencoder.send_copies`` and ``autoencoder.send_noise`` (the settings it was trained with), so the
    message is the one ``simulate`` sends for the same configuration (:mod:`ppcmi.client.stages`).

    A train set is the new folder ``out`` holding chunks ``chunk-00000.ppcmi`` ... of at most about
    ``chunk_bytes`` each (``ppcmi server train`` takes the folder), encoded and written one chunk at a time
    and committed as a whole by one rename; the case list ``out.cases.json`` stays beside it. ``device``: where the
    encoders run (:class:`~ppcmi.client.site.Hospital`)."""
    h = Hospital(site_dir, device=device)
    prep = h.data_cfg.preprocess()
    dtype = np.float16 if float16 else np.float32
    ae = h.settings.autoencoder
    cfg = replace(h.settings, autoencoder=replace(ae, send_copies=ae.send_copies if copies is None else copies,
                                                  send_noise=ae.send_noise if noise is None else noise))
    record = Path(str(out) + ".cases.json")
    if out.exists():
        raise PpcmiError(f"{out}: already exists; refusing to overwrite it")
    if record.exists():
        raise PpcmiError(f"{record}: already exists; refusing to overwrite it (it binds an earlier query to its patients)")
    if with_masks:
        cases = discover_cases(data, group_regex=h.data_cfg.group_regex, group_csv=h.data_cfg.group_csv,
                               rois=h.data_cfg.roi_names())
        arr = stages.prepare(cases, cfg, label_map_of(h))
        set_id = protocol.new_set_id()
        local = {"kind": "train", "site": h.name, "query": "", "set": set_id, "key": h.key_fingerprint,
                 "copies": cfg.autoencoder.send_copies, "cases": [{"case_id": c} for c in arr["case_ids"]]}
        atomic_write_json(record, local, overwrite=False)
        try:
            n, nbytes, _ = stages.write_training_set(stages.training_chunks(h, arr, cfg, dtype=dtype, target=chunk_bytes,
                                                                            set_id=set_id), out)
        except BaseException:
            record.unlink(missing_ok=True)  # the set was not written: neither is its case list
            raise
        return n, nbytes
    planes = list_inputs([data])
    msg = stages.query(h, _load_planes(planes, prep), noise=cfg.autoencoder.send_noise, dtype=dtype)
    blob = protocol.encode(msg)
    local = {"kind": msg.kind, "site": h.name, "query": msg.query, "key": h.key_fingerprint, "cases": planes}
    atomic_write_json(record, local, overwrite=False)
    try:
        atomic_write_bytes(out, blob, overwrite=False)
    except BaseException:
        record.unlink(missing_ok=True)  # the message was not written: neither is its case list
        raise
    return msg.n, len(blob)


def rotate_and_encode(site_dir: Path, data: Path, out: Path, *, copies: int | None = None,
                      noise: float | None = None, device: Device = None) -> tuple[Path, Path, int, int]:
    """Replace the site's key and encode its training set under the new one (``client rotate-key``).

    Both outputs are checked before the key is touched, and if encoding fails the old key is put back,
    so a refusal never leaves a site whose key changed without the message the server needs to follow."""
    from .keys import rotate_key, undo_rotation

    Hospital(site_dir)  # fail before touching the key if the site is not trained
    refuse_existing([out, Path(str(out) + ".cases.json")])
    ensure_dir(Path(out).parent)
    new, backup = rotate_key(site_dir)
    try:
        n, size = encode_folder(site_dir, data, out, with_masks=True, copies=copies, noise=noise, device=device)
    except BaseException:  # no message under the new key: the old key stays the site's key
        undo_rotation(site_dir, backup)
        raise
    return new, backup, n, size


# the largest plane a case list may name: a label map of this size is resampled in memory (int64, 2 GiB)
MAX_PLANE_PIXELS = 2**28
CASE_FORMATS = ("png", "nifti", "mha", "nrrd", "dicom")  # every output format a case list may name


def _case_list(path: Path) -> dict:
    rec = read_json(path, "case list")
    if isinstance(rec, list):
        raise PpcmiError(f"{path}: a case list from before replies were bound to their query; encode the query again")
    r = Record(rec, path, "case list")
    if r.get("kind", str) != "query":
        raise PpcmiError(f"{path}: not a query case list written by 'ppcmi client encode'")
    for k in ("site", "query", "key"):
        r.get(k, str)
    for i, c in enumerate(r.get("cases", list)):
        case = Record(c, path, "case list", prefix=f"cases[{i}].")
        case.get("source", str, ok=bool, expect="a file name")
        case.get("stem", str)
        case.get("format", str, ok=lambda v: v in CASE_FORMATS, expect=f"one of {', '.join(CASE_FORMATS)}")
        case.get("slice_index", (int, type(None)), default=None, ok=lambda v: v is None or v >= 0,
                 expect="a slice number >= 0 or null")
        case.get("original_shape", list, ok=lambda v: len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                                         for n in v) and v[0] * v[1] <= MAX_PLANE_PIXELS,
                 expect=f"[height, width] in pixels (at most {MAX_PLANE_PIXELS} in all)")
        case.get("spacing", (list, type(None)), default=None,  # (absent in case lists written before target spacings)
                 ok=lambda v: v is None or (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                               and math.isfinite(x) and x > 0 for x in v)),
                 expect="[row_mm, col_mm], both > 0, or null")
    bad = [c["stem"] for c in rec["cases"] if not isinstance(c["stem"], str) or c["stem"] in ("", ".", "..")
           or Path(c["stem"]).name != c["stem"] or "\\" in c["stem"]]
    if bad:
        raise PpcmiError(f"{path}: case name {bad[0]!r} is not a plain file name; label maps are written only inside --out")
    return rec


def _find_case_list(reply: Path, query: str) -> Path:
    """The case list beside ``reply`` that belongs to its query (``--cases`` not given)."""
    found = []
    for p in sorted(Path(reply).parent.glob("*.cases.json")):
        try:
            if json.loads(p.read_text()).get("query") == query:
                found.append(p)
        except (OSError, ValueError, AttributeError):
            continue
    if len(found) != 1:
        raise PpcmiError(f"--cases: {'no' if not found else len(found)} case lists for query {query or '(none)'} beside {reply}; "
                         "give the one 'ppcmi client encode' wrote (QUERY.cases.json)")
    return found[0]


def _geometries(planes: list[dict], prep: Preprocess) -> list[PlaneGeometry]:
    """Each plane's geometry: a function of its native shape and spacing (the case list's ``original_shape`` and
    ``spacing``; a case list written before target spacings existed has no ``spacing``, and its site's settings
    have no ``data.spacing``) and the site's shared preprocessing, so the case list records those two only."""
    return [plane_geometry(pl["original_shape"], prep, pl.get("spacing"), where=str(pl["source"])) for pl in planes]


def label_map_paths(planes: list[dict], out: Path) -> list[Path]:
    """The files each source of ``planes`` is written to (:func:`ppcmi.data.output_names`: ``STEM.png`` for 2D
    images, ``STEM.nii.gz`` for NIfTI, ``STEM.mha``, ``STEM.nrrd``, and for DICOM ``STEM.nii.gz`` + ``STEM.seg.dcm``),
    in order; two sources that would share a file are an error naming it."""
    paths: dict[str, list[Path]] = {}
    for pl in planes:
        if pl["source"] not in paths:
            paths[pl["source"]] = [out / n for n in output_names(pl["source"], pl["stem"])]
    seen: dict[Path, str] = {}
    for source, ps in paths.items():
        for p in ps:
            if p in seen:
                raise PpcmiError(f"{p}: the label maps of {seen[p]} and {source} would both be written here (same file "
                                 "name); segment them into separate --out folders")
            seen[p] = source
    return [p for ps in paths.values() for p in ps]


def check_outputs(planes: list[dict], out: Path, *, overwrite: bool = False) -> list[Path]:
    """Refuse, before any work, label maps that would collide or (without ``overwrite``) replace existing files."""
    paths = label_map_paths(planes, out)
    if not overwrite:
        refuse_existing(paths, OVERWRITE_HINT)
    return paths


OVERWRITE_HINT = " (pass --overwrite to replace earlier label maps)"


def _write_label_maps(planes: list[dict], labels_idx: Sequence[np.ndarray], lmap: LabelMap, out: Path, *,
                      overwrite: bool = False) -> list[Path]:
    """Map each plane's class indices (already on its native grid) to raw label values, and write one label map
    per source with the source's geometry (:func:`ppcmi.data.render_prediction`).

    Every file is rendered first and then written as one step (:func:`ppcmi.fileio.write_files`): an existing file
    is refused before any is written (unless ``overwrite``), so a refusal leaves no label map behind."""
    check_outputs(planes, out, overwrite=overwrite)
    ensure_dir(out)
    values = np.asarray(lmap.values)
    by_source: dict[str, list[tuple[dict, np.ndarray]]] = {}
    for pl, lab in zip(planes, labels_idx):
        by_source.setdefault(pl["source"], []).append((pl, values[lab]))
    files: dict[Path, bytes] = {}
    for source, items in by_source.items():
        items.sort(key=lambda t: t[0]["slice_index"] or 0)
        rendered = render_prediction(Path(source), [a for _, a in items], items[0][0]["stem"], labels=lmap)
        files.update((out / name, blob) for name, blob in rendered.items())
    return write_files(files, overwrite=overwrite, hint=OVERWRITE_HINT)


def decode_reply(site_dir: Path, reply: Path, cases: Path | None, out: Path, *, overwrite: bool = False,
                 device: Device = None) -> list[Path]:
    """Unprotect and decode a reply file; ``cases`` is the local list written by :func:`encode_folder`.

    Every label map path is checked before any is written: an existing one is refused (unless
    ``overwrite``; then each is replaced atomically) and nothing is left half-written. ``device``: where the
    decoder runs."""
    h = Hospital(site_dir, device=device)
    try:
        msg = protocol.decode(Path(reply).read_bytes(), expected=_mask_shapes(h))
    except PpcmiError as e:
        raise PpcmiError(f"{reply}: {e}") from None
    if msg.kind != "reply":
        raise PpcmiError(f"{reply}: a {msg.kind!r} message, not a reply")
    cases = Path(cases) if cases is not None else _find_case_list(Path(reply), msg.query)
    rec = _case_list(cases)
    if not msg.query or msg.query != rec["query"]:
        raise PpcmiError(f"{reply}: answers query {msg.query or '(no id)'}, but {cases} belongs to query {rec['query']}; "
                         "refusing to put its results on that case list's patients")
    if msg.client != h.name or rec["site"] != h.name:
        raise PpcmiError(f"{reply}: for site {msg.client!r}, case list for {rec['site']!r}, this site is {h.name!r}")
    if rec["key"] != h.key_fingerprint:
        raise PpcmiError(f"{cases}: the query was encoded under another key than this site's current one "
                         f"(rotated since?); its reply cannot be decoded with this key")
    planes = rec["cases"]
    if len(planes) != msg.n:
        raise PpcmiError(f"{cases}: lists {len(planes)} images but the reply holds {msg.n}")
    check_outputs(planes, out, overwrite=overwrite)  # before decoding anything
    return _write_label_maps(planes, h.segment(msg, _geometries(planes, h.data_cfg.preprocess())), label_map_of(h), out,
                             overwrite=overwrite)


def _mask_shapes(h: Hospital) -> dict:
    shapes = h.models["mask"].cfg.latent_shapes(h.data_cfg.size)
    return shapes


def _predict(h: Hospital, images: Sequence[Path], out: Path, send: Callable[[bytes], bytes], batch: int = 16, *,
             overwrite: bool = False) -> list[Path]:
    """Protect each batch of images, ``send`` its query bytes to a server, unprotect the reply, write label maps
    (every output path checked before anything is read or sent)."""
    planes = list_inputs(images)
    check_outputs(planes, out, overwrite=overwrite)
    prep = h.data_cfg.preprocess()
    x = _load_planes(planes, prep)
    geometries = _geometries(planes, prep)
    labels: list[np.ndarray] = []
    row = 4 * sum(int(np.prod(v)) for v in h.latent_shapes().values())  # float32 bytes of one image's keyed latents
    batch = max(1, min(batch, protocol.QUERY_BYTES // row))  # every query under the service's size limit, at any size
    for s in range(0, len(x), batch):
        query = h.protect(x[s:s + batch])
        reply = protocol.decode(send(protocol.encode(query)), expected=_mask_shapes(h))
        if reply.kind != "reply" or reply.query != query.query or reply.client != h.name or reply.n != query.n:
            raise PpcmiError(f"reply: does not answer the query just sent (query {query.query}, reply to "
                             f"{reply.query or '(no id)'} for {reply.client!r}, {reply.n} of {query.n} rows)")
        labels += h.segment(reply, geometries[s:s + batch], batch=batch)
    return _write_label_maps(planes, labels, label_map_of(h), out, overwrite=overwrite)


def predict_files(site_dir: Path, send: Callable[[bytes], bytes], images: Sequence[Path], out: Path, *,
                  overwrite: bool = False, device: Device = None) -> list[Path]:
    """Hospital -> mapping -> hospital for image files, through protocol bytes.

    ``send`` takes a query message and returns the reply message: the caller chooses who maps it
    (``ppcmi predict --model`` passes an in-process coordinator), so hospital code never loads the
    coordinator's. ``device``: where this hospital's autoencoders run."""
    return _predict(Hospital(site_dir, device=device), images, out, send, overwrite=overwrite)


def predict_remote(site_dir: Path, server_url: str, images: Sequence[Path], out: Path, *, cert: Path, key: Path,
                   ca: Path, overwrite: bool = False, device: Device = None) -> list[Path]:
    """Hospital -> HTTPS inference service (mutual TLS) -> hospital for image files.

    ``cert`` must be this site's client certificate: its CN is the site id the server uses to
    pick this hospital's adapters, so a certificate for another site is refused here first.
    """
    from ..certs import load_cert, site_id_of
    from ..errors import CertError
    from .remote import ServiceClient

    h = Hospital(site_dir, device=device)
    cn = site_id_of(load_cert(cert), f"--cert {cert}")
    if cn != h.name:
        raise CertError(f"--cert: {cert} is the certificate of site {cn!r}, but {site_dir} is site {h.name!r}")
    with ServiceClient(server_url, cert=cert, key=key, ca=ca) as client:
        return _predict(h, images, out, client.map, overwrite=overwrite)


def evaluate_folder(pred: Path, data: Path, out: Path, labels: str | None = None, *, overwrite: bool = False,
                    rois: Sequence[str] | None = None) -> dict:
    """Score predicted label maps (matched by stem) against ``data/masks`` at native resolution.

    ``out/per_case.csv`` and ``out/summary.json`` are refused, before any scoring, if either exists,
    unless ``overwrite``; then both are replaced, each atomically."""
    from ..data import discover_labels, parse_labels
    from ..fileio import refuse_existing
    from ..metrics import evaluate_cases, evaluation_paths, summarize, write_evaluation

    hint = " (pass --overwrite to replace an earlier evaluation)"
    if not overwrite:
        refuse_existing(evaluation_paths(out), hint)
    cases = discover_cases(data, rois=rois)
    lmap = parse_labels(labels) or discover_labels(cases)
    pred_files = {_stem(p): p for p in Path(pred).iterdir() if p.is_file() and _is_image(p)} if Path(pred).is_dir() else {}
    if not pred_files:
        raise DataError(f"{pred}: no predicted label maps found")
    rows = []
    for c in cases:
        stem = c.case_id if c.slice_index is None else c.case_id.rsplit("_z", 1)[0]
        if stem not in pred_files:
            continue
        gt, sp = read_case_mask(c)
        pr, _ = read_mask(pred_files[stem], c.slice_index)
        if pr.shape != gt.shape:
            raise DataError(f"{pred_files[stem]}: prediction is {pr.shape} but the ground truth {c.mask_path} is {gt.shape}")
        g = lmap.to_index(gt, c.mask_path)
        p = lmap.to_index(pr, pred_files[stem])
        rows += evaluate_cases(p[None], g[None], [c.case_id], lmap.n_classes, spacings=[sp], class_names=list(lmap.names))
    if not rows:
        raise DataError(f"{pred}: none of the predictions matches a case in {data}")
    summ = summarize(rows)
    write_evaluation(rows, summ, out, overwrite=overwrite, hint=hint)
    return summ
