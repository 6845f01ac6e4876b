"""A hospital's dataset fingerprint (hospital side): aggregates of its training cases that the coordinator plans from.

:func:`compute_fingerprint` reads every training plane once (image and mask, at native size, before any
crop or intensity scaling) and keeps only sums, counts, a fixed-bin histogram and quantiles over planes;
the result is a :class:`ppcmi.protocol.Fingerprint`, the only thing that crosses. :func:`dataset_modality`
finds the imaging modality where the data says it: a ``dataset.json`` (nnU-Net's ``channel_names``, the
Medical Segmentation Decathlon's ``modality``) or the DICOM ``Modality`` attribute.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..labels import LabelMap
from ..protocol import HIST_MAX_INDEX, MODALITIES, QUANTILES, Fingerprint, hist_index
from .discovery import Case, dataset_modalities, dicom_modality, read_case_mask
from .preprocess import to_color
from .readers import _cached_volume, read_image

log = logging.getLogger(__name__)

# names datasets use for a channel, by modality (lower case; matched as whole words or prefixes)
_ALIASES = {
    "CT": ("ct", "cta", "cect", "ncct", "hu", "computed tomography"),
    "MR": ("mr", "mri", "t1", "t1w", "t1c", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd", "cine", "mra", "bold", "swi",
           "magnetic resonance"),
    "US": ("us", "ultrasound", "echo", "sonography"),
    "XR": ("xr", "x-ray", "xray", "cr", "dx", "mg", "mammography", "radiograph"),
    "PET": ("pet", "pt", "suv"),
}


def normalise_modality(name: str) -> str:
    """A channel or modality name as one of :data:`ppcmi.protocol.MODALITIES` ("OTHER" when none matches).

    ``"CT"``, ``"MRI"``, ``"T2"``, ``"FLAIR"``, ``"ultrasound"`` ... -> CT, MR, MR, MR, US; DICOM codes too."""
    s = str(name).strip().lower()
    if s.upper() in MODALITIES:
        return s.upper()
    words = s.replace("_", " ").replace("-", " ").split()
    for modality, aliases in _ALIASES.items():
        if s in aliases or (words and words[0] in aliases):
            return modality
    return "OTHER"


def dataset_modality(root: str | Path | None, cases: Sequence[Case]) -> str:
    """The modality the data records: ``root/dataset.json`` (:func:`dataset_modalities`), else the first case's
    DICOM header (:func:`dicom_modality`), else "UNKNOWN". Channels of different modalities are reported; the
    plan normalises the gray plane as channel 0's."""
    names = dataset_modalities(root) if root is not None and Path(root).is_dir() else None
    if not names and cases and _is_dicom(cases[0].image_path):
        try:
            names = dicom_modality(cases[0].image_path)
        except Exception:  # a .dcm that pydicom cannot read: its reader names it when the case is loaded
            names = None
    if not names:
        return "UNKNOWN"
    found = [normalise_modality(n) for n in names]
    if len(set(found)) > 1:
        log.warning("%s: channels of different modalities (%s); planning for channel 0 (%s)", root, ", ".join(names), found[0])
    return found[0]


def _is_dicom(path: Path) -> bool:
    return Path(path).is_dir() or Path(path).suffix.lower() == ".dcm"


class _Moments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.), in float64."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        n_b, mean_b = x.size, float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


def _quantiles(values: list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.quantile(np.asarray(values, dtype=np.float64), QUANTILES)) if values else ()


def compute_fingerprint(cases: Sequence[Case], labels: LabelMap, *, client: str, modality: str = "UNKNOWN",
                        offset: float = 0.0) -> Fingerprint:
    """The fingerprint of a hospital's training ``cases`` (see :class:`ppcmi.protocol.Fingerprint`).

    Intensities are those of the gray plane (ITU-R 601 luminance of a colour image) minus ``offset``
    (``data.offset``), counted where the mask holds a class other than background."""
    if not cases:
        raise DataError(f"{client}: no training cases to fingerprint")
    k = labels.n_classes
    rows, cols, sp_rows, sp_cols = [], [], [], []
    top, bottom, left, right = [], [], [], []
    channels, constant = 1, 0
    moments = _Moments()
    hist = np.zeros(2 * HIST_MAX_INDEX + 2, dtype=np.int64)
    class_pixels = np.zeros(k, dtype=np.float64)
    class_planes = np.zeros(k, dtype=np.int64)
    cases_with: dict[str, np.ndarray] = {}
    try:
        for case in cases:
            image, sp_img = read_image(case.image_source, case.slice_index)
            mask, sp_mask = read_case_mask(case)  # (an RTSTRUCT is rasterised on the case's series)
            where = "" if case.slice_index is None else f" (slice {case.slice_index})"
            if image.shape[1:] != mask.shape:
                raise DataError(f"{case.image_path} and {case.mask_path}{where}: image is {image.shape[1]}x{image.shape[2]} but "
                                f"mask is {mask.shape[0]}x{mask.shape[1]}")
            index = labels.to_index(mask, f"{case.mask_path}{where}")
            channels = max(channels, image.shape[0])
            gray = to_color(image, "gray")[0].astype(np.float64) - offset  # (channel 0 of a multi-channel image)
            if not np.isfinite(gray).all():
                raise DataError(f"{case.image_path}{where}: image has NaN/Inf values")
            h, w = index.shape
            rows.append(h)
            cols.append(w)
            spacing = sp_img or sp_mask
            if spacing is not None:
                sp_rows.append(float(spacing[0]))
                sp_cols.append(float(spacing[1]))
            constant += int(gray.min() == gray.max())
            counts = np.bincount(index.ravel(), minlength=k)
            class_pixels += counts / index.size
            present = counts > 0
            class_planes += present
            seen = cases_with.setdefault(str(case.image_path), np.zeros(k, dtype=bool))
            seen |= present
            fg = index > 0
            if fg.any():
                r = np.flatnonzero(fg.any(axis=1))
                c = np.flatnonzero(fg.any(axis=0))
                top.append(r[0] / h)
                bottom.append((r[-1] + 1) / h)
                left.append(c[0] / w)
                right.append((c[-1] + 1) / w)
                values = gray[fg]
                moments.add(values)
                hist += np.bincount(hist_index(values) + HIST_MAX_INDEX + 1, minlength=hist.size)
    finally:
        _cached_volume.cache_clear()
    fraction = class_pixels / len(cases)
    fraction = fraction / fraction.sum()
    nz = np.flatnonzero(hist)
    return Fingerprint(
        client=client, modality=modality, n_cases=len(cases_with), n_planes=len(cases), channels=int(channels), n_classes=k,
        rows=_quantiles(rows), cols=_quantiles(cols), n_spacing=len(sp_rows), spacing_rows=_quantiles(sp_rows),
        spacing_cols=_quantiles(sp_cols), fg_pixels=int(moments.n), fg_mean=float(moments.mean), fg_std=moments.std,
        hist=tuple((int(i) - HIST_MAX_INDEX - 1, int(hist[i])) for i in nz),
        class_fraction=tuple(float(f) for f in fraction), class_planes=tuple(int(v) for v in class_planes),
        class_cases=tuple(int(v) for v in np.sum(list(cases_with.values()), axis=0)), n_fg_planes=len(top),
        extent_top=_quantiles(top), extent_bottom=_quantiles(bottom), extent_left=_quantiles(left), extent_right=_quantiles(right),
        constant_planes=constant)


__all__ = ["normalise_modality", "dataset_modality", "compute_fingerprint"]
