"""Hospital-side data handling: dataset discovery, readers, preprocessing, splits, site partition, synthetic sites.

Everything here runs at a hospital, on its own images and masks; nothing in this module talks to
the server. A dataset is a folder in the layout

    root/images/<id>.<ext>     (.png .jpg .jpeg .tif .tiff .nii .nii.gz .mha .mhd .dcm, or a folder
                                of DICOM files holding one series)
    root/masks/<id>.<ext>      (same stem; the extension may differ)

Orientation. Every reader returns a 2D plane as (H, W) = (rows, columns):

- 2D files (PIL, single-frame DICOM): the stored row order, unchanged.
- NIfTI: the axial slice is the last voxel axis; ``data[:, :, k].T``, so rows follow the second
  voxel axis (j) and columns the first (i). Spacing is ``(zooms[1], zooms[0])``.
- MHA/MHD (SimpleITK): ``GetArrayFromImage(img)[k]``, shaped (y, x): the same convention as NIfTI
  (rows = second index axis, columns = first). Spacing is ``GetSpacing()[1], GetSpacing()[0]``.
- DICOM: ``pixel_array`` is (Rows, Columns); spacing is ``PixelSpacing`` (row, column); slices of a
  series are sorted along the slice normal (ImagePositionPatient and ImageOrientationPatient),
  else by ImagePositionPatient[2], else by InstanceNumber, else by file name.

Images and masks are paired in stored voxel order, without reorientation: an image and mask in
different 3D formats (say a DICOM series and a NIfTI mask) must have been written in the same
voxel order. Discovery checks that their slice counts agree and loading checks (H, W).

Randomness comes only from local ``np.random.default_rng(seed)`` generators.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")
_PIL_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_NIFTI_EXTS = (".nii", ".nii.gz")
_ITK_EXTS = (".mha", ".mhd")
_EXTS_LONGEST_FIRST = tuple(sorted(IMAGE_EXTS, key=len, reverse=True))

Spacing = tuple[float, float] | None

__all__ = [
    "IMAGE_EXTS", "Case", "discover_cases", "n_slices", "read_image", "read_mask", "Preprocess", "LabelMap", "discover_labels",
    "parse_labels", "Sample", "scale_intensity", "to_color", "resize_image", "resize_mask", "prepare_image",
    "load_sample", "load_arrays", "split_cases", "split_from_lists", "partition", "synth",
]


# ----------------------------------------------------------------------------- cases and discovery


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


def _split_name(name: str) -> tuple[str, str]:
    """``"a.nii.gz"`` -> ``("a", ".nii.gz")``; the extension is lower-cased; unknown ones pass through."""
    low = name.lower()
    for ext in _EXTS_LONGEST_FIRST:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    p = Path(name)
    return p.stem, p.suffix.lower()


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


# ----------------------------------------------------------------------------- readers


def _format(path: Path) -> str:
    if path.is_dir():
        return "dicom-series"
    ext = _split_name(path.name)[1]
    if ext in _PIL_EXTS:
        return "pil"
    if ext in _NIFTI_EXTS:
        return "nifti"
    if ext in _ITK_EXTS:
        return "itk"
    if ext == ".dcm":
        return "dicom"
    raise DataError(f"{path}: unrecognised file type {ext!r} (expected one of {', '.join(IMAGE_EXTS)})")


def _one_line(e: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _guarded(path: Path, kind: str, fn: Any, *args: Any) -> Any:
    """Run a library call; turn any failure into a one-line DataError naming the file."""
    if not path.exists():
        raise DataError(f"{path}: {kind} file does not exist")
    try:
        return fn(*args)
    except DataError:
        raise
    except Exception as e:  # every library has its own exception types
        raise DataError(f"{path}: cannot read {kind} ({_one_line(e)})") from e


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _nifti_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: NIfTI data shaped {shape} is not supported (2D or 3D only)")
    return shape


@functools.lru_cache(maxsize=2)
def _cached_volume(path_str: str, stamp: tuple[int, int]) -> tuple[np.ndarray, Spacing]:
    """A whole NIfTI/MHA volume as (Z, H, W) or (Z, H, W, C) in its stored dtype, read-only."""
    path = Path(path_str)
    if _format(path) == "nifti":
        import nibabel as nib

        img = nib.load(path_str)
        shape = _nifti_shape(img.shape, path)
        data = np.asanyarray(img.dataobj).reshape(shape)
        if data.ndim == 2:
            data = data[:, :, None]
        vol = np.ascontiguousarray(data.transpose(2, 1, 0))  # (i, j, k) -> (k, j, i) = (Z, H, W)
        zooms = img.header.get_zooms()
        spacing = (float(zooms[1]), float(zooms[0])) if len(zooms) >= 2 else None
    else:
        import SimpleITK as sitk

        img = sitk.ReadImage(path_str)
        vol = sitk.GetArrayFromImage(img)  # (z, y, x[, c]) or (y, x[, c])
        dim = img.GetDimension()
        if dim == 2:
            vol = vol[None]
        elif dim != 3:
            raise DataError(f"{path}: {dim}-D image is not supported (2D or 3D only)")
        sp = img.GetSpacing()
        spacing = (float(sp[1]), float(sp[0]))
    vol.setflags(write=False)
    return vol, spacing


def _dicom_header(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


@functools.lru_cache(maxsize=8)
def _cached_series(folder_str: str, stamp: tuple[int, int]) -> tuple[tuple[Path, ...], Spacing]:
    """The DICOM files of a series folder, sorted along the slice axis, and the in-plane spacing."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder_str)
    entries: list[tuple[Path, Any]] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError) as e:
            if p.suffix.lower() == ".dcm":
                raise DataError(f"{p}: cannot read image ({_one_line(e)})") from e
            log.debug("%s: not a DICOM file, ignored", p)
            continue
        if "Rows" not in ds or "Columns" not in ds:
            log.debug("%s: DICOM file without an image (e.g. DICOMDIR), ignored", p)
            continue
        entries.append((p, ds))
    if not entries:
        raise DataError(f"{folder}: no DICOM image files in this series folder")
    uids = {str(ds.SeriesInstanceUID) for _, ds in entries if "SeriesInstanceUID" in ds}
    if len(uids) > 1:
        raise DataError(f"{folder}: holds {len(uids)} DICOM series; put one series per folder")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in entries}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices have different sizes {sorted(shapes)}")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in entries) and len(entries) > 1:
        raise DataError(f"{folder}: a series folder with several multi-frame files is not supported")

    def key(item: tuple[Path, Any]) -> float:
        ds = item[1]
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
        if all("ImageOrientationPatient" in d for _, d in entries):
            o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            return float(pos @ np.cross(o[:3], o[3:]))
        return float(pos[2])

    if all("ImagePositionPatient" in ds for _, ds in entries):
        entries.sort(key=key)
    elif all("InstanceNumber" in ds for _, ds in entries):
        entries.sort(key=lambda it: int(it[1].InstanceNumber))
    ds0 = entries[0][1]
    spacing = (float(ds0.PixelSpacing[0]), float(ds0.PixelSpacing[1])) if "PixelSpacing" in ds0 else None
    return tuple(p for p, _ in entries), spacing


