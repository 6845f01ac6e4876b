"""Preprocessing (hospital side): a raw plane becomes a network input (region of interest, colour, intensity,
resize to the target spacing or to fit, and pad; the geometry in :mod:`ppcmi.data.geometry`) and a case becomes a training sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..config import Preprocess
from ..errors import DataError
from ..labels import LabelMap
from .discovery import Case, read_case_mask
from .geometry import PlaneGeometry, crop_plane, fit_image, fit_mask, label_dtype, plane_geometry
from .readers import _cached_volume, read_image

log = logging.getLogger(__name__)


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


def intensity_map(x: np.ndarray, prep: Preprocess) -> tuple[float, float, float, float]:
    """``(clip_low, clip_high, zero, one)`` for values ``x`` (offset already subtracted): values are clipped
    to ``[clip_low, clip_high]``, then ``zero`` maps to 0 and ``one`` to 1 (and the result is clipped to [0, 1]).

    minmax: the image's range; percentile: its ``data.percentiles``; window: ``data.window``;
    zscore: the image's mean +- ``data.zrange`` standard deviations (a per-image z-score, its range
    ``[-zrange, zrange]`` laid onto [0, 1]); ct: clip to ``data.window`` (the pooled foreground percentiles
    of a plan), then the same z-score map with the pooled foreground ``data.stats`` (mean, std)."""
    if prep.intensity == "window":
        lo, hi = prep.window  # type: ignore[misc]
        return lo, hi, lo, hi
    if prep.intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, prep.percentiles))
        return lo, hi, lo, hi
    if prep.intensity == "zscore":
        mean, std = float(x.mean()), float(x.std())
        return mean - prep.zrange * std, mean + prep.zrange * std, mean - prep.zrange * std, mean + prep.zrange * std
    if prep.intensity == "ct":
        (lo, hi), (mean, std) = prep.window, prep.stats  # type: ignore[misc]
        return lo, hi, mean - prep.zrange * std, mean + prep.zrange * std
    lo, hi = float(x.min()), float(x.max())
    return lo, hi, lo, hi


def scale_intensity(image: np.ndarray, prep: Preprocess) -> np.ndarray:
    """Per-image scaling to float32 in [0, 1] over all channels together (see :func:`intensity_map`).

    minmax: (x - min) / (max - min); percentile: clip to the percentiles, then the same;
    window: (x - offset) clipped to the window, then (v - low) / (high - low); zscore and ct:
    z-scores (per image, or pooled over the federation's foreground after clipping to the pooled
    percentiles) laid onto [0, 1]. A constant image gives zeros.
    """
    x = image.astype(np.float64) - prep.offset
    lo, hi, zero, one = intensity_map(x, prep)
    if not (hi > lo and one > zero):
        return np.zeros(image.shape, dtype=np.float32)
    return np.clip((np.clip(x, lo, hi) - zero) / (one - zero), 0.0, 1.0).astype(np.float32)


def check_intensity(image: np.ndarray, foreground: np.ndarray, prep: Preprocess, where: str) -> None:
    """Refuse a plane the intensity normalisation destroys, in one line naming ``where`` and the settings.

    ``image`` is the raw (C, H, W) plane and ``foreground`` an (H, W) bool mask (before the crop). An image
    that is not constant but becomes constant is an error; so is one where more than ``data.max_clipped``
    of the foreground pixels lie beyond the values that map to 0 and 1 (strictly: the pixels of a
    minmax image's extremes are not clipped)."""
    g = plane_geometry(image.shape[-2:], prep)
    x = to_color(crop_plane(image, g), prep.color).astype(np.float64) - prep.offset
    fg = crop_plane(foreground, g)
    settings = (f"data.intensity={prep.intensity}, data.window={prep.window}, data.offset={prep.offset:g}"
                + (f", data.stats={prep.stats}, data.zrange={prep.zrange:g}" if prep.intensity in ("zscore", "ct") else ""))
    if not x.max() > x.min():
        return  # blank before any normalisation: counted in the fingerprint, not this setting's doing
    lo, hi, zero, one = intensity_map(x, prep)
    low, high = max(lo, zero), min(hi, one)
    if not (high > low and (x > low).any() and (x < high).any()):
        raise DataError(f"{where}: the image (values {x.min():g} to {x.max():g} after data.offset) becomes constant after "
                        f"intensity normalisation ({settings}); check data.offset and data.window")
    n_fg = int(fg.sum())
    if n_fg and prep.intensity != "minmax":
        v = x[:, fg]
        share = float(((v < low) | (v > high)).any(axis=0).mean())
        if share > prep.max_clipped:
            raise DataError(f"{where}: {share:.0%} of the foreground pixels are clipped by the intensity normalisation "
                            f"({settings}), more than data.max_clipped={prep.max_clipped:g}; check data.offset and data.window"
                            + (" or raise data.zrange" if prep.intensity in ("zscore", "ct") else ""))


def prepare_image(image: np.ndarray, prep: Preprocess, geometry: PlaneGeometry | None = None) -> np.ndarray:
    """Raw (C, H, W) -> float32 (1 or 3, size, size) in [0, 1]: region (``data.roi`` / ``data.crop``), colour, intensity
    scaling (over the region), resize and padding with 0 (``geometry``, by default
    :func:`~ppcmi.data.geometry.plane_geometry` of the plane without a spacing: pass the plane's own geometry
    whenever its spacing is known, so ``data.spacing`` applies)."""
    g = geometry or plane_geometry(image.shape[-2:], prep)
    x = scale_intensity(to_color(crop_plane(image, g), prep.color), prep)
    return np.clip(fit_image(x, g), 0.0, 1.0)


@dataclass
class Sample:
    """A preprocessed case: image float32 (C, size, size) in [0, 1], mask int64 (size, size) class indices.

    ``native_mask`` is the mask's class indices on the native plane (``label_dtype``), ``native_spacing`` its mm
    per pixel (None when the file tells none); ``geometry`` says where the native plane lies in ``image``."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float] | None  # mm per pixel after resizing
    case_id: str
    group: str
    original_shape: tuple[int, int]
    geometry: PlaneGeometry | None = None
    native_mask: np.ndarray | None = None
    native_spacing: tuple[float, float] | None = None


def load_sample(case: Case, prep: Preprocess, labels: LabelMap) -> Sample:
    """Read, check, scale, resize and pad one case; masks are mapped to class indices, then resized (nearest)
    and padded with background."""
    image, sp_img = read_image(case.image_source, case.slice_index)
    mask, sp_mask = read_case_mask(case)
    where = "" if case.slice_index is None else f" (slice {case.slice_index})"
    h, w = image.shape[1:]
    if (h, w) != mask.shape:
        raise DataError(f"{case.image_path} and {case.mask_path}{where}: image is {h}x{w} but mask is "
                        f"{mask.shape[0]}x{mask.shape[1]}")
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(f"{case.image_path}{where}: image has {int((~finite).sum())} NaN/Inf values")
    if image.shape[0] not in (1, 3):
        raise DataError(f"{case.image_path}{where}: image has {image.shape[0]} channels; the networks take 1 (gray) or "
                        f"3 (rgb) channels, multi-channel inputs are read but not yet modelled")
    index = labels.to_index(mask, f"{case.mask_path}{where}")
    check_intensity(image, index > 0, prep, f"{case.image_path}{where}")
    spacing = sp_img or sp_mask
    g = plane_geometry((h, w), prep, spacing, where=f"{case.image_path}{where}")  # to data.spacing when the file tells one
    return Sample(prepare_image(image, prep, g), fit_mask(crop_plane(index, g), g), g.spacing(spacing), case.case_id,
                  case.group, (h, w), g, index.astype(label_dtype(labels.n_classes)), spacing)


def load_arrays(cases: Sequence[Case], prep: Preprocess, labels: LabelMap, *, progress: bool = False,
                native: bool = False) -> dict:
    """Load every case into stacked arrays.

    Returns ``{"images": float32 (N, C, S, S), "masks": int64 (N, S, S), "case_ids", "groups",
    "spacings", "original_shapes", "geometries"}`` (lists in the order of ``cases``; ``geometries`` holds each
    plane's :class:`~ppcmi.data.geometry.PlaneGeometry`). With ``native`` also ``"native_masks"`` (each
    case's class indices on its native plane) and ``"native_spacings"`` (mm per native pixel or None): what
    predictions restored by :func:`~ppcmi.data.geometry.restore_labels` are scored against.
    """
    from tqdm import tqdm

    n, s = len(cases), prep.size
    c = 3 if prep.color == "rgb" else 1
    out: dict[str, Any] = {"images": np.empty((n, c, s, s), np.float32), "masks": np.empty((n, s, s), np.int64),
                           "case_ids": [], "groups": [], "spacings": [], "original_shapes": [], "geometries": []}
    if native:
        out["native_masks"], out["native_spacings"] = [], []
    try:
        for i, case in enumerate(tqdm(cases, desc="loading", unit="case", disable=not progress)):
            smp = load_sample(case, prep, labels)
            out["images"][i], out["masks"][i] = smp.image, smp.mask
            out["case_ids"].append(smp.case_id)
            out["groups"].append(smp.group)
            out["spacings"].append(smp.spacing)
            out["original_shapes"].append(smp.original_shape)
            out["geometries"].append(smp.geometry)
            if native:
                out["native_masks"].append(smp.native_mask)
                out["native_spacings"].append(smp.native_spacing)
    finally:
        _cached_volume.cache_clear()
    return out
