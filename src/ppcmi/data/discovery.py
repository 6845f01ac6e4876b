"""Dataset discovery (hospital side): image/mask pairs in ``images/`` + ``masks/``, one case per 2D
plane, patient groups from a file-name pattern or a CSV.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..labels import LabelMap
from .readers import IMAGE_EXTS, _cached_volume, _format, _n_slices, _split_name, read_mask

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Case:
    """One 2D training example: an image plane and its mask plane.

    ``case_id`` is the file stem (``.nii.gz`` etc. removed); a slice of a 3D volume is
    ``f"{stem}_z{index:03d}"``. ``image_path`` is a file or a DICOM series folder.
    ``slice_index`` is the axial slice of a 3D volume, None for 2D files. ``group`` is the
    patient id (defaults to the stem); ``site`` comes from the group CSV's ``site`` column.
    """

    case_id: str
    image_path: Path
    mask_path: Path
    slice_index: int | None
    group: str
    site: str | None = None


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
        m = pattern.search(stem)
        if m is None:
            raise DataError(f"{path}: stem {stem!r} does not match group_regex {pattern.pattern!r}")
        g = m.group(1) if pattern.groups and m.group(1) is not None else m.group(0)
        if not g:
            raise DataError(f"{path}: group_regex {pattern.pattern!r} gives an empty group for {stem!r}")
        return g, None
    return stem, None


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


def discover_cases(root: str | Path, *, group_regex: str | None = None,
                   group_csv: str | Path | None = None) -> list[Case]:
    """Pair ``root/images/<id>.*`` with ``root/masks/<id>.*`` and return the cases sorted by case_id.

    3D volumes (NIfTI, MHA/MHD, DICOM series or multi-frame DICOM) give one case per axial slice;
    only the header is read here. The group is the first capture group (or the whole match) of
    ``re.search(group_regex, stem)``, or the ``group`` column of ``group_csv`` (columns
    ``case,group[,site]``; a relative path that does not exist is also looked up in ``root``),
    or the stem. Unknown extensions are skipped (debug log); a mask without an image is a warning;
    an image without a mask, a stem missing from the CSV or not matching the regex is a DataError.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder is missing (expected the layout {root}/images/ + {root}/masks/)")
    if group_regex is not None and group_csv is not None:
        raise DataError("group_regex and group_csv: give one of them, not both")
    pattern = None
    if group_regex is not None:
        try:
            pattern = re.compile(group_regex)
        except re.error as e:
            raise DataError(f"group_regex: invalid regular expression {group_regex!r} ({e})") from e
    table, csv_path = None, None
    if group_csv is not None:
        csv_path = Path(group_csv)
        if not csv_path.is_absolute() and not csv_path.exists() and (root / csv_path).exists():
            csv_path = root / csv_path
        if not csv_path.is_file():
            raise DataError(f"{csv_path}: group CSV does not exist")
        table = _read_group_csv(csv_path)

    images = _index_folder(img_dir, "image")
    if not images:
        raise DataError(f"{img_dir}: no images found (recognised: {', '.join(IMAGE_EXTS)} or a DICOM series folder)")
    masks = _index_folder(mask_dir, "mask")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("%s: %d mask(s) without an image are ignored (e.g. %s)", mask_dir, len(orphans),
                    masks[orphans[0]].name)

    cases: list[Case] = []
    for stem, ipath in images.items():
        mpath = masks.get(stem)
        if mpath is None:
            raise DataError(f"{ipath}: no mask found for this image (expected {mask_dir}/{stem}.<ext>)")
        group, site = _group_of(stem, ipath, pattern, table, csv_path)
        n_img, n_mask = _n_slices(ipath, "image"), _n_slices(mpath, "mask")
        if n_img != n_mask:
            def desc(n: int | None) -> str:
                return "2D" if n is None else f"{n} slices"
            raise DataError(f"{ipath} and {mpath}: image is {desc(n_img)} but mask is {desc(n_mask)}")
        if n_img is None:
            cases.append(Case(stem, ipath, mpath, None, group, site))
        else:
            if _format(ipath) != _format(mpath):
                log.warning("%s: image and mask are different 3D formats; they are paired in stored voxel order", ipath)
            cases.extend(Case(f"{stem}_z{k:03d}", ipath, mpath, k, group, site) for k in range(n_img))
    cases.sort(key=lambda c: c.case_id)
    for a, b in zip(cases, cases[1:]):
        if a.case_id == b.case_id:
            raise DataError(f"{b.image_path}: case id {b.case_id!r} is not unique (also from {a.image_path})")
    log.info("%s: %d cases in %d groups", root, len(cases), len({c.group for c in cases}))
    return cases


def discover_labels(cases: Sequence[Case], *, max_cases: int | None = None) -> LabelMap:
    """The sorted union of the values in the masks (all, or ``max_cases`` spread evenly over the list)."""
    if not cases:
        raise DataError("discover_labels: no cases to read masks from")
    chosen = list(cases)
    if max_cases is not None and 0 < max_cases < len(chosen):
        idx = np.unique(np.linspace(0, len(chosen) - 1, max_cases).round().astype(int))
        chosen = [chosen[i] for i in idx]
    seen: set[int] = set()
    try:
        for c in chosen:
            seen.update(np.unique(read_mask(c.mask_path, c.slice_index)[0]).tolist())
    finally:
        _cached_volume.cache_clear()
    where = chosen[0].mask_path.parent
    if len(seen) < 2:
        raise DataError(f"{where}: every mask holds only the value {sorted(seen)}; nothing to segment "
                        f"(checked {len(chosen)} masks)")
    values = tuple(sorted(int(v) for v in seen))
    if len(values) > 20:
        log.warning("%s: masks hold %d distinct values; are these label masks?", where, len(values))
    log.info("%s: label values %s", where, values)
    return LabelMap(values)