def _series(folder: Path) -> tuple[tuple[Path, ...], Spacing]:
    return _cached_series(str(folder), _stamp(folder))


def _n_slices(path: Path, kind: str) -> int | None:
    """Number of axial slices of a 3D volume, or None for a 2D image (a 3D volume of depth 1 is 2D)."""
    fmt = _format(path)

    def count() -> int | None:
        if fmt == "pil":
            return None
        if fmt == "nifti":
            import nibabel as nib

            shape = _nifti_shape(nib.load(path).shape, path)
            return shape[2] if len(shape) == 3 and shape[2] > 1 else None
        if fmt == "itk":
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            if len(size) not in (2, 3):
                raise DataError(f"{path}: {len(size)}-D image is not supported (2D or 3D only)")
            return size[2] if len(size) == 3 and size[2] > 1 else None
        if fmt == "dicom":
            frames = int(_dicom_header(path).get("NumberOfFrames", 1) or 1)
            return frames if frames > 1 else None
        files = _series(path)[0]
        if len(files) == 1:  # one (possibly multi-frame) file
            frames = int(_dicom_header(files[0]).get("NumberOfFrames", 1) or 1)
            return frames if frames > 1 else None
        return len(files)

    return _guarded(path, kind, count)


def n_slices(path: str | Path) -> int | None:
    """Number of axial slices of a 3D volume (header only where cheap), or None for a 2D image.

    A 3D volume of depth 1 counts as 2D. Unreadable files are a DataError naming the file.
    """
    return _n_slices(Path(path), "image")


def _pick(n: int, slice_index: int | None, path: Path) -> int:
    if slice_index is None:
        if n == 1:
            return 0
        raise DataError(f"{path}: is a 3D volume with {n} slices; a slice index is needed")
    if not 0 <= slice_index < n:
        raise DataError(f"{path}: slice index {slice_index} is out of range (the volume has {n} slices)")
    return int(slice_index)


