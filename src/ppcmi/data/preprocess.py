"""Preprocessing (hospital side): a raw plane becomes a network input (crop, intensity, colour,
resize) and a case becomes a training sample; masks are restored to the native plane.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Preprocess
from ..errors import DataError
from ..labels import LabelMap
from .discovery import Case, read_case_mask
from .readers import _cached_volume, read_image

log = logging.getLogger(__name__)

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
    x = to_color(center_crop(image, prep.crop), prep.color).astype(np.float64) - prep.offset
    fg = center_crop(foreground, prep.crop)
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
