"""Margins and verdicts (referee, no trust side): the margins of DESIGN.md section 4, the scores an estimate is
judged by, the prior-only baselines, and the rule that turns attack, baseline and positive control into a status.

Pure functions over arrays and result dicts. A status is "succeeded" (the attack beat the baseline by more than
a margin), "not exceeded", or "void" (the positive control did not beat it either: the test could not see).
"""

from __future__ import annotations

import numpy as np

from . import attacks as A

MARGINS = {"ssim_gain": 0.05, "psnr_gain_db": 1.0, "dice_gain": 0.05, "linkage_top1_x_chance": 2.0, "min_pool": 100,
           "mia_tpr_at_1pct_fpr": 0.02, "mia_tpr_upper95": 0.05, "auc": [0.45, 0.55], "min_nonmembers_0.1pct": 2000}
RECOVERED = 1e-3  # held-out relative latent error below which a key counts as recovered


def stats(v: np.ndarray) -> dict:
    m, lo, hi = A.mean_ci(v)
    return {"mean": m, "ci95": [lo, hi], "n": int(len(v))}


def gains(att: dict, base: dict) -> dict:
    g = {}
    if "ssim" in att:
        g["ssim_gain"] = att["ssim"]["mean"] - base["ssim"]["mean"]
        g["psnr_gain_db"] = att["psnr"]["mean"] - base["psnr"]["mean"]
    if "dice" in att:
        g["dice_gain"] = att["dice"]["mean"] - base["dice"]["mean"]
    return g


def exceeds(g: dict) -> list[str]:
    return [k for k, v in g.items() if k in MARGINS and v > MARGINS[k]]


def verdict(att: dict, base: dict, ctrl: dict) -> dict:
    """Gains of the attack and of its positive control over the baseline, and the status they give."""
    ga, gc = gains(att, base), gains(ctrl, base)
    ex, exc = exceeds(ga), exceeds(gc)
    status = "void" if not exc else ("succeeded" if ex else "not exceeded")
    return {"gains": ga, "exceeded": ex, "control_gains": gc, "control_passed": bool(exc), "status": status}


def combine(res: dict) -> dict:
    """The attack's status over victims: succeeded if it succeeded on any victim; void if every control failed."""
    st = [v["status"] for v in res["per_victim"].values()]
    res["status"] = "succeeded" if "succeeded" in st else ("void" if all(s == "void" for s in st) else "not exceeded")
    return res


def image_entry(est: np.ndarray, truth: np.ndarray) -> dict:
    """SSIM and PSNR of (N, S, S) estimates after a per-image affine intensity fit, and raw."""
    s = A.image_scores(est, truth)
    r = A.image_scores(est, truth, affine=False)
    return {"ssim": stats(s["ssim"]), "psnr": stats(s["psnr"]), "ssim_raw": stats(r["ssim"]), "psnr_raw": stats(r["psnr"])}


def mask_entry(pred_fg: np.ndarray, fg: np.ndarray) -> dict:
    return {"dice": stats(A.dice(pred_fg, fg))}


def prior_baselines(aux_images: np.ndarray, aux_fg: np.ndarray) -> dict:
    """The prior-only guesses from public data alone: the mean aux image (N, S, S -> S, S), and the mean aux
    foreground map thresholded where it best fits the aux masks."""
    mean_img = aux_images.mean(0)
    pfg = aux_fg.mean(0)
    best_t, best_d = 0.5, -1.0
    for t in np.linspace(0.05, 0.95, 19):
        d = float(A.dice(np.broadcast_to(pfg > t, aux_fg.shape), aux_fg).mean())
        if d > best_d:
            best_t, best_d = float(t), d
    return {"mean_image": mean_img, "mean_fg": pfg, "fg_threshold": best_t}


def baseline_scores(pri: dict, images: np.ndarray, fg: np.ndarray) -> dict:
    est = np.broadcast_to(pri["mean_image"], images.shape)
    out = image_entry(est, images)
    out.update(mask_entry(np.broadcast_to(pri["mean_fg"] > pri["fg_threshold"], fg.shape), fg))
    return out


def mia_verdict(ev: dict) -> tuple[bool, list[str]]:
    t = ev["tpr_at_1pct_fpr"]
    ex = []
    if t["tpr"] > MARGINS["mia_tpr_at_1pct_fpr"]:
        ex.append("tpr_at_1pct_fpr")
    if t["tpr_ci95"][1] > MARGINS["mia_tpr_upper95"]:
        ex.append("tpr_upper95")
    if not MARGINS["auc"][0] <= ev["auc"] <= MARGINS["auc"][1]:
        ex.append("auc")
    return bool(ex), ex


def mia_entry(ev: dict, ctrl: dict) -> dict:
    """A membership attack's entry: its evaluation, its control's, and the status (void unless the control's
    TPR at 1 % FPR is above the margin with 95 % confidence)."""
    ex, which = mia_verdict(ev)
    ctrl_t = ctrl["tpr_at_1pct_fpr"]
    passed = ctrl_t["tpr_ci95"][0] > MARGINS["mia_tpr_at_1pct_fpr"]
    return {"attack": ev, "control": ctrl, "exceeded": which, "control_passed": bool(passed),
            "status": "void" if not passed else ("succeeded" if ex else "not exceeded")}
