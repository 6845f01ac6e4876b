"""Tests for ppcmi.metrics: hand-derived values, agreement with MONAI, empty-mask rule, summary, I/O."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from scipy import ndimage

from ppcmi.errors import PpcmiError
from ppcmi.metrics import (
    EMPTY_RULE,
    METRICS,
    case_metrics,
    evaluate_cases,
    pool_summaries,
    pooled_hd95_px,
    structure_names,
    summarize,
    write_evaluation,
)

DIST = ("hd95_px", "asd_px", "hd95_mm", "asd_mm", "hd95_pooled_px")


def _blobs(rng: np.random.Generator, shape: tuple[int, int], n_classes: int, sigma: float = 3.0) -> np.ndarray:
    """Random smooth label map: class c where smoothed noise c is above its 80th percentile."""
    lab = np.zeros(shape, dtype=np.int64)
    for c in range(1, n_classes):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        lab[noise > np.quantile(noise, 0.8)] = c
    return lab


def _lines(shape, col, rows=(5, 25)):
    m = np.zeros(shape, dtype=np.int64)
    m[rows[0] : rows[1], col] = 1
    return m


# ----------------------------------------------------------------------------- hand-derived


def test_identical_masks_give_dice_one_and_zero_distances():
    lab = _blobs(np.random.default_rng(1), (48, 48), 3)
    m = case_metrics(lab, lab.copy(), 3, spacing=(0.7, 1.3))
    for name in ("class1", "class2", "fg"):
        assert m[f"{name}_status"] == "ok"
        assert m[f"{name}_dice"] == 1.0
        for d in DIST:
            assert m[f"{name}_{d}"] == 0.0


@pytest.mark.parametrize("d", [1, 3, 7])
def test_vertical_lines_shifted_by_d_columns(d):
    # 1-pixel-wide lines are all boundary; every pixel's nearest partner is d columns away.
    pred, gt = _lines((32, 32), 8), _lines((32, 32), 8 + d)
    m = case_metrics(pred, gt, 2, spacing=(2.0, 0.5))
    for name in ("class1", "fg"):
        assert m[f"{name}_dice"] == 0.0
        assert m[f"{name}_status"] == "ok"
        for px in ("hd95_px", "asd_px", "hd95_pooled_px"):
            assert m[f"{name}_{px}"] == pytest.approx(d, abs=1e-6)
        # spacing is (row, column): a column shift scales by the column spacing 0.5
        assert m[f"{name}_hd95_mm"] == pytest.approx(0.5 * d, abs=1e-6)
        assert m[f"{name}_asd_mm"] == pytest.approx(0.5 * d, abs=1e-6)


def test_horizontal_lines_shifted_by_rows_use_row_spacing():
    d = 4
    pred, gt = _lines((32, 32), 8).T.copy(), _lines((32, 32), 8 + d).T.copy()
    m = case_metrics(pred, gt, 2, spacing=(2.0, 0.5))
    assert m["fg_hd95_px"] == pytest.approx(d, abs=1e-6)
    assert m["fg_hd95_mm"] == pytest.approx(2.0 * d, abs=1e-6)
    assert m["fg_asd_mm"] == pytest.approx(2.0 * d, abs=1e-6)


def test_square_inside_rectangle_hand_values():
    sq = np.zeros((20, 20), dtype=np.int64)
    sq[10:14, 10:14] = 1  # 4x4, boundary ring of 12 pixels
    rect = np.zeros((20, 20), dtype=np.int64)
    rect[10:14, 10:16] = 1  # 4x6, boundary ring of 16 pixels
    m = case_metrics(sq, rect, 2)
    assert m["fg_dice"] == pytest.approx(2 * 16 / (16 + 24))
    # square -> rect: 10 zeros, 2 ones; rect -> square: 10 zeros, 2 ones, 4 twos.
    assert m["fg_asd_px"] == pytest.approx((2 + 2 + 8) / 28, rel=1e-6)
    assert m["fg_hd95_px"] == pytest.approx(2.0)  # max(q95 of [0]*10+[1]*2, q95 of [0]*10+[1]*2+[2]*4) = max(1, 2)
    assert m["fg_hd95_pooled_px"] == pytest.approx(2.0)  # 28 values, 0.95*27 = 25.65 -> between two 2s


def _brute_boundary(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    inner = np.ones_like(mask)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        inner &= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return mask & ~inner


def _brute_pooled_hd95(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = np.argwhere(_brute_boundary(a)), np.argwhere(_brute_boundary(b))
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all boundary pairs
    return float(np.percentile(np.concatenate([dist.min(axis=1), dist.min(axis=0)]), 95))


@pytest.mark.parametrize("seed", range(6))
def test_pooled_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal((14, 17)), 1.5) > 0.1  # touches the border
    b = ndimage.gaussian_filter(rng.standard_normal((14, 17)), 1.5) > 0.1
    assert a.any() and b.any()
    expected = _brute_pooled_hd95(a, b)
    assert pooled_hd95_px(a, b) == pytest.approx(expected, rel=1e-12)
    m = case_metrics(a.astype(np.int64), b.astype(np.int64), 2)
    assert m["fg_hd95_pooled_px"] == pytest.approx(expected, rel=1e-12)


def test_pooled_hd95_rejects_empty_mask():
    with pytest.raises(PpcmiError, match="non-empty"):
        pooled_hd95_px(np.zeros((4, 4), bool), np.ones((4, 4), bool))


# ----------------------------------------------------------------------------- MONAI agreement


def _onehot(lab: np.ndarray, k: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([lab == c for c in range(k)])[None].astype(np.float32))  # (1, K, H, W)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice
def test_agrees_with_monai_called_directly():
    rng = np.random.default_rng(42)
    k, spacing = 4, (0.8, 1.3)
    pred, gt = _blobs(rng, (64, 64), k), _blobs(rng, (64, 64), k)
    m = case_metrics(pred, gt, k, spacing=spacing, class_names=["bg", "a", "b", "c"])

    yp, yg = _onehot(pred, k), _onehot(gt, k)
    fp = torch.from_numpy((pred > 0)[None, None].astype(np.float32))
    fg = torch.from_numpy((gt > 0)[None, None].astype(np.float32))
    expected = {}
    for names, p, g, inc in ((["a", "b", "c"], yp, yg, False), (["fg"], fp, fg, True)):
        dice = compute_dice(p, g, include_background=inc)[0]
        hd = compute_hausdorff_distance(p, g, include_background=inc, percentile=95)[0]
        asd = compute_average_surface_distance(p, g, include_background=inc, symmetric=True)[0]
        hd_mm = compute_hausdorff_distance(p, g, include_background=inc, percentile=95, spacing=spacing)[0]
        asd_mm = compute_average_surface_distance(p, g, include_background=inc, symmetric=True, spacing=spacing)[0]
        for i, n in enumerate(names):
            expected[n] = dict(dice=dice[i], hd95_px=hd[i], asd_px=asd[i], hd95_mm=hd_mm[i], asd_mm=asd_mm[i])
    for n, vals in expected.items():
        assert m[f"{n}_status"] == "ok"
        for metric, v in vals.items():
            assert m[f"{n}_{metric}"] == pytest.approx(float(v), rel=1e-6), (n, metric)


def test_batched_equals_one_by_one_and_sizes_may_differ():
    rng = np.random.default_rng(7)
    preds = np.stack([_blobs(rng, (40, 40), 3) for _ in range(5)])
    gts = np.stack([_blobs(rng, (40, 40), 3) for _ in range(5)])
    gts[2] = 0  # some empty structures in the batch
    spacings = [None, (1.0, 2.0), None, (0.5, 0.5), (1.5, 1.0)]
    rows = evaluate_cases(preds, gts, [f"c{i}" for i in range(5)], 3, spacings=spacings)
    for i, row in enumerate(rows):
        single = case_metrics(preds[i], gts[i], 3, spacing=spacings[i])
        for key, v in single.items():
            assert row[key] == v or (math.isnan(v) and math.isnan(row[key])), key
    # a list of differently sized maps gives the same values per case
    small = _blobs(rng, (24, 30), 3)
    mixed = evaluate_cases([preds[0], small, preds[1]], [gts[0], small, gts[1]], ["x", "s", "y"], 3)
    assert mixed[0]["fg_dice"] == rows[0]["fg_dice"] and mixed[2]["fg_hd95_px"] == rows[1]["fg_hd95_px"]
    assert mixed[1]["fg_dice"] == 1.0


def test_torch_thread_count_is_restored():
    before = torch.get_num_threads()
    case_metrics(_lines((16, 16), 3), _lines((16, 16), 5), 2)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- empty masks and structures


def test_empty_mask_rule_all_four_statuses():
    full = np.zeros((16, 16), dtype=np.int64)
    full[4:10, 4:10] = 1
    empty = np.zeros((16, 16), dtype=np.int64)
    preds = np.stack([empty, empty, full, full])
    gts = np.stack([empty, full, empty, full])
    rows = evaluate_cases(preds, gts, ["both", "pred", "gt", "ok"], 2, spacings=[(1.0, 1.0), None, None, None])
    both, pred_empty, gt_empty, ok = rows
    assert both["fg_status"] == "both_empty" and both["fg_dice"] == 1.0
    assert all(both[f"fg_{d}"] == 0.0 for d in DIST)  # spacing known: mm distances 0 as well
    assert pred_empty["fg_status"] == "pred_empty" and gt_empty["fg_status"] == "gt_empty"
    for r in (pred_empty, gt_empty):
        assert r["fg_dice"] == 0.0
        assert all(math.isnan(r[f"fg_{d}"]) for d in DIST)
    assert ok["fg_status"] == "ok" and ok["fg_dice"] == 1.0 and ok["fg_hd95_px"] == 0.0
    assert math.isnan(ok["fg_hd95_mm"])  # spacing unknown
    # both empty and spacing unknown: px distances 0, mm undefined
    m = case_metrics(empty, empty, 2)
    assert m["fg_hd95_px"] == 0.0 and math.isnan(m["fg_hd95_mm"]) and math.isnan(m["fg_asd_mm"])
    assert "both_empty" in EMPTY_RULE and "pred_empty" in EMPTY_RULE


def test_merged_foreground_equals_dice_of_nonzero():
    rng = np.random.default_rng(3)
    pred, gt = _blobs(rng, (48, 48), 3), _blobs(rng, (48, 48), 3)
    pred[pred > 0] = 3 - pred[pred > 0]  # swap the classes: per-class overlap changes, foreground does not
    m = case_metrics(pred, gt, 3)
    a, b = pred > 0, gt > 0
    assert m["fg_dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-6)
    for c in (1, 2):
        pa, gb = pred == c, gt == c
        assert m[f"class{c}_dice"] == pytest.approx(2 * (pa & gb).sum() / (pa.sum() + gb.sum()), rel=1e-6)


def test_binary_reports_class_and_fg_equal():
    rng = np.random.default_rng(5)
    pred, gt = _blobs(rng, (32, 32), 2), _blobs(rng, (32, 32), 2)
    m = case_metrics(pred, gt, 2, class_names=["background", "lesion"])
    assert set(m) == {f"{s}_{x}" for s in ("lesion", "fg") for x in (*METRICS, "status")}
    for x in METRICS:
        np.testing.assert_equal(m[f"lesion_{x}"], m[f"fg_{x}"])  # NaN == NaN here (mm without spacing)
    assert structure_names(3) == ["class1", "class2", "fg"]


# ----------------------------------------------------------------------------- summary


def _rows_for_summary():
    rng = np.random.default_rng(11)
    preds = np.stack([_blobs(rng, (32, 32), 3) for _ in range(8)])
    gts = np.stack([_blobs(rng, (32, 32), 3) for _ in range(8)])
    preds[5] = 0  # pred empty for every structure: NaN distances
    extra = [{"site": "h1" if i < 5 else "h2", "method": "ppcmi"} for i in range(8)]
    return evaluate_cases(preds, gts, [f"c{i}" for i in range(8)], 3, extra=extra)


def test_summarize_matches_numpy_and_counts_undefined():
    rows = _rows_for_summary()
    assert rows[0]["site"] == "h1" and rows[0]["method"] == "ppcmi" and rows[0]["case_id"] == "c0"
    s = summarize(rows, n_boot=500, seed=1)
    assert s["n_cases"] == 8 and s["empty_rule"] == EMPTY_RULE and s["std_ddof"] == 0
    for col in ("fg_dice", "class1_hd95_px", "fg_asd_px", "fg_hd95_pooled_px"):
        v = np.array([r[col] for r in rows])
        st = s[col]
        assert st["mean"] == pytest.approx(np.nanmean(v))
        assert st["std"] == pytest.approx(np.nanstd(v, ddof=0))
        assert st["n"] == int(np.isfinite(v).sum())
        assert st["n_undefined"] == int(np.isnan(v).sum())
        lo, hi = st["ci95"]
        assert lo <= st["mean"] <= hi
    assert s["fg_hd95_px"]["n_undefined"] == 1 and s["fg_hd95_px"]["n"] == 7
    assert s["fg_dice"]["n_undefined"] == 0  # dice 0.0 for the empty prediction, not dropped
    assert s["fg_hd95_mm"]["n"] == 0 and s["fg_hd95_mm"]["n_undefined"] == 8  # no spacing
    assert math.isnan(s["fg_hd95_mm"]["mean"])
    assert s["counts"]["fg"] == {"ok": 7, "both_empty": 0, "pred_empty": 1, "gt_empty": 0}
    assert sum(s["counts"]["class1"].values()) == 8
    assert "site" not in s and "case_id" not in s  # only metric columns are summarised
    np.testing.assert_equal(summarize(rows, n_boot=500, seed=1), s)  # deterministic under a seed


def test_summarize_by_group():
    rows = _rows_for_summary()
    s = summarize(rows, n_boot=200, group_key="site")
    assert list(s["by_group"]) == ["h1", "h2"]
    h1, h2 = s["by_group"]["h1"], s["by_group"]["h2"]
    assert h1["n_cases"] == 5 and h2["n_cases"] == 3
    assert "by_group" not in h1
    assert h1["fg_dice"]["mean"] == pytest.approx(np.mean([r["fg_dice"] for r in rows[:5]]))
    assert h2["fg_hd95_px"]["n_undefined"] == 1 and h2["counts"]["fg"]["pred_empty"] == 1
    with pytest.raises(PpcmiError, match="group_key"):
        summarize([{k: v for k, v in rows[0].items() if k != "site"}], group_key="site")


def test_pool_summaries_equals_summarize_of_all_rows():
    rows = _rows_for_summary()
    whole = summarize(rows, n_boot=50)
    pooled = pool_summaries(summarize(rows, n_boot=50, group_key="site")["by_group"])
    assert pooled["n_cases"] == whole["n_cases"] and pooled["counts"] == whole["counts"]
    for col in ("fg_dice", "class1_hd95_px", "fg_asd_px", "fg_hd95_mm"):
        for k in ("n", "n_undefined"):
            assert pooled[col][k] == whole[col][k], (col, k)
        np.testing.assert_allclose([pooled[col]["mean"], pooled[col]["std"]], [whole[col]["mean"], whole[col]["std"]],
                                   rtol=1e-12, atol=1e-12)
        assert pooled[col]["ci95"] is None  # needs the rows, which never travel
    assert list(pooled["by_group"]) == ["h1", "h2"]
    with pytest.raises(PpcmiError, match="no summaries"):
        pool_summaries({})


# ----------------------------------------------------------------------------- files


def test_write_evaluation_round_trip(tmp_path):
    rows = _rows_for_summary()
    summary = summarize(rows, n_boot=100, group_key="site")
    csv_path, json_path = write_evaluation(rows, summary, tmp_path / "eval", prefix="test_")
    assert csv_path.name == "test_per_case.csv" and json_path.name == "test_summary.json"
    with open(csv_path, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(rows[0])
    assert len(back) == len(rows)
    for r, b in zip(rows, back):
        for k, v in r.items():
            if isinstance(v, float):
                got = float(b[k])
                assert got == v or (math.isnan(v) and math.isnan(got)), k
            else:
                assert b[k] == str(v)
    loaded = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert loaded["fg_dice"]["mean"] == pytest.approx(summary["fg_dice"]["mean"])
    assert loaded["fg_hd95_mm"]["mean"] is None
    assert loaded["by_group"]["h2"]["counts"] == summary["by_group"]["h2"]["counts"]


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_field():
    a = np.zeros((8, 8), dtype=np.int64)
    with pytest.raises(PpcmiError, match=r"pred and gt should have the same shape, got \(8, 8\) and \(8, 9\)"):
        case_metrics(a, np.zeros((8, 9), dtype=np.int64), 2)
    bad = a.copy()
    bad[0, 0] = 3
    with pytest.raises(PpcmiError, match=r"pred: label value 3 out of range 0\.\.2"):
        case_metrics(bad, a, 3)
    with pytest.raises(PpcmiError, match=r"gt: label value -1"):
        case_metrics(a, a - 1, 3)
    with pytest.raises(PpcmiError, match="gt: expected an integer label map"):
        case_metrics(a, a.astype(np.float32), 2)
    with pytest.raises(PpcmiError, match="pred: expected 3 dimensions"):
        evaluate_cases(a, a, ["x"], 2)
    batch = np.zeros((2, 8, 8), dtype=np.int64)
    with pytest.raises(PpcmiError, match="case_ids"):
        evaluate_cases(batch, batch, ["x"], 2)
    with pytest.raises(PpcmiError, match="spacings"):
        evaluate_cases(batch, batch, ["x", "y"], 2, spacings=[(1.0, 1.0), (0.0, 1.0)])
    with pytest.raises(PpcmiError, match="class_names"):
        case_metrics(a, a, 3, class_names=["bg", "a"])
    with pytest.raises(PpcmiError, match="extra"):
        evaluate_cases(batch, batch, ["x", "y"], 2, extra=[{"fg_dice": 1}, {}])
    with pytest.raises(PpcmiError, match="n_classes"):
        case_metrics(a, a, 1)


def test_volume_dice_counts_every_plane_of_a_volume_together():
    from ppcmi.metrics import volume_dice, volume_summary

    # volume "a": two 2x2 planes; class 1 predicted on 3 pixels of which 2 are right, 4 true pixels in all
    gt_a = [np.array([[1, 1], [0, 0]]), np.array([[1, 1], [0, 0]])]
    pr_a = [np.array([[1, 0], [0, 0]]), np.array([[1, 0], [1, 0]])]
    # volume "b": class 2 only, predicted exactly; class 1 absent from both -> 1.0 (both empty)
    gt_b = [np.array([[2, 0], [0, 0]])]
    pr_b = [np.array([[2, 0], [0, 0]])]
    plane2d = np.array([[1, 1], [1, 1]])  # a 2D case (volume None): left out
    rows = volume_dice([pr_a[0], pr_b[0], pr_a[1], plane2d], [gt_a[0], gt_b[0], gt_a[1], np.zeros((2, 2), int)],
                       ["a", "b", "a", None], 3, class_names=["bg", "x", "y"], extra={"site": "h1"})
    assert [r["volume"] for r in rows] == ["a", "b"] and [r["n_planes"] for r in rows] == [2, 1]
    a, b = rows
    assert a["site"] == "h1"
    assert a["x_dice"] == pytest.approx(2 * 2 / (3 + 4))  # 2|P∩G| / (|P| + |G|) over both planes
    assert a["y_dice"] == 1.0 and a["fg_dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert b["x_dice"] == 1.0 and b["y_dice"] == 1.0 and b["fg_dice"] == 1.0
    # the mean over a's planes would be (2/3 + 2/4) / 2 = 0.583, not 4/7 = 0.571
    assert a["x_dice"] != pytest.approx((2 / 3 + 2 / 4) / 2, abs=1e-3)
    s = volume_summary(rows, group_key="site")
    assert s["n_volumes"] == 2 and s["x_dice"] == pytest.approx((4 / 7 + 1.0) / 2)
    assert s["by_group"]["h1"]["n_volumes"] == 2
    with pytest.raises(PpcmiError, match="as long"):
        volume_dice([pr_b[0]], [gt_b[0]], ["b", "c"], 3)
    with pytest.raises(PpcmiError, match=r"pred\[0\]"):
        volume_dice([np.full((2, 2), 5)], [gt_b[0]], ["b"], 3)


def test_volume_dice_equals_monais_3d_dice_of_the_restacked_volume():
    from ppcmi.metrics import volume_dice

    rng = np.random.default_rng(7)
    gt = rng.integers(0, 3, size=(6, 9, 8))
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 3, size=gt.shape))
    order = rng.permutation(6)  # planes in any order
    rows = volume_dice([pred[z] for z in order], [gt[z] for z in order], ["v"] * 6, 3)
    onehot = lambda x: torch.from_numpy(np.stack([x == c for c in range(3)])[None].astype(np.float32))  # noqa: E731
    ref = compute_dice(onehot(pred), onehot(gt), include_background=False)[0]
    assert rows[0]["class1_dice"] == pytest.approx(float(ref[0]), abs=1e-6)
    assert rows[0]["class2_dice"] == pytest.approx(float(ref[1]), abs=1e-6)
