"""Segmentation metrics (hospital side): a hospital scores its own predictions against its own masks.

Structures. For label maps with ``n_classes`` = K classes (0 = background) every foreground
class c = 1 … K-1 is scored (named ``class_names[c]`` or ``f"class{c}"``), plus ``"fg"``: all
foreground classes merged into one mask (the paper's PSFH figure merges classes 1 and 2).
For a binary task (K = 2) the class and ``"fg"`` are both reported; they are equal.

Metrics per structure (columns ``f"{name}_{metric}"``):

- ``dice``: MONAI ``compute_dice``, batched over cases.
- ``hd95_px`` / ``hd95_mm``: MONAI's ``compute_hausdorff_distance(percentile=95)``, symmetric:
  the larger of the two directed 95th percentiles. ``_px`` uses unit spacing; ``_mm`` the
  case's spacing, NaN when the spacing is unknown.
- ``asd_px`` / ``asd_mm``: MONAI's ``compute_average_surface_distance(symmetric=True)``: the
  mean of both directed boundary-distance sets, pooled.

  Both come from the MONAI building blocks those two functions call (``get_mask_edges``, then
  ``get_surface_distance`` in each direction), run once per structure for all four columns
  instead of four times; the values are bit-identical to the two functions (tested).
- ``hd95_pooled_px``: the published definition, kept for comparability with the paper:
  boundary pixels of each mask (mask minus its binary erosion), the distances from every
  boundary pixel of one mask to the nearest boundary pixel of the other, both directions
  pooled into one set, 95th percentile (``np.percentile``, linear). Always in pixels.
- ``status``: which branch of the empty-mask rule applied.

Spacing is ``(row spacing, column spacing)``, i.e. along axis 0 (H) then axis 1 (W), in mm.

Empty-mask rule (also the constant ``EMPTY_RULE``, which reports print verbatim): for a
structure where ground truth and prediction are both empty, dice = 1.0 and every distance is
0.0 (the ``_mm`` distances stay NaN when the spacing is unknown), status ``"both_empty"``;
where exactly one is empty, dice = 0.0 and every distance is NaN (undefined), status
``"pred_empty"`` or ``"gt_empty"``; otherwise status ``"ok"``. Undefined values are counted by
``summarize`` (``n_undefined``) and per-status ``counts``, never silently averaged away. The
published code instead drops cases with one empty mask.

``summarize`` reports, per metric column, the mean and the population standard deviation
(``ddof=0``) of the finite values, their number ``n``, the number of undefined values
``n_undefined`` and a 95 % percentile-bootstrap interval of the mean over cases.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance
from scipy import ndimage

from .errors import PpcmiError
from .fileio import atomic_write_text, json_text, write_files
from .protocol import CASE_STATUSES, METRIC_COLUMNS

__all__ = [
    "EMPTY_RULE",
    "METRICS",
    "STATUSES",
    "case_metrics",
    "evaluate_cases",
    "volume_dice",
    "volume_summary",
    "pool_summaries",
    "pooled_hd95_px",
    "structure_names",
    "summarize",
    "evaluation_paths",
    "write_evaluation",
    "write_summary",
]

log = logging.getLogger(__name__)

EMPTY_RULE = (
    "empty-mask rule: gt and pred both empty -> dice 1.0, distances 0.0 (mm distances NaN when "
    "spacing is unknown), status both_empty; exactly one empty -> dice 0.0, distances NaN "
    "(undefined, counted in n_undefined), status pred_empty or gt_empty; otherwise status ok"
)
METRICS = METRIC_COLUMNS  # the names a summary carries across (ppcmi.protocol)
STATUSES = CASE_STATUSES
STD_DDOF = 0
_CHUNK = 64  # cases scored together: bounds the (B, S, H, W) masks and MONAI's batched Dice


# --------------------------------------------------------------------------- validation


def structure_names(n_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Names of the scored structures: the K-1 foreground classes, then ``"fg"``."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise PpcmiError(f"n_classes: must be an integer >= 2, got {n_classes!r}")
    if class_names is None:
        names = [f"class{c}" for c in range(1, n_classes)]
    else:
        class_names = list(class_names)
        if len(class_names) != n_classes:
            raise PpcmiError(
                f"class_names: expected {n_classes} names (index 0 = background), got {len(class_names)}"
            )
        names = list(class_names[1:])
        for n in names:
            if not isinstance(n, str) or not n or n == "fg" or any(ch in n for ch in ",\n\r"):
                raise PpcmiError(f"class_names: invalid foreground name {n!r} (non-empty, not 'fg', no comma)")
        if len(set(names)) != len(names):
            raise PpcmiError(f"class_names: foreground names must be unique, got {names}")
    return [*names, "fg"]


def _check_labels(arr: Any, name: str, n_classes: int) -> np.ndarray:
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PpcmiError(f"{name}: expected an integer label map, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise PpcmiError(f"{name}: label value {bad} out of range 0..{n_classes - 1}")
    return arr


def _check_pair(pred: Any, gt: Any, n_classes: int, pname: str, gname: str, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    pred = _check_labels(pred, pname, n_classes)
    gt = _check_labels(gt, gname, n_classes)
    if pred.ndim != ndim:
        raise PpcmiError(f"{pname}: expected {ndim} dimensions, got shape {pred.shape}")
    if gt.ndim != ndim:
        raise PpcmiError(f"{gname}: expected {ndim} dimensions, got shape {gt.shape}")
    if pred.shape != gt.shape:
        raise PpcmiError(f"{pname} and {gname} should have the same shape, got {pred.shape} and {gt.shape}")
    if min(pred.shape[-2:]) < 1:
        raise PpcmiError(f"{pname}: empty image, shape {pred.shape}")
    return pred, gt


def _check_spacing(spacing: Any, name: str) -> tuple[float, float] | None:
    if spacing is None:
        return None
    try:
        sy, sx = (float(s) for s in spacing)
    except (TypeError, ValueError):
        raise PpcmiError(f"{name}: expected (row, column) spacing in mm or None, got {spacing!r}") from None
    if not (math.isfinite(sy) and math.isfinite(sx) and sy > 0 and sx > 0):
        raise PpcmiError(f"{name}: spacing must be finite and positive, got {spacing!r}")
    return (sy, sx)


# --------------------------------------------------------------------------- maths


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask minus its binary erosion (4-connected structure, outside the image counts as empty)."""
    return mask & ~ndimage.binary_erosion(mask)


