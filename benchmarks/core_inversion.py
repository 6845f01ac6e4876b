"""A9: inverting the federated core's round updates, measured on real data (a benchmark script; plays every role).

Builds a small ``mapping.scope = "federated"`` round in-process on the bundled Sunnybrook subset (or ``--data``): the
split, each hospital's stage 1 and keyed pairs (the stage API), and round 1 at every hospital
(:func:`ppcmi.client.fedcore.local_round`, the very function the SuperNodes run). Then the attacker, given only the views
its threat model grants (:mod:`ppcmi.privacy.views`), runs A9 (:func:`ppcmi.privacy.procedures.a9`) on

  * ``worst_case``: each hospital's own update, as a coordinator would see it without SecAgg+;
  * ``secagg_sum``: the FedAvg average of the updates, all SecAgg+ lets it see;
  * ``control``: A9's positive control (:func:`ppcmi.privacy.procedures.a9_control`): one round on two rows of hospital1
    (the smallest batch its BatchNorm trains on), one step, the rows mapped back with the victim's frames, key and
    decoders,

and the referee (this script) scores the reconstructions against the hospital's slices and the prior-only baseline
(:mod:`ppcmi.privacy.verdicts`), after matching recovered rows to true rows (Hungarian on canonical latents: an
update does not order its rows). It also records two checks of the attacker's model: the simulated update from the
true rows against the real one (cosine), and the objective at the truth, near it and far from it (how identifiable the
rows are from the update).

Writes ``benchmarks/results/core-inversion.json`` and ``.md``. Usage::

    PYTHONPATH=src python benchmarks/core_inversion.py [--iters 150] [--clients 2] [--control-pairs 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safetensors.torch import load_file  # noqa: E402

from ppcmi.client import fedcore  # noqa: E402
from ppcmi.client.keys import key_path, load_key  # noqa: E402
from ppcmi.client.site import Hospital  # noqa: E402
from ppcmi.client.stages import prepare, site_seed, train_autoencoders  # noqa: E402
from ppcmi.config import load_config, to_dict  # noqa: E402
from ppcmi.flower.core_wire import initial_core  # noqa: E402
from ppcmi.klt import KeyedLatentTransform  # noqa: E402
from ppcmi.models import MappingConfig  # noqa: E402
from ppcmi.privacy import inversion as INV  # noqa: E402
from ppcmi.privacy import procedures as P  # noqa: E402
from ppcmi.privacy import verdicts as V  # noqa: E402
from ppcmi.privacy.views import CoreUpdates, PublicData, SiteKit, StolenKey, VictimFrames, threat_of  # noqa: E402
from ppcmi.simulate import plan  # noqa: E402

OVERRIDES = ["data.size=32", "data.intensity=percentile", "data.crop=0.375", "data.group_regex=^(SCD\\d+)_",
             "data.partition=group", "data.test_frac=0.34", "autoencoder.width=0.25", "autoencoder.epochs=30",
             "autoencoder.patience=30", "autoencoder.batch_size=8", "autoencoder.send_copies=1", "mapping.scope=federated",
             "mapping.epochs=2"]


def say(msg: str) -> None:
    print(f"[core-inversion {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def frames_of(site_dir: Path, site: str, scales: list[str]) -> dict:
    """A hospital's canonical frames from its kept state (the referee's and the control's reading; never the attack's)."""
    own = load_file(str(site_dir / fedcore.FOLDER / "own.safetensors"))
    img, msk = {}, {}
    for s in scales:
        w, b = own[f"in_frames.{site}.{s}.weight"].double().numpy(), own[f"in_frames.{site}.{s}.bias"].double().numpy()
        img[s] = (w.T, -(w.T @ b))  # in frame: x -> Uᵀ x - Uᵀ mu
        msk[s] = (own[f"out_frames.{site}.{s}.weight"].double().numpy(), own[f"out_frames.{site}.{s}.bias"].double().numpy())
    return {"image": img, "mask": msk}


def spec_of(cfg, pairs: dict, n_rows: int, seed: int, rounds: int) -> INV.RoundSpec:
    scales = [s for s in ("s3", "s4", "b") if f"zt_img_{s}" in pairs]
    return INV.RoundSpec(MappingConfig(**{f.name: getattr(cfg.mapping, f.name) for f in fields(MappingConfig)}),
                         {s: tuple(int(d) for d in pairs[f"zt_img_{s}"].shape[1:]) for s in scales},
                         {s: tuple(int(d) for d in pairs[f"zt_msk_{s}"].shape[1:]) for s in scales},
                         n_rows, fedcore.round_lr(cfg.mapping, 1, rounds, 1), 1, cfg.mapping.batch_size, INV.fit_seed(seed, 1),
                         cfg.mapping.federated_norm)


def canonical(pairs: dict, frames: dict) -> tuple[dict, dict]:
    scales = [s for s in ("s3", "s4", "b") if f"zt_img_{s}" in pairs]
    return (INV.to_canonical({s: pairs[f"zt_img_{s}"].double().numpy() for s in scales}, frames["image"]),
            INV.to_canonical({s: pairs[f"zt_msk_{s}"].double().numpy() for s in scales}, frames["mask"]))


def cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[k].reshape(-1).double() for k in b])
    y = torch.cat([b[k].reshape(-1).double() for k in b])
    return float((x @ y) / (x.norm() * y.norm()))


def score(est: dict, truth_img: np.ndarray, truth_fg: np.ndarray, perm: np.ndarray) -> dict:
    return {**V.image_entry(est["images"][perm], truth_img), **V.mask_entry(est["fg"][perm], truth_fg)}


def judged(att: dict, base: dict, ctrl: dict, ctrl_base: dict) -> dict:
    """:func:`ppcmi.privacy.verdicts.verdict`'s rule, the control's gains taken over the baseline on its own rows."""
    ga, gc = V.gains(att, base), V.gains(ctrl, ctrl_base)
    ex, exc = V.exceeds(ga), V.exceeds(gc)
    return {"gains": ga, "exceeded": ex, "control_gains": gc, "control_passed": bool(exc),
            "status": "void" if not exc else ("succeeded" if ex else "not exceeded")}


def main(argv=None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="core-inversion-"))  # the hospitals' site folders (keys included): removed at the end
    try:
        return run(argv, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(argv, work: Path) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "sunnybrook_lv"))
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--worst-victims", type=int, default=1, help="how many hospitals' own updates the worst case inverts")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--smooth", type=float, default=0.05)
    ap.add_argument("--control-pairs", type=int, default=3)
    ap.add_argument("--mapping", nargs="*", default=[], help="extra mapping.* overrides (e.g. mapping.widen=[8,8,8])")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core-inversion"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # tiny networks: one thread is several times faster than two on a shared 2-core machine
    t_start = time.perf_counter()
    cfg = load_config(None, [f"clients={args.clients}", *OVERRIDES, *args.mapping])
    pl = plan(cfg, args.data)
    rounds = cfg.mapping.epochs
    core = {k: torch.from_numpy(v) for k, v in initial_core(cfg).items()}
    sites: dict = {}
    for i, (name, cases) in enumerate(pl.hospitals.items()):
        arrays = prepare(cases, cfg, pl.labels)
        site_dir = work / name
        seed = site_seed(cfg.seed, i)
        train_autoencoders(site_dir, name, arrays, cfg, pl.labels, seed=seed, progress=False)
        hosp = Hospital(site_dir)
        pairs = fedcore.training_pairs(hosp, lambda a=arrays: a, cfg, site_dir)
        res = fedcore.local_round(core, pairs, cfg.mapping, site=name, site_dir=site_dir, round_=1, rounds=rounds,
                                  local_epochs=1, seed=seed, init_seed=cfg.seed)
        scales = [s for s in ("s3", "s4", "b") if f"zt_img_{s}" in pairs]
        kit = SiteKit(name, hosp.models, KeyedLatentTransform(load_key(key_path(hosp.dir)), hosp.ae_cfg.latent_channels()))
        fr = frames_of(site_dir, name, scales)
        sites[name] = {"arrays": arrays, "pairs": pairs, "seed": seed, "n": res.n_rows, "kit": kit, "frames": fr,
                       "update": {k: res.core[k] - core[k] for k in core}, "spec": spec_of(cfg, pairs, res.n_rows, seed, rounds),
                       "truth": canonical(pairs, fr)}
    t_setup = time.perf_counter() - t_start
    say(f"set up in {t_setup:.0f} s: " + ", ".join(f"{n} {st['n']} rows" for n, st in sites.items()))

    # ---- the attacker's model of a hospital, checked (referee): the true rows give the real update
    model_check = {}
    g = torch.Generator().manual_seed(11)
    for name, st in sites.items():
        h = {s: torch.from_numpy(v).float() for s, v in st["truth"][0].items()}
        t = {s: torch.from_numpy(v).float() for s, v in st["truth"][1].items()}
        sim = INV.simulate_update(core, h, t, st["spec"])
        prof = {}
        for label, noise in (("truth", 0.0), ("truth+5%", 0.05), ("truth+30%", 0.3)):
            jit = lambda d: {s: v + noise * v.std() * torch.randn(v.shape, generator=g) for s, v in d.items()}  # noqa: E731
            prof[label] = float(INV.update_distance(INV.simulate_update(core, jit(h), jit(t), st["spec"]), st["update"]))
        rnd = {s: v.std() * torch.randn(v.shape, generator=g) for s, v in h.items()}
        rnd_t = {s: v.std() * torch.randn(v.shape, generator=g) for s, v in t.items()}
        prof["random"] = float(INV.update_distance(INV.simulate_update(core, rnd, rnd_t, st["spec"]), st["update"]))
        model_check[name] = {"rows": st["n"], "cosine_simulated_vs_real": cosine(sim, st["update"]),
                             "max_abs_diff": max(float((sim[k] - st["update"][k]).abs().max()) for k in core),
                             "objective_profile": prof}

    # ---- public data (T2): the held-out patients, and the attacker's own autoencoders
    test = prepare(pl.test, cfg, pl.labels)
    models = P.train_attacker_autoencoders(test["images"], test["masks"], pl.labels.n_classes, width=cfg.autoencoder.width,
                                           skips=cfg.autoencoder.skips, recipe=cfg.autoencoder, work=work / "attacker",
                                           progress=False)
    public = PublicData("held-out test patients", test["images"], test["masks"], models)
    pri = V.prior_baselines(public.images[:, 0], public.fg)
    tuning = {"iters": args.iters, "lr": args.lr, "smooth": args.smooth, "seed": 0}
    global_np = {k: v.numpy() for k, v in core.items()}
    specs = {n: st["spec"] for n, st in sites.items()}

    def referee(est: dict, names: list[str]) -> dict:
        """Scores over every victim's rows pooled, after matching rows; and the latent recovery per hospital."""
        imgs, fgs, t_img, t_fg, latent = [], [], [], [], {}
        for n in names:
            st = sites[n]
            inv = est["inversion"]
            both_est = {**{f"h{s}": v for s, v in inv.h[n].items()}, **{f"t{s}": v for s, v in inv.t[n].items()}}
            both_true = {**{f"h{s}": v for s, v in st["truth"][0].items()}, **{f"t{s}": v for s, v in st["truth"][1].items()}}
            perm = INV.match_rows(both_est, both_true)
            latent[n] = {"relative_error": INV.relative_error({k: v[perm] for k, v in both_est.items()}, both_true),
                         "zero_guess": 1.0}
            imgs.append(est["victims"][n]["images"][perm])
            fgs.append(est["victims"][n]["fg"][perm])
            t_img.append(st["arrays"]["images"][:, 0])
            t_fg.append(st["arrays"]["masks"] > 0)
        ti, tf = np.concatenate(t_img), np.concatenate(t_fg)
        entry = {**V.image_entry(np.concatenate(imgs), ti), **V.mask_entry(np.concatenate(fgs), tf)}
        return {"entry": entry, "baseline": V.baseline_scores(pri, ti, tf), "latent": latent,
                "objective": list(est["inversion"].objective)}

    cases: dict = {}
    timing: dict = {}
    # ---- worst case: each hospital's own update (no SecAgg+)
    t0 = time.perf_counter()
    victims = list(sites)[:args.worst_victims]
    say(f"worst case: inverting {', '.join(victims)}'s own update")
    view = CoreUpdates(global_np, {n: {k: v.numpy() for k, v in sites[n]["update"].items()} for n in victims}, specs, False)
    worst = P.a9(view, public, **tuning)
    cases["worst_case"] = referee(worst, victims)
    # the same recovered rows mapped back with each victim's frames and key (a diagnostic: did the inversion find them?)
    keyed = {"inversion": worst["inversion"], "victims": {}}
    for n in victims:
        st = sites[n]
        zt_i = INV.from_canonical({s: a.astype(np.float64) for s, a in worst["inversion"].h[n].items()}, st["frames"]["image"])
        zt_m = INV.from_canonical({s: a.astype(np.float64) for s, a in worst["inversion"].t[n].items()}, st["frames"]["mask"])
        keyed["victims"][n] = {"images": st["kit"].decode_keyed(zt_i, "image")[:, 0],
                               "fg": P.fg_of_probs(st["kit"].decode_keyed(zt_m, "mask"))}
    cases["worst_case_key_known"] = referee(keyed, victims)
    timing["worst_case_s"] = time.perf_counter() - t0

    # ---- SecAgg+: only the average
    say("SecAgg+ case: inverting the average")
    t0 = time.perf_counter()
    total = sum(st["n"] for st in sites.values())
    avg = {k: sum(st["update"][k] * (st["n"] / total) for st in sites.values()).numpy() for k in core}
    summed = P.a9(CoreUpdates(global_np, {"sum": avg}, specs, True), public, **tuning)
    cases["secagg_sum"] = referee(summed, list(sites))
    timing["secagg_sum_s"] = time.perf_counter() - t0

    # ---- positive control: two rows of hospital1, one step, victim's frames, key and decoders
    t0 = time.perf_counter()
    victim = next(iter(sites))
    st = sites[victim]
    c_img, c_fg, c_t_img, c_t_fg, c_latent, c_obj = [], [], [], [], [], []
    for j in range(args.control_pairs):
        say(f"control {j + 1}/{args.control_pairs}")
        rows = slice(2 * j, 2 * j + 2)
        sub = {k: v[rows].clone() for k, v in st["pairs"].items()}
        d = work / f"control-{j}"
        r = fedcore.local_round(core, sub, cfg.mapping, site=victim, site_dir=d, round_=1, rounds=rounds, local_epochs=1,
                                seed=st["seed"], init_seed=cfg.seed)
        fr = frames_of(d, victim, st["spec"].scales)
        spec = spec_of(cfg, sub, 2, st["seed"], rounds)
        est = P.a9_control(CoreUpdates(global_np, {victim: {k: (r.core[k] - core[k]).numpy() for k in core}}, {victim: spec}, False),
                           StolenKey(victim, st["kit"]), VictimFrames(victim, fr["image"], fr["mask"]), **tuning)
        th, tt = canonical(sub, fr)
        both_true = {**{f"h{s}": v for s, v in th.items()}, **{f"t{s}": v for s, v in tt.items()}}
        inv = est["inversion"]
        both_est = {**{f"h{s}": v for s, v in inv.h[victim].items()}, **{f"t{s}": v for s, v in inv.t[victim].items()}}
        perm = INV.match_rows(both_est, both_true)
        c_latent.append(INV.relative_error({k: v[perm] for k, v in both_est.items()}, both_true))
        c_obj.append(list(inv.objective))
        c_img.append(est["victims"][victim]["images"][perm])
        c_fg.append(est["victims"][victim]["fg"][perm])
        c_t_img.append(st["arrays"]["images"][rows, 0])
        c_t_fg.append(st["arrays"]["masks"][rows] > 0)
    ti, tf = np.concatenate(c_t_img), np.concatenate(c_t_fg)
    ctrl = {"entry": {**V.image_entry(np.concatenate(c_img), ti), **V.mask_entry(np.concatenate(c_fg), tf)},
            "baseline": V.baseline_scores(pri, ti, tf), "latent": {victim: {"relative_error": float(np.mean(c_latent)),
                                                                            "per_pair": c_latent, "zero_guess": 1.0}},
            "objective": c_obj, "rows": 2 * args.control_pairs}
    cases["control"] = ctrl
    timing["control_s"] = time.perf_counter() - t0

    verdicts = {c: judged(cases[c]["entry"], cases[c]["baseline"], ctrl["entry"], ctrl["baseline"])
                for c in ("worst_case", "secagg_sum", "worst_case_key_known")}
    threats = {"worst_case": threat_of((CoreUpdates, PublicData)).label, "secagg_sum": threat_of((CoreUpdates, PublicData)).label,
               "control": threat_of((CoreUpdates, StolenKey, VictimFrames)).label,
               "worst_case_key_known": threat_of((CoreUpdates, StolenKey, VictimFrames)).label}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    data_rel = Path(args.data).resolve()
    data_name = f"../shared/data/{data_rel.name}" if "shared" in data_rel.parts else f"data/{data_rel.name}"
    result = {"attack": "A9", "description": "inverting the federated core's round 1 updates (gradient inversion through "
                                            "a replayed local round), decoded with public-data autoencoders",
              "data": data_name, "hospitals": {n: st["n"] for n, st in sites.items()}, "public_slices": int(len(test["images"])),
              "settings": {"overrides": [*OVERRIDES, *args.mapping], "clients": args.clients, "tuning": tuning,
                           "control_pairs": args.control_pairs, "mapping": to_dict(cfg)["mapping"]},
              "model_check": model_check, "cases": cases, "verdicts": verdicts, "threats": threats, "margins": V.MARGINS,
              "timing": {"setup_s": t_setup, **timing, "total_s": time.perf_counter() - t_start},
              "machine": {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    def m(e, k):
        return f"{e[k]['mean']:.3f}"

    lines = ["# A9: inverting the federated core's round updates", "",
             f"Data `{r['data']}` at 32 x 32, {len(r['hospitals'])} hospitals ({', '.join(f'{n}: {k} rows' for n, k in r['hospitals'].items())}), "
             f"{r['public_slices']} public slices; inversion {r['settings']['tuning']}; machine: {r['machine']['cpu']}, "
             f"{r['machine']['threads']} threads; total {r['timing']['total_s']:.0f} s.", "",
             "| case | threat | SSIM | PSNR dB | Dice | baseline SSIM / PSNR / Dice | latent rel. error (0 guess = 1) | status |",
             "|---|---|---|---|---|---|---|---|"]
    for c in ("worst_case", "secagg_sum", "worst_case_key_known", "control"):
        e, b = r["cases"][c]["entry"], r["cases"][c]["baseline"]
        lat = np.mean([v["relative_error"] for v in r["cases"][c]["latent"].values()])
        st = r["verdicts"][c]["status"] if c in r["verdicts"] else ("passed" if r["verdicts"]["worst_case"]["control_passed"] else "failed")
        lines.append(f"| {c} | {r['threats'][c]} | {m(e, 'ssim')} | {m(e, 'psnr')} | {m(e, 'dice')} | "
                     f"{m(b, 'ssim')} / {m(b, 'psnr')} / {m(b, 'dice')} | {lat:.3f} | {st} |")
    lines += ["", "Gains over the prior-only baseline (margins: SSIM 0.05, PSNR 1 dB, Dice 0.05):", ""]
    for c, v in r["verdicts"].items():
        g = v["gains"]
        lines.append(f"- {c}: SSIM {g['ssim_gain']:+.3f}, PSNR {g['psnr_gain_db']:+.2f} dB, Dice {g['dice_gain']:+.3f} -> {v['status']}")
    gc = r["verdicts"]["worst_case"]["control_gains"]
    lines.append(f"- control: SSIM {gc['ssim_gain']:+.3f}, PSNR {gc['psnr_gain_db']:+.2f} dB, Dice {gc['dice_gain']:+.3f} -> "
                 f"{'passed' if r['verdicts']['worst_case']['control_passed'] else 'failed (every verdict is void)'}")
    lines += ["", "The attacker's model of a hospital's round (true rows in, update out) and the objective around the truth:", ""]
    for n, mc in r["model_check"].items():
        p = mc["objective_profile"]
        lines.append(f"- {n} ({mc['rows']} rows): cosine(simulated, real) = {mc['cosine_simulated_vs_real']:.6f}; objective at truth "
                     f"{p['truth']:.4f}, +5 % noise {p['truth+5%']:.3f}, +30 % {p['truth+30%']:.3f}, random {p['random']:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