def _read_pil(path: Path, kind: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            log.warning("%s: has %d frames; only the first is used", path, im.n_frames)
        im.load()
        mode = im.mode
        if mode in ("P", "PA"):
            if kind == "mask":  # palette index = label value
                arr = np.asarray(im)
                return arr[..., 0] if arr.ndim == 3 else arr
            im = im.convert("RGBA")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.array(im)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # LA, RGBA: drop alpha
        arr = arr[..., :-1]
    return arr


def _read_dicom_pixels(path: Path, kind: str, frame: int | None) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[_pick(frames, frame, path)]
    elif frame not in (None, 0):
        raise DataError(f"{path}: is a 2D image; slice index {frame} is out of range")
    if kind == "image":
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            arr = arr.astype(np.float64) * slope + intercept
    return arr


def _read_plane(path: Path, slice_index: int | None, kind: str) -> tuple[np.ndarray, Spacing]:
    """One plane as (H, W) or (H, W, C) in its stored dtype, and its (row, col) spacing."""
    path = Path(path)
    fmt = _format(path)

    def read() -> tuple[np.ndarray, Spacing]:
        if fmt == "pil":
            if slice_index not in (None, 0):
                raise DataError(f"{path}: is a 2D image; slice index {slice_index} is out of range")
            return _read_pil(path, kind), None
        if fmt in ("nifti", "itk"):
            vol, spacing = _cached_volume(str(path), _stamp(path))
            return vol[_pick(vol.shape[0], slice_index, path)], spacing
        if fmt == "dicom":
            ds = _dicom_header(path)
            spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])) if "PixelSpacing" in ds else None
            return _read_dicom_pixels(path, kind, slice_index), spacing
        files, spacing = _series(path)
        if len(files) == 1:  # one (possibly multi-frame) file
            return _guarded(files[0], kind, _read_dicom_pixels, files[0], kind, slice_index), spacing
        f = files[_pick(len(files), slice_index, path)]
        return _guarded(f, kind, _read_dicom_pixels, f, kind, None), spacing

    arr, spacing = _guarded(path, kind, read)
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise DataError(f"{path}: {kind} plane has an unsupported shape {arr.shape}")
    return arr, spacing