def pooled_hd95_px(pred: np.ndarray, gt: np.ndarray) -> float:
    """The published HD95 in pixels for two non-empty binary masks (H, W).

    Boundary distances in both directions are pooled into one set before the 95th percentile.
    Raises ``PpcmiError`` if either mask is empty (the caller applies ``EMPTY_RULE``).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise PpcmiError(f"pooled_hd95_px: expected two (H, W) masks of one shape, got {pred.shape} and {gt.shape}")
    if not pred.any() or not gt.any():
        raise PpcmiError("pooled_hd95_px: pred and gt must both be non-empty")
    # Crop to the union's bounding box with a one-pixel empty margin: erosion and boundary
    # distances are unchanged (beyond the image the erosion also sees empty pixels).
    rows, cols = np.nonzero(pred | gt)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    p = np.pad(pred[r0:r1, c0:c1], 1)
    g = np.pad(gt[r0:r1, c0:c1], 1)
    bp, bg = _boundary(p), _boundary(g)
    d_pg = ndimage.distance_transform_edt(~bg)[bp]  # every boundary pixel of pred -> nearest of gt
    d_gp = ndimage.distance_transform_edt(~bp)[bg]
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def _structures(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, H, W) int -> (B, S, H, W) bool: classes 1..K-1, then all foreground merged."""
    per_class = [labels == c for c in range(1, n_classes)]
    return np.stack([*per_class, labels > 0], axis=1)


