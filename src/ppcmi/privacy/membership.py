"""Membership inference maths (attacker and referee, no trust side): the member/non-member split,
loss-threshold and offline-LiRA scores, ROC, TPR at a fixed FPR with Clopper-Pearson intervals.

Pure functions over arrays; nothing here imports hospital code or key handling. Higher scores
mean "more likely a member" throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PpcmiError


@dataclass(frozen=True)
class MembershipSplit:
    """Which records are members (used only for training) and which are non-members (never in
    training or validation), with the patient of every record. Built only by :func:`make_split`,
    which refuses any patient on both sides."""

    member_groups: tuple[str, ...]
    nonmember_groups: tuple[str, ...]

    @property
    def n_members(self) -> int:
        return len(self.member_groups)

    @property
    def n_nonmembers(self) -> int:
        return len(self.nonmember_groups)


def make_split(member_groups, nonmember_groups, *, trained_groups=()) -> MembershipSplit:
    """Build a patient-disjoint split.

    ``member_groups``: the patient of each member record; ``nonmember_groups``: the patient of each
    non-member record; ``trained_groups``: every patient whose records touched training or
    validation at all (members' patients, validation rows' patients). A non-member patient that
    appears in either is an error, so a split that is not patient-disjoint cannot be built.
    """
    mem = tuple(str(g) for g in member_groups)
    non = tuple(str(g) for g in nonmember_groups)
    if not mem or not non:
        raise PpcmiError(f"membership split: need members and non-members, got {len(mem)} and {len(non)}")
    touched = set(mem) | {str(g) for g in trained_groups}
    overlap = sorted(set(non) & touched)
    if overlap:
        raise PpcmiError(f"membership split: patients {overlap[:5]} are both non-members and in training/validation")
    return MembershipSplit(mem, non)


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """M1: a record the model fits better (lower loss) is more likely a member."""
    return -np.asarray(losses, np.float64)


def lira_offline_scores(target_losses: np.ndarray, ref_losses: np.ndarray, ref_in: np.ndarray) -> np.ndarray:
    """M3, offline LiRA with a global variance (Carlini et al. 2022, section VI.B, for few reference models).

    ``target_losses`` (n,) per-record losses under the target model; ``ref_losses`` (R, n) under R
    reference models; ``ref_in`` (R, n) True where the record was in that reference model's
    training set. Only OUT models are used (offline). The statistic is log-loss; the score is how
    many global standard deviations the target's log-loss lies below the record's mean OUT
    log-loss. Records with no OUT model fall back to the mean over all OUT values.
    """
    t = np.log(np.maximum(np.asarray(target_losses, np.float64), 1e-12))
    r = np.log(np.maximum(np.asarray(ref_losses, np.float64), 1e-12))
    out = ~np.asarray(ref_in, bool)
    if r.shape != out.shape or r.shape[1] != t.shape[0]:
        raise PpcmiError(f"lira: shapes differ: target {t.shape}, reference {r.shape}, in-mask {out.shape}")
    if not out.any():
        raise PpcmiError("lira: no reference model leaves any record out")
    cnt = out.sum(0)
    mu = np.where(cnt > 0, (r * out).sum(0) / np.maximum(cnt, 1), r[out].mean())
    resid = (r - mu[None])[out]
    sigma = max(float(resid.std()) if resid.size > 1 else 0.0, 1e-6)
    return (mu - t) / sigma


def reference_assignment(units: np.ndarray, n_models: int, seed: int = 0) -> np.ndarray:
    """(R, n) in-masks for R reference models: every unit (e.g. a source slice, whose augmented
    copies go together) is IN for exactly half of the models, chosen at random."""
    if n_models < 2 or n_models % 2:
        raise PpcmiError(f"--shadow-models: must be an even number of at least 2, got {n_models}")
    units = np.asarray(units)
    uniq, inv = np.unique(units, return_inverse=True)
    rng = np.random.default_rng(seed)
    unit_in = np.zeros((n_models, len(uniq)), bool)
    for u in range(len(uniq)):
        unit_in[rng.permutation(n_models)[: n_models // 2], u] = True
    return unit_in[:, inv]


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 − alpha) interval for a binomial proportion k/n."""
    from scipy.stats import beta

    if n <= 0:
        return float("nan"), float("nan")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> dict:
    """TPR at the strictest threshold whose false-positive rate on the non-members is at most ``fpr``.

    The threshold is a non-member score, so at most floor(fpr · n_non) non-members lie strictly
    above it; with fewer than 1/fpr non-members that is zero and the achieved FPR is 0 (the
    resolution is 1/n_non, reported as ``fpr_resolution``).
    """
    m = np.asarray(member_scores, np.float64)
    nm = np.sort(np.asarray(nonmember_scores, np.float64))[::-1]
    allowed = int(np.floor(fpr * len(nm) + 1e-9))
    thr = nm[min(allowed, len(nm) - 1)]
    tp = int((m > thr).sum())
    fp = int((nm > thr).sum())
    lo, hi = clopper_pearson(tp, len(m))
    return {"target_fpr": fpr, "tpr": tp / len(m), "tpr_ci95": [lo, hi], "achieved_fpr": fp / len(nm),
            "tp": tp, "n_members": len(m), "fp": fp, "n_nonmembers": len(nm), "fpr_resolution": 1.0 / len(nm)}


