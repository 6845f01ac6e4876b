"""Hospital-side file workflows: encode a folder into a message, decode a reply into label maps, predict, evaluate.

Everything that names a file or a patient stays here: a query message carries only keyed
latents, and the list of which case each row belongs to is kept beside it in a local
``<message>.cases.json`` that never leaves the hospital. The case list records the query's random
id and the fingerprint of the key it was encoded under; a reply echoes the id, and decoding refuses a
reply, case list or key that do not belong together, so a result can only land on its own patients. Label maps are written in the input's
format: PNG for 2D images, NIfTI for volumes (NIfTI, MetaImage or DICOM series inputs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import protocol
from ..data import (IMAGE_EXTS, LabelMap, Preprocess, discover_cases, n_slices, prepare_image, read_image,
                    read_mask, restore_mask)
from ..errors import DataError, PpcmiError
from ..fileio import Record, atomic_write_bytes, atomic_write_json, ensure_dir, read_json
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
    """Expand image files, DICOM series folders and dataset folders (``images/``) into planes to segment."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if p.is_dir() and (p / "images").is_dir():
            files += sorted(q for q in (p / "images").iterdir() if _is_image(q) and not q.name.startswith("."))
        elif p.is_dir() and not any(q.suffix.lower() in (".dcm", "") and q.is_file() for q in p.iterdir()):
            files += sorted(q for q in p.iterdir() if q.is_file() and _is_image(q) and not q.name.startswith("."))
        else:
            files.append(p)
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no images found")
    planes = []
    for f in files:
        n = n_slices(f)
        fmt = "png" if n is None and not f.is_dir() and not f.name.lower().endswith((".nii", ".nii.gz", ".mha", ".mhd")) else "nifti"
        for k in ([None] if n is None else range(n)):
            planes.append({"source": str(f), "slice_index": k, "stem": _stem(f), "format": fmt})
    return planes


def _load_planes(planes: list[dict], prep: Preprocess) -> np.ndarray:
    out = np.empty((len(planes), 3 if prep.color == "rgb" else 1, prep.size, prep.size), np.float32)
    for i, pl in enumerate(planes):
        img, _ = read_image(Path(pl["source"]), pl["slice_index"])
        if not np.isfinite(img).all():
            raise DataError(f"{pl['source']}: image has NaN/Inf values")
        pl["original_shape"] = list(img.shape[1:])
        out[i] = prepare_image(img, prep)
    return out


def encode_folder(site_dir: Path, data: Path, out: Path, *, with_masks: bool = False, float16: bool = False,
                  noise: float | None = None, copies: int | None = None) -> tuple[int, int]:
    """Write a query (images) or train (image+mask pairs, plus ``copies - 1`` augmented copies) message
    plus the local case list; returns (N, bytes). ``copies`` and ``noise`` default to the site's own
    ``autoencoder.send_copies`` and ``autoencoder.send_noise`` (the settings it was trained with), so the
    message is the one ``simulate`` sends for the same configuration (:mod:`ppcmi.client.stages`)."""
    h = Hospital(site_dir)
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
        cases = discover_cases(data, group_regex=h.data_cfg.group_regex, group_csv=h.data_cfg.group_csv)
        arr = stages.prepare(cases, cfg, label_map_of(h))
        msg = stages.training_batch(h, arr, cfg, dtype=dtype)
        local = [{"case_id": c} for c in arr["case_ids"]]
    else:
        planes = list_inputs([data])
        msg = stages.query(h, _load_planes(planes, prep), noise=cfg.autoencoder.send_noise, dtype=dtype)
        local = planes
    blob = protocol.encode(msg)
    local = {"kind": msg.kind, "site": h.name, "query": msg.query, "key": h.key_fingerprint, "cases": local}
    atomic_write_json(record, local, overwrite=False)
    try:
        atomic_write_bytes(out, blob, overwrite=False)
    except BaseException:
        record.unlink(missing_ok=True)  # the message was not written: neither is its case list
        raise
    return msg.n, len(blob)


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


def _write_label_maps(planes: list[dict], labels_idx: np.ndarray, lmap: LabelMap, out: Path, crop: float = 1.0) -> list[Path]:
    """Resize each plane back to its source size, map class indices to raw label values, write per source."""
    ensure_dir(out)
    values = np.asarray(lmap.values)
    by_source: dict[str, list[tuple[dict, np.ndarray]]] = {}
    for pl, lab in zip(planes, labels_idx):
        h, w = pl["original_shape"]
        by_source.setdefault(pl["source"], []).append((pl, values[restore_mask(lab, (h, w), crop)]))
    written = []
    for source, items in by_source.items():
        pl0 = items[0][0]
        if pl0["format"] == "png":
            from PIL import Image
            import io

            arr = items[0][1]
            arr = arr.astype(np.uint8) if arr.max() < 256 and arr.min() >= 0 else arr.astype(np.uint16)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            written.append(atomic_write_bytes(out / f"{pl0['stem']}.png", buf.getvalue(), overwrite=False))
        else:
            written.append(_write_nifti(source, [a for _, a in sorted(items, key=lambda t: t[0]["slice_index"] or 0)], out / f"{pl0['stem']}.nii.gz"))
    return written


