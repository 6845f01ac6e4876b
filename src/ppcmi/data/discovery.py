"""Dataset discovery (hospital side): image/mask pairs in ``images/`` + ``masks/`` or in nnU-Net's raw
dataset layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``; v2 and MSD / v1), one
case per 2D plane, patient groups from a file-name pattern or a CSV.

nnU-Net raw layout, as nnU-Net documents it:

- v2 ``dataset.json``: ``channel_names`` (``{"0": "CT"}``), ``labels`` name -> value
  (``{"background": 0, "liver": 1}``), ``numTraining``, ``file_ending`` (``".nii.gz"``); images are
  ``imagesTr/CASE_0000<ending>``, ``CASE_0001<ending>``, ... one file per channel, labels
  ``labelsTr/CASE<ending>``.
- MSD / v1 ``dataset.json``: ``modality`` (``{"0": "MRI"}``), ``labels`` value -> name, ``training``
  (``[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]``) and ``test`` lists; image
  files without the ``_0000`` suffix, several channels as a 4D NIfTI.

A case's channels are ``CASE_0000``, ``CASE_0001``, ... when ``imagesTr/CASE_0000<ending>`` exists,
else the single file ``CASE<ending>`` (possibly 4D with channels on the 4th axis). The labels of
``dataset.json`` become the cases' label map (values and names).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..labels import LabelMap
from .readers import (IMAGE_EXTS, _cached_volume, _format, _n_slices, _series, _split_name, is_rtstruct, read_image, read_mask,
                      rtstruct_roi_names, rtstruct_series_uid)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Case:
    """One 2D training example: an image plane and its mask plane.

    ``case_id`` is the file stem (``.nii.gz`` etc. removed); a slice of a 3D volume is
    ``f"{stem}_z{index:03d}"``. ``image_path`` is a file or a DICOM series folder.
    ``slice_index`` is the axial slice of a 3D volume, None for 2D files. ``group`` is the
    patient id (defaults to the stem); ``site`` comes from the group CSV's ``site`` column.
    ``image_paths`` lists every channel file of an image stored one file per channel (nnU-Net's
    ``CASE_0000``, ``CASE_0001``, ...; ``image_path`` is the first), empty for one file.
    ``labels`` is the label map a ``dataset.json`` declares (or an RTSTRUCT's chosen ROIs), None
    where the masks must tell. ``rois`` are the RTSTRUCT ROI names that are classes 1, 2, ... when
    ``mask_path`` is a DICOM RTSTRUCT (rasterised on the ``image_path`` series), else empty.
    """

    case_id: str
    image_path: Path
    mask_path: Path
    slice_index: int | None
    group: str
    site: str | None = None
    image_paths: tuple[Path, ...] = ()
    labels: LabelMap | None = None
    rois: tuple[str, ...] = ()
    stack: str | None = None  # a 2D file that is one plane of a volume: the volume's name (``volume_regex``)

    @property
    def volume(self) -> str | None:
        """The volume a slice was cut from (its file stem, ``case_id`` without ``_zNNN``); for a 2D file the volume
        ``volume_regex`` named (its ``stack``), else None."""
        return self.stack if self.slice_index is None else self.case_id[: -len(f"_z{self.slice_index:03d}")]

    @property
    def image_source(self) -> Path | tuple[Path, ...]:
        """What :func:`ppcmi.data.read_image` reads: the channel files, or the one image file/folder."""
        return self.image_paths or self.image_path


def read_case_mask(case: Case) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The case's mask plane (:func:`ppcmi.data.read_mask`); an RTSTRUCT is rasterised on the case's series."""
    if case.rois:
        return read_mask(case.mask_path, case.slice_index, reference=case.image_path, rois=case.rois)
    return read_mask(case.mask_path, case.slice_index)


def _index_folder(folder: Path, what: str) -> dict[str, Path]:
    """Map stem -> path for the recognised files and DICOM folders in ``folder``."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            stem = p.name
        else:
            stem, ext = _split_name(p.name)
            if ext not in IMAGE_EXTS:
                log.debug("%s: ignored (extension %r is not one of %s)", p, ext, ", ".join(IMAGE_EXTS))
                continue
        if stem in found:
            raise DataError(f"{p}: two {what} files share the stem {stem!r} (the other is {found[stem].name})")
        found[stem] = p
    return found


def _group_of(stem: str, path: Path, pattern: re.Pattern[str] | None, table: dict[str, tuple[str, str | None]] | None,
              csv_path: Path | None) -> tuple[str, str | None]:
    if table is not None:
        if stem not in table:
            raise DataError(f"{path}: case {stem!r} is missing from the group CSV {csv_path}")
        return table[stem]
    if pattern is not None:
        return _captured("group_regex", pattern, stem, path), None
    return stem, None


def _compile(name: str, regex: str | None) -> re.Pattern[str] | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise DataError(f"{name}: invalid regular expression {regex!r} ({e})") from e


def _captured(name: str, pattern: re.Pattern[str], stem: str, path: Path) -> str:
    """The first capture group (or the whole match) of ``pattern`` in ``stem``; a DataError naming the file without one."""
    m = pattern.search(stem)
    if m is None:
        raise DataError(f"{path}: stem {stem!r} does not match {name} {pattern.pattern!r}")
    g = m.group(1) if pattern.groups and m.group(1) is not None else m.group(0)
    if not g:
        raise DataError(f"{path}: {name} {pattern.pattern!r} gives an empty name for {stem!r}")
    return g


def _read_group_csv(path: Path) -> dict[str, tuple[str, str | None]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read the group CSV ({type(e).__name__}: {e.strerror or e})") from e
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "case" not in cols or "group" not in cols:
        raise DataError(f"{path}: group CSV needs the columns 'case,group' (optional 'site'), found {cols}")
    table: dict[str, tuple[str, str | None]] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        case, group, site = row.get("case", ""), row.get("group", ""), row.get("site", "") or None
        if not case:
            continue
        if not group:
            raise DataError(f"{path}: line {line}: case {case!r} has an empty group")
        if case in table and table[case] != (group, site):
            raise DataError(f"{path}: line {line}: case {case!r} is listed twice with different groups/sites")
        table[case] = (group, site)
    return table


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _is_nnunet(root: Path) -> bool:
    return not (root / "images").is_dir() and ((root / "dataset.json").is_file() or (root / "imagesTr").is_dir())


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def _json_labels(meta: dict, path: Path) -> LabelMap | None:
    """``labels`` of a dataset.json as a LabelMap sorted by value: v2 name -> value, v1 value -> name."""
    raw = meta.get("labels")
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) < 2:
        raise DataError(f"{path}: 'labels' must map at least two labels (background and a class), got {raw!r}")
    pairs: list[tuple[int, str]] = []
    for k, v in raw.items():
        if isinstance(v, (list, tuple)):
            raise DataError(f"{path}: label {k!r} is a region {v!r}; region-based labels are not supported")
        if isinstance(v, int) and not isinstance(v, bool):
            pairs.append((v, str(k)))  # v2: name -> value
        elif str(k).strip().lstrip("-").isdigit():
            pairs.append((int(k), str(v)))  # v1 / MSD: "value" -> name
        else:
            raise DataError(f"{path}: label {k!r}: {v!r} is neither name -> integer (v2) nor integer -> name (v1)")
    pairs.sort()
    if pairs[0][0] != 0:
        raise DataError(f"{path}: 'labels' has no background value 0 (values {[v for v, _ in pairs]})")
    return LabelMap(tuple(v for v, _ in pairs), tuple(n for _, n in pairs))


def _channel_names(meta: dict) -> list[str] | None:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict):
        return None
    try:
        return [str(raw[k]) for k in sorted(raw, key=lambda k: int(k))]
    except ValueError:
        return [str(v) for v in raw.values()]


def _file_ending(meta: dict, folder: Path) -> str | None:
    ending = meta.get("file_ending")
    if isinstance(ending, str) and ending:
        return ending.lower() if ending.startswith(".") else "." + ending.lower()
    exts = sorted({_split_name(p.name)[1] for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
                  & set(IMAGE_EXTS)) if folder.is_dir() else []
    return exts[0] if len(exts) == 1 else None


def _by_stem(folder: Path, ending: str | None) -> dict[str, Path]:
    """stem -> file for the files of ``folder`` with ``ending`` (or any recognised extension)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        stem, ext = _split_name(p.name)
        if (ext == ending) if ending else ext in IMAGE_EXTS:
            if stem in out:
                raise DataError(f"{p}: two files share the stem {stem!r} (the other is {out[stem].name})")
            out[stem] = p
    return out


def _channels_of(case: str, files: dict[str, Path], n_channels: int | None, where: Path) -> tuple[Path, ...] | None:
    """The channel files of ``case``: CASE_0000, CASE_0001, ... if CASE_0000 exists, else (CASE,); None if neither."""
    if f"{case}_0000" in files:
        found = []
        while f"{case}_{len(found):04d}" in files:
            found.append(files[f"{case}_{len(found):04d}"])
        if n_channels is not None and len(found) != n_channels:
            raise DataError(f"{where}: case {case!r} has {len(found)} channel files ({case}_0000 ...) but dataset.json "
                            f"declares {n_channels} channels")
        return tuple(found)
    if case in files:
        return (files[case],)
    return None


def _group_channels(files: dict[str, Path], n_channels: int | None, where: Path) -> dict[str, tuple[Path, ...]]:
    """Image files without labels (imagesTs): case -> channel files, stripping ``_0000`` suffixes when
    every file carries one, else one file per case."""
    if files and all(_CHANNEL.match(s) for s in files):
        cases = sorted({_CHANNEL.match(s).group("case") for s in files})  # type: ignore[union-attr]
        out = {c: _channels_of(c, files, n_channels, where) for c in cases}
        missing = [c for c, v in out.items() if v is None]
        if missing:
            raise DataError(f"{where}: case {missing[0]!r} has channel files but no {missing[0]}_0000")
        return out  # type: ignore[return-value]
    return {s: (p,) for s, p in files.items()}


def _nnunet_pairs(root: Path, meta: dict) -> tuple[list[tuple[str, tuple[Path, ...], Path]], LabelMap | None]:
    """(case, channel files, label file) for every training case of an nnU-Net raw dataset."""
    json_path = root / "dataset.json"
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder is missing (expected the nnU-Net layout {root}/imagesTr/ + {root}/labelsTr/)")
    declared = _json_labels(meta, json_path) if meta else None
    ending = _file_ending(meta, lab_dir)
    names = _channel_names(meta)
    n_channels = len(names) if names else None
    images, labels = _by_stem(img_dir, ending), _by_stem(lab_dir, ending)
    training = meta.get("training")
    if isinstance(training, list) and training:
        listed = []
        for entry in training:
            if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
                raise DataError(f"{json_path}: a 'training' entry lacks its 'label' path: {entry!r}")
            lab = (root / entry["label"]).resolve()
            if not lab.is_file():
                raise DataError(f"{lab}: listed in {json_path} 'training' but does not exist")
            listed.append(_split_name(lab.name)[0])
        unlisted = sorted(set(labels) - set(listed))
        if unlisted:
            log.warning("%s: %d label files not listed in dataset.json 'training' are ignored (e.g. %s)", lab_dir,
                        len(unlisted), unlisted[0])
        cases = listed
    else:
        cases = sorted(labels)
    if not cases:
        raise DataError(f"{lab_dir}: no label files found{f' ending in {ending}' if ending else ''}")
    pairs = []
    for case in cases:
        if case not in labels:
            raise DataError(f"{lab_dir}: no label file for case {case!r}")
        channels = _channels_of(case, images, n_channels, img_dir)
        if channels is None:
            raise DataError(f"{labels[case]}: no image for this label (expected {img_dir}/{case}_0000{ending or '.<ext>'} "
                            f"or {case}{ending or '.<ext>'})")
        pairs.append((case, channels, labels[case]))
    n = meta.get("numTraining")
    if isinstance(n, int) and n != len(pairs):
        log.warning("%s: numTraining is %d but %d training cases were found", json_path, n, len(pairs))
    return pairs, declared


def _index_pairs(root: Path) -> list[tuple[str, tuple[Path, ...], Path]]:
    """(stem, (image,), mask) for today's ``images/`` + ``masks/`` layout."""
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder is missing (expected the layout {root}/images/ + {root}/masks/, or nnU-Net's "
                            f"dataset.json + imagesTr/ + labelsTr/)")
    images = _index_folder(img_dir, "image")
    if not images:
        raise DataError(f"{img_dir}: no images found (recognised: {', '.join(IMAGE_EXTS)} or a DICOM series folder)")
    masks = _index_folder(mask_dir, "mask")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("%s: %d mask(s) without an image are ignored (e.g. %s)", mask_dir, len(orphans),
                    masks[orphans[0]].name)
    pairs = []
    for stem, ipath in images.items():
        mpath = masks.get(stem)
        if mpath is None:
            raise DataError(f"{ipath}: no mask found for this image (expected {mask_dir}/{stem}.<ext>)")
        pairs.append((stem, (ipath,), mpath))
    return pairs


def _series_folders(patient: Path) -> dict[str, Path]:
    """SeriesInstanceUID -> folder for ``patient`` itself (a flat export) and its subfolders that hold one
    DICOM image series."""
    out: dict[str, Path] = {}
    for d in [patient] + sorted(q for q in patient.iterdir() if q.is_dir() and not q.name.startswith(".")):
        try:
            files = _series(d)[0]
        except DataError:
            continue
        import pydicom

        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        out[uid] = d
    return out


def _rtstructs_in(folder: Path) -> list[Path]:
    """RTSTRUCT files directly in ``folder`` or one level below it."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            found += [q for q in sorted(p.iterdir()) if q.is_file() and not q.name.startswith(".") and is_rtstruct(q)]
        elif is_rtstruct(p):
            found.append(p)
    return found


def _is_dicom_rt(root: Path) -> bool:
    if (root / "images").is_dir() or _is_nnunet(root):
        return False
    return bool(_rtstructs_in(root)) or any(d.is_dir() and _rtstructs_in(d) for d in root.iterdir())


def _rt_pairs(root: Path) -> list[tuple[str, tuple[Path, ...], Path]]:
    """(patient, (series folder,), RTSTRUCT) for a DICOM-RT export: ``root`` is one patient folder
    (``CT/`` series + ``RTSTRUCT/`` file, as a planning system exports them) or holds one per patient."""
    patients = [root] if _rtstructs_in(root) else sorted(d for d in root.iterdir() if d.is_dir() and _rtstructs_in(d))
    pairs = []
    for patient in patients:
        structs = _rtstructs_in(patient)
        if len(structs) != 1:
            raise DataError(f"{patient}: holds {len(structs)} RTSTRUCT files ({', '.join(p.name for p in structs)}); "
                            f"keep one per patient folder")
        uid = rtstruct_series_uid(structs[0])
        series = _series_folders(patient)
        if uid not in series:
            raise DataError(f"{structs[0]}: its image series {uid} is not among the series folders of {patient}")
        pairs.append((patient.name, (series[uid],), structs[0]))
    return pairs


def dataset_layout(root: str | Path) -> str:
    """``"nnunet"``, ``"dicom-rt"`` or ``"images-masks"``: the layout :func:`discover_cases` reads ``root`` as."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    return "nnunet" if _is_nnunet(root) else "dicom-rt" if _is_dicom_rt(root) else "images-masks"


def dicom_rt_series(root: str | Path) -> list[tuple[str, Path]]:
    """(patient, image series folder) of a DICOM-RT export (:func:`discover_cases`), or [] when ``root`` is not one."""
    root = Path(root)
    if not root.is_dir() or not _is_dicom_rt(root):
        return []
    return [(patient, channels[0]) for patient, channels, _ in _rt_pairs(root)]


def _choose_rois(pairs: list[tuple[str, tuple[Path, ...], Path]], rois: Sequence[str] | None) -> tuple[str, ...]:
    """The ROI names that are classes 1, 2, ...: ``rois`` as given, else the first RTSTRUCT's names sorted."""
    first = pairs[0][2]
    chosen = tuple(rois) if rois is not None else tuple(sorted(rtstruct_roi_names(first)))
    if not chosen:
        raise DataError(f"{first}: RTSTRUCT holds no ROI")
    if len(set(chosen)) != len(chosen):
        raise DataError(f"data.rois: names must be distinct, got {list(chosen)}")
    for _, _, rt in pairs:
        names = rtstruct_roi_names(rt)
        missing = [r for r in chosen if r not in names]
        if missing:
            raise DataError(f"{rt}: no ROI named {missing[0]!r} (the RTSTRUCT holds {', '.join(map(repr, names))}); "
                            f"choose the classes with data.rois")
    return chosen


def discover_cases(root: str | Path, *, group_regex: str | None = None, group_csv: str | Path | None = None,
                   rois: Sequence[str] | None = None, volume_regex: str | None = None) -> list[Case]:
    """Pair images with masks and return the cases sorted by case_id.

    Layouts: ``root/images/<id>.*`` + ``root/masks/<id>.*``, or nnU-Net's raw dataset
    (``dataset.json`` + ``imagesTr/`` + ``labelsTr/``, v2 or MSD / v1; module docstring), whose
    ``labels`` become each case's ``labels``. 3D volumes (NIfTI, MHA/MHD, NRRD, DICOM series or
    multi-frame DICOM) give one case per axial slice; only the header is read here. The group is
    the first capture group (or the whole match) of ``re.search(group_regex, stem)``, or the
    ``group`` column of ``group_csv`` (columns ``case,group[,site]``; a relative path that does not
    exist is also looked up in ``root``), or the stem. Unknown extensions are skipped (debug log); a
    mask without an image is a warning; an image without a mask, a stem missing from the CSV or not
    matching the regex is a DataError.

    DICOM RTSTRUCT masks: ``masks/<id>.dcm`` may be an RTSTRUCT drawn on the series folder
    ``images/<id>/``, and ``root`` may be a DICOM-RT export (a patient folder with a series folder
    and an RTSTRUCT, such as ``CT/`` + ``RTSTRUCT/``, or a folder of such patient folders; the case
    is the patient folder's name). ``rois`` chooses the ROIs that become classes 1, 2, ... in that
    order (default: the first RTSTRUCT's ROI names, sorted); overlaps follow
    :func:`ppcmi.data.readers.rtstruct_volume` (the smaller ROI wins).

    ``volume_regex``: where 2D files are the planes of volumes (a slice per file), the volume's name is the first
    capture group (or the whole match) of ``re.search(volume_regex, stem)``, so whole test volumes are scored too
    (:func:`ppcmi.metrics.volume_dice`); a 2D stem that does not match is a DataError. 3D files name their own volume.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if group_regex is not None and group_csv is not None:
        raise DataError("group_regex and group_csv: give one of them, not both")
    pattern, stacks = _compile("group_regex", group_regex), _compile("volume_regex", volume_regex)
    table, csv_path = None, None
    if group_csv is not None:
        csv_path = Path(group_csv)
        if not csv_path.is_absolute() and not csv_path.exists() and (root / csv_path).exists():
            csv_path = root / csv_path
        if not csv_path.is_file():
            raise DataError(f"{csv_path}: group CSV does not exist")
        table = _read_group_csv(csv_path)

    labels: LabelMap | None = None
    if _is_nnunet(root):
        pairs, labels = _nnunet_pairs(root, _read_dataset_json(root))
    elif _is_dicom_rt(root):
        pairs = _rt_pairs(root)
    else:
        pairs = _index_pairs(root)
    chosen: tuple[str, ...] = ()
    rt_pairs = [pr for pr in pairs if is_rtstruct(pr[2])]
    if rt_pairs:
        if len(rt_pairs) != len(pairs):
            raise DataError(f"{rt_pairs[0][2]}: some masks are RTSTRUCTs and some are not; use one kind per dataset")
        chosen = _choose_rois(rt_pairs, rois)
        labels = LabelMap(tuple(range(len(chosen) + 1)), ("background", *chosen))
    elif rois is not None:
        raise DataError(f"data.rois: given ({list(rois)}) but {root} has no RTSTRUCT masks")

    cases: list[Case] = []
    for stem, channels, mpath in pairs:
        ipath = channels[0]
        extra = channels if len(channels) > 1 else ()
        group, site = _group_of(stem, ipath, pattern, table, csv_path)
        n_img = _n_slices(ipath, "image")
        if chosen:
            if _format(ipath) != "dicom-series":
                raise DataError(f"{mpath}: an RTSTRUCT mask needs a DICOM series folder as its image, not {ipath.name}")
            import pydicom

            uid = str(pydicom.dcmread(_series(ipath)[0][0], stop_before_pixels=True,
                                      specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
            if uid != rtstruct_series_uid(mpath):
                raise DataError(f"{mpath}: RTSTRUCT is drawn on series {rtstruct_series_uid(mpath)}, not on {ipath} ({uid})")
        n_mask = n_img if chosen else _n_slices(mpath, "mask")
        for other in extra[1:]:
            if _n_slices(other, "image") != n_img:
                raise DataError(f"{other}: channel has a different slice count from {ipath.name}")
        if n_img != n_mask:
            def desc(n: int | None) -> str:
                return "2D" if n is None else f"{n} slices"
            raise DataError(f"{ipath} and {mpath}: image is {desc(n_img)} but mask is {desc(n_mask)}")
        if n_img is None:
            stack = None if stacks is None else _captured("volume_regex", stacks, stem, ipath)
            cases.append(Case(stem, ipath, mpath, None, group, site, extra, labels, chosen, stack))
        else:
            if not chosen and _format(ipath) != _format(mpath):
                log.warning("%s: image and mask are different 3D formats; they are paired in stored voxel order", ipath)
            cases.extend(Case(f"{stem}_z{k:03d}", ipath, mpath, k, group, site, extra, labels, chosen) for k in range(n_img))
    cases.sort(key=lambda c: c.case_id)
    for a, b in zip(cases, cases[1:]):
        if a.case_id == b.case_id:
            raise DataError(f"{b.image_path}: case id {b.case_id!r} is not unique (also from {a.image_path})")
    log.info("%s: %d cases in %d groups", root, len(cases), len({c.group for c in cases}))
    return cases


def nnunet_test_images(root: str | Path) -> list[tuple[str, tuple[Path, ...]]]:
    """The images to segment of an nnU-Net raw dataset (``imagesTs/``): (case, channel files), sorted.

    ``CASE_0000``, ``CASE_0001``, ... are one case's channels when every file carries such a suffix;
    otherwise each file is a case (the MSD / v1 layout)."""
    root = Path(root)
    meta = _read_dataset_json(root)
    folder = root / "imagesTs"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder is missing (nnU-Net keeps the images to segment there)")
    names = _channel_names(meta)
    files = _by_stem(folder, _file_ending(meta, folder))
    if not files:
        raise DataError(f"{folder}: no images found")
    return sorted(_group_channels(files, len(names) if names else None, folder).items())


def dicom_modality(image: Path) -> list[str] | None:
    """[Modality] of a DICOM file or series folder (e.g. ["CT"]), None when the header does not say."""
    import pydicom

    first = image if image.is_file() else _series(image)[0][0]
    modality = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "") or "")
    return [modality] if modality else None


def dataset_modalities(root: str | Path) -> list[str] | None:
    """The modality of each channel as ``root/dataset.json`` names it (nnU-Net's ``channel_names``, the
    Decathlon's ``modality``), None without one."""
    return _channel_names(_read_dataset_json(Path(root)))


def dataset_info(root: str | Path) -> dict:
    """What a dataset says about itself, for planning (nothing per case beyond counts).

    ``{"layout": "nnunet" | "dicom-rt" | "images-masks", "version": 2 | 1 | None (nnU-Net dataset.json flavour),
    "name", "modalities": [per channel, e.g. "CT", "MRI"] or None, "channels": int or None,
    "labels": {"values": [...], "names": [...]} or None, "file_ending": ".nii.gz" or None,
    "num_training": int, "num_test": int}``. nnU-Net: from ``dataset.json``. DICOM-RT: the series'
    DICOM Modality and the RTSTRUCT's ROIs (sorted by name). ``images/`` + ``masks/``: the modality
    from the DICOM header where the images are DICOM, else None; labels None (the masks tell the
    values, :func:`discover_labels`); channels from the first image; ``file_ending`` the images'
    extension when they share one.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if _is_nnunet(root):
        meta = _read_dataset_json(root)
        pairs, labels = _nnunet_pairs(root, meta)
        names = _channel_names(meta)
        version = None if not meta else 2 if "channel_names" in meta or "file_ending" in meta else 1
        n_test = len(nnunet_test_images(root)) if (root / "imagesTs").is_dir() else 0
        channels = len(names) if names else None
        ending = _file_ending(meta, root / "labelsTr")
        layout = "nnunet"
    elif _is_dicom_rt(root):
        pairs, version, n_test, meta, channels, layout = _rt_pairs(root), None, 0, {}, 1, "dicom-rt"
        chosen = _choose_rois(pairs, None)
        labels = LabelMap(tuple(range(len(chosen) + 1)), ("background", *chosen))
        names, ending = dicom_modality(pairs[0][1][0]), None
    else:
        pairs, labels, names, version = _index_pairs(root), None, None, None
        n_test, meta = 0, {}
        exts = {_split_name(p.name)[1] for _, (p,), _ in pairs if p.is_file()}
        ending = exts.pop() if len(exts) == 1 else None
        channels = None
        layout = "images-masks"
        if _format(pairs[0][1][0]) in ("dicom", "dicom-series"):
            names = dicom_modality(pairs[0][1][0])
    if channels is None and pairs:
        first = pairs[0][1]
        n = _n_slices(first[0], "image")
        channels = len(first) * int(read_image(first[0], None if n is None else 0)[0].shape[0])
    return {"layout": layout, "version": version, "name": meta.get("name") if isinstance(meta.get("name"), str) else None,
            "modalities": names, "channels": channels,
            "labels": None if labels is None else {"values": list(labels.values), "names": list(labels.names)},
            "file_ending": ending, "num_training": len(pairs), "num_test": n_test}


def discover_labels(cases: Sequence[Case], *, max_cases: int | None = None) -> LabelMap:
    """The label map of the cases: the one their ``dataset.json`` declares (values and names; the
    masks read must hold no other value), else the sorted union of the values in the masks (all,
    or ``max_cases`` spread evenly over the list)."""
    if not cases:
        raise DataError("discover_labels: no cases to read masks from")
    declared = {c.labels for c in cases}
    chosen = list(cases)
    if max_cases is not None and 0 < max_cases < len(chosen):
        idx = np.unique(np.linspace(0, len(chosen) - 1, max_cases).round().astype(int))
        chosen = [chosen[i] for i in idx]
    seen: set[int] = set()
    try:
        for c in chosen:
            seen.update(np.unique(read_case_mask(c)[0]).tolist())
    finally:
        _cached_volume.cache_clear()
    where = chosen[0].mask_path.parent
    if len(declared) == 1 and None not in declared:
        (lmap,) = declared
        extra = sorted(seen - set(lmap.values))
        if extra:
            raise DataError(f"{where}: masks hold the values {extra} that dataset.json 'labels' {lmap.values} does not "
                            f"declare")
        log.info("%s: label map from dataset.json: %s", where, dict(zip(lmap.names, lmap.values)))
        return lmap
    if len(seen) < 2:
        raise DataError(f"{where}: every mask holds only the value {sorted(seen)}; nothing to segment "
                        f"(checked {len(chosen)} masks)")
    values = tuple(sorted(int(v) for v in seen))
    if len(values) > 20:
        log.warning("%s: masks hold %d distinct values; are these label masks?", where, len(values))
    log.info("%s: label values %s", where, values)
    return LabelMap(values)
