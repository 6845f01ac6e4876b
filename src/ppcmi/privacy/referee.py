"""The referee (auditor side): scores each attack's estimates against the ground truth, runs its positive control
and its prior-only baseline, and gives the verdict; it also draws which pairs leak.

The referee holds everything (:class:`~ppcmi.privacy.run.Run`): the victims' :class:`~ppcmi.privacy.views.GroundTruth`,
their keys as :class:`~ppcmi.privacy.views.StolenKey` (the positive controls "key known" are what a T4 attacker
does), and the server view of latents sent without the transform (the controls "no transform"). An attack never
sees any of it: it returns estimates, and one ``score_*`` function per attack judges them. Each ``score_*`` takes the
referee and ``runs``: ``{scope: (views, estimates)}``, one entry per victim (or ordered pair of hospitals, or one for
the whole run), the views in the order the attack declares them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

from . import attacks as A
from . import membership as M
from . import procedures as P
from .run import Run
from .verdicts import (MARGINS, RECOVERED, baseline_scores, combine, image_entry, mask_entry, mia_entry, prior_baselines, stats,
                       verdict)
from .views import ChallengePart, MembershipChallenge, ServerView, TargetModel

MIA_NOTE = ("rows are not independent (a slice's augmented copies, a patient's slices), so the Clopper-Pearson "
            "intervals, which assume independent records, are optimistic")


@dataclass(frozen=True)
class AuditSettings:
    """How hard the audit tries, and where it keeps the networks it trains (``work``: resumable)."""

    work: Path
    shadow_models: int = 4
    shadow_epochs: int | None = None
    control_epochs: int = 150
    progress: bool = True
    device: object = None  # where the audit's networks train (``--device``; a torch.device, None is the CPU)


class Referee:
    """The run, the settings, the prior-only baselines (from the public data), and what the controls share."""

    def __init__(self, run: Run, settings: AuditSettings):
        self.run = run
        self.settings = settings
        self.prior = prior_baselines(run.aux.images[:, 0], run.aux.masks > 0)
        self._control: tuple | None = None

    def baseline(self, images: np.ndarray, fg: np.ndarray) -> dict:
        return baseline_scores(self.prior, images, fg)

    def membership_control(self) -> tuple[TargetModel, MembershipChallenge, np.ndarray]:
        """The positive control of M1 and M3: a deliberately memorising network (no dropout, no validation, many
        epochs) trained on a few member rows, and a challenge of those rows and every non-member; trained once."""
        if self._control is None:
            run, s = self.run, self.settings
            challenge, truth = run.membership()
            names = run.names
            rng = np.random.default_rng(11)
            rows = {h: rng.permutation(truth.member_rows[h])[: max(4, 64 // len(names))] for h in names}
            cfg = replace(run.cfg.mapping, dropout=0.0, val_frac=0.0, epochs=s.control_epochs, patience=s.control_epochs, dp=False,
                          lr_schedule="constant", scope="shared")
            model = P.train_or_load([P.subset_rows(run.message(h), r) for h, r in rows.items()], cfg, s.work / "control_memorising",
                                    5, s.progress, device=s.device)
            starts = np.cumsum([0] + [p.batch.n for p in challenge.parts])
            non = [p for i, p in enumerate(challenge.parts) if not truth.member[starts[i]]]
            parts = [ChallengePart(h, P.subset_rows(run.message(h), r), tuple(truth.member_units[h][int(x)] for x in r)) for h, r in rows.items()]
            member = np.r_[np.ones(sum(len(r) for r in rows.values()), bool), np.zeros(sum(p.batch.n for p in non), bool)]
            self._control = (TargetModel(lambda h: model, cfg), MembershipChallenge(tuple(parts + non)), member)
        return self._control

    def membership_roles(self) -> dict:
        _, truth = self.run.membership()
        return {"n_members": truth.split.n_members, "n_nonmembers": truth.split.n_nonmembers,
                "n_validation_rows_excluded": truth.n_validation_rows,
                "member_patients": sorted(set(truth.split.member_groups)),
                "nonmember_patients": sorted(set(truth.split.nonmember_groups))}


# ----------------------------------------------------------------------------- which pairs leak (the referee's draw)


def a5_leaks(server: ServerView, seed: int = 0) -> dict:
    """A5: per victim, a random order of its original slices; the first ones leak (up to ``max(K_PROCRUSTES)``),
    the rest are held out and reconstructed."""
    rng = np.random.default_rng(seed)
    kmax = max(P.K_PROCRUSTES)
    out = {}
    for h in server.messages:
        n = server.n_originals(h)
        order = rng.permutation(n)
        held = order[kmax:] if n > kmax + 1 else order[n // 2:]
        out[h] = (np.array([i for i in order if i not in set(held)], dtype=np.int64), held)
    return out


def a6_leaks(server: ServerView, seed: int = 0) -> dict:
    """A6: half of each victim's slices leak, with every augmented copy sent of them (in random order); the other
    half's originals are reconstructed."""
    rng = np.random.default_rng(seed + 6)
    out = {}
    for h, msg in server.messages.items():
        n = server.n_originals(h)
        src = np.arange(msg.n) % n
        order = rng.permutation(n)
        leak_src, eval_src = set(order[: n // 2].tolist()), np.sort(order[n // 2:])
        out[h] = (rng.permutation(np.flatnonzero(np.isin(src, list(leak_src)))), eval_src)
    return out


# ----------------------------------------------------------------------------- scoring, one function per attack


def score_a1(ref: Referee, runs: dict) -> dict:
    """Image: the best of the 3 leading component maps per slice (chosen with the truth: an upper bound for the
    attacker). Control: the same attack on latents sent without the transform."""
    ((server, public), est), = runs.values()
    ctl = P.a1(ref.run.plain_server_view(), public)
    res: dict = {"per_victim": {}, "mask_rule": est["mask_rule"]}
    for h in server.messages:
        t, n = ref.run.truth(h), server.n_originals(h)
        per_scale, agree = {}, {}
        for s in server.scales:
            k_maps, p_maps = est["victims"][h]["maps"][s], ctl["victims"][h]["maps"][s]
            agree[s] = float(min(abs(np.corrcoef(k_maps[:, c].ravel(), p_maps[:, c].ravel())[0, 1]) for c in range(k_maps.shape[1])))
            sc = A.best_component_scores(k_maps[:n], t.images)
            pc = A.best_component_scores(p_maps[:n], t.images)
            per_scale[s] = {"attack": {"ssim": stats(sc["ssim"]), "psnr": stats(sc["psnr"])},
                            "control": {"ssim": stats(pc["ssim"]), "psnr": stats(pc["psnr"])}}
        best = max(per_scale, key=lambda s: per_scale[s]["attack"]["ssim"]["mean"])
        att = {**per_scale[best]["attack"], **mask_entry(est["victims"][h]["fg"], t.fg)}
        ctl_h = {**per_scale[best]["control"], **mask_entry(ctl["victims"][h]["fg"], t.fg)}
        base = ref.baseline(t.images, t.fg)
        res["per_victim"][h] = {"image_scale": best, "per_scale": per_scale, "pc_agreement_min_abs_corr": agree,
                                "attack": att, "control": ctl_h, "baseline": base, **verdict(att, base, ctl_h)}
    return combine(res)


def score_a5(ref: Referee, runs: dict) -> dict:
    """Key errors against the true key, held-out latent error of the recovered key; the decoded held-out slices
    against the truth. Control: the true key and the victim's decoder (T4)."""
    res: dict = {"per_victim": {}, "k": list(P.K_PROCRUSTES), "recovered_below": RECOVERED}
    for victim, ((server, leaked, _decoder), est) in runs.items():
        t, kit = ref.run.truth(victim), ref.run.stolen_key(victim).kit
        held = leaked.targets
        table: dict = {}
        for kind, z_all in (("image", t.z_img), ("mask", t.z_msk)):
            zt_all = server.keyed(victim, kind)
            for s in server.scales:
                true = kit.true_key(kind, s)
                c = z_all[s].shape[1]
                m_true, b_true = true if true is not None else (np.eye(c), np.zeros(c))
                active = z_all[s].std(axis=(0, 2, 3)) > 1e-6 * max(float(z_all[s].std()), 1e-12)
                rows = []
                for k, m_hat, b_hat in est["keys"][(kind, s)]:
                    err = A.latent_error(A.apply_key(z_all[s][held], m_hat, b_hat), zt_all[s][held])
                    rows.append({"k": k, "key_rel_error": A.relative_error(m_hat, m_true),
                                 "key_rel_error_active": A.relative_error(m_hat[:, active], m_true[:, active]),
                                 "active_channels": int(active.sum()),
                                 "bias_rel_error": A.relative_error(b_hat, b_true), "heldout_latent_error": err,
                                 "recovered": bool(err <= RECOVERED)})
                first = next((r["k"] for r in rows if r["recovered"]), None)
                table[f"{kind}/{s}"] = {"rows": rows, "smallest_k": first, "pixels_per_image": int(np.prod(z_all[s].shape[2:])),
                                        "channels": c}
        imgs, fg = t.images[held], t.fg[held]
        att = {**image_entry(est["images"], imgs), **mask_entry(est["fg"], fg)}
        keyed = {s: server.keyed(victim, "image")[s][held] for s in server.scales}
        keyed_m = {s: server.keyed(victim, "mask")[s][held] for s in server.scales}
        ctl = {**image_entry(kit.decode_keyed(keyed, "image")[:, 0], imgs), **mask_entry(P.fg_of_probs(kit.decode_keyed(keyed_m, "mask")), fg)}
        base = ref.baseline(imgs, fg)
        allk = [v["smallest_k"] for v in table.values()]
        res["per_victim"][victim] = {"key_recovery": table, "n_heldout": int(len(held)), "decode_with_k": est["decode_with_k"],
                                     "smallest_k_all_scales": None if None in allk else max(allk),
                                     "attack": att, "control": ctl, "baseline": base, **verdict(att, base, ctl)}
    return combine(res)


def score_a6(ref: Referee, runs: dict) -> dict:
    """The reconstructed held-out slices at each k against the truth. Control: the same attack on latents sent
    without the transform. A victim counts as succeeded if any k did."""
    res: dict = {"per_victim": {}, "k": list(P.K_INVERSION)}
    for victim, ((_server, public, leaked), est) in runs.items():
        t = ref.run.truth(victim)
        imgs, fg = t.images[leaked.targets], t.fg[leaked.targets]
        base = ref.baseline(imgs, fg)
        ctl = P.a6(ref.run.plain_server_view(), public, leaked)
        per_k = {}
        for k in P.K_INVERSION:
            out = {label: {**image_entry(e[k]["images"], imgs), **mask_entry(e[k]["fg"], fg)} for label, e in (("attack", est), ("control", ctl))}
            per_k[str(k)] = {"k_used": est[k]["k_used"], **out, **verdict(out["attack"], base, out["control"])}
        kk = str(max(P.K_INVERSION))
        res["per_victim"][victim] = {"per_k": per_k, "n_eval": int(len(leaked.targets)), "baseline": base,
                                     "attack": per_k[kk]["attack"], "control": per_k[kk]["control"],
                                     **verdict(per_k[kk]["attack"], base, per_k[kk]["control"])}
        if any(v["status"] == "succeeded" for v in per_k.values()):
            res["per_victim"][victim]["status"] = "succeeded"
    return combine(res)


def score_a7(ref: Referee, runs: dict) -> dict:
    """Top-1 and top-5 of each victim slice's true candidate (itself). Control: the key known and the victim's own
    encoder on the candidates."""
    ((server, _public, pool), est), = runs.values()
    m, s = len(pool.images), est["scale"]
    offsets = ref.run.pool_offsets()
    res: dict = {"per_victim": {}, "pool": int(m), "scale": s, "chance_top1": 1 / m, "chance_top5": min(1.0, 5 / m),
                 "pool_meets_minimum": bool(m >= MARGINS["min_pool"])}
    for i, h in enumerate(server.messages):
        n = server.n_originals(h)
        truth = offsets[i] + np.arange(n)
        per = {k: {"top1": A.topk_accuracy(v, truth, 1), "top5": A.topk_accuracy(v, truth, 5)} for k, v in est["victims"][h].items()}
        best = max(per, key=lambda k: per[k]["top1"])
        z_plain = ref.run.truth(h).z_img[s][:n]
        cand_own = ref.run.stolen_key(h).kit.encode_plain(pool.images[:, None], "image")[s]
        d = -cdist(z_plain.reshape(n, -1), cand_own.reshape(m, -1), "sqeuclidean")  # (n, m), never (n, m, D)
        ctrl = {"top1": A.topk_accuracy(d, truth, 1), "top5": A.topk_accuracy(d, truth, 5)}
        lim = MARGINS["linkage_top1_x_chance"] / m
        passed = ctrl["top1"] > lim
        exceeded = per[best]["top1"] > lim
        res["per_victim"][h] = {"methods": per, "best_method": best, "attack": per[best], "control": ctrl,
                                "top1_limit": lim, "control_passed": bool(passed),
                                "status": "void" if not passed else ("succeeded" if exceeded else "not exceeded")}
    return combine(res)


def score_a8(ref: Referee, runs: dict) -> dict:
    """``A<-B``: A's slices decoded with B's key and decoder against the truth. Control: A's own key and decoder;
    for reference, B's decoder on A's plain latents (no transform at all)."""
    res: dict = {"per_pair": {}}
    controls: dict = {}
    for (a, b), ((server, other), est) in runs.items():
        t, n = ref.run.truth(a), server.n_originals(a)
        if a not in controls:
            own = ref.run.stolen_key(a).kit
            zt_i = {s: v[:n] for s, v in server.keyed(a, "image").items()}
            zt_m = {s: v[:n] for s, v in server.keyed(a, "mask").items()}
            controls[a] = {**image_entry(own.decode_keyed(zt_i, "image")[:, 0], t.images),
                           **mask_entry(P.fg_of_probs(own.decode_keyed(zt_m, "mask")), t.fg)}
        ctl = controls[a]
        base = ref.baseline(t.images, t.fg)
        att = {**image_entry(est["images"], t.images), **mask_entry(est["fg"], t.fg)}
        no_klt = image_entry(other.kit.decode_plain({s: v[:n] for s, v in t.z_img.items()}, "image")[:, 0], t.images)
        res["per_pair"][f"{a}<-{b}"] = {"victim": a, "attacker": b, "attack": att, "control": ctl, "baseline": base,
                                        "no_transform": no_klt, **verdict(att, base, ctl)}
    res["per_victim"] = res["per_pair"]
    return combine(res)


def _split_scores(scores: np.ndarray, member: np.ndarray) -> dict:
    return M.evaluate_scores(scores[member], scores[~member])


def score_m1(ref: Referee, runs: dict) -> dict:
    """AUC and TPR at 1 % FPR of the loss-threshold scores; control: the same attack on the memorising network."""
    ((_target, _challenge), scores), = runs.values()
    _, truth = ref.run.membership()
    ctrl_target, ctrl_challenge, ctrl_member = ref.membership_control()
    ctrl = _split_scores(P.m1(ctrl_target, ctrl_challenge), ctrl_member)
    return {**mia_entry(_split_scores(scores, truth.member), ctrl), "roles": ref.membership_roles(), "note": MIA_NOTE}


def score_m3(ref: Referee, runs: dict) -> dict:
    """As M1, for offline LiRA; the control is scored against the attack's own reference networks."""
    ((_target, _challenge), est), = runs.values()
    _, truth = ref.run.membership()
    refs = est["references"]
    ctrl_target, ctrl_challenge, ctrl_member = ref.membership_control()
    ctrl = _split_scores(P.lira_scores(ctrl_target, ctrl_challenge, refs), ctrl_member)
    out = mia_entry(_split_scores(est["scores"], truth.member), ctrl)
    out["reference_models"] = len(refs.models)
    out["reference_epochs"] = refs.epochs
    return {**out, "roles": ref.membership_roles(), "note": MIA_NOTE}
