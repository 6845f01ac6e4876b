"""Plane geometry (hospital side): where a native plane's pixels land in the size x size network input, and
the one way class probabilities at the network size go back to the native plane.

Forward. A plane of native shape (H, W) keeps a region: the box ``data.roi`` = (top, bottom, left, right) in
fractions of the field (:func:`roi_box`: widened outward to whole pixels), or else the central ``data.crop``
fraction of each side (:func:`crop_box`, the central special case). The region is resized and then padded
symmetrically to ``size`` x ``size``; one interpolation does the whole resize, and how large the region becomes
(``scaled``) is decided as follows.

- ``data.spacing`` = (row_mm, col_mm) set and the plane's own spacing known: the region is resampled to that
  spacing, ``rows * native_row_mm / row_mm`` by ``cols * native_col_mm / col_mm`` pixels (half up), so a
  structure covers the same number of pixels at every hospital whatever its scanner, and padded to ``size``.
  ppcmi feeds whole planes, not patches (nnU-Net samples patches from planes of any size), so a region larger
  than ``size`` at the target spacing must still fit: it is scaled down, aspect kept, until its longer side is
  ``size`` (``PlaneGeometry.fit`` < 1 says by how much; the plan picks the spacing so that the median field
  fits). A plane whose spacing is unknown (a PNG) falls back to the fit below.
- otherwise, with ``data.resize = "pad"`` (the default since config version 3) the region keeps its aspect ratio:
  its longer side becomes ``size``, the shorter one ``round(short * size / long)`` (half up).
- with ``"squash"`` (every config before version 3) both sides become ``size`` whatever the aspect ratio, and
  nothing is padded.

The padding splits what is left with the extra pixel of an odd amount at the bottom or right (MONAI's
``SpatialPad(method="symmetric")`` rule). Images are padded with 0 after intensity scaling, masks with
background. :class:`PlaneGeometry` records all of it.

Inverse. :func:`restore_scores` takes class probabilities (K, size, size), drops the padding, resamples them
bilinearly to the region's native size (which undoes the target spacing and any fit in one step) and places
them into the native plane with background probability 1 outside the region; :func:`restore_labels` takes
the argmax there, one plane at a time. ``ppcmi predict``, ``client decode``, ``simulate``, the Flower
evaluation and the benchmarks' U-Nets all restore this way, so a prediction is never upsampled as labels.

Resampling is torch's ``interpolate``: bilinear with ``align_corners=False``, antialiased along a shrinking
axis; masks go forward by nearest neighbour on pixel centres (``"nearest-exact"``), so no label is blended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Preprocess
from ..errors import DataError

RESIZE_MODES = ("pad", "squash")


def crop_box(h: int, w: int, crop: float) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the central ``crop`` fraction of an h x w plane (at least 1 pixel)."""
    rows, cols = max(1, round(h * crop)), max(1, round(w * crop))
    return (h - rows) // 2, (w - cols) // 2, rows, cols