@contextlib.contextmanager
def _torch_single_thread():
    """Run torch on one intra-op thread, restoring the previous setting afterwards.

    The metrics issue thousands of small tensor ops (crop, pad, any, quantile); on a busy
    2-core machine OpenMP hand-offs made them up to 25x slower than a single thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _monai_hd95_asd(
    pred: np.ndarray, gt: np.ndarray, spacings: Sequence[tuple[float, float] | None]
) -> list[tuple[float, float]]:
    """MONAI's symmetric HD95 and ASD of two non-empty binary masks (H, W), once per spacing.

    Exactly what ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)`` compute for one channel (both call
    ``get_mask_edges`` then ``get_surface_distance`` in each direction), but the edges are
    found once for every metric and spacing instead of once per call (and per spacing).
    HD95 = larger of the two directed 95th percentiles; ASD = mean of both sets pooled.
    ``tests/test_metrics.py`` checks the results equal those two MONAI functions.
    """
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's empty-mask and deprecation notices; masks are non-empty here
        edges_p, edges_g = get_mask_edges(torch.from_numpy(pred), torch.from_numpy(gt), crop=True)
        for spacing in spacings:
            d_pg = get_surface_distance(edges_p, edges_g, "euclidean", spacing)  # float32, one per pred edge pixel
            d_gp = get_surface_distance(edges_g, edges_p, "euclidean", spacing)
            hd = torch.max(torch.stack([torch.quantile(d, 0.95) for d in (d_pg, d_gp)]))
            asd = torch.cat([d_pg, d_gp]).mean()
            out.append((float(hd), float(asd)))
    return out


def _score_chunk(
    preds: np.ndarray,
    gts: np.ndarray,
    n_classes: int,
    names: list[str],
    spacings: list[tuple[float, float] | None],
) -> list[dict[str, float | str]]:
    """Metrics for B same-shaped cases (B, H, W); one dict per case."""
    with _torch_single_thread():
        out, status = _score_arrays(preds, gts, n_classes, spacings)
    rows = []
    for b in range(preds.shape[0]):
        row: dict[str, float | str] = {}
        for s, name in enumerate(names):
            for m in METRICS:
                row[f"{name}_{m}"] = float(out[m][b, s])
            row[f"{name}_status"] = str(status[b, s])
        rows.append(row)
    return rows


def _score_arrays(
    preds: np.ndarray, gts: np.ndarray, n_classes: int, spacings: list[tuple[float, float] | None]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-metric (B, S) float arrays and the (B, S) status array for B cases (B, H, W)."""
    ps, gs = _structures(preds, n_classes), _structures(gts, n_classes)  # (B, S, H, W)
    b_n, s_n = ps.shape[:2]
    p_any, g_any = ps.any(axis=(2, 3)), gs.any(axis=(2, 3))  # (B, S)

    nan = np.full((b_n, s_n), np.nan)
    out = {m: nan.copy() for m in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(torch.from_numpy(ps), torch.from_numpy(gs), include_background=True, ignore_empty=False)
    out["dice"] = dice.double().numpy()

    known = np.array([s is not None for s in spacings])[:, None]  # (B, 1)
    both = ~p_any & ~g_any
    out["dice"][both] = 1.0
    out["dice"][p_any ^ g_any] = 0.0
    for m in ("hd95_px", "asd_px", "hd95_pooled_px"):
        out[m][both] = 0.0
    for m in ("hd95_mm", "asd_mm"):
        out[m][both & known] = 0.0

    for b, s in zip(*np.nonzero(p_any & g_any)):  # distances only where both masks are non-empty
        known_b = spacings[b] is not None
        res = _monai_hd95_asd(ps[b, s], gs[b, s], [None, spacings[b]] if known_b else [None])
        out["hd95_px"][b, s], out["asd_px"][b, s] = res[0]
        if known_b:
            out["hd95_mm"][b, s], out["asd_mm"][b, s] = res[1]
        out["hd95_pooled_px"][b, s] = pooled_hd95_px(ps[b, s], gs[b, s])

    status = np.full((b_n, s_n), "ok", dtype=object)
    status[both] = "both_empty"
    status[~p_any & g_any] = "pred_empty"
    status[p_any & ~g_any] = "gt_empty"
    return out, status


# --------------------------------------------------------------------------- public API


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    n_classes: int,
    *,
    spacing: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, float | str]:
    """All metrics for one case.

    ``pred``, ``gt``: integer label maps (H, W) with values in 0..n_classes-1.
    ``spacing``: (row, column) pixel size in mm, or None (then the ``_mm`` columns are NaN).
    Returns ``{f"{structure}_{metric}": float, f"{structure}_status": str}``.
    """
    names = structure_names(n_classes, class_names)
    pred, gt = _check_pair(pred, gt, n_classes, "pred", "gt", ndim=2)
    spacing = _check_spacing(spacing, "spacing")
    return _score_chunk(pred[None], gt[None], n_classes, names, [spacing])[0]


