"""The privacy audit of a finished run folder (auditor side: plays every attacker and the referee).

``run_audit(RUN)`` reads ``RUN/config.json``, the site folders (keys included, for the ground truth
and the positive controls), the train messages exactly as sent (``RUN/wire``) and the mapping
network (``RUN/server``), runs the attacks of DESIGN.md section 4 for the chosen threat levels and
writes ``RUN/audit/report.md``, ``audit.json`` and plots. Key bytes, Q and b are never written:
only errors against them are.

Roles (recorded in ``audit.json`` under ``roles``):

- victim: each hospital in turn; its records are its training slices, which it sent to the
  server keyed (the originals are the first N rows of its train message, then augmented copies).
- aux (T2 public data): by default the run's held-out test patients' images and masks, which are
  patient-disjoint from every hospital's records by construction of the split (checked);
  or ``aux_dir`` (checked for identical images).
- members (T5): the train-message rows the mapping network was fitted on (its validation rows
  are neither members nor non-members); non-members: the test patients' slices and augmented
  copies, encoded and keyed by each hospital, never in training or validation. The split is
  built by :func:`ppcmi.privacy.membership.make_split`, which refuses any shared patient.

Every attack has a positive control (no transform or key known) and a prior-only baseline; an
attack whose positive control does not exceed the margins is void. Margins: DESIGN.md section 4.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import cdist

from .. import protocol
from ..config import from_dict, to_dict
from ..errors import PpcmiError
from ..fileio import atomic_write_json
from . import attacks as A
from . import membership as M

log = logging.getLogger(__name__)

THREATS = {
    "T0": "network eavesdropper (sees the messages; with TLS nothing, without it what T1 sees)",
    "T1": "curious server: keyed latents only",
    "T2": "T1 plus public images and masks of the same modality (aux)",
    "T3": "T2 plus k leaked pairs (plain latent or image, with its keyed latent)",
    "T4": "stolen key (and the hospital's decoder)",
    "T5": "membership attacker with the mapping network's weights or query access",
}
ATTACKS = {  # attack -> (threat levels it belongs to, what it is)
    "A1": (("T0", "T1", "T2"), "ciphertext-only principal-component maps of keyed latents"),
    "A5": (("T3", "T4"), "known-plaintext key recovery by orthogonal Procrustes"),
    "A6": (("T3",), "learned inversion: aux-trained autoencoder plus a 1x1 map fitted on k leaked pairs"),
    "A7": (("T2",), "linkage of keyed latents to a pool of candidate images"),
    "A8": (("T1",), "the paper's cross-decoder attack: another hospital's key and decoder"),
    "M1": (("T5",), "loss-threshold membership inference on the mapping network"),
    "M3": (("T5",), "offline LiRA membership inference with reference mapping networks"),
}
MARGINS = {"ssim_gain": 0.05, "psnr_gain_db": 1.0, "dice_gain": 0.05, "linkage_top1_x_chance": 2.0, "min_pool": 100,
           "mia_tpr_at_1pct_fpr": 0.02, "mia_tpr_upper95": 0.05, "auc": [0.45, 0.55], "min_nonmembers_0.1pct": 2000}
K_PROCRUSTES = (1, 2, 5, 10)
K_INVERSION = (10, 100)
RECOVERED = 1e-3  # held-out relative latent error below which a key counts as recovered


def parse_threats(spec: str | None) -> list[str]:
    if not spec:
        return list(THREATS)
    out = [t.strip().upper() for t in spec.split(",") if t.strip()]
    bad = [t for t in out if t not in THREATS]
    if bad or not out:
        raise PpcmiError(f"--threats: unknown threat {', '.join(bad) or repr(spec)}; known: {','.join(THREATS)}")
    return out


# ----------------------------------------------------------------------------- loading the run


class RunData:
    """Everything the auditor reads from a run folder, and the roles derived from its split."""

    def __init__(self, run: Path, data_dir: Path | None = None, aux_dir: Path | None = None):
        from ..client import stages
        from ..client.site import Hospital, training_inputs
        from ..data import discover_cases
        from ..simulate import plan

        self.run = run
        cfg_path = run / "config.json"
        if not run.is_dir():
            raise PpcmiError(f"{run}: run folder not found")
        if not cfg_path.exists():
            raise PpcmiError(f"{cfg_path}: missing; not a run folder written by 'ppcmi simulate' or 'ppcmi demo'")
        raw = json.loads(cfg_path.read_text())
        recorded = raw.pop("data_dir", None)
        self.cfg = from_dict(raw)
        data = Path(data_dir) if data_dir is not None else Path(recorded) if recorded else None
        if data is None or not (data / "images").is_dir():
            raise PpcmiError(f"{cfg_path}: data_dir {str(recorded)!r} not found from here; pass --data DIR")
        self.data_dir = data
        for sub in ("sites", "wire", "server"):
            if not (run / sub).is_dir():
                raise PpcmiError(f"{run / sub}: missing; the run has not finished stage 2")
        self.plan = plan(self.cfg, data)
        labels = self.plan.labels
        copies = self.cfg.autoencoder.send_copies
        self.hospitals: dict[str, dict] = {}
        for name, cases in self.plan.hospitals.items():
            wire_path = run / "wire" / f"{name}.train.ppcmi"
            if not wire_path.exists():
                raise PpcmiError(f"{wire_path}: missing train message")
            msg = protocol.decode(wire_path.read_bytes())
            hosp = Hospital(run / "sites" / name)
            arr = stages.prepare(cases, self.cfg, labels)
            n = len(cases)
            if msg.n != n * copies:
                raise PpcmiError(f"{wire_path}: {msg.n} rows, expected {n} cases x {copies} copies")
            x_all, y_all = training_inputs(arr["images"], arr["masks"], labels.n_classes, copies=copies, seed=self.cfg.seed)
            again = stages.training_batch(hosp, arr, self.cfg)
            for k, a in msg.arrays.items():
                b = again.arrays[k]
                if np.abs(a.astype(np.float64) - b).max() > 1e-3 * max(np.abs(b).max(), 1.0):
                    raise PpcmiError(f"{wire_path}: {k} does not match the site's re-encoding of its cases; the run folder was changed after stage 2")
            self.hospitals[name] = {
                "hospital": hosp, "msg": msg, "n": n, "images": arr["images"][:, 0], "fg": arr["masks"] > 0,
                "groups": np.array([c.group for c in cases]), "case_ids": list(arr["case_ids"]),
                "x_all": x_all.numpy(), "y_all": y_all.numpy(), "src": np.arange(msg.n) % n,
                "zt_img": msg.latents("zt_img_"), "zt_msk": msg.latents("zt_msk_"),
                "z_img": hosp.plain_latents(x_all, "image"), "z_msk": hosp.plain_latents(y_all, "mask"),
            }
        self.scales = list(next(iter(self.hospitals.values()))["zt_img"])
        self.size = self.cfg.data.size
        # ---- aux (T2)
        victim_groups = {g for h in self.hospitals.values() for g in h["groups"]}
        if aux_dir is None:
            test = stages.prepare(self.plan.test, self.cfg, labels)
            groups = [c.group for c in self.plan.test]
            overlap = sorted(set(groups) & victim_groups)
            if overlap:
                raise PpcmiError(f"aux: test patients {overlap[:3]} also belong to a hospital; the split is not patient-disjoint")
            self.aux_source = "the run's held-out test patients"
        else:
            aux_cases = discover_cases(aux_dir, group_regex=self.cfg.data.group_regex)
            test = stages.prepare(aux_cases, self.cfg, labels)
            groups = [f"aux:{c.group}" for c in aux_cases]
            victim_hashes = {hashlib.sha256(im.tobytes()).hexdigest() for h in self.hospitals.values() for im in h["images"]}
            dup = [c for c, im in zip(test["case_ids"], test["images"][:, 0]) if hashlib.sha256(im.tobytes()).hexdigest() in victim_hashes]
            if dup:
                raise PpcmiError(f"{aux_dir}: aux images {dup[:3]} are identical to a hospital's training images; aux must be disjoint from the victims")
            self.aux_source = f"--aux {aux_dir}"
        self.aux = {"images": test["images"][:, 0], "fg": test["masks"] > 0, "masks": test["masks"], "groups": np.array(groups),
                    "images4": test["images"], "case_ids": list(test["case_ids"])}
        self.test_from_plan = aux_dir is None
        self.test_arrays = test if aux_dir is None else stages.prepare(self.plan.test, self.cfg, labels)
        self.test_groups = np.array([c.group for c in self.plan.test])


# ----------------------------------------------------------------------------- attacker's own autoencoders (T2)


def train_attacker_autoencoders(rd: RunData, out: Path, progress: bool) -> dict:
    """The attacker trains its own image and mask autoencoders, of the public architecture, on aux only."""
    from ..augment import batch_augmenter
    from ..models import AEConfig, Autoencoder
    from ..training import FitConfig, bce_dice_loss, fit, seeded_init

    site_cfg = next(iter(rd.hospitals.values()))["hospital"].ae_cfg
    ac = rd.cfg.autoencoder
    x_img = torch.from_numpy(rd.aux["images4"]).float()
    x_msk = torch.nn.functional.one_hot(torch.from_numpy(rd.aux["masks"]).long(), rd.plan.labels.n_classes).permute(0, 3, 1, 2).float()
    models = {}
    for kind, x in (("image", x_img), ("mask", x_msk)):
        cfg = AEConfig(in_channels=int(x.shape[1]), width=site_cfg.width, skips=site_cfg.skips)
        model = seeded_init(lambda: Autoencoder(cfg), 777 + (kind == "mask"))
        fc = FitConfig(epochs=ac.epochs, batch_size=ac.batch_size, lr=ac.lr, patience=ac.epochs, seed=777, schedule=ac.lr_schedule)
        work = out / f"attacker_{kind}_ae"
        fit(model, lambda m, b: bce_dice_loss(m(b[0]), b[0]), [x], None, fc, work, desc=f"attacker {kind} AE",
            progress=progress, augment=batch_augmenter([kind]) if ac.augment else None, resume=(work / "state.json").exists())
        models[kind] = model.eval()
    return models


@torch.no_grad()
def _enc(model, x: np.ndarray) -> dict[str, np.ndarray]:
    return {s: v.numpy().astype(np.float64) for s, v in model.encode(torch.from_numpy(np.asarray(x, np.float32))).items()}


@torch.no_grad()
def _dec(model, z: dict[str, np.ndarray]) -> np.ndarray:
    return model.decode({s: torch.from_numpy(np.asarray(v, np.float32)) for s, v in z.items()}).numpy()


# ----------------------------------------------------------------------------- verdict helpers


def _stats(v: np.ndarray) -> dict:
    m, lo, hi = A.mean_ci(v)
    return {"mean": m, "ci95": [lo, hi], "n": int(len(v))}


def _gains(att: dict, base: dict) -> dict:
    g = {}
    if "ssim" in att:
        g["ssim_gain"] = att["ssim"]["mean"] - base["ssim"]["mean"]
        g["psnr_gain_db"] = att["psnr"]["mean"] - base["psnr"]["mean"]
    if "dice" in att:
        g["dice_gain"] = att["dice"]["mean"] - base["dice"]["mean"]
    return g


def _exceeds(g: dict) -> list[str]:
    return [k for k, v in g.items() if k in MARGINS and v > MARGINS[k]]


def _verdict(att: dict, base: dict, ctrl: dict) -> dict:
    ga, gc = _gains(att, base), _gains(ctrl, base)
    ex, exc = _exceeds(ga), _exceeds(gc)
    status = "void" if not exc else ("succeeded" if ex else "not exceeded")
    return {"gains": ga, "exceeded": ex, "control_gains": gc, "control_passed": bool(exc), "status": status}


def _img(est: np.ndarray, truth: np.ndarray) -> dict:
    s = A.image_scores(est, truth)
    r = A.image_scores(est, truth, affine=False)
    return {"ssim": _stats(s["ssim"]), "psnr": _stats(s["psnr"]), "ssim_raw": _stats(r["ssim"]), "psnr_raw": _stats(r["psnr"])}


def _msk(pred_fg: np.ndarray, fg: np.ndarray) -> dict:
    return {"dice": _stats(A.dice(pred_fg, fg))}


def _fg_of_probs(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(1) > 0


def prior_baselines(rd: RunData) -> dict:
    """The prior-only guesses: the mean aux image, and the mean aux foreground map thresholded where it
    best fits the aux masks."""
    mean_img = rd.aux["images"].mean(0)
    pfg = rd.aux["fg"].mean(0)
    best_t, best_d = 0.5, -1.0
    for t in np.linspace(0.05, 0.95, 19):
        d = float(A.dice(np.broadcast_to(pfg > t, rd.aux["fg"].shape), rd.aux["fg"]).mean())
        if d > best_d:
            best_t, best_d = float(t), d
    return {"mean_image": mean_img, "mean_fg": pfg, "fg_threshold": best_t}


def _baseline_scores(pri: dict, images: np.ndarray, fg: np.ndarray) -> dict:
    est = np.broadcast_to(pri["mean_image"], images.shape)
    out = _img(est, images)
    out.update(_msk(np.broadcast_to(pri["mean_fg"] > pri["fg_threshold"], fg.shape), fg))
    return out


# ----------------------------------------------------------------------------- A1


def attack_a1(rd: RunData, att_models: dict, pri: dict) -> dict:
    res: dict = {"per_victim": {}}
    aux_lat = _enc(att_models["mask"], np.eye(rd.plan.labels.n_classes, dtype=np.float32)[rd.aux["masks"]].transpose(0, 3, 1, 2))
    rules = {s: A.fit_threshold_rule(A.pca_maps(aux_lat[s], 3), rd.aux["fg"]) for s in rd.scales}
    mscale = max(rules, key=lambda s: rules[s]["aux_dice"])  # chosen on aux only
    res["mask_rule"] = {"scale": mscale, **rules[mscale]}
    for name, h in rd.hospitals.items():
        n = h["n"]
        per_scale, agree = {}, {}
        for s in rd.scales:
            k_maps = A.pca_maps(h["zt_img"][s], 3)      # fitted on every row the server holds
            p_maps = A.pca_maps(h["z_img"][s], 3)
            agree[s] = float(min(abs(np.corrcoef(k_maps[:, c].ravel(), p_maps[:, c].ravel())[0, 1]) for c in range(k_maps.shape[1])))
            sc = A.best_component_scores(k_maps[:n], h["images"])
            pc = A.best_component_scores(p_maps[:n], h["images"])
            per_scale[s] = {"attack": {"ssim": _stats(sc["ssim"]), "psnr": _stats(sc["psnr"])},
                            "control": {"ssim": _stats(pc["ssim"]), "psnr": _stats(pc["psnr"])}}
        best = max(per_scale, key=lambda s: per_scale[s]["attack"]["ssim"]["mean"])
        rule = res["mask_rule"]
        fg_att = A.apply_threshold_rule(A.pca_maps(h["zt_msk"][mscale], 3)[:n], rule, rd.size)
        fg_ctl = A.apply_threshold_rule(A.pca_maps(h["z_msk"][mscale], 3)[:n], rule, rd.size)
        att = {**per_scale[best]["attack"], **_msk(fg_att, h["fg"])}
        ctl = {**per_scale[best]["control"], **_msk(fg_ctl, h["fg"])}
        base = _baseline_scores(pri, h["images"], h["fg"])
        res["per_victim"][name] = {"image_scale": best, "per_scale": per_scale, "pc_agreement_min_abs_corr": agree,
                                   "attack": att, "control": ctl, "baseline": base, **_verdict(att, base, ctl)}
    return _combine(res)


def _combine(res: dict) -> dict:
    """The attack's status over victims: succeeded if it succeeded on any victim; void if every control failed."""
    st = [v["status"] for v in res["per_victim"].values()]
    res["status"] = "succeeded" if "succeeded" in st else ("void" if all(s == "void" for s in st) else "not exceeded")
    return res


