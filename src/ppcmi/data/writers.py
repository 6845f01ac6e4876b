"""Prediction writers (hospital side): label maps back into files that overlay their source image.

A prediction arrives as the readers' planes: one (H, W) integer label map per plane of the source,
in the readers' plane convention and slice order (``ppcmi.data`` docstring), raw label values
already. The writer stacks them and lets the imaging libraries put the geometry back:

- NIfTI (``.nii``, ``.nii.gz``) -> ``STEM.nii.gz`` through nibabel with the source's own header:
  the same voxel order, the qform and the sform with their codes, so any viewer places the label
  exactly where it places the image (a 4D source gives a 3D label on its spatial grid).
- MetaImage (``.mha``, ``.mhd``) -> ``STEM.mha``; NRRD (``.nrrd``, ``.nhdr``) -> ``STEM.nrrd``:
  SimpleITK builds the label image from the array and copies the source's size, spacing, origin
  and direction (``CopyInformation``).
- DICOM (a series folder, a 2D ``.dcm`` or a multi-frame file) -> ``STEM.nii.gz``, a label volume
  on the series geometry (SimpleITK's GDCM series reader; the readers' slice order is checked to be
  GDCM's), and ``STEM.seg.dcm``, a DICOM SEG (highdicom, binary, one segment per class with its
  name) that references the source instances and their FrameOfReferenceUID.
- PNG, JPEG, TIFF -> ``STEM.png`` (8-bit, or 16-bit when a value exceeds 255).

Nothing is overwritten unless asked: every target is checked before any is written, and the files
are written as one step (:func:`ppcmi.fileio.write_files`: atomic, a refusal leaves none behind).
"""

from __future__ import annotations

import gzip
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from ..fileio import refuse_existing, write_files
from ..labels import LabelMap
from .readers import _format, _guarded, _n_slices, _nifti_shape, _one_line, _series, _split_name

log = logging.getLogger(__name__)

_ITK_OUT = {".mha": ".mha", ".mhd": ".mha", ".nrrd": ".nrrd", ".nhdr": ".nrrd"}


def output_format(source: str | Path) -> str:
    """What :func:`write_prediction` writes for ``source``: "png", "nifti", "mha", "nrrd" or "dicom"
    (a NIfTI label volume plus a DICOM SEG)."""
    source = Path(source)
    fmt = _format(source)
    if fmt == "pil":
        return "png"
    if fmt == "itk":
        return _ITK_OUT[_split_name(source.name)[1]].lstrip(".")
    if fmt == "nifti":
        return "nifti"
    return "dicom"


def output_names(source: str | Path, stem: str) -> list[str]:
    """The file names :func:`write_prediction` writes for ``source`` (label volume first)."""
    fmt = output_format(source)
    if fmt == "dicom":
        return [f"{stem}.nii.gz", f"{stem}.seg.dcm"]
    return [f"{stem}." + {"png": "png", "nifti": "nii.gz", "mha": "mha", "nrrd": "nrrd"}[fmt]]


def _stack(source: Path, planes: Sequence[np.ndarray]) -> np.ndarray:
    """The planes as one int64 (Z, H, W) array, checked against the source's slice count."""
    n = _n_slices(source, "image")
    expected = 1 if n is None else n
    if len(planes) != expected:
        raise DataError(f"{source}: {len(planes)} prediction planes for an image of {expected} "
                        f"{'plane' if expected == 1 else 'planes'}")
    arrs = [np.asarray(p) for p in planes]
    for k, a in enumerate(arrs):
        if a.ndim != 2:
            raise DataError(f"{source}: prediction plane {k} is shaped {a.shape}, not (H, W)")
        if a.dtype.kind not in "iub":
            raise DataError(f"{source}: prediction plane {k} is {a.dtype}, not an integer label map")
        if a.shape != arrs[0].shape:
            raise DataError(f"{source}: prediction planes have different shapes {arrs[0].shape} and {a.shape}")
    return np.stack(arrs).astype(np.int64)


def _label_dtype(vol: np.ndarray, source: Path) -> np.dtype:
    lo, hi = int(vol.min()), int(vol.max())
    for dt in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise DataError(f"{source}: label values {lo}..{hi} do not fit a 32-bit label map")