def read_image(path: Path, slice_index: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read one image plane: float32 (C, H, W) raw intensities, C = 1 or 3, and (row_mm, col_mm) or None.

    RGBA drops alpha; palette images are converted to RGB; DICOM applies RescaleSlope/Intercept.
    ``slice_index`` selects the axial slice of a 3D volume (None for 2D files).
    """
    path = Path(path)
    arr, spacing = _read_plane(path, slice_index, "image")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.shape[2] in (1, 3):
        arr = arr.transpose(2, 0, 1)
    else:
        raise DataError(f"{path}: image has {arr.shape[2]} channels; only 1 (gray) or 3 (RGB) are supported")
    return np.ascontiguousarray(arr, dtype=np.float32), spacing


def read_mask(path: Path, slice_index: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read one mask plane: int64 (H, W) of raw label values, and (row_mm, col_mm) or None.

    Palette PNGs keep their palette indices. A colour mask whose channels are all equal is read
    as gray; other colour masks and non-integer values are a DataError.
    """
    path = Path(path)
    arr, spacing = _read_plane(path, slice_index, "mask")
    if arr.ndim == 3:
        if arr.shape[2] > 1 and not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            raise DataError(f"{path}: colour mask is not supported; save the label values as a gray or palette image")
        arr = arr[..., 0]
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise DataError(f"{path}: mask has {int(bad.sum())} non-integer values (e.g. {arr[bad].flat[0].item()!r})")
    return np.ascontiguousarray(arr, dtype=np.int64), spacing


# ----------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """Raw mask values -> class indices: ``values[i]`` is class i; ``values[0]`` is background."""

    values: tuple[int, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            values = tuple(int(v) for v in self.values)
        except (TypeError, ValueError) as e:
            raise DataError(f"labels: values must be integers, got {self.values!r}") from e
        if len(values) < 2:
            raise DataError(f"labels: need at least 2 values (background and one class), got {values}")
        if len(set(values)) != len(values):
            raise DataError(f"labels: values must be distinct, got {values}")
        names = tuple(str(n) for n in self.names) or ("background",) + tuple(f"class{i}" for i in range(1, len(values)))
        if len(names) != len(values):
            raise DataError(f"labels: {len(names)} names {names} for {len(values)} values {values}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", names)

    @property
    def n_classes(self) -> int:
        return len(self.values)

    def to_index(self, mask: np.ndarray, source: str | Path) -> np.ndarray:
        """int64 class indices of ``mask``; a value outside ``values`` is a DataError naming ``source``."""
        mask = np.asarray(mask)
        vals = np.asarray(self.values, dtype=np.int64)
        order = np.argsort(vals, kind="stable")
        sorted_vals = vals[order]
        pos = np.clip(np.searchsorted(sorted_vals, mask), 0, len(vals) - 1)
        ok = sorted_vals[pos] == mask
        if not ok.all():
            unknown = np.unique(mask[~ok])
            shown = ", ".join(str(v) for v in unknown[:10].tolist()) + (", ..." if len(unknown) > 10 else "")
            raise DataError(f"{source}: mask has label values [{shown}] outside the mapping {self.values}")
        return order[pos].astype(np.int64)


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


def parse_labels(spec: str | None, names: str | None = None) -> LabelMap | None:
    """``"0,1,2"`` (and optional ``"bg,ps,fh"``) -> LabelMap; ``None``/empty -> None (discover instead)."""
    if spec is None or not str(spec).strip():
        if names is not None and str(names).strip():
            raise DataError(f"--class-names: given ({names!r}) without --labels; give the label values too")
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"--labels: expected comma-separated integers such as '0,1,2', got {spec!r}") from None
    if len(values) < 2 or len(set(values)) != len(values):
        raise DataError(f"--labels: need at least 2 distinct values (background first), got {spec!r}")
    name_list: tuple[str, ...] = ()
    if names is not None and str(names).strip():
        name_list = tuple(n.strip() for n in str(names).split(","))
        if len(name_list) != len(values) or not all(name_list):
            raise DataError(f"--class-names: {names!r} must give {len(values)} non-empty names "
                            f"to match --labels {spec!r}")
        if "fg" in name_list[1:]:
            raise DataError(f"--class-names: 'fg' is reserved for the merged foreground; rename it in {names!r}")
    return LabelMap(values, name_list)


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How a raw plane becomes a network input: intensity scaling, colour, resize to size x size."""

    size: int = 256
    intensity: str = "minmax"  # minmax | percentile | window
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = None  # (low, high) after subtracting offset, e.g. (-1000, 1000)
    offset: float = 0.0  # subtracted from raw values first (CT stored as HU+1024 -> 1024)
    color: str = "gray"  # gray (luminance) | rgb (3 channels; gray repeated)
    crop: float = 1.0  # keep the central fraction of each side before resizing (1.0: whole plane)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise DataError(f"data.size: must be a positive integer, got {self.size!r}")
        if self.intensity not in ("minmax", "percentile", "window"):
            raise DataError(f"data.intensity: must be minmax, percentile or window, got {self.intensity!r}")
        if self.color not in ("gray", "rgb"):
            raise DataError(f"data.color: must be gray or rgb, got {self.color!r}")
        lo, hi = (float(v) for v in self.percentiles)
        if not 0 <= lo < hi <= 100:
            raise DataError(f"data.percentiles: need 0 <= low < high <= 100, got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", (lo, hi))
        if self.window is not None:
            wl, wh = (float(v) for v in self.window)
            if not wl < wh:
                raise DataError(f"data.window: need low < high, got {self.window!r}")
            object.__setattr__(self, "window", (wl, wh))
        elif self.intensity == "window":
            raise DataError("data.window: intensity 'window' needs a window (low, high)")
        object.__setattr__(self, "offset", float(self.offset))
        if not 0.0 < float(self.crop) <= 1.0:
            raise DataError(f"data.crop: must be in (0, 1], got {self.crop!r}")
        object.__setattr__(self, "crop", float(self.crop))


def crop_box(h: int, w: int, crop: float) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the central ``crop`` fraction of an h x w plane (at least 1 pixel)."""
    rows, cols = max(1, round(h * crop)), max(1, round(w * crop))
    return (h - rows) // 2, (w - cols) // 2, rows, cols


def center_crop(plane: np.ndarray, crop: float) -> np.ndarray:
    """The central ``crop`` fraction of the last two axes."""
    if crop >= 1.0:
        return plane
    top, left, rows, cols = crop_box(*plane.shape[-2:], crop)
    return plane[..., top:top + rows, left:left + cols]


def restore_mask(mask: np.ndarray, original_shape: tuple[int, int], crop: float = 1.0) -> np.ndarray:
    """The inverse of cropping and resizing for a label map: back to ``original_shape``, background (0) outside the crop."""
    h, w = original_shape
    top, left, rows, cols = crop_box(h, w, crop)
    out = np.zeros((h, w), dtype=mask.dtype)
    out[top:top + rows, left:left + cols] = resize_mask(mask, (rows, cols))
    return out


def to_color(image: np.ndarray, color: str) -> np.ndarray:
    """(C, H, W) -> (1, H, W) by ITU-R 601 luminance for "gray", or (3, H, W) for "rgb" (gray repeated)."""
    if color == "gray":
        if image.shape[0] == 3:
            w = np.asarray([0.299, 0.587, 0.114], dtype=np.float64)
            return np.tensordot(w, image.astype(np.float64), axes=1)[None].astype(np.float32)
        return image
    if image.shape[0] == 1:
        return np.repeat(image, 3, axis=0)
    return image


def scale_intensity(image: np.ndarray, prep: Preprocess) -> np.ndarray:
    """Per-image scaling to float32 in [0, 1] over all channels together.

    minmax: (x - min) / (max - min); percentile: clip to the percentiles, then the same;
    window: (x - offset) clipped to the window, then (v - low) / (high - low).
    A constant image gives zeros.
    """
    x = image.astype(np.float64) - prep.offset
    if prep.intensity == "window":
        lo, hi = prep.window  # type: ignore[misc]
    elif prep.intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, prep.percentiles))
    else:
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(image.shape, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size), bilinear (align_corners=False, antialiased when shrinking)."""
    c, h, w = image.shape
    if (h, w) == (size, size):
        return image.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size or w > size)
    return out[0].numpy()


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) -> (size, size) or (rows, cols), nearest neighbour on pixel centres (torch's "nearest-exact").

    Values are copied, never blended, so only labels present in ``mask`` can appear.
    """
    h, w = mask.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return mask[np.ix_(rows, cols)]