def evaluate_cases(
    preds: np.ndarray | Sequence[np.ndarray],
    gts: np.ndarray | Sequence[np.ndarray],
    case_ids: Sequence[str],
    n_classes: int,
    *,
    spacings: Sequence[tuple[float, float] | None] | None = None,
    class_names: Sequence[str] | None = None,
    extra: Sequence[dict] | None = None,
) -> list[dict]:
    """Metrics for N cases: one row ``{"case_id", **extra[i], **metrics}`` per case.

    ``preds``, ``gts``: integer label maps (N, H, W), or sequences of N (H_i, W_i) maps when
    cases differ in size. Cases are scored in batches of up to 64 same-shaped cases.
    ``spacings``: one (row, column) mm spacing or None per case; None for all if omitted.
    ``extra``: one dict per case (e.g. ``{"site": "hospital1"}``) copied into its row.
    """
    t0 = time.perf_counter()
    names = structure_names(n_classes, class_names)
    if isinstance(preds, np.ndarray) or isinstance(gts, np.ndarray):
        preds, gts = _check_pair(preds, gts, n_classes, "pred", "gt", ndim=3)
        pred_list, gt_list = list(preds), list(gts)
    else:
        pred_list, gt_list = list(preds), list(gts)
        if len(pred_list) != len(gt_list):
            raise PpcmiError(
                f"pred and gt should hold the same number of cases, got {len(pred_list)} and {len(gt_list)}"
            )
        pairs = [
            _check_pair(p, g, n_classes, f"pred[{i}]", f"gt[{i}]", ndim=2)
            for i, (p, g) in enumerate(zip(pred_list, gt_list))
        ]
        pred_list, gt_list = [p for p, _ in pairs], [g for _, g in pairs]
    n = len(pred_list)

    case_ids = [str(c) for c in case_ids]
    if len(case_ids) != n:
        raise PpcmiError(f"case_ids: expected {n} ids, got {len(case_ids)}")
    dup = sorted(c for c, k in Counter(case_ids).items() if k > 1)
    if dup:
        raise PpcmiError(f"case_ids: duplicate ids {dup[:5]}")
    if spacings is None:
        sp_list: list[tuple[float, float] | None] = [None] * n
    else:
        if len(spacings) != n:
            raise PpcmiError(f"spacings: expected {n} entries, got {len(spacings)}")
        sp_list = [_check_spacing(s, f"spacings[{i}]") for i, s in enumerate(spacings)]
    metric_cols = {f"{s}_{m}" for s in names for m in (*METRICS, "status")}
    if extra is None:
        extra_list: list[dict] = [{}] * n
    else:
        extra_list = list(extra)
        if len(extra_list) != n:
            raise PpcmiError(f"extra: expected {n} dicts, got {len(extra_list)}")
        for i, e in enumerate(extra_list):
            clash = sorted(set(e) & (metric_cols | {"case_id"}))
            if clash:
                raise PpcmiError(f"extra[{i}]: keys {clash} clash with metric columns or case_id")

    metrics: list[dict[str, float | str]] = []
    start = 0
    while start < n:  # consecutive runs of same-shaped cases, at most _CHUNK at a time
        stop = start + 1
        while stop < n and stop - start < _CHUNK and pred_list[stop].shape == pred_list[start].shape:
            stop += 1
        metrics += _score_chunk(
            np.stack(pred_list[start:stop]), np.stack(gt_list[start:stop]), n_classes, names, sp_list[start:stop]
        )
        start = stop

    rows = [{"case_id": cid, **e, **m} for cid, e, m in zip(case_ids, extra_list, metrics)]
    log.debug("evaluated %d cases x %d structures in %.2f s", n, len(names), time.perf_counter() - t0)
    return rows