def _check_plane_shape(source: Path, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise DataError(f"{source}: prediction planes are {got[0]}x{got[1]} but the image planes are "
                        f"{want[0]}x{want[1]}")


# ----------------------------------------------------------------------------- per format


def _nifti_bytes(source: Path, vol: np.ndarray) -> bytes:
    """A NIfTI label volume with the source's header geometry (qform, sform, codes, voxel order)."""
    import nibabel as nib

    src = nib.load(str(source))
    _nifti_shape(src.shape, source)  # 2D, 3D, or 3D + channels; anything else is a DataError
    spatial = tuple(int(s) for s in src.shape[:3])
    data = vol.transpose(2, 1, 0)  # (k, j, i) -> (i, j, k): the inverse of the readers' transpose
    if data.shape[:2] != spatial[:2] or int(np.prod(spatial[2:])) != data.shape[2]:
        raise DataError(f"{source}: prediction is {vol.shape[0]} planes of {vol.shape[1]}x{vol.shape[2]} but the "
                        f"image is shaped {tuple(src.shape)} (NIfTI i, j, k)")
    data = data.reshape(spatial).astype(_label_dtype(vol, source))
    hdr = src.header.copy()
    hdr.set_data_dtype(data.dtype)
    out = type(src)(data, None, header=hdr)  # the header's shape follows the data: a 4D source gives 3D
    out.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
    out.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    out.header.set_intent("label")
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, 0
    return gzip.compress(out.to_bytes(), mtime=0)


def _sitk_bytes(image: Any, ext: str) -> bytes:
    """Encode a SimpleITK image as file bytes (SimpleITK chooses the writer by extension)."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="ppcmi-write-") as tmp:
        path = Path(tmp) / f"label{ext}"
        sitk.WriteImage(image, str(path), True)
        return path.read_bytes()


def _label_image(vol: np.ndarray, reference: Any, source: Path) -> Any:
    """A SimpleITK label image from (Z, H, W) with ``reference``'s size, spacing, origin and direction."""
    import SimpleITK as sitk

    arr = vol.astype(_label_dtype(vol, source))
    size = tuple(reversed(reference.GetSize()))  # (z, y, x) or (y, x): the array order
    if reference.GetDimension() not in (2, 3):
        raise DataError(f"{source}: {reference.GetDimension()}-D image is not supported (2D or 3D only)")
    if reference.GetDimension() == 2:
        size = (1,) + size
    if arr.shape != size:
        raise DataError(f"{source}: prediction is {arr.shape[0]} planes of {arr.shape[1]}x{arr.shape[2]} but the "
                        f"image is {size[0]} planes of {size[1]}x{size[2]}")
    if reference.GetDimension() == 2:
        arr = arr[0]
    label = sitk.GetImageFromArray(arr, isVector=False)
    label.CopyInformation(reference)
    return label


def _itk_reference(source: Path) -> Any:
    """The source's geometry as a SimpleITK image (its size, spacing, origin, direction)."""
    import SimpleITK as sitk

    return sitk.ReadImage(str(source))


def _dicom_files(source: Path) -> list[Path]:
    """The DICOM files of ``source`` in the readers' slice order (one file for a 2D or multi-frame DICOM)."""
    if _format(source) == "dicom":
        return [source]
    return list(_series(source)[0])


def _dicom_reference(source: Path, files: list[Path]) -> Any:
    """The DICOM series geometry from SimpleITK's GDCM reader, after checking GDCM sorts as the readers do."""
    import SimpleITK as sitk

    if len(files) == 1:
        return sitk.ReadImage(str(files[0]))
    import pydicom

    heads = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "ImagePositionPatient"])
             for f in files]
    if not all("ImagePositionPatient" in h for h in heads):
        # no slice positions: the series has no geometry to keep beyond spacing; keep the readers' order
        log.warning("%s: slices without ImagePositionPatient; the label volume follows the readers' slice order "
                    "with no position in space", source)
    else:
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source), str(heads[0].SeriesInstanceUID))
        if [Path(n).resolve() for n in names] != [f.resolve() for f in files]:
            raise DataError(f"{source}: GDCM orders the {len(names)} slices of this series differently from the "
                            f"readers ({len(files)} slices); the slice positions are ambiguous, refusing to write "
                            f"geometry")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader.Execute()