def _write_nifti(source: str, planes: list[np.ndarray], path: Path) -> Path:
    """Stack (H, W) planes into a volume in the source's voxel order (the inverse of the readers' transpose)."""
    import nibabel as nib

    if path.exists():
        raise PpcmiError(f"{path}: already exists; refusing to overwrite it")
    vol = np.stack(planes).transpose(2, 1, 0).astype(np.int16)  # (Z, H, W) -> (i, j, k)
    src = Path(source)
    if src.name.lower().endswith((".nii", ".nii.gz")):
        ref = nib.load(str(src))
        affine = ref.affine
        if len(ref.shape) == 2 or (len(ref.shape) >= 3 and ref.shape[2] == 1):
            vol = vol.reshape(ref.shape[:2] + (1,) * (len(ref.shape) - 2)) if len(ref.shape) > 2 else vol[:, :, 0]
    else:
        _, sp = read_image(src, 0 if len(planes) > 1 else None)
        affine = np.diag([sp[1] if sp else 1.0, sp[0] if sp else 1.0, 1.0, 1.0])
    img = nib.Nifti1Image(vol, affine)
    atomic_write_bytes(path, img.to_bytes() if not str(path).endswith(".gz") else _gz(img.to_bytes()), overwrite=False)
    return path


def _gz(b: bytes) -> bytes:
    import gzip

    return gzip.compress(b, mtime=0)


def decode_reply(site_dir: Path, reply: Path, cases: Path | None, out: Path) -> list[Path]:
    """Unprotect and decode a reply file; ``cases`` is the local list written by :func:`encode_folder`."""
    h = Hospital(site_dir)
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
    return _write_label_maps(planes, h.unprotect(msg), label_map_of(h), out, h.data_cfg.crop)


def _mask_shapes(h: Hospital) -> dict:
    shapes = h.models["mask"].cfg.latent_shapes(h.data_cfg.size)
    return shapes


def _predict(h: Hospital, images: Sequence[Path], out: Path, send: Callable[[bytes], bytes], batch: int = 16) -> list[Path]:
    """Protect each batch of images, ``send`` its query bytes to a server, unprotect the reply, write label maps."""
    planes = list_inputs(images)
    x = _load_planes(planes, h.data_cfg.preprocess())
    labels = []
    for s in range(0, len(x), batch):
        query = h.protect(x[s:s + batch])
        reply = protocol.decode(send(protocol.encode(query)), expected=_mask_shapes(h))
        if reply.kind != "reply" or reply.query != query.query or reply.client != h.name or reply.n != query.n:
            raise PpcmiError(f"reply: does not answer the query just sent (query {query.query}, reply to "
                             f"{reply.query or '(no id)'} for {reply.client!r}, {reply.n} of {query.n} rows)")
        labels.append(h.unprotect(reply))
    return _write_label_maps(planes, np.concatenate(labels), label_map_of(h), out, h.data_cfg.crop)


def predict_files(site_dir: Path, send: Callable[[bytes], bytes], images: Sequence[Path], out: Path) -> list[Path]:
    """Hospital -> mapping -> hospital for image files, through protocol bytes.

    ``send`` takes a query message and returns the reply message: the caller chooses who maps it
    (``ppcmi predict --model`` passes an in-process coordinator), so hospital code never loads the
    coordinator's."""
    return _predict(Hospital(site_dir), images, out, send)


def predict_remote(site_dir: Path, server_url: str, images: Sequence[Path], out: Path, *, cert: Path, key: Path,
                   ca: Path) -> list[Path]:
    """Hospital -> HTTPS inference service (mutual TLS) -> hospital for image files.

    ``cert`` must be this site's client certificate: its CN is the site id the server uses to
    pick this hospital's adapters, so a certificate for another site is refused here first.
    """
    from ..certs import load_cert, site_id_of
    from ..errors import CertError
    from .remote import ServiceClient

    h = Hospital(site_dir)
    cn = site_id_of(load_cert(cert), f"--cert {cert}")
    if cn != h.name:
        raise CertError(f"--cert: {cert} is the certificate of site {cn!r}, but {site_dir} is site {h.name!r}")
    with ServiceClient(server_url, cert=cert, key=key, ca=ca) as client:
        return _predict(h, images, out, client.map)


def evaluate_folder(pred: Path, data: Path, out: Path, labels: str | None = None) -> dict:
    """Score predicted label maps (matched by stem) against ``data/masks`` at native resolution."""
    from ..data import discover_labels, parse_labels
    from ..metrics import evaluate_cases, summarize, write_evaluation

    cases = discover_cases(data)
    lmap = parse_labels(labels) or discover_labels(cases)
    pred_files = {_stem(p): p for p in Path(pred).iterdir() if p.is_file() and _is_image(p)} if Path(pred).is_dir() else {}
    if not pred_files:
        raise DataError(f"{pred}: no predicted label maps found")
    rows = []
    for c in cases:
        stem = c.case_id if c.slice_index is None else c.case_id.rsplit("_z", 1)[0]
        if stem not in pred_files:
            continue
        gt, sp = read_mask(c.mask_path, c.slice_index)
        pr, _ = read_mask(pred_files[stem], c.slice_index)
        if pr.shape != gt.shape:
            raise DataError(f"{pred_files[stem]}: prediction is {pr.shape} but the ground truth {c.mask_path} is {gt.shape}")
        g = lmap.to_index(gt, c.mask_path)
        p = lmap.to_index(pr, pred_files[stem])
        rows += evaluate_cases(p[None], g[None], [c.case_id], lmap.n_classes, spacings=[sp], class_names=list(lmap.names))
    if not rows:
        raise DataError(f"{pred}: none of the predictions matches a case in {data}")
    summ = summarize(rows)
    write_evaluation(rows, summ, out)
    return summ
