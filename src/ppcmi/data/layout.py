"""A subset of a dataset as a folder of symlinks in the dataset's own layout (hospital side; used by ``ppcmi deploy``).

:func:`link_cases` gives a hospital's data folder the layout its source has, so that
:func:`ppcmi.data.discover_cases` reads it back to exactly the cases it was given (the same case ids,
files, slices, channels, labels and ROIs):

- ``images/`` + ``masks/``: ``DEST/images/<name>`` and ``DEST/masks/<name>`` (a DICOM series folder is
  linked whole; an RTSTRUCT mask beside the series folder it is drawn on);
- nnU-Net raw: ``DEST/imagesTr/`` with every channel file (``CASE_0000``, ``CASE_0001``, ...),
  ``DEST/labelsTr/``, and ``DEST/dataset.json``: the source's, with ``numTraining`` and a ``training``
  list (MSD / v1) that name only the linked cases, and no ``test`` list (``imagesTs/`` is not linked);
- DICOM-RT export: one folder per patient, ``DEST/<patient>/<series>/`` (the series folder, or for a
  flat export a folder of links to the series' own files) and ``DEST/<patient>/RTSTRUCT/<file>``.

Only whole files are linked: a 3D volume's slices cannot be dealt to two folders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from ..fileio import atomic_write_json
from .discovery import Case, _read_dataset_json, dataset_layout
from .readers import _series

log = logging.getLogger(__name__)

RTSTRUCT_DIR = "RTSTRUCT"


def case_files(case: Case) -> tuple[Path, ...]:
    """Every file (or DICOM series folder) a case reads: its image channels and its mask."""
    return (*(case.image_paths or (case.image_path,)), case.mask_path)


def _stem(case: Case) -> str:
    """The case's file or patient stem (a volume's slice ids add ``_zNNN``)."""
    return case.case_id if case.slice_index is None else case.case_id.rsplit("_z", 1)[0]


def _link(link: Path, target: Path) -> None:
    target = target.absolute()
    if link.is_symlink():
        if link.resolve() != target.resolve():
            raise DataError(f"{link}: already links to {link.resolve()}, not to {target}")
        return
    if link.exists():
        raise DataError(f"{link}: already exists and is not a link to {target}")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())


def _link_nnunet(cases: Sequence[Case], root: Path, dest: Path) -> None:
    for c in cases:
        for f in c.image_paths or (c.image_path,):
            _link(dest / "imagesTr" / f.name, f)
        _link(dest / "labelsTr" / c.mask_path.name, c.mask_path)
    meta = _read_dataset_json(root)
    if not meta:
        return
    kept = {c.mask_path.name for c in cases}
    meta = dict(meta)
    if isinstance(meta.get("training"), list):
        meta["training"] = [e for e in meta["training"] if isinstance(e, dict) and isinstance(e.get("label"), str)
                            and Path(e["label"]).name in kept]
    meta.pop("test", None)
    if "numTest" in meta:
        meta["numTest"] = 0
    meta["numTraining"] = len(kept)
    atomic_write_json(dest / "dataset.json", meta)


def _link_dicom_rt(cases: Sequence[Case], dest: Path) -> None:
    for c in cases:
        patient = dest / _stem(c)
        series = c.image_path
        if series.resolve() == c.mask_path.parent.resolve():  # a flat export: the RTSTRUCT sits among the series' files
            for f in _series(series)[0]:
                _link(patient / "series" / f.name, f)
        else:
            _link(patient / (series.name if series.name != RTSTRUCT_DIR else "series"), series)
        _link(patient / RTSTRUCT_DIR / c.mask_path.name, c.mask_path)


def link_cases(cases: Sequence[Case], root: str | Path, dest: str | Path) -> Path:
    """Symlink the files of ``cases`` (discovered in ``root``) into ``dest`` in ``root``'s own layout (module
    docstring); returns ``dest``. Linking the same cases again is a no-op; a name already taken by another file
    is a DataError naming it."""
    root, dest = Path(root), Path(dest)
    if not cases:
        raise DataError(f"{dest}: no cases to link from {root}")
    layout = dataset_layout(root)
    dest.mkdir(parents=True, exist_ok=True)
    if layout == "nnunet":
        _link_nnunet(cases, root, dest)
    elif layout == "dicom-rt":
        _link_dicom_rt(cases, dest)
    else:
        for c in cases:
            _link(dest / "images" / c.image_path.name, c.image_path)
            _link(dest / "masks" / c.mask_path.name, c.mask_path)
    log.debug("%s: linked %d cases of %s (%s layout)", dest, len(cases), root, layout)
    return dest