def roi_box(h: int, w: int, roi: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the box ``roi`` = (top, bottom, left, right), fractions of an h x w plane, widened
    outward to whole pixels (a foreground box measured as fractions of the same field is kept whole; at least 1 pixel)."""
    t, b, left, r = (float(v) for v in roi)
    eps = 1e-9  # a fraction computed as k / h lands on pixel k, not one before or after
    top, bottom = min(h - 1, max(0, math.floor(t * h + eps))), min(h, max(1, math.ceil(b * h - eps)))
    lft, rgt = min(w - 1, max(0, math.floor(left * w + eps))), min(w, max(1, math.ceil(r * w - eps)))
    return top, lft, max(1, bottom - top), max(1, rgt - lft)


def region_box(h: int, w: int, prep: Preprocess) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the region of an h x w plane that ``prep`` keeps: ``data.roi``, else ``data.crop``."""
    return roi_box(h, w, prep.roi) if prep.roi is not None else crop_box(h, w, prep.crop)


def center_crop(plane: np.ndarray, crop: float) -> np.ndarray:
    """The central ``crop`` fraction of the last two axes."""
    if crop >= 1.0:
        return plane
    top, left, rows, cols = crop_box(*plane.shape[-2:], crop)
    return plane[..., top:top + rows, left:left + cols]


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _bilinear(t: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, out_h, out_w): bilinear, align_corners=False, antialiased when either side shrinks.

    torch 2.13's antialiased kernel is wrong when the output is one column wide and more than one row high (every
    output row gets the first one's value); that case runs transposed (one row high, which it gets right: checked
    against the separable triangle filter for every shrink within 7 x 7 pixels in tests/test_geometry.py)."""
    h, w = t.shape[-2:]
    antialias = h > out_h or w > out_w
    if antialias and out_w == 1 and out_h != 1:
        return _bilinear(t.transpose(-1, -2), 1, out_h).transpose(-1, -2)
    return F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=antialias)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(C, H, W) -> (C, size, size) or (C, rows, cols), bilinear (align_corners=False, antialiased along a shrinking axis)."""
    _, h, w = image.shape
    out_h, out_w = _shape(size)
    if (h, w) == (out_h, out_w):
        return image.astype(np.float32, copy=False)
    return _bilinear(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], out_h, out_w)[0].numpy()


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) -> (size, size) or (rows, cols), nearest neighbour on pixel centres (torch's "nearest-exact").

    Values are copied, never blended, so only labels present in ``mask`` can appear.
    """
    h, w = mask.shape
    out_h, out_w = _shape(size)
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return mask[np.ix_(rows, cols)]


@dataclass(frozen=True)
class PlaneGeometry:
    """Where one native plane's pixels land in the network input (all in pixels).

    ``native``: (H, W) of the source plane; ``crop``: (top, left, rows, cols) of the kept region in it
    (``data.roi`` or ``data.crop``); ``scaled``: (rows, cols) of that region after resizing; ``pad``: (top,
    bottom, left, right) added around it, so that ``scaled`` plus ``pad`` is the network size.
    ``native_spacing``: the plane's mm per pixel (row, col) when it was resampled to ``target_spacing``
    (``data.spacing``); both None when it was fitted by pixels (no target spacing, or the plane tells none).
    ``fit``: the scale applied on top of the target spacing, 1.0 when the region fits (its pixels at the target
    spacing, rounded half up, are at most ``size``; and without a target spacing), below 1 when it was larger
    than the network input at it and scaled down to fit.
    """

    native: tuple[int, int]
    crop: tuple[int, int, int, int]
    scaled: tuple[int, int]
    pad: tuple[int, int, int, int]
    native_spacing: tuple[float, float] | None = None
    target_spacing: tuple[float, float] | None = None
    fit: float = 1.0

    @property
    def size(self) -> tuple[int, int]:
        """(rows, cols) of the network input."""
        return self.scaled[0] + self.pad[0] + self.pad[1], self.scaled[1] + self.pad[2] + self.pad[3]

    def spacing(self, native: tuple[float, float] | None) -> tuple[float, float] | None:
        """mm per network pixel (row, column) for a native spacing in mm (None stays None)."""
        if native is None:
            return None
        return native[0] * self.crop[2] / self.scaled[0], native[1] * self.crop[3] / self.scaled[1]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))  # (the tolerance keeps an exact half that float arithmetic lands just below)


def plane_geometry(native: Sequence[int], prep: Preprocess, spacing: Sequence[float] | None = None, *,
                   where: str = "plane geometry") -> PlaneGeometry:
    """The geometry of a plane of shape ``native`` (H, W) and native ``spacing`` (row_mm, col_mm, or None when the
    file tells none) under ``prep`` (``size``, ``roi`` / ``crop``, ``resize``, ``spacing``); ``where`` (the file)
    starts an error's message."""
    h, w = (int(v) for v in native)
    if h < 1 or w < 1:
        raise DataError(f"plane geometry: a plane needs at least 1x1 pixels, got {h}x{w}")
    if prep.resize not in RESIZE_MODES:
        raise DataError(f"data.resize: must be one of {', '.join(RESIZE_MODES)}, got {prep.resize!r}")
    top, left, rows, cols = region_box(h, w, prep)
    size = prep.size
    native_sp = target = None
    fit = 1.0
    if prep.resize == "squash":
        scaled = (size, size)
    elif prep.spacing is not None and spacing is not None:
        native_sp = (float(spacing[0]), float(spacing[1]))
        if not (native_sp[0] > 0 and native_sp[1] > 0 and math.isfinite(native_sp[0]) and math.isfinite(native_sp[1])):
            raise DataError(f"{where}: pixel spacing {tuple(spacing)} is not positive mm per pixel; data.spacing resamples "
                            "by it (fix the file's header, or set data.spacing = None)")
        target = prep.spacing
        at_r, at_c = rows * native_sp[0] / target[0], cols * native_sp[1] / target[1]  # pixels at the target spacing
        if _half_up(max(at_r, at_c)) > size:  # larger than the input even after rounding to whole pixels: scale down
            fit = size / max(at_r, at_c)
        scaled = (min(size, max(1, _half_up(at_r * fit))), min(size, max(1, _half_up(at_c * fit))))
    else:
        long = max(rows, cols)
        scaled = (max(1, (2 * rows * size + long) // (2 * long)), max(1, (2 * cols * size + long) // (2 * long)))
    pr, pc = size - scaled[0], size - scaled[1]
    return PlaneGeometry((h, w), (top, left, rows, cols), scaled, (pr // 2, pr - pr // 2, pc // 2, pc - pc // 2),
                         native_sp, target, fit)


def crop_plane(plane: np.ndarray, g: PlaneGeometry) -> np.ndarray:
    """The kept region of a plane (last two axes native (H, W))."""
    if tuple(plane.shape[-2:]) != g.native:
        raise DataError(f"plane geometry: plane is {plane.shape[-2]}x{plane.shape[-1]}, its geometry is for "
                        f"{g.native[0]}x{g.native[1]}")
    top, left, rows, cols = g.crop
    return plane[..., top:top + rows, left:left + cols]


def _pad(x: np.ndarray, g: PlaneGeometry, value: float | int) -> np.ndarray:
    if not any(g.pad):
        return x
    pt, pb, pl, pr = g.pad
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(pt, pb), (pl, pr)], mode="constant", constant_values=value)


def fit_image(region: np.ndarray, g: PlaneGeometry) -> np.ndarray:
    """A cropped (C, rows, cols) float image -> (C, size, size): bilinear resize to ``g.scaled``, padded with 0."""
    return _pad(resize_image(region, g.scaled), g, 0.0)


def fit_mask(region: np.ndarray, g: PlaneGeometry) -> np.ndarray:
    """A cropped (rows, cols) class-index mask -> (size, size): nearest resize to ``g.scaled``, padded with background (0)."""
    return _pad(resize_mask(region, g.scaled), g, 0)


def forward_image(image: np.ndarray, g: PlaneGeometry) -> np.ndarray:
    """A native (C, H, W) float image (already scaled) -> (C, size, size): crop, resize, pad with 0."""
    return fit_image(crop_plane(image, g), g)


def forward_mask(mask: np.ndarray, g: PlaneGeometry) -> np.ndarray:
    """A native (H, W) class-index mask -> (size, size): crop, nearest resize, pad with background."""
    return fit_mask(crop_plane(mask, g), g)


def restore_scores(scores: torch.Tensor | np.ndarray, g: PlaneGeometry) -> torch.Tensor:
    """Class probabilities (K, size, size), channel 0 background -> float32 (K, H, W) on the native plane.

    The padding is dropped, the rest resampled bilinearly to the region's native (rows, cols) (antialiased along
    a shrinking axis; this undoes the target spacing and any fit), and placed into the native plane; outside the
    region (``data.roi`` or ``data.crop``) background has probability 1.
    """
    s = torch.as_tensor(scores).float()
    if s.ndim != 3 or tuple(s.shape[1:]) != g.size:
        raise DataError(f"restore: expected class scores (K, {g.size[0]}, {g.size[1]}), got {tuple(s.shape)}")
    pt, _, pl, _ = g.pad
    region = s[:, pt:pt + g.scaled[0], pl:pl + g.scaled[1]]
    top, left, rows, cols = g.crop
    if (rows, cols) != g.scaled:
        region = _bilinear(region[None], rows, cols)[0]
    if (rows, cols) == g.native:
        return region.contiguous()
    out = torch.zeros((s.shape[0], *g.native), dtype=torch.float32)
    out[0] = 1.0
    out[:, top:top + rows, left:left + cols] = region
    return out


def label_dtype(n_classes: int) -> type:
    """The integer type of restored label maps: uint8 up to 256 classes (a native test set stays small), else int64."""
    return np.uint8 if n_classes <= 256 else np.int64


def restore_labels(scores: torch.Tensor | np.ndarray, geometries: Sequence[PlaneGeometry]) -> list[np.ndarray]:
    """Class probabilities (N, K, size, size) -> N class-index maps (H_i, W_i) at native resolution.

    Each plane goes through :func:`restore_scores` and the argmax on its own, so only one native (K, H, W)
    array exists at a time.
    """
    s = torch.as_tensor(scores)
    if s.ndim != 4 or len(geometries) != s.shape[0]:
        raise DataError(f"restore: expected class scores (N, K, H, W) and N geometries, got {tuple(s.shape)} and "
                        f"{len(geometries)} geometries")
    dtype = label_dtype(int(s.shape[1]))
    return [restore_scores(p, g).argmax(0).numpy().astype(dtype) for p, g in zip(s, geometries)]


__all__ = ["RESIZE_MODES", "PlaneGeometry", "plane_geometry", "crop_box", "roi_box", "region_box", "center_crop", "crop_plane", "resize_image",
           "resize_mask", "fit_image", "fit_mask", "forward_image", "forward_mask", "restore_scores", "restore_labels",
           "label_dtype"]