# ----------------------------------------------------------------------------- A5


def attack_a5(rd: RunData, pri: dict, seed: int = 0) -> dict:
    res: dict = {"per_victim": {}, "k": list(K_PROCRUSTES), "recovered_below": RECOVERED}
    rng = np.random.default_rng(seed)
    for name, h in rd.hospitals.items():
        hosp, n = h["hospital"], h["n"]
        order = rng.permutation(n)
        held = order[max(K_PROCRUSTES):] if n > max(K_PROCRUSTES) + 1 else order[n // 2:]
        leak_pool = [i for i in order if i not in set(held)]
        table: dict = {}
        recovered_keys: dict = {}
        for kind, zt_all, z_all in (("image", h["zt_img"], h["z_img"]), ("mask", h["zt_msk"], h["z_msk"])):
            for s in rd.scales:
                true = hosp.true_key(kind, s)
                c = z_all[s].shape[1]
                m_true, b_true = true if true is not None else (np.eye(c), np.zeros(c))
                rows = []
                for k in K_PROCRUSTES:
                    leak = np.array(leak_pool[:k])
                    m_hat, b_hat = A.procrustes_key(z_all[s][leak], zt_all[s][leak])
                    pred = A.apply_key(z_all[s][held], m_hat, b_hat)
                    err = A.latent_error(pred, zt_all[s][held])
                    active = z_all[s].std(axis=(0, 2, 3)) > 1e-6 * max(float(z_all[s].std()), 1e-12)
                    rows.append({"k": int(len(leak)), "key_rel_error": A.relative_error(m_hat, m_true),
                                 "key_rel_error_active": A.relative_error(m_hat[:, active], m_true[:, active]),
                                 "active_channels": int(active.sum()),
                                 "bias_rel_error": A.relative_error(b_hat, b_true), "heldout_latent_error": err,
                                 "recovered": bool(err <= RECOVERED)})
                    recovered_keys[(kind, s, int(len(leak)))] = (m_hat, b_hat)
                first = next((r["k"] for r in rows if r["recovered"]), None)
                table[f"{kind}/{s}"] = {"rows": rows, "smallest_k": first, "pixels_per_image": int(np.prod(z_all[s].shape[2:])),
                                        "channels": c}
        kmax = max(r["k"] for r in next(iter(table.values()))["rows"])
        # consequence: invert the held-out latents with the key recovered from kmax pairs; decode with the victim's decoder
        z_img = {s: A.invert_key(h["zt_img"][s][held], *recovered_keys[("image", s, kmax)]) for s in rd.scales}
        z_msk = {s: A.invert_key(h["zt_msk"][s][held], *recovered_keys[("mask", s, kmax)]) for s in rd.scales}
        imgs, fg = h["images"][held], h["fg"][held]
        att = {**_img(hosp.decode_plain(z_img, "image")[:, 0], imgs), **_msk(_fg_of_probs(hosp.decode_plain(z_msk, "mask")), fg)}
        keyed = {s: h["zt_img"][s][held] for s in rd.scales}
        keyed_m = {s: h["zt_msk"][s][held] for s in rd.scales}
        ctl = {**_img(hosp.decode_keyed(keyed, "image")[:, 0], imgs), **_msk(_fg_of_probs(hosp.decode_keyed(keyed_m, "mask")), fg)}
        base = _baseline_scores(pri, imgs, fg)
        allk = [v["smallest_k"] for v in table.values()]
        res["per_victim"][name] = {"key_recovery": table, "n_heldout": int(len(held)), "decode_with_k": kmax,
                                   "smallest_k_all_scales": None if None in allk else max(allk),
                                   "attack": att, "control": ctl, "baseline": base, **_verdict(att, base, ctl)}
    return _combine(res)


# ----------------------------------------------------------------------------- A6


def attack_a6(rd: RunData, att_models: dict, pri: dict, seed: int = 0) -> dict:
    res: dict = {"per_victim": {}, "k": list(K_INVERSION)}
    rng = np.random.default_rng(seed + 6)
    ncls = rd.plan.labels.n_classes
    for name, h in rd.hospitals.items():
        n = h["n"]
        order = rng.permutation(n)
        leak_src, eval_src = set(order[: n // 2].tolist()), np.sort(order[n // 2:])
        leak_rows_all = rng.permutation(np.flatnonzero(np.isin(h["src"], list(leak_src))))
        imgs, fg = h["images"][eval_src], h["fg"][eval_src]
        base = _baseline_scores(pri, imgs, fg)
        per_k = {}
        for k in K_INVERSION:
            rows = leak_rows_all[:k]
            out = {}
            a_img = _enc(att_models["image"], h["x_all"][rows])  # the attacker encodes the leaked images with its own encoder
            a_msk = _enc(att_models["mask"], h["y_all"][rows])
            for label, lat_img, lat_msk in (("attack", h["zt_img"], h["zt_msk"]), ("control", h["z_img"], h["z_msk"])):
                rec_i, rec_m = {}, {}
                for s in rd.scales:
                    w, c = A.fit_linear_map(lat_img[s][rows], a_img[s])
                    rec_i[s] = A.apply_linear_map(lat_img[s][eval_src], w, c)
                    w, c = A.fit_linear_map(lat_msk[s][rows], a_msk[s])
                    rec_m[s] = A.apply_linear_map(lat_msk[s][eval_src], w, c)
                out[label] = {**_img(_dec(att_models["image"], rec_i)[:, 0], imgs),
                              **_msk(_fg_of_probs(_dec(att_models["mask"], rec_m)) if ncls > 1 else _dec(att_models["mask"], rec_m)[:, 0] > 0.5, fg)}
            per_k[str(k)] = {"k_used": int(len(rows)), **out, **_verdict(out["attack"], base, out["control"])}
        kk = str(max(K_INVERSION))
        res["per_victim"][name] = {"per_k": per_k, "n_eval": int(len(eval_src)), "baseline": base,
                                   "attack": per_k[kk]["attack"], "control": per_k[kk]["control"],
                                   **_verdict(per_k[kk]["attack"], base, per_k[kk]["control"])}
        if any(v["status"] == "succeeded" for v in per_k.values()):
            res["per_victim"][name]["status"] = "succeeded"
    return _combine(res)


# ----------------------------------------------------------------------------- A7


def attack_a7(rd: RunData, att_models: dict) -> dict:
    """Candidates: every hospital's original slices plus the aux slices; each victim slice's true match is itself."""
    pool = np.concatenate([h["images"] for h in rd.hospitals.values()] + [rd.aux["images"]])
    offsets = np.cumsum([0] + [h["n"] for h in rd.hospitals.values()])
    s = max(rd.scales, key=lambda sc: np.prod(next(iter(rd.hospitals.values()))["zt_img"][sc].shape[2:]))
    cand_att = _enc(att_models["image"], pool[:, None])[s]
    m = len(pool)
    res: dict = {"per_victim": {}, "pool": int(m), "scale": s, "chance_top1": 1 / m, "chance_top5": min(1.0, 5 / m),
                 "pool_meets_minimum": bool(m >= MARGINS["min_pool"])}
    for i, (name, h) in enumerate(rd.hospitals.items()):
        n = h["n"]
        truth = offsets[i] + np.arange(n)
        zt = h["zt_img"][s][:n]
        scores = {"pca_r2": A.linkage_scores_pca(zt, pool), "norm_corr": A.linkage_scores_norm(zt, cand_att)}
        per = {k: {"top1": A.topk_accuracy(v, truth, 1), "top5": A.topk_accuracy(v, truth, 5)} for k, v in scores.items()}
        best = max(per, key=lambda k: per[k]["top1"])
        # positive control: key known and the victim's own encoder on the candidates
        z_plain = h["z_img"][s][:n]
        cand_own = h["hospital"].plain_latents(pool[:, None], "image")[s]
        d = -cdist(z_plain.reshape(n, -1), cand_own.reshape(m, -1), "sqeuclidean")  # (n, m), never (n, m, D)
        ctrl = {"top1": A.topk_accuracy(d, truth, 1), "top5": A.topk_accuracy(d, truth, 5)}
        lim = MARGINS["linkage_top1_x_chance"] / m
        passed = ctrl["top1"] > lim
        exceeded = per[best]["top1"] > lim
        res["per_victim"][name] = {"methods": per, "best_method": best, "attack": per[best], "control": ctrl,
                                   "top1_limit": lim, "control_passed": bool(passed),
                                   "status": "void" if not passed else ("succeeded" if exceeded else "not exceeded")}
    return _combine(res)


# ----------------------------------------------------------------------------- A8


def attack_a8(rd: RunData, pri: dict) -> dict:
    res: dict = {"per_pair": {}}
    names = list(rd.hospitals)
    for a in names:
        h = rd.hospitals[a]
        n = h["n"]
        zt_i = {s: v[:n] for s, v in h["zt_img"].items()}
        zt_m = {s: v[:n] for s, v in h["zt_msk"].items()}
        z_i = {s: v[:n] for s, v in h["z_img"].items()}
        base = _baseline_scores(pri, h["images"], h["fg"])
        own = h["hospital"]
        ctl = {**_img(own.decode_keyed(zt_i, "image")[:, 0], h["images"]), **_msk(_fg_of_probs(own.decode_keyed(zt_m, "mask")), h["fg"])}
        for b in names:
            if b == a:
                continue
            hb = rd.hospitals[b]["hospital"]
            att = {**_img(hb.decode_keyed(zt_i, "image")[:, 0], h["images"]), **_msk(_fg_of_probs(hb.decode_keyed(zt_m, "mask")), h["fg"])}
            no_klt = _img(hb.decode_plain(z_i, "image")[:, 0], h["images"])
            res["per_pair"][f"{a}<-{b}"] = {"victim": a, "attacker": b, "attack": att, "control": ctl, "baseline": base,
                                            "no_transform": no_klt, **_verdict(att, base, ctl)}
    res["per_victim"] = res["per_pair"]
    return _combine(res)


# ----------------------------------------------------------------------------- M1, M3


def membership_records(rd: RunData) -> dict:
    """Members: train-message rows in the mapping network's training split. Non-members: the test
    patients' slices (and augmented copies), keyed by each hospital; never in training or validation."""
    from ..server.mapping import mapping_split

    names = list(rd.hospitals)
    copies = rd.cfg.autoencoder.send_copies
    shared = rd.cfg.mapping.scope == "shared"
    cid = np.concatenate([np.full(rd.hospitals[h]["n"] * copies, i) for i, h in enumerate(names)])
    if shared:
        tr, va = mapping_split(cid, rd.cfg.mapping.val_frac, rd.cfg.seed)
    else:
        tr, va = [], []
        off = 0
        for i, h in enumerate(names):
            t, v = mapping_split(np.zeros(int((cid == i).sum()), np.int64), rd.cfg.mapping.val_frac, rd.cfg.seed)
            tr += (t + off).tolist()
            va += (v + off).tolist()
            off += int((cid == i).sum())
        tr, va = np.array(tr), np.array(va)
    offsets = np.cumsum([0] + [rd.hospitals[h]["n"] * copies for h in names])
    members, nonmembers = {}, {}
    ta = rd.test_arrays
    for i, h in enumerate(names):
        d = rd.hospitals[h]
        rows = tr[(tr >= offsets[i]) & (tr < offsets[i + 1])] - offsets[i]
        members[h] = {"rows": rows, "groups": d["groups"][d["src"][rows]], "units": [f"{h}/m/{u}" for u in d["src"][rows]]}
        msg = d["hospital"].training_batch(ta["images"], ta["masks"], copies=copies, noise=rd.cfg.autoencoder.send_noise, seed=4242)
        src = np.arange(msg.n) % len(ta["images"])
        nonmembers[h] = {"msg": msg, "groups": rd.test_groups[src], "units": [f"{h}/n/{u}" for u in src]}
    split = M.make_split(np.concatenate([m["groups"] for m in members.values()]),
                         np.concatenate([v["groups"] for v in nonmembers.values()]),
                         trained_groups=[g for h in rd.hospitals.values() for g in h["groups"]])
    return {"members": members, "nonmembers": nonmembers, "split": split, "n_val_rows": int(len(va))}


def _train_or_load(batches: list, cfg, out: Path, seed: int, progress: bool):
    """Train a mapping network into ``out``, or load it if an interrupted audit already trained it there."""
    from ..server.mapping import MappingServer, train_mapping

    if (out / "mapping.safetensors").exists() and (out / "config.json").exists():
        return MappingServer(out).model.to(memory_format=torch.contiguous_format).eval()
    resume = (out / "train" / "state.json").exists() and not cfg.dp
    if cfg.dp and out.exists():
        import shutil

        shutil.rmtree(out)  # DP-SGD runs cannot resume: start that network again
    model, _ = train_mapping(batches, cfg, out, seed=seed, resume=resume, progress=progress)
    return model.eval()


def _subset(msg, rows: np.ndarray):
    return protocol.LatentBatch("train", msg.client, {k: np.ascontiguousarray(v[rows]) for k, v in msg.arrays.items()})


def _losses(model, recs: dict, rd: RunData) -> tuple[np.ndarray, np.ndarray]:
    from ..server.mapping import row_losses

    mem = np.concatenate([row_losses(model, _subset(rd.hospitals[h]["msg"], r["rows"])) for h, r in recs["members"].items()])
    non = np.concatenate([row_losses(model, v["msg"]) for v in recs["nonmembers"].values()])
    return mem, non


def _load_target(rd: RunData, name: str):
    from ..server.mapping import MappingServer

    d = rd.run / "server" if rd.cfg.mapping.scope == "shared" else rd.run / "server" / name
    return MappingServer(d).model.to(memory_format=torch.contiguous_format)


def _mia_verdict(ev: dict) -> tuple[bool, list[str]]:
    t = ev["tpr_at_1pct_fpr"]
    ex = []
    if t["tpr"] > MARGINS["mia_tpr_at_1pct_fpr"]:
        ex.append("tpr_at_1pct_fpr")
    if t["tpr_ci95"][1] > MARGINS["mia_tpr_upper95"]:
        ex.append("tpr_upper95")
    if not MARGINS["auc"][0] <= ev["auc"] <= MARGINS["auc"][1]:
        ex.append("auc")
    return bool(ex), ex


def attack_membership(rd: RunData, out: Path, *, shadow_models: int, shadow_epochs: int | None, control_epochs: int,
                      progress: bool) -> dict:
    recs = membership_records(rd)
    names = list(rd.hospitals)
    # the target(s): per-row losses; one shared network or one per hospital
    mem_l, non_l = [], []
    for h in names:
        model = _load_target(rd, h)
        m, nn_ = _losses(model, {"members": {h: recs["members"][h]}, "nonmembers": {h: recs["nonmembers"][h]}}, rd)
        mem_l.append(m)
        non_l.append(nn_)
    mem_l, non_l = np.concatenate(mem_l), np.concatenate(non_l)
    res: dict = {"roles": {"n_members": recs["split"].n_members, "n_nonmembers": recs["split"].n_nonmembers,
                           "n_validation_rows_excluded": recs["n_val_rows"],
                           "member_patients": sorted(set(recs["split"].member_groups)),
                           "nonmember_patients": sorted(set(recs["split"].nonmember_groups))}}
    m1 = M.evaluate_scores(M.loss_threshold_scores(mem_l), M.loss_threshold_scores(non_l))

    # positive control: a deliberately memorising network (no dropout, no validation, many epochs) on a few member rows
    rng = np.random.default_rng(11)
    ctrl_rows = {h: rng.permutation(recs["members"][h]["rows"])[: max(4, 64 // len(names))] for h in names}
    ctrl_cfg = replace(rd.cfg.mapping, dropout=0.0, val_frac=0.0, epochs=control_epochs, patience=control_epochs, dp=False,
                       lr_schedule="constant", scope="shared")
    ctrl_model = _train_or_load([_subset(rd.hospitals[h]["msg"], r) for h, r in ctrl_rows.items()], ctrl_cfg, out / "control_memorising",
                                5, progress)
    ctrl_recs = {"members": {h: {"rows": r} for h, r in ctrl_rows.items()}, "nonmembers": recs["nonmembers"]}
    cm, cn = _losses(ctrl_model.eval(), ctrl_recs, rd)
    m1_ctrl = M.evaluate_scores(M.loss_threshold_scores(cm), M.loss_threshold_scores(cn))
    res["M1"] = _mia_entry(m1, m1_ctrl)

    # M3: reference networks, each trained on half of the units (a source slice with its augmented copies)
    if shadow_models:
        units = [u for h in names for u in recs["members"][h]["units"]] + [u for h in names for u in recs["nonmembers"][h]["units"]]
        all_units = np.array(units)
        ref_in = M.reference_assignment(all_units, shadow_models, seed=3)
        ref_cfg = replace(rd.cfg.mapping, epochs=shadow_epochs or rd.cfg.mapping.epochs,
                          patience=shadow_epochs or rd.cfg.mapping.epochs, scope="shared")
        n_mem = sum(len(recs["members"][h]["rows"]) for h in names)
        ref_mem, ref_non, ref_ctrl_mem = [], [], []
        for r in range(shadow_models):
            batches, off, off_n = [], 0, n_mem
            for h in names:
                mr = recs["members"][h]["rows"]
                nm = recs["nonmembers"][h]["msg"]
                in_m = ref_in[r, off:off + len(mr)]
                in_n = ref_in[r, off_n:off_n + nm.n]
                parts = [_subset(rd.hospitals[h]["msg"], mr[in_m]).arrays, _subset(nm, np.flatnonzero(in_n)).arrays]
                batches.append(protocol.LatentBatch("train", h, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
                off += len(mr)
                off_n += nm.n
            model = _train_or_load(batches, ref_cfg, out / "shadow" / f"ref{r}", 100 + r, progress)
            a, b = _losses(model, recs, rd)
            c, _ = _losses(model, ctrl_recs, rd)
            ref_mem.append(a)
            ref_non.append(b)
            ref_ctrl_mem.append(c)
        ref_l = np.concatenate([np.stack(ref_mem), np.stack(ref_non)], 1)
        target_l = np.r_[mem_l, non_l]
        sc = M.lira_offline_scores(target_l, ref_l, ref_in)
        m3 = M.evaluate_scores(sc[:n_mem], sc[n_mem:])
        # control: the memorising network scored against the same references (its members' in-masks looked up by row)
        unit_index = {u: i for i, u in enumerate(units)}
        ctrl_units = [f"{h}/m/{rd.hospitals[h]['src'][r]}" for h in names for r in ctrl_rows[h]]
        ctrl_in = ref_in[:, [unit_index[u] for u in ctrl_units]]
        ctrl_ref = np.concatenate([np.stack(ref_ctrl_mem), np.stack(ref_non)], 1)
        ctrl_sc = M.lira_offline_scores(np.r_[cm, cn], ctrl_ref, np.concatenate([ctrl_in, ref_in[:, n_mem:]], 1))
        m3_ctrl = M.evaluate_scores(ctrl_sc[:len(cm)], ctrl_sc[len(cm):])
        res["M3"] = _mia_entry(m3, m3_ctrl)
        res["M3"]["reference_models"] = shadow_models
        res["M3"]["reference_epochs"] = ref_cfg.epochs
    res["note"] = ("rows are not independent (a slice's augmented copies, a patient's slices), so the Clopper-Pearson "
                   "intervals, which assume independent records, are optimistic")
    return res


def _mia_entry(ev: dict, ctrl: dict) -> dict:
    ex, which = _mia_verdict(ev)
    ctrl_t = ctrl["tpr_at_1pct_fpr"]
    passed = ctrl_t["tpr_ci95"][0] > MARGINS["mia_tpr_at_1pct_fpr"]
    return {"attack": ev, "control": ctrl, "exceeded": which, "control_passed": bool(passed),
            "status": "void" if not passed else ("succeeded" if ex else "not exceeded")}


# ----------------------------------------------------------------------------- orchestration


def run_audit(run: str | Path, *, threats: str | None = None, aux_dir: str | Path | None = None, data_dir: str | Path | None = None,
              out: str | Path | None = None, shadow_models: int = 4, shadow_epochs: int | None = None, control_epochs: int = 150,
              progress: bool = True) -> dict:
    """Audit a finished run; writes ``OUT/report.md``, ``OUT/audit.json`` and plots (``OUT`` = ``RUN/audit``)."""
    from .report import write_report

    chosen = parse_threats(threats)
    run = Path(run)
    out = Path(out) if out is not None else run / "audit"
    if (out / "audit.json").exists():
        raise PpcmiError(f"{out}: holds an audit already; choose another --out")
    # an interrupted audit continues: networks it finished under OUT/work are loaded, not retrained
    t0 = time.perf_counter()
    rd = RunData(run, Path(data_dir) if data_dir else None, Path(aux_dir) if aux_dir else None)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [a for a, (ts, _) in ATTACKS.items() if set(ts) & set(chosen)]
    pri = prior_baselines(rd)
    att_models = train_attacker_autoencoders(rd, out / "work", progress) if {"A1", "A6", "A7"} & set(wanted) else {}
    results: dict = {}
    timings: dict = {}
    for a in wanted:
        t = time.perf_counter()
        log.info("audit: %s", a)
        if a == "A1":
            results[a] = attack_a1(rd, att_models, pri)
        elif a == "A5":
            results[a] = attack_a5(rd, pri)
        elif a == "A6":
            results[a] = attack_a6(rd, att_models, pri)
        elif a == "A7":
            results[a] = attack_a7(rd, att_models)
        elif a == "A8":
            results[a] = attack_a8(rd, pri)
        elif a == "M1" and "M1" not in results:
            mia = attack_membership(rd, out / "work", shadow_models=shadow_models if "M3" in wanted else 0,
                                    shadow_epochs=shadow_epochs, control_epochs=control_epochs, progress=progress)
            results["M1"] = {**mia["M1"], "roles": mia["roles"], "note": mia["note"]}
            if "M3" in mia:
                results["M3"] = {**mia["M3"], "roles": mia["roles"], "note": mia["note"]}
        timings[a] = time.perf_counter() - t
        results.get(a, {})["threats"] = [t for t in ATTACKS[a][0]]
        if a in results:
            results[a]["description"] = ATTACKS[a][1]
    summary_path = run / "summary.json"
    run_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    server_meta = json.loads((run / "server" / "config.json").read_text()) if (run / "server" / "config.json").exists() else {}
    succeeded = [a for a, r in results.items() if r.get("status") == "succeeded"]
    void = [a for a, r in results.items() if r.get("status") == "void"]
    audit = {
        "run": run.name, "threats": chosen, "attacks_run": list(results), "margins": MARGINS,
        "roles": _roles(rd, results),
        "defences": {"klt": rd.cfg.klt, "skips": rd.cfg.autoencoder.skips, "send_noise": rd.cfg.autoencoder.send_noise,
                     "send_noise_relative": _noise_relative(rd),
                     "dp": {**server_meta["dp"], "rows_per_patient": _rows_per_patient(rd)} if server_meta.get("dp") else None,
                     "send_copies": rd.cfg.autoencoder.send_copies},
        "run_dice": (run_summary.get("ppcmi") or run_summary.get("summary") or {}).get("fg_dice", {}).get("mean"),
        "results": results, "succeeded": succeeded, "void": void,
        "conclusion": (f"attack(s) {', '.join(succeeded)} succeeded" if succeeded else
                       "no attack in this suite exceeded the margins") + (f"; {', '.join(void)} void (positive control failed)" if void else ""),
        "timings_s": {**timings, "total": time.perf_counter() - t0},
        "config": to_dict(rd.cfg),
    }
    atomic_write_json(out / "audit.json", audit)
    write_report(audit, out, _examples(rd) if "A1" in results else None)
    return audit


def _examples(rd: RunData, n: int = 3) -> dict:
    """Three slices of the first victim next to the leading component maps of its keyed and plain latents."""
    h = next(iter(rd.hospitals.values()))
    s = max(rd.scales, key=lambda sc: h["zt_img"][sc].shape[-1])  # the finest latent grid
    k = A.upsample(A.pca_maps(h["zt_img"][s], 3)[: h["n"]], rd.size)
    p = A.upsample(A.pca_maps(h["z_img"][s], 3)[: h["n"]], rd.size)
    idx = np.linspace(0, h["n"] - 1, num=min(n, h["n"])).astype(int)
    return {"cols": ["slice", f"keyed PC1 ({s})", "keyed PC2", "keyed PC3", "plain PC1"],
            "rows": [[h["images"][i], k[i, 0], k[i, 1], k[i, 2], p[i, 0]] for i in idx]}


def _noise_relative(rd: RunData) -> dict:
    """The latent noise std as a fraction of each scale's plain image-latent std (pooled over hospitals)."""
    if not rd.cfg.autoencoder.send_noise:
        return {}
    sd = {s: float(np.mean([h["z_img"][s].std() for h in rd.hospitals.values()])) for s in rd.scales}
    return {s: rd.cfg.autoencoder.send_noise / max(v, 1e-12) for s, v in sd.items()}


def _rows_per_patient(rd: RunData) -> dict:
    """How many sent rows each patient (the split's group) contributed: DP-SGD's epsilon is per row, so a
    patient is protected only by group privacy over this many rows."""
    counts = np.unique(np.concatenate([d["groups"][d["src"]] for d in rd.hospitals.values()]), return_counts=True)[1]
    return {"mean": float(counts.mean()), "max": int(counts.max()), "patients": int(len(counts))}


def _roles(rd: RunData, results: dict) -> dict:
    return {
        "victims": {h: {"slices": d["n"], "patients": sorted(set(d["groups"].tolist())), "rows_sent": int(d["msg"].n)}
                    for h, d in rd.hospitals.items()},
        "aux": {"source": rd.aux_source, "slices": int(len(rd.aux["images"])), "patients": sorted(set(rd.aux["groups"].tolist()))},
        "membership": results.get("M1", {}).get("roles"),
    }


__all__ = ["THREATS", "ATTACKS", "MARGINS", "parse_threats", "run_audit", "RunData", "membership_records"]
