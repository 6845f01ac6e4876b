"""Image and mask readers (hospital side): PNG/JPEG/TIFF, NIfTI, MHA/MHD, NRRD, DICOM files and series,
returning one 2D plane (H, W) and its spacing; an image may be several files, one per channel.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd",
                                ".nhdr", ".dcm")
_PIL_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_NIFTI_EXTS = (".nii", ".nii.gz")
_ITK_EXTS = (".mha", ".mhd", ".nrrd", ".nhdr")
_EXTS_LONGEST_FIRST = tuple(sorted(IMAGE_EXTS, key=len, reverse=True))

Spacing = tuple[float, float] | None


def _split_name(name: str) -> tuple[str, str]:
    """``"a.nii.gz"`` -> ``("a", ".nii.gz")``; the extension is lower-cased; unknown ones pass through."""
    low = name.lower()
    for ext in _EXTS_LONGEST_FIRST:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    p = Path(name)
    return p.stem, p.suffix.lower()

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
    """(i, j[, k[, c]]) with trailing singleton axes dropped; a 4th axis holds channels (MSD multi-modal)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3, 4):
        raise DataError(f"{path}: NIfTI data shaped {shape} is not supported (2D, 3D, or 3D with channels on the "
                        f"4th axis)")
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
        # (i, j, k[, c]) -> (k, j, i[, c]) = (Z, H, W[, C])
        vol = np.ascontiguousarray(data.transpose((2, 1, 0) + tuple(range(3, data.ndim))))
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
            return shape[2] if len(shape) >= 3 and shape[2] > 1 else None
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


def _rescale(ds: Any, frame: int) -> tuple[float, float]:
    """(slope, intercept) of the modality rescale: top level, or for an enhanced multi-frame image the
    frame's own or the shared PixelValueTransformationSequence (where SimpleITK/GDCM read it too)."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for g in groups:
        seq = g.get("PixelValueTransformationSequence")
        if seq:
            return float(seq[0].get("RescaleSlope", 1) or 1), float(seq[0].get("RescaleIntercept", 0) or 0)
    return 1.0, 0.0


def _read_dicom_pixels(path: Path, kind: str, frame: int | None) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    k = 0
    if frames > 1:
        k = _pick(frames, frame, path)
        arr = arr[k]
    elif frame not in (None, 0):
        raise DataError(f"{path}: is a 2D image; slice index {frame} is out of range")
    if kind == "image":
        slope, intercept = _rescale(ds, k)
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


def read_image(path: Path | Sequence[Path], slice_index: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read one image plane: float32 (C, H, W) raw intensities and (row_mm, col_mm) or None.

    C is 1 (gray), 3 (RGB), or the channels of a multi-channel volume (a 4D NIfTI's 4th axis, a
    vector MHA/NRRD). ``path`` may also be a sequence of files, one per channel (nnU-Net's
    ``CASE_0000``, ``CASE_0001``, ...): their planes are stacked in that order and must agree in size.
    RGBA drops alpha; palette images are converted to RGB; DICOM applies RescaleSlope/Intercept, so
    CT comes in HU. ``slice_index`` selects the axial slice of a 3D volume (None for 2D files).
    """
    if not isinstance(path, (str, Path)):
        paths = [Path(p) for p in path]
        if not paths:
            raise DataError("read_image: an empty list of channel files")
        planes = [read_image(p, slice_index) for p in paths]
        for p, (a, _) in zip(paths[1:], planes[1:]):
            if a.shape[1:] != planes[0][0].shape[1:]:
                raise DataError(f"{p}: channel plane is {a.shape[1]}x{a.shape[2]} but {paths[0].name} is "
                                f"{planes[0][0].shape[1]}x{planes[0][0].shape[2]}")
        return np.concatenate([a for a, _ in planes]), planes[0][1]
    path = Path(path)
    arr, spacing = _read_plane(path, slice_index, "image")
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32), spacing


# ----------------------------------------------------------------------------- DICOM RTSTRUCT masks