def _segment_numbers(vol: np.ndarray, labels: LabelMap | None, source: Path) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Raw label values -> SEG segment numbers 1..K (0 = background), and (number, name) per segment."""
    if labels is None:
        present = [int(v) for v in np.unique(vol) if v != 0]
        labels = LabelMap((0, *present), ("background", *(f"label {v}" for v in present))) if present else None
        if labels is None:
            return np.zeros(vol.shape, np.uint8), []
    index = labels.to_index(vol, f"{source} (prediction)")
    return index.astype(np.uint16 if labels.n_classes > 255 else np.uint8), \
        [(i, labels.names[i]) for i in range(1, labels.n_classes)]


def _seg_bytes(files: list[Path], vol: np.ndarray, labels: LabelMap | None, source: Path) -> bytes | None:
    """A DICOM SEG of ``vol`` referencing ``files`` (highdicom), or None (logged) when the source cannot carry one."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from .. import __version__

    segnums, segments = _segment_numbers(vol, labels, source)
    if not segments:
        log.warning("%s: the prediction holds no foreground and no label names were given; no DICOM SEG written",
                    source)
        return None
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    algorithm = hd.AlgorithmIdentificationSequence(name="ppcmi PPCMI-SF", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(segment_number=n, segment_label=name[:64],
                                              segmented_property_category=codes.SCT.Tissue,
                                              segmented_property_type=codes.SCT.Tissue,
                                              algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                              algorithm_identification=algorithm)
                    for n, name in segments]
    pixels = segnums[0] if len(files) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) == 1 else segnums
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ppcmi",
            manufacturer_model_name="PPCMI-SF", software_versions=__version__, device_serial_number="0",
            series_description="ppcmi segmentation", omit_empty_frames=True)
    except Exception as e:  # highdicom raises ValueError/AttributeError/KeyError for sources it cannot reference
        log.warning("%s: no DICOM SEG written, the source cannot be referenced (%s); the NIfTI label volume is",
                    source, _one_line(e))
        return None
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png_bytes(vol: np.ndarray, source: Path) -> bytes:
    from PIL import Image

    from .readers import _read_pil

    plane = vol[0]
    _check_plane_shape(source, plane.shape, _guarded(source, "image", _read_pil, source, "image").shape[:2])
    dt = _label_dtype(vol, source)
    if dt not in (np.uint8, np.uint16):
        raise DataError(f"{source}: label values {int(vol.min())}..{int(vol.max())} do not fit a PNG (0..65535)")
    buf = io.BytesIO()
    Image.fromarray(plane.astype(dt)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- entry point


def _check_stem(source: Path, stem: str) -> None:
    if not stem or Path(stem).name != stem or stem in (".", "..") or "\\" in stem:
        raise DataError(f"{source}: output name {stem!r} is not a plain file name")


def render_prediction(source: str | Path, planes: Sequence[np.ndarray], stem: str, *,
                      labels: LabelMap | None = None) -> dict[str, bytes]:
    """The files :func:`write_prediction` writes, as ``{file name: bytes}`` (label volume first), without
    touching the disk: a caller writing several sources renders all, then writes them as one step
    (:func:`ppcmi.fileio.write_files`). A DICOM SEG the source cannot carry is left out (logged)."""
    source = Path(source)
    _check_stem(source, stem)
    fmt = output_format(source)
    names = output_names(source, stem)
    vol = _stack(source, planes)

    def encode() -> list[bytes | None]:
        if fmt == "png":
            return [_png_bytes(vol, source)]
        if fmt == "nifti":
            return [_nifti_bytes(source, vol)]
        if fmt in ("mha", "nrrd"):
            return [_sitk_bytes(_label_image(vol, _itk_reference(source), source), f".{fmt}")]
        files = _dicom_files(source)
        label = _label_image(vol, _dicom_reference(source, files), source)
        return [_sitk_bytes(label, ".nii.gz"), _seg_bytes(files, vol, labels, source)]

    try:
        blobs = encode()
    except DataError:
        raise
    except Exception as e:  # every library has its own exception types
        raise DataError(f"{source}: cannot write its prediction ({_one_line(e)})") from e
    return {name: blob for name, blob in zip(names, blobs) if blob is not None}


def write_prediction(source: str | Path, planes: Sequence[np.ndarray], out_dir: str | Path, stem: str, *,
                     labels: LabelMap | None = None, overwrite: bool = False) -> list[Path]:
    """Write a predicted label map with ``source``'s exact geometry into ``out_dir``.

    ``planes``: one (H, W) integer array of raw label values per plane of ``source`` (one for a 2D
    image), in the readers' plane convention and slice order. ``labels`` names the classes of a
    DICOM SEG (segment i is ``labels.values[i]``, named ``labels.names[i]``; background
    ``labels.values[0]`` is not a segment); without it, each non-zero value present is a segment
    named ``label V``. Returns the written paths (label volume first; a DICOM source also gets
    ``STEM.seg.dcm`` unless the source lacks what a SEG must reference, which is logged). Without
    ``overwrite`` an existing target is refused (PpcmiError) before anything is rendered or written;
    with it each file is replaced atomically.
    """
    source, out_dir = Path(source), Path(out_dir)
    _check_stem(source, stem)
    targets = [out_dir / n for n in output_names(source, stem)]
    if not overwrite:
        refuse_existing(targets)
    files = {out_dir / name: blob for name, blob in render_prediction(source, planes, stem, labels=labels).items()}
    written = write_files(files, overwrite=overwrite)
    log.info("%s: prediction written to %s", source, ", ".join(p.name for p in written))
    return written


__all__ = ["output_format", "output_names", "render_prediction", "write_prediction"]