def patient_permutation(member_scores: np.ndarray, member_groups, nonmember_scores: np.ndarray, nonmember_groups, *,
                        draws: int = 2000, seed: int = 0) -> dict:
    """How far from 0.5 the AUC strays when the member label follows whole patients but not membership.

    Members and non-members are different patients, so an AUC away from 0.5 can come from the patients alone (one
    patient's slices resemble each other) rather than from the model having trained on them. Each draw deals the
    member label to as many randomly chosen patients (of both sets together) as there are member patients, every row
    of a patient with it, and computes the AUC; under "membership changes nothing" the observed AUC is one such draw.
    Returns the observed AUC, the null's 2.5 / 50 / 97.5 percentiles, and the two-sided permutation p-value of
    ``|AUC - 0.5|`` (with the observed draw counted, so it is never 0).
    """
    from scipy.stats import rankdata

    m, nm = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    gm, gn = np.asarray(member_groups, dtype=str), np.asarray(nonmember_groups, dtype=str)
    if len(gm) != len(m) or len(gn) != len(nm):
        raise PpcmiError(f"patient_permutation: {len(m)} member and {len(nm)} non-member scores, but "
                         f"{len(gm)} and {len(gn)} patient ids")
    if set(gm) & set(gn):
        raise PpcmiError(f"patient_permutation: patient {sorted(set(gm) & set(gn))[0]!r} is on both sides")
    if draws < 1:
        raise PpcmiError(f"patient_permutation: draws must be at least 1, got {draws}")
    ranks = rankdata(np.r_[m, nm])  # ties share their mean rank, as roc_auc_score counts them
    patients, row_patient = np.unique(np.r_[gm, gn], return_inverse=True)
    rows_of = np.bincount(row_patient, minlength=len(patients)).astype(np.float64)
    rank_of = np.bincount(row_patient, weights=ranks, minlength=len(patients))
    n_member_patients = len(np.unique(gm))
    total = float(len(ranks))

    def auc(chosen: np.ndarray) -> np.ndarray:  # chosen: (draws, patients) bool, member-labelled patients
        n1 = chosen @ rows_of
        r1 = chosen @ rank_of
        return (r1 - n1 * (n1 + 1) / 2) / (n1 * (total - n1))

    observed = np.zeros((1, len(patients)), bool)
    observed[0, np.unique(row_patient[:len(m)])] = True
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((draws, len(patients))), axis=1)  # a random order of the patients per draw
    chosen = np.zeros((draws, len(patients)), bool)
    np.put_along_axis(chosen, order[:, :n_member_patients], True, axis=1)
    null = auc(chosen)
    obs = float(auc(observed)[0])
    p = (1 + int((np.abs(null - 0.5) >= abs(obs - 0.5) - 1e-12).sum())) / (draws + 1)
    lo, mid, hi = np.percentile(null, [2.5, 50, 97.5])
    return {"observed_auc": obs, "null_auc_percentiles": [float(lo), float(mid), float(hi)], "p_two_sided": p,
            "draws": draws, "seed": seed, "member_patients": n_member_patients,
            "nonmember_patients": len(patients) - n_member_patients}


def evaluate_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """AUC, the ROC curve, TPR at 1 % FPR, and at 0.1 % FPR only with at least 2000 non-members."""
    from sklearn.metrics import roc_auc_score, roc_curve

    m, nm = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    y = np.r_[np.ones(len(m)), np.zeros(len(nm))]
    s = np.r_[m, nm]
    fpr, tpr, _ = roc_curve(y, s)
    out = {"auc": float(roc_auc_score(y, s)), "n_members": len(m), "n_nonmembers": len(nm),
           "tpr_at_1pct_fpr": tpr_at_fpr(m, nm, 0.01), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
    out["tpr_at_0.1pct_fpr"] = tpr_at_fpr(m, nm, 0.001) if len(nm) >= 2000 else None
    return out