@functools.lru_cache(maxsize=64)
def _modality(path_str: str, stamp: tuple[int, int]) -> str:
    import pydicom

    try:
        return str(pydicom.dcmread(path_str, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
    except Exception:  # not DICOM: the format's own reader reports it
        return ""


def is_rtstruct(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM RT Structure Set file (Modality RTSTRUCT)."""
    path = Path(path)
    return path.is_file() and _split_name(path.name)[1] in (".dcm", "") and _modality(str(path), _stamp(path)) == "RTSTRUCT"


@functools.lru_cache(maxsize=8)
def _rt_header(path_str: str, stamp: tuple[int, int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ROI names in StructureSetROISequence order, referenced SeriesInstanceUIDs) of an RTSTRUCT."""
    import pydicom

    ds = pydicom.dcmread(path_str, stop_before_pixels=True)
    uids = {str(se.SeriesInstanceUID) for fr in ds.get("ReferencedFrameOfReferenceSequence", [])
            for st in fr.get("RTReferencedStudySequence", []) for se in st.get("RTReferencedSeriesSequence", [])}
    return tuple(str(r.ROIName) for r in ds.get("StructureSetROISequence", [])), tuple(sorted(uids))


@functools.lru_cache(maxsize=8)
def _series_uid(folder_str: str, stamp: tuple[int, int]) -> str:
    import pydicom

    first = _series(Path(folder_str))[0][0]
    return str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


def rtstruct_series_uid(path: Path) -> str:
    """The SeriesInstanceUID of the image series an RTSTRUCT's contours are drawn on."""
    path = Path(path)
    uids = _guarded(path, "mask", lambda: _rt_header(str(path), _stamp(path)))[1]
    if len(uids) != 1:
        raise DataError(f"{path}: RTSTRUCT references {len(uids)} image series; exactly one is supported")
    return uids[0]


def rtstruct_roi_names(path: Path) -> list[str]:
    """The ROI names of an RTSTRUCT, in its StructureSetROISequence order."""
    path = Path(path)
    return list(_guarded(path, "mask", lambda: _rt_header(str(path), _stamp(path)))[0])


@functools.lru_cache(maxsize=1)
def _loaded_rtstruct(rt_str: str, series_str: str, stamps: tuple[tuple[int, int], tuple[int, int]]) -> tuple[Any, np.ndarray]:
    """rt-utils' RTStruct on the series (it loads every slice), and where its slices sit in the readers' order."""
    import pydicom
    from rt_utils import RTStructBuilder

    rt, folder = Path(rt_str), Path(series_str)
    files = _series(folder)[0]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    h0 = heads[0]
    # rt-utils 1.2.7 allocates each slice mask as (Columns, Rows) and scales the row direction by the
    # row spacing: it is right only for square images with square pixels, so refuse the others.
    if int(h0.Rows) != int(h0.Columns) or abs(float(h0.PixelSpacing[0]) - float(h0.PixelSpacing[1])) > 1e-6:
        raise DataError(f"{rt}: RTSTRUCT rasterisation (rt-utils 1.2.7) needs square slices with square pixels; "
                        f"the series is {h0.Rows}x{h0.Columns} at {list(h0.PixelSpacing)} mm")
    struct = RTStructBuilder.create_from(dicom_series_path=str(folder), rt_struct_path=str(rt))
    ours = {str(h.SOPInstanceUID): k for k, h in enumerate(heads)}
    theirs = [str(ds.SOPInstanceUID) for ds in struct.series_data]
    if sorted(theirs) != sorted(ours):
        raise DataError(f"{rt}: rt-utils found {len(theirs)} slices in {folder}, the readers {len(ours)}")
    return struct, np.asarray([ours[u] for u in theirs])  # rt-utils slice i is our slice order[i]


@functools.lru_cache(maxsize=16)
def _roi_mask(rt_str: str, series_str: str, name: str, stamps: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """One ROI as bool (Z, H, W) in the readers' slice order, read-only."""
    struct, order = _loaded_rtstruct(rt_str, series_str, stamps)
    mask = np.asarray(struct.get_roi_mask_by_name(name), bool)  # (rows, cols, slices) in rt-utils' order
    if not mask.any():
        log.warning("%s: ROI %r has no contour on the series; its class is empty", rt_str, name)
    out = np.zeros((mask.shape[2], mask.shape[0], mask.shape[1]), bool)
    out[order] = mask.transpose(2, 0, 1)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=2)
def _cached_rtstruct(rt_str: str, series_str: str, rois: tuple[str, ...],
                     stamps: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """The RTSTRUCT's ROIs rasterised by rt-utils on the series, as uint16 (Z, H, W) in the readers'
    slice order: ROI ``rois[i]`` is value i + 1; where ROIs overlap, the one with fewer voxels wins."""
    masks = [_roi_mask(rt_str, series_str, name, stamps) for name in rois]
    out = np.zeros(masks[0].shape, np.uint16)
    for value in sorted(range(1, len(rois) + 1), key=lambda v: -int(masks[v - 1].sum())):  # largest first: smaller wins
        out[masks[value - 1]] = value
    out.setflags(write=False)
    return out


def rtstruct_volume(path: Path, series: Path, rois: Sequence[str] | None = None) -> np.ndarray:
    """An RTSTRUCT rasterised on its image series (rt-utils): uint16 (Z, H, W) in the readers' slice order.

    Classes: ``rois`` in the given order are values 1, 2, ...; by default every ROI of the file,
    sorted by name (so hospitals whose exports list the same ROIs in another order agree). Where
    ROIs overlap, the smaller ROI (fewer voxels on this series) wins, so a tumour drawn inside a
    lung stays a tumour; the polygons are filled by rt-utils (OpenCV ``fillPoly``: holes, several
    contours per slice). A name the file does not hold is a DataError listing the ones it does.
    """
    path, series = Path(path), Path(series)
    names = rtstruct_roi_names(path)
    chosen = tuple(sorted(names) if rois is None else rois)
    missing = [r for r in chosen if r not in names]
    if missing:
        raise DataError(f"{path}: no ROI named {missing[0]!r} (the RTSTRUCT holds {', '.join(map(repr, names))})")
    if not chosen:
        raise DataError(f"{path}: RTSTRUCT holds no ROI")
    uid = rtstruct_series_uid(path)
    got = _guarded(series, "image", lambda: _series_uid(str(series), _stamp(series)))
    if got != uid:
        raise DataError(f"{path}: RTSTRUCT is drawn on series {uid}, but {series} holds series {got}")
    return _guarded(path, "mask", _cached_rtstruct, str(path), str(series), chosen, (_stamp(path), _stamp(series)))


def read_mask(path: Path, slice_index: int | None = None, *, reference: Path | None = None,
              rois: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read one mask plane: int64 (H, W) of raw label values, and (row_mm, col_mm) or None.

    Palette PNGs keep their palette indices. A colour mask whose channels are all equal is read
    as gray; other colour masks and non-integer values are a DataError. A DICOM RTSTRUCT is
    rasterised on ``reference``, its image series folder (:func:`rtstruct_volume`; ``rois`` chooses
    and orders the classes).
    """
    path = Path(path)
    if is_rtstruct(path):
        if reference is None:
            raise DataError(f"{path}: an RTSTRUCT mask needs its image series (reference=) to be rasterised on")
        vol = rtstruct_volume(path, Path(reference), rois)
        return vol[_pick(vol.shape[0], slice_index, path)].astype(np.int64), _series(Path(reference))[1]
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