def volume_dice(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    volumes: Sequence[str | None],
    n_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    extra: dict | None = None,
) -> list[dict]:
    """Dice of whole volumes from their planes: one row ``{"volume", **extra, "<structure>_dice", "n_planes"}`` per
    volume, in order of first appearance.

    ``volumes[i]`` names the volume plane ``i`` was cut from (None: a 2D case, left out). Per structure the
    volume's Dice is 2 |P and G| / (|P| + |G|) with the voxels of all its planes counted together, which is the
    3D Dice of the restacked volume whatever the planes' order (1.0 when both are empty, as :data:`EMPTY_RULE`
    says for a case). This is how a 3D dataset is usually reported; the mean over planes weighs a plane that
    barely holds the structure as much as the middle of it."""
    names = structure_names(n_classes, class_names)
    preds, gts, volumes = list(preds), list(gts), list(volumes)
    if not len(preds) == len(gts) == len(volumes):
        raise PpcmiError(f"volume_dice: preds, gts and volumes should be as long, got {len(preds)}, {len(gts)} and {len(volumes)}")
    acc: dict[str, np.ndarray] = {}  # volume -> (structures, 4): intersection, |P|, |G|, planes
    for i, (p, g, v) in enumerate(zip(preds, gts, volumes)):
        if v is None:
            continue
        p, g = _check_pair(p, g, n_classes, f"pred[{i}]", f"gt[{i}]", ndim=2)
        sp, sg = _structures(p[None], n_classes)[0], _structures(g[None], n_classes)[0]
        counts = np.stack([(sp & sg).sum(axis=(1, 2)), sp.sum(axis=(1, 2)), sg.sum(axis=(1, 2)),
                           np.ones(len(names), dtype=np.int64)], axis=1).astype(np.int64)
        acc[v] = acc[v] + counts if v in acc else counts
    rows = []
    for v, c in acc.items():
        row: dict = {"volume": v, **(extra or {}), "n_planes": int(c[0, 3])}
        for k, name in enumerate(names):
            inter, sp, sg = (int(x) for x in c[k, :3])
            row[f"{name}_dice"] = 1.0 if sp + sg == 0 else 2.0 * inter / (sp + sg)
        rows.append(row)
    return rows


def volume_summary(rows: Sequence[dict], *, group_key: str | None = None) -> dict:
    """Means of :func:`volume_dice` rows: ``{"n_volumes", "<structure>_dice", "by_group": {...}}`` (per ``group_key``
    value, e.g. the hospital, when given)."""
    def means(rs: Sequence[dict]) -> dict:
        keys = [k for k in (rs[0] if rs else {}) if k.endswith("_dice")]
        return {"n_volumes": len(rs), **{k: float(np.mean([r[k] for r in rs])) for k in keys}}

    out = means(rows)
    if group_key is not None:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(str(r[group_key]), []).append(r)
        out["by_group"] = {g: means(rs) for g, rs in groups.items()}
    return out


