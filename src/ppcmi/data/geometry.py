"""Plane geometry (hospital side): where a native plane's pixels land in the size x size network input, and
the one way class probabilities at the network size go back to the native plane.

Forward. A plane of native shape (H, W) keeps its central ``data.crop`` fraction (:func:`crop_box`); the crop
is resized and then padded symmetrically to ``size`` x ``size``. With ``data.resize = "pad"`` (the default
since config version 3) the crop keeps its aspect ratio: its longer side becomes ``size``, the shorter one
``round(short * size / long)`` (half up), and the padding splits the rest with the extra pixel of an odd
amount at the bottom or right (MONAI's ``SpatialPad(method="symmetric")`` rule). Images are padded with 0
after intensity scaling, masks with background. With ``"squash"`` (every config before version 3) both sides
become ``size`` whatever the aspect ratio, and nothing is padded. :class:`PlaneGeometry` records all of it.

Inverse. :func:`restore_scores` takes class probabilities (K, size, size), drops the padding, resamples them
bilinearly to the crop's native size and places them into the native plane with background probability 1
outside the crop; :func:`restore_labels` takes the argmax there, one plane at a time. ``ppcmi predict``,
``client decode``, ``simulate``, the Flower evaluation and the benchmarks' U-Nets all restore this way, so a
prediction is never upsampled as labels.

Resampling is torch's ``interpolate``: bilinear with ``align_corners=False``, antialiased along a shrinking
axis; masks go forward by nearest neighbour on pixel centres (``"nearest-exact"``), so no label is blended.
"""

from __future__ import annotations

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

    ``native``: (H, W) of the source plane; ``crop``: (top, left, rows, cols) of the kept region in it;
    ``scaled``: (rows, cols) of that region after resizing; ``pad``: (top, bottom, left, right) added around
    it, so that ``scaled`` plus ``pad`` is the network size.
    """

    native: tuple[int, int]
    crop: tuple[int, int, int, int]
    scaled: tuple[int, int]
    pad: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(rows, cols) of the network input."""
        return self.scaled[0] + self.pad[0] + self.pad[1], self.scaled[1] + self.pad[2] + self.pad[3]

    def spacing(self, native: tuple[float, float] | None) -> tuple[float, float] | None:
        """mm per network pixel (row, column) for a native spacing in mm (None stays None)."""
        if native is None:
            return None
        return native[0] * self.crop[2] / self.scaled[0], native[1] * self.crop[3] / self.scaled[1]


def plane_geometry(native: Sequence[int], prep: Preprocess) -> PlaneGeometry:
    """The geometry of a plane of shape ``native`` (H, W) under ``prep`` (``size``, ``crop``, ``resize``)."""
    h, w = (int(v) for v in native)
    if h < 1 or w < 1:
        raise DataError(f"plane geometry: a plane needs at least 1x1 pixels, got {h}x{w}")
    if prep.resize not in RESIZE_MODES:
        raise DataError(f"data.resize: must be one of {', '.join(RESIZE_MODES)}, got {prep.resize!r}")
    top, left, rows, cols = crop_box(h, w, prep.crop)
    size = prep.size
    if prep.resize == "squash":
        scaled = (size, size)
    else:
        long = max(rows, cols)
        scaled = (max(1, (2 * rows * size + long) // (2 * long)), max(1, (2 * cols * size + long) // (2 * long)))
    pr, pc = size - scaled[0], size - scaled[1]
    return PlaneGeometry((h, w), (top, left, rows, cols), scaled, (pr // 2, pr - pr // 2, pc // 2, pc - pc // 2))


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

    The padding is dropped, the rest resampled bilinearly to the crop's native (rows, cols) (antialiased along
    a shrinking axis), and placed into the native plane; outside the crop background has probability 1.
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


__all__ = ["RESIZE_MODES", "PlaneGeometry", "plane_geometry", "crop_box", "center_crop", "crop_plane", "resize_image",
           "resize_mask", "fit_image", "fit_mask", "forward_image", "forward_mask", "restore_scores", "restore_labels",
           "label_dtype"]