def prepare_image(image: np.ndarray, prep: Preprocess) -> np.ndarray:
    """Raw (C, H, W) -> float32 (1 or 3, size, size) in [0, 1]: centre crop, colour, intensity scaling, resize."""
    x = scale_intensity(to_color(center_crop(image, prep.crop), prep.color), prep)
    return np.clip(resize_image(x, prep.size), 0.0, 1.0)


@dataclass
class Sample:
    """A preprocessed case: image float32 (C, size, size) in [0, 1], mask int64 (size, size) class indices."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float] | None  # mm per pixel after resizing
    case_id: str
    group: str
    original_shape: tuple[int, int]


def load_sample(case: Case, prep: Preprocess, labels: LabelMap) -> Sample:
    """Read, check, scale and resize one case; masks are mapped to class indices, then resized (nearest)."""
    image, sp_img = read_image(case.image_path, case.slice_index)
    mask, sp_mask = read_mask(case.mask_path, case.slice_index)
    where = "" if case.slice_index is None else f" (slice {case.slice_index})"
    h, w = image.shape[1:]
    if (h, w) != mask.shape:
        raise DataError(f"{case.image_path} and {case.mask_path}{where}: image is {h}x{w} but mask is "
                        f"{mask.shape[0]}x{mask.shape[1]}")
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(f"{case.image_path}{where}: image has {int((~finite).sum())} NaN/Inf values")
    index = labels.to_index(mask, f"{case.mask_path}{where}")
    spacing = sp_img or sp_mask
    _, _, rows, cols = crop_box(h, w, prep.crop)
    if spacing is not None:
        spacing = (spacing[0] * rows / prep.size, spacing[1] * cols / prep.size)
    return Sample(prepare_image(image, prep), resize_mask(center_crop(index, prep.crop), prep.size), spacing, case.case_id,
                  case.group, (h, w))


def load_arrays(cases: Sequence[Case], prep: Preprocess, labels: LabelMap, *, progress: bool = False) -> dict:
    """Load every case into stacked arrays.

    Returns ``{"images": float32 (N, C, S, S), "masks": int64 (N, S, S), "case_ids", "groups",
    "spacings", "original_shapes"}`` (lists in the order of ``cases``).
    """
    from tqdm import tqdm

    n, s = len(cases), prep.size
    c = 3 if prep.color == "rgb" else 1
    out: dict[str, Any] = {"images": np.empty((n, c, s, s), np.float32), "masks": np.empty((n, s, s), np.int64),
                           "case_ids": [], "groups": [], "spacings": [], "original_shapes": []}
    try:
        for i, case in enumerate(tqdm(cases, desc="loading", unit="case", disable=not progress)):
            smp = load_sample(case, prep, labels)
            out["images"][i], out["masks"][i] = smp.image, smp.mask
            out["case_ids"].append(smp.case_id)
            out["groups"].append(smp.group)
            out["spacings"].append(smp.spacing)
            out["original_shapes"].append(smp.original_shape)
    finally:
        _cached_volume.cache_clear()
    return out


# ----------------------------------------------------------------------------- splits and partition


def _count(frac: float, n: int) -> int:
    return int(math.floor(frac * n + 0.5))


def split_cases(cases: Sequence[Case], *, val_frac: float = 0.2, test_frac: float = 0.2, seed: int = 0,
                by_group: bool = True) -> dict[str, list[Case]]:
    """Random train/val/test split; with ``by_group`` whole groups (patients) go to one split.

    Fractions are of groups (``by_group``) or of cases. With 3 or more units every non-zero
    fraction gets at least one unit and train keeps at least one. Deterministic for a seed.
    """
    for name, f in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= f < 1:
            raise DataError(f"{name}: must be in [0, 1), got {f}")
    if val_frac + test_frac >= 1:
        raise DataError(f"val_frac + test_frac: must be below 1, got {val_frac} + {test_frac}")
    if not cases:
        raise DataError("split_cases: no cases to split")
    units = sorted({c.group for c in cases}) if by_group else sorted(c.case_id for c in cases)
    n = len(units)
    n_test, n_val = _count(test_frac, n), _count(val_frac, n)
    if n >= 3:
        n_test = max(n_test, 1) if test_frac > 0 else 0
        n_val = max(n_val, 1) if val_frac > 0 else 0
    while n_test + n_val > n - 1 and n_test + n_val > 0:  # keep at least one unit for training
        if n_val >= n_test and n_val > (1 if n >= 3 and val_frac > 0 else 0):
            n_val -= 1
        elif n_test > (1 if n >= 3 and test_frac > 0 else 0):
            n_test -= 1
        elif n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    perm = np.random.default_rng(seed).permutation(n)
    where = {}
    for rank, i in enumerate(perm):
        where[units[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    for c in sorted(cases, key=lambda c: c.case_id):
        out[where[c.group if by_group else c.case_id]].append(c)
    log.info("split (%s, seed %d): %s", "by group" if by_group else "by case", seed,
             ", ".join(f"{k} {len(v)}" for k, v in out.items()))
    return out


def split_from_lists(cases: Sequence[Case], lists: dict[str, str | Path]) -> dict[str, list[Case]]:
    """Split by list files (one volume or slice name per line; ``#`` comments and blank lines skipped).

    A case belongs to a split if its case_id equals an entry or starts with ``entry + "_"``. A case
    matched by two splits is a DataError; cases in no list are dropped (logged). A relative list
    path that does not exist is also looked up in the dataset root (the parent of ``images/``).
    """
    if not lists:
        raise DataError("split_lists: no list files given")
    root = Path(cases[0].image_path).parent.parent if cases else None
    entry_split: dict[str, str] = {}
    entry_file: dict[str, Path] = {}
    for split, lp in lists.items():
        path = Path(lp)
        if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
            path = root / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"{path}: cannot read the {split!r} list ({type(e).__name__}: {e.strerror or e})") from e
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry in entry_split and entry_split[entry] != split:
                raise DataError(f"{path}: {entry!r} is listed in both {entry_split[entry]!r} ({entry_file[entry]}) "
                                f"and {split!r}")
            entry_split[entry], entry_file[entry] = split, path
    out: dict[str, list[Case]] = {k: [] for k in lists}
    used: set[str] = set()
    dropped = 0
    for c in sorted(cases, key=lambda c: c.case_id):
        cid = c.case_id
        keys = [cid] + [cid[:i] for i, ch in enumerate(cid) if ch == "_"]
        hits = {k: entry_split[k] for k in keys if k in entry_split}
        splits = set(hits.values())
        if len(splits) > 1:
            detail = ", ".join(f"{k!r} in {entry_file[k]}" for k in hits)
            raise DataError(f"{c.image_path}: case {cid!r} is listed in {len(splits)} splits ({detail})")
        if not splits:
            dropped += 1
            continue
        used.update(hits)
        out[splits.pop()].append(c)
    if dropped:
        log.info("split lists: %d of %d cases are in no list and were dropped", dropped, len(cases))
    unused = len(entry_split) - len(used)
    if unused:
        log.warning("split lists: %d of %d entries match no case (e.g. %r)", unused, len(entry_split),
                    next(e for e in entry_split if e not in used))
    log.info("split from lists: %s", ", ".join(f"{k} {len(v)}" for k, v in out.items()))
    return out


def partition(cases: Sequence[Case], n_sites: int, *, mode: str = "group", seed: int = 0) -> list[list[Case]]:
    """Deal cases to ``n_sites`` simulated hospitals; each site's list is sorted by case_id.

    "iid": shuffle cases, deal round-robin. "group": shuffle groups, then greedily give the
    largest remaining group to the site with the fewest cases (whole patients per site).
    "site": the sorted unique ``Case.site`` labels are the sites (their count must be n_sites).
    """
    if n_sites < 1:
        raise DataError(f"partition: n_sites must be at least 1, got {n_sites}")
    cases = list(cases)
    rng = np.random.default_rng(seed)
    parts: list[list[Case]] = [[] for _ in range(n_sites)]
    if mode == "iid":
        if len(cases) < n_sites:
            raise DataError(f"partition: {len(cases)} cases cannot fill {n_sites} sites")
        for rank, i in enumerate(rng.permutation(len(cases))):
            parts[rank % n_sites].append(cases[i])
    elif mode == "group":
        by_group: dict[str, list[Case]] = {}
        for c in cases:
            by_group.setdefault(c.group, []).append(c)
        groups = sorted(by_group)
        if len(groups) < n_sites:
            raise DataError(f"partition: {len(groups)} groups cannot fill {n_sites} sites (mode 'group')")
        shuffled = [groups[i] for i in rng.permutation(len(groups))]
        shuffled.sort(key=lambda g: -len(by_group[g]))  # stable: ties keep the shuffled order
        for g in shuffled:
            target = min(range(n_sites), key=lambda k: (len(parts[k]), k))
            parts[target].extend(by_group[g])
    elif mode == "site":
        missing = [c for c in cases if c.site is None]
        if missing:
            raise DataError(f"{missing[0].image_path}: case {missing[0].case_id!r} has no site label "
                            "(mode 'site' needs a group CSV with a 'site' column)")
        labels = sorted({c.site for c in cases if c.site is not None})
        if len(labels) != n_sites:
            raise DataError(f"partition: {len(labels)} site labels {labels} but {n_sites} sites requested")
        index = {s: k for k, s in enumerate(labels)}
        for c in cases:
            parts[index[c.site]].append(c)  # type: ignore[index]
    else:
        raise DataError(f"data.partition: must be iid, group or site, got {mode!r}")
    for p in parts:
        p.sort(key=lambda c: c.case_id)
    log.info("partition (%s, seed %d): %s cases per site", mode, seed, [len(p) for p in parts])
    return parts


# ----------------------------------------------------------------------------- synthetic sites

_SYNTH_RE = re.compile(r"^site\d+_p\d+_s\d+\.png$")


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float) -> np.ndarray:
    ct, st = math.cos(theta), math.sin(theta)
    u = (xx - cx) * ct + (yy - cy) * st
    v = -(xx - cx) * st + (yy - cy) * ct
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def synth(out: str | Path, *, sites: int = 3, patients_per_site: int = 4, slices_per_patient: int = 8, size: int = 128,
          n_classes: int = 3, seed: int = 0, overwrite: bool = False) -> Path:
    """Write synthetic multi-site, multi-class phantoms in the images/ + masks/ layout and return ``out``.

    Stems are ``site{k}_p{patient:02d}_s{slice:02d}``; ``groups.csv`` maps each to its patient
    group and site. Per slice: a smooth background texture, an ellipse (class 1, semi-axes
    18-32 % of the size) and, for more classes, discs inside it (class 2, 3, ...). Every class has
    its own mean intensity; every site its own gain, offset and noise level. Shapes vary smoothly
    along a patient's slices. Everything is drawn from ``np.random.default_rng(seed)``.
    """
    for name, v, lo in (("sites", sites, 1), ("patients_per_site", patients_per_site, 1),
                        ("slices_per_patient", slices_per_patient, 1), ("size", size, 16)):
        if not isinstance(v, int) or v < lo:
            raise DataError(f"synth: {name} must be an integer >= {lo}, got {v!r}")
    if not 2 <= n_classes <= 8:
        raise DataError(f"synth: n_classes must be between 2 and 8, got {n_classes}")
    out = Path(out)
    img_dir, mask_dir = out / "images", out / "masks"
    existing = [p for d in (img_dir, mask_dir) if d.is_dir() for p in d.iterdir() if not p.name.startswith(".")]
    if existing and not overwrite:
        raise DataError(f"{out}: already holds {len(existing)} image/mask files; refusing to overwrite (use overwrite)")
    for p in existing:
        if p.is_file() and _SYNTH_RE.match(p.name):
            p.unlink()
        else:
            log.warning("%s: not a synthetic file, left in place", p)

    rng = np.random.default_rng(seed)
    levels = np.linspace(30.0, 200.0, n_classes)
    gap = float(levels[1] - levels[0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    rows = ["case,group,site"]
    n_inner = n_classes - 2
    for k in range(1, sites + 1):
        gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-15.0, 15.0)
        sigma = gap * rng.uniform(0.05, 0.12)
        for p in range(1, patients_per_site + 1):
            cx0, cy0 = rng.uniform(0.4, 0.6, 2) * size
            a0, b0 = rng.uniform(0.18, 0.32, 2) * size
            theta0, dtheta = rng.uniform(0.0, math.pi), rng.uniform(-0.4, 0.4)
            drift = rng.uniform(-0.05, 0.05, 2) * size
            phi0 = rng.uniform(0.0, 2 * math.pi)
            freqs = rng.uniform(0.5, 2.5, (3, 2)) * rng.choice([-1.0, 1.0], (3, 2))
            phases, dphases = rng.uniform(0.0, 2 * math.pi, 3), rng.uniform(-0.5, 0.5, 3)
            for s in range(slices_per_patient):
                t = 2.0 * s / (slices_per_patient - 1) - 1.0 if slices_per_patient > 1 else 0.0
                scale = 1.0 - 0.25 * t * t
                cx, cy = cx0 + drift[0] * t, cy0 + drift[1] * t
                a, b, theta = a0 * scale, b0 * scale, theta0 + dtheta * t
                label = np.zeros((size, size), np.uint8)
                inside = _ellipse(xx, yy, cx, cy, a, b, theta)
                label[inside] = 1
                ct, st = math.cos(theta), math.sin(theta)
                frac = 0.25 if n_inner == 1 else 0.5
                spread = 0.45 if n_inner == 1 else min(0.4, 0.45 * math.sin(math.pi / max(n_inner, 1)))
                radius = spread * min(a, b)
                for j in range(n_inner):
                    phi = phi0 + 2 * math.pi * j / n_inner
                    u, v = frac * a * math.cos(phi), frac * b * math.sin(phi)
                    dcx, dcy = cx + u * ct - v * st, cy + u * st + v * ct
                    label[inside & ((xx - dcx) ** 2 + (yy - dcy) ** 2 <= radius ** 2)] = 2 + j
                texture = sum(0.08 * gap * np.cos(2 * math.pi * (f[0] * xx + f[1] * yy) / size + ph + dph * t)
                              for f, ph, dph in zip(freqs, phases, dphases))
                noise = rng.normal(0.0, sigma, (size, size))
                image = np.clip(np.round(offset + gain * (levels[label] + texture) + noise), 0, 255).astype(np.uint8)
                stem = f"site{k}_p{p:02d}_s{s:02d}"
                atomic_write_bytes(img_dir / f"{stem}.png", _png(image))
                atomic_write_bytes(mask_dir / f"{stem}.png", _png(label))
                rows.append(f"{stem},site{k}_p{p:02d},site{k}")
    atomic_write_text(out / "groups.csv", "\n".join(rows) + "\n")
    n = sites * patients_per_site * slices_per_patient
    atomic_write_text(out / "README.md", (
        "# Synthetic multi-site phantoms (ppcmi synth)\n\n"
        f"{n} 2D slices: {sites} sites x {patients_per_site} patients x {slices_per_patient} slices, "
        f"{size}x{size} pixels, {n_classes} classes (0 = background), seed {seed}.\n\n"
        "- `images/<stem>.png`: 8-bit gray; `masks/<stem>.png`: uint8 labels 0..n_classes-1.\n"
        "- Stems are `site{k}_p{patient:02d}_s{slice:02d}`; `groups.csv` gives each case's patient group and site.\n"
        "- Class 1 is an ellipse, classes 2+ are discs inside it, on a smooth textured background.\n"
        "- Each class has its own mean intensity; each site its own gain, offset and noise level.\n"
        "- Made by `ppcmi.data.synth`; no real patient data.\n"
    ))
    log.info("%s: wrote %d synthetic cases (%d sites)", out, n, sites)
    return out