def _metric_columns(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    suffixes = tuple(f"_{m}" for m in METRICS)
    metric_cols = [c for c in cols if c.endswith(suffixes)]
    structures = [c[: -len("_status")] for c in cols if c.endswith("_status") and f"{c[:-7]}_dice" in cols]
    for i, r in enumerate(rows):
        for c in metric_cols + [f"{s}_status" for s in structures]:
            if c not in r:
                raise PpcmiError(f"rows[{i}]: missing column {c!r}")
    return metric_cols, structures


def _column_stats(values: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    n = int(finite.size)
    if n == 0:
        mean = std = float("nan")
        ci = [float("nan"), float("nan")]
    else:
        mean, std = float(finite.mean()), float(finite.std(ddof=STD_DDOF))
        rng = np.random.default_rng(seed)
        block = max(1, 1_000_000 // n)  # resamples per draw: bounds memory to ~8 MB
        boot = np.concatenate(
            [finite[rng.integers(0, n, size=(min(block, n_boot - i), n))].mean(axis=1) for i in range(0, n_boot, block)]
        )
        ci = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
    return {"mean": mean, "std": std, "n": n, "ci95": ci, "n_undefined": int(values.size - n)}


def _summarize_flat(
    rows: Sequence[dict], metric_cols: list[str], structures: list[str], n_boot: int, seed: int
) -> dict:
    out: dict[str, Any] = {"n_cases": len(rows)}
    for c in metric_cols:
        try:
            values = np.array([float(r[c]) for r in rows], dtype=np.float64)
        except (TypeError, ValueError):
            raise PpcmiError(f"rows: column {c!r} holds a non-numeric value") from None
        out[c] = _column_stats(values, n_boot, seed)
    counts: dict[str, dict[str, int]] = {}
    for s in structures:
        counts[s] = dict.fromkeys(STATUSES, 0)
        for r in rows:
            st = str(r[f"{s}_status"])
            counts[s][st] = counts[s].get(st, 0) + 1
    out["counts"] = counts
    out["empty_rule"] = EMPTY_RULE
    out["std_ddof"] = STD_DDOF
    out["bootstrap"] = {"method": "percentile", "level": 0.95, "n_boot": n_boot, "seed": seed}
    return out


def summarize(rows: Sequence[dict], *, n_boot: int = 1000, seed: int = 0, group_key: str | None = None) -> dict:
    """Summary of per-case rows (as returned by ``evaluate_cases``).

    For every metric column (name ending in ``_dice``, ``_hd95_px``, … see ``METRICS``):
    ``{"mean", "std" (population, ddof=0), "n" (finite values), "ci95": [lo, hi],
    "n_undefined" (NaN values; n + n_undefined = n_cases)}``; mean, std and the bootstrap use
    the finite values only.
    ``ci95`` is a percentile bootstrap of the mean: ``n_boot`` resamples of the cases drawn from
    ``np.random.default_rng(seed)`` (a fresh generator per column: no dependence on column order).
    Also ``"counts"`` (cases per status, per structure), ``"empty_rule"``, ``"n_cases"``,
    ``"std_ddof"``, ``"bootstrap"``; with ``group_key`` (e.g. ``"site"``) also ``"by_group"``:
    ``{str(value): the same summary over that group's rows}`` in order of first appearance.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise PpcmiError(f"n_boot: must be a positive integer, got {n_boot!r}")
    rows = list(rows)
    metric_cols, structures = _metric_columns(rows)
    out = _summarize_flat(rows, metric_cols, structures, n_boot, seed)
    if group_key is not None:
        groups: dict[str, list[dict]] = {}
        for i, r in enumerate(rows):
            if group_key not in r:
                raise PpcmiError(f"rows[{i}]: missing group_key {group_key!r}")
            groups.setdefault(str(r[group_key]), []).append(r)
        out["group_key"] = group_key
        out["by_group"] = {g: _summarize_flat(rs, metric_cols, structures, n_boot, seed) for g, rs in groups.items()}
    return out


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_per_case_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows as CSV atomically; the header is the union of the rows' keys in first-seen order."""
    return atomic_write_text(path, _per_case_csv(rows))


def _per_case_csv(rows: Sequence[dict]) -> str:
    header: dict[str, None] = {}
    for r in rows:
        header.update(dict.fromkeys(r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def pool_summaries(groups: dict[str, dict]) -> dict:
    """The overall summary of several groups' summaries (as ``summarize`` returns them), without their rows.

    Used where only summaries travel (each hospital scores its own cases and sends its summary).
    Per metric column: ``n`` and ``n_undefined`` add up; ``mean`` is the n-weighted mean and
    ``std`` the pooled population standard deviation (ddof=0) of the finite values, both exactly
    what ``summarize`` gives on the concatenated rows. ``ci95`` needs the rows, so it is None.
    ``counts`` and ``n_cases`` add up. Returns the same layout plus ``"by_group"``.
    """
    if not groups:
        raise PpcmiError("groups: no summaries to pool")
    first = next(iter(groups.values()))
    cols = [c for c, v in first.items() if isinstance(v, dict) and "mean" in v]
    out: dict[str, Any] = {"n_cases": 0}
    for g, s in groups.items():
        missing = [c for c in cols if not isinstance(s.get(c), dict)]
        if missing:
            raise PpcmiError(f"groups[{g!r}]: missing metric columns {missing[:5]}")
        out["n_cases"] += int(s["n_cases"])
    for c in cols:
        parts = [(int(s[c]["n"]), s[c]["mean"], s[c]["std"]) for s in groups.values()]
        n = sum(k for k, _, _ in parts)
        if n == 0:
            mean = std = float("nan")
        else:
            mean = sum(k * m for k, m, _ in parts if k) / n
            second = sum(k * (sd * sd + m * m) for k, m, sd in parts if k) / n
            std = math.sqrt(max(0.0, second - mean * mean))
        out[c] = {"mean": mean, "std": std, "n": n, "ci95": None,
                  "n_undefined": sum(int(s[c]["n_undefined"]) for s in groups.values())}
    counts: dict[str, dict[str, int]] = {}
    for s in groups.values():
        for struct, by_status in s.get("counts", {}).items():
            acc = counts.setdefault(struct, dict.fromkeys(STATUSES, 0))
            for st, k in by_status.items():
                acc[st] = acc.get(st, 0) + int(k)
    out["counts"] = counts
    out["empty_rule"] = EMPTY_RULE
    out["std_ddof"] = STD_DDOF
    out["by_group"] = dict(groups)
    return out


def write_summary(summary: dict, path: str | Path) -> Path:
    """Write a summary as strict JSON atomically (NaN and infinities become ``null``)."""
    return atomic_write_text(path, _summary_json(summary))


def _summary_json(summary: dict) -> str:
    return json_text(_nan_to_none(summary))


def evaluation_paths(out_dir: str | Path, *, prefix: str = "") -> tuple[Path, Path]:
    """The two files :func:`write_evaluation` writes: (per-case CSV, summary JSON)."""
    return Path(out_dir) / f"{prefix}per_case.csv", Path(out_dir) / f"{prefix}summary.json"


def write_evaluation(
    rows: Sequence[dict], summary: dict, out_dir: str | Path, *, prefix: str = "", overwrite: bool = True,
    hint: str = ""
) -> tuple[Path, Path]:
    """Write ``{prefix}per_case.csv`` and ``{prefix}summary.json`` into ``out_dir`` atomically.

    The CSV header is the union of the rows' keys in first-seen order; NaN is written as
    ``nan`` (``float()`` reads it back). In the JSON, NaN and infinities become ``null`` so
    the file is strict JSON. With ``overwrite=False`` an existing file of the two is refused
    before either is written (``hint`` is appended to the error). Returns (csv path, json path).
    """
    csv_path, json_path = evaluation_paths(out_dir, prefix=prefix)
    write_files({csv_path: _per_case_csv(rows).encode("utf-8"), json_path: _summary_json(summary).encode("utf-8")},
                overwrite=overwrite, hint=hint)
    log.info("wrote %s and %s (%d cases)", csv_path, json_path, len(rows))
    return csv_path, json_path
