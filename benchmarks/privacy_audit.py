"""Privacy audit of one dataset: a PPCMI-SF run, its defences, and `ppcmi audit` of each; results JSON + markdown.

Variants (each a run folder OUT/<variant>/ with OUT/<variant>/audit/):

- baseline:  the dataset's PPCMI-SF setting (sunnybrook_lv: the demo's; psfhs/acdc: the `ppcmi bench` presets)
- noise:     Gaussian noise of std --noise on plain latents before the KLT (train messages and queries)
- dp:        DP-SGD mapping network (GroupNorm; noise multiplier --dp-noise, clip --dp-clip, batch --dp-batch);
             settings other than the defaults get their own folder and row, e.g. dp-n1-c1-b128
- no_skips:  only the bottleneck latent is sent and decoded
- rotation:  hospital1 rotates its key after the baseline; the server re-fits only its adapters
- noise_fixed: the baseline's sites, keys and mapping network, with train messages and queries re-encoded
             with latent noise --noise: the attacks' view of the noise defence without retraining the
             mapping network (its Dice is not the retrained network's: that one can adapt to the noise,
             and has fresh keys); membership is not audited, since the network never saw these messages

noise and dp reuse the baseline's autoencoders (fresh keys), so they isolate what they change. A
finished variant or audit is skipped on a rerun, so the script can be stopped and started again.
With --reuse BENCH_OUT, the baseline and no_skips variants are copies of a finished `ppcmi bench`
run of the same settings (ppcmi_cpu and no_skips) instead of new trainings.

    python benchmarks/privacy_audit.py --dataset sunnybrook_lv --data data/sunnybrook_lv --out runs/privacy-sunnybrook
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ppcmi import protocol
from ppcmi.bench import _reuse_stage1
from ppcmi.experiment import dataset_config
from ppcmi.client.keys import rotate_key
from ppcmi.client.site import Hospital
from ppcmi.client.stages import write_training_set
from ppcmi.config import from_dict, load_config, to_dict
from ppcmi.data import load_arrays
from ppcmi.demo import demo_config
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.metrics import summarize
from ppcmi.privacy.audit import run_audit
from ppcmi.server.inbox import read_set
from ppcmi.server.mapping import MappingServer, refit_adapters
from ppcmi.simulate import infer_and_score, load_test, plan, public_summary, run_simulation

log = logging.getLogger("privacy_audit")
VARIANTS = ("baseline", "noise", "dp", "no_skips", "rotation", "noise_fixed")


def base_config(dataset: str, data: Path):
    """The audited baseline: the dataset's preset with the published identity adapters (as ``ppcmi bench``'s
    ppcmi_cpu), so that DP-SGD, which cannot use canonical frames, and every other defence compare against
    the same network. Frames live on the server: what leaves a hospital, and so A1-A8, is the same either way."""
    if dataset == "sunnybrook_lv":
        return load_config(None, ["mapping.adapter_init=identity"], base=demo_config(bundled=True))
    cfg = dataset_config(dataset)
    if cfg.data.split_lists:
        cfg = replace(cfg, data=replace(cfg.data, split_lists={k: str(data / v) for k, v in cfg.data.split_lists.items()}))
    return cfg


def variant_config(cfg, variant: str, args):
    sets = {"baseline": [], "rotation": [], "noise_fixed": [f"autoencoder.send_noise={args.noise}"], "noise": [f"autoencoder.send_noise={args.noise}"],
            "dp": ["mapping.norm=group", "mapping.dp=true", f"mapping.dp_noise={args.dp_noise}", f"mapping.dp_clip={args.dp_clip}"]
            + ([f"mapping.batch_size={args.dp_batch}"] if args.dp_batch else []),
            "no_skips": ["autoencoder.skips=false"]}[variant]
    return load_config(None, sets, base=cfg)


# the dp variant's settings when not given; at these its folder and row are plain "dp"
DP_DEFAULTS = {"dp_noise": 1.0, "dp_clip": 1.0, "dp_batch": None}


def variant_key(variant: str, args) -> str:
    """The folder and row name of a variant: one per noise level, and one per DP-SGD setting other than the default."""
    if variant.startswith("noise"):
        return f"{variant}-{args.noise:g}"
    if variant == "dp" and any(getattr(args, k) != v for k, v in DP_DEFAULTS.items()):
        return f"dp-n{args.dp_noise:g}-c{args.dp_clip:g}" + (f"-b{args.dp_batch}" if args.dp_batch else "")
    return variant


# the `ppcmi bench` method whose run is this variant's, when the dataset's preset is the same
BENCH_METHOD = {"baseline": "ppcmi_cpu", "no_skips": "no_skips"}


def _comparable(cfg: dict) -> dict:
    """A run's settings without where its data lies (folders differ between harnesses, the data does not)."""
    cfg = json.loads(json.dumps(cfg))  # tuples as a JSON file holds them
    return {**{k: v for k, v in cfg.items() if k != "data_dir"}, "data": {k: v for k, v in cfg["data"].items() if k != "split_lists"}}


def run_config(run: Path):
    """The settings a finished run recorded in RUN/config.json (read by ``ppcmi.config.from_dict``: settings
    added since take their defaults, or the old value where the default changed)."""
    return from_dict({k: v for k, v in json.loads((run / "config.json").read_text()).items() if k != "data_dir"})


def reuse_bench_run(cfg, variant: str, bench: Path, out: Path) -> bool:
    """Copy ``bench/<method>/`` (a finished ``ppcmi bench`` run of exactly this variant's settings) to ``out``.

    Returns False, copying nothing, when there is no such finished run; raises when it exists with other settings."""
    src = bench / BENCH_METHOD.get(variant, "")
    if variant not in BENCH_METHOD or (out / "summary.json").exists() or not (src / "summary.json").exists():
        return False
    have, want = _comparable(to_dict(run_config(src))), _comparable(to_dict(cfg))
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise SystemExit(f"error: --reuse: {src} was run with other settings ({', '.join(diff)} differ)")
    if out.exists():
        shutil.rmtree(out)  # an unfinished run of this variant; the bench run replaces it
    # hard links where the file system allows (the audit only adds files, under OUT/audit)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("audit", "audit-*"), copy_function=_link_or_copy)
    log.info("%s: reusing %s", variant, src)
    return True


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def simulate(cfg, data: Path, out: Path, baseline: Path | None) -> dict:
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if baseline is not None and not (out / "sites").exists():
        _reuse_stage1(baseline, out, cfg.klt)
    res = run_simulation(cfg, data, out, resume=True, progress=False)
    res.pop("_arrays", None)
    atomic_write_json(out / "summary.json", public_summary(res))
    return public_summary(res)


def rotation(cfg, data: Path, base: Path, out: Path, with_previous: bool = True) -> dict:
    """hospital1 rotates its key; the server re-fits its adapters (from its previous message unless
    ``with_previous`` is False: then as its model calls for); Dice before/after and with the old key."""
    if (out / "rotation.json").exists():
        return json.loads((out / "rotation.json").read_text())
    pl = plan(cfg, data)
    test = load_test(pl)
    name = next(iter(pl.hospitals))
    site = out / "sites" / name
    if site.exists():
        shutil.rmtree(site)
    shutil.copytree(base / "sites" / name, site)
    arr = load_arrays(pl.hospitals[name], pl.prep, pl.labels)
    stale = out / "stale_site"  # the same site with its old key, to show old-key latents no longer map
    if stale.exists():
        shutil.rmtree(stale)
    shutil.copytree(site, stale)
    t0 = time.perf_counter()
    rotate_key(site)
    msg = Hospital(site).training_batch(arr["images"], arr["masks"], copies=cfg.autoencoder.send_copies, noise=cfg.autoencoder.send_noise)
    if (out / "server").exists():
        shutil.rmtree(out / "server")
    sent = base / "wire" / f"{name}.train"  # the server kept what it received (a run from before chunks: one .ppcmi file)
    previous = read_set(sent if sent.exists() else base / "wire" / f"{name}.train.ppcmi")
    refit_adapters(base / "server", protocol.decode(protocol.encode(msg)), cfg.mapping, out / "server", seed=cfg.seed,
                   previous=previous if with_previous else None, progress=False)
    seconds = time.perf_counter() - t0

    def dice(site_dir: Path, model: Path) -> float:
        _, rows = infer_and_score({name: Hospital(site_dir)}, {name: MappingServer(model)}, test, pl.labels)
        return summarize(rows)["fg_dice"]["mean"]

    init = json.loads((out / "server" / "config.json").read_text())["refits"][-1]["init"]  # as refit_adapters recorded it
    res = {"hospital": name, "adapter_init": init, "dice_before": dice(base / "sites" / name, base / "server"), "dice_after": dice(site, out / "server"),
           "dice_old_key_new_adapters": dice(stale, out / "server"), "refit_seconds": seconds}
    shutil.rmtree(stale)  # holds the old key: not kept
    atomic_write_json(out / "rotation.json", res)
    return res


def share_attacker_autoencoders(base: Path, run: Path) -> None:
    """Start ``run``'s audit from the attacker autoencoders ``base``'s audit trained: they depend only on the
    attacker's auxiliary data and the autoencoder settings, which a variant on the baseline's autoencoders keeps.
    Networks fitted to the baseline's mapping network or messages (controls, reference networks) are not copied."""
    if (base / "audit" / "work").exists() and not (run / "audit" / "work").exists():
        shutil.copytree(base / "audit" / "work", run / "audit" / "work", ignore=shutil.ignore_patterns("control_memorising", "shadow*"))


# Only the bundled Sunnybrook LV subset is CC0: figures that show other datasets' images stay in runs/.
REDISTRIBUTABLE = ("sunnybrook_lv",)


def publish_audit(run: Path, dataset: str, dest: Path) -> None:
    """Copy ``run``'s audit report, JSON and ROC plot to ``dest`` (committed with the results), and those of an
    audit run in parts (``RUN/audit-t5``) to ``dest/t5``; the A1 figure, which shows the victims' slices, only
    for a dataset whose license allows copying it."""
    keep_images = dataset in REDISTRIBUTABLE
    parts = [(run / "audit", dest)] + [(d, dest / d.name.removeprefix("audit-")) for d in sorted(run.glob("audit-*"))
                                       if (d / "report.md").exists()]
    for src, to in parts:
        to.mkdir(parents=True, exist_ok=True)
        for name in ("audit.json", "roc.png") + (("a1_maps.png",) if keep_images else ()):
            if (src / name).exists():
                shutil.copy2(src / name, to / name)
        report = (src / "report.md").read_text()
        if not keep_images:
            report = report.replace("![A1 maps](a1_maps.png)", f"(The A1 figure shows {dataset} slices, which stay in ../shared/data; "
                                                              f"it is in {run.name}/{src.name}/a1_maps.png of the run folder.)")
        atomic_write_text(to / "report.md", report)


def noise_fixed(cfg, data: Path, base: Path, out: Path) -> dict:
    """The baseline run re-encoded with latent noise, same keys and mapping network; Dice through it, and its audit (T0-T3)."""
    if not (out / "summary.json").exists():
        for sub in ("sites", "server"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
            shutil.copytree(base / sub, out / sub)
        raw = json.loads((base / "config.json").read_text())
        atomic_write_json(out / "config.json", {**to_dict(cfg), "data_dir": raw.get("data_dir", str(data))})
        pl = plan(cfg, data)
        hospitals = {h: Hospital(out / "sites" / h) for h in pl.hospitals}
        for h, cases in pl.hospitals.items():
            arr = load_arrays(cases, pl.prep, pl.labels)
            write_training_set(hospitals[h].training_chunks(arr["images"], arr["masks"], copies=cfg.autoencoder.send_copies,
                                                            noise=cfg.autoencoder.send_noise), out / "wire" / f"{h}.train")
        srv = MappingServer(out / "server")
        _, rows = infer_and_score(hospitals, {h: srv for h in hospitals}, load_test(pl), pl.labels,
                                  noise=cfg.autoencoder.send_noise)
        atomic_write_json(out / "summary.json", {"ppcmi": summarize(rows, group_key="site"),
                                                 "note": "mapping network trained on the baseline's noise-free messages"})
    if not (out / "audit" / "audit.json").exists():
        share_attacker_autoencoders(base, out)
        run_audit(out, data_dir=data, threats="T0,T1,T2,T3", progress=False)
    return json.loads((out / "summary.json").read_text())


def headline(a: dict) -> dict:
    """The numbers a reader compares across variants."""
    r = a["results"]
    pv = lambda k, path: [v for v in (_dig(x, path) for x in r.get(k, {}).get("per_victim", {}).values()) if v is not None]  # noqa: E731
    out = {a_: r[a_]["status"] for a_ in r}
    if "A1" in r:
        out["A1_ssim_gain_max"] = max(pv("A1", ["gains", "ssim_gain"]))
        out["A1_dice_gain_max"] = max(pv("A1", ["gains", "dice_gain"]))
    if "A6" in r:
        out["A6_ssim_gain_max"] = max(pv("A6", ["gains", "ssim_gain"]))
        out["A6_dice_gain_max"] = max(pv("A6", ["gains", "dice_gain"]))
    if "A5" in r:
        ks = pv("A5", ["smallest_k_all_scales"])
        out["A5_smallest_k_worst"] = None if len(ks) < len(r["A5"]["per_victim"]) else max(ks)
    if "A7" in r:
        out["A7_top1_max"] = max(pv("A7", ["attack", "top1"]))
        out["A7_pool"] = r["A7"]["pool"]
    if "A8" in r:
        out["A8_ssim_raw_mean"] = float(np.mean(pv("A8", ["attack", "ssim_raw", "mean"])))
    for m in ("M1", "M3"):
        if m in r:
            out[f"{m}_auc"] = r[m]["attack"]["auc"]
            out[f"{m}_tpr1"] = r[m]["attack"]["tpr_at_1pct_fpr"]["tpr"]
            out[f"{m}_tpr1_hi"] = r[m]["attack"]["tpr_at_1pct_fpr"]["tpr_ci95"][1]
    return out


def _dig(d, path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _f(v, d=3):
    return "n/a" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def results_md(dataset: str, rows: dict) -> str:
    L = [f"### {dataset}", "",
         "| variant | Dice | defence setting | A1 SSIM / Dice gain | A5 k to recover | A6 SSIM / Dice gain | A7 top-1 (pool) | A8 SSIM raw | "
         "M1 AUC, TPR@1% [hi] | M3 AUC, TPR@1% [hi] | succeeded | void |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in rows.items():
        if v.startswith("rotation"):
            continue
        h = r.get("headline", {})
        L.append(f"| {v} | {_f(r.get('dice'), 4)} | {r.get('setting', '')} | {_f(h.get('A1_ssim_gain_max'))} / {_f(h.get('A1_dice_gain_max'))} | "
                 f"{_f(h.get('A5_smallest_k_worst'))} | {_f(h.get('A6_ssim_gain_max'))} / {_f(h.get('A6_dice_gain_max'))} | "
                 f"{_f(h.get('A7_top1_max'))} ({_f(h.get('A7_pool'))}) | {_f(h.get('A8_ssim_raw_mean'))} | "
                 f"{_f(h.get('M1_auc'))}, {_f(h.get('M1_tpr1'), 4)} [{_f(h.get('M1_tpr1_hi'), 4)}] | "
                 f"{_f(h.get('M3_auc'))}, {_f(h.get('M3_tpr1'), 4)} [{_f(h.get('M3_tpr1_hi'), 4)}] | "
                 f"{', '.join(r.get('succeeded', [])) or 'none'} | {', '.join(r.get('void', [])) or 'none'} |")
    for v, rr in rows.items():
        if not v.startswith("rotation"):
            continue
        L += ["", f"Key rotation ({rr['hospital']}, adapters from {rr.get('adapter_init', 'identity')}): Dice {rr['dice_before']:.4f} before, {rr['dice_after']:.4f} after re-fitting only its "
                  f"adapters ({rr.get('refit_epochs', '?')} epochs, {rr['refit_seconds']:.0f} s), {rr['dice_old_key_new_adapters']:.4f} when the old key's latents are sent "
                  "to the re-fitted adapters."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, choices=("sunnybrook_lv", "psfhs", "acdc"))
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--noise", type=float, default=0.3, help="latent noise std for the noise and noise_fixed variants "
                                                          "(0.3: about half the latents' std in every measured preset)")
    p.add_argument("--dp-noise", type=float, default=DP_DEFAULTS["dp_noise"])
    p.add_argument("--dp-clip", type=float, default=DP_DEFAULTS["dp_clip"])
    p.add_argument("--dp-batch", type=int, default=DP_DEFAULTS["dp_batch"], help="expected batch size of the dp variant's Poisson sampling "
                                                             "(default: the baseline's mapping.batch_size)")
    p.add_argument("--shadow-models", type=int, default=2)
    p.add_argument("--shadow-epochs", type=int, default=None)
    p.add_argument("--control-epochs", type=int, default=100)
    p.add_argument("--refit-epochs", type=int, default=5, help="adapter re-fit epochs after rotation (0: mapping.epochs)")
    p.add_argument("--reuse", type=Path, default=None, metavar="BENCH_OUT",
                   help="a `ppcmi bench` results folder of this dataset: its finished ppcmi_cpu and no_skips runs "
                        "become the baseline and no_skips variants (their settings must match)")
    p.add_argument("--rotation-from", type=Path, default=None, metavar="RUN",
                   help="rotate a key in this finished run instead of OUT/baseline, with the re-fit its model calls for "
                        "(canonical frames with mapping.adapter_init = pca, else identity adapters); no previous message")
    p.add_argument("--threats", default=None, help="threat levels to audit for the variants run now, e.g. T0,T1,T2,T3 "
                                                   "(default: all; membership, T5, trains reference networks)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"error: --variants: unknown {', '.join(bad)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    cfg = base_config(args.dataset, args.data)
    base = args.out / "baseline"
    rows: dict = {}
    for v in variants:
        log.info("variant %s", v)
        vcfg = variant_config(cfg, v, args)
        if v == "rotation":
            src, key = base, v
            if args.rotation_from is not None:  # another finished run (e.g. a `ppcmi bench` run with canonical frames)
                src, key = args.rotation_from, f"rotation-{args.rotation_from.name}"
                vcfg = run_config(src)
            if args.refit_epochs:
                vcfg = load_config(None, [f"mapping.epochs={args.refit_epochs}", f"mapping.patience={args.refit_epochs}"], base=vcfg)
            rows[key] = {**rotation(vcfg, args.data, src, args.out / key, with_previous=args.rotation_from is None),
                         "refit_epochs": vcfg.mapping.epochs}
            continue
        key = variant_key(v, args)
        run = args.out / key
        if args.reuse is not None:
            reuse_bench_run(vcfg, v, args.reuse, run)
        if v == "noise_fixed":
            summ = noise_fixed(vcfg, args.data, base, run)
        else:
            summ = simulate(vcfg, args.data, run, base if v in ("noise", "dp") else None)
        if not (run / "audit" / "audit.json").exists():
            if v in ("noise", "dp"):  # the baseline's autoencoders, so the attacker's too
                share_attacker_autoencoders(base, run)
            run_audit(run, data_dir=args.data, threats=args.threats, shadow_models=args.shadow_models, shadow_epochs=args.shadow_epochs,
                      control_epochs=args.control_epochs, progress=False)
        a = json.loads((run / "audit" / "audit.json").read_text())
        for extra in sorted(run.glob("audit-*/audit.json")):  # audits run in parts (e.g. --threats T5 --out RUN/audit-t5)
            b = json.loads(extra.read_text())
            a["results"].update(b["results"])
            a["succeeded"] = sorted(set(a["succeeded"]) | set(b["succeeded"]))
            a["void"] = sorted(set(a["void"]) | set(b["void"]))
        publish_audit(run, args.dataset, args.results / f"privacy-{args.dataset}" / ("" if key == "baseline" else key))
        dp = a["defences"].get("dp")
        setting = {"baseline": "none", "noise": f"latent noise std {args.noise}", "dp": "DP-SGD "
                   + (f"ε={dp['epsilon']:.2f} at δ=1/{dp['n_rows']} (noise {dp['noise_multiplier']:g}, clip "
                      f"{dp['max_grad_norm']:g}, batch {vcfg.mapping.batch_size})" if dp else ""),
                   "no_skips": "bottleneck only",
                   "noise_fixed": f"latent noise std {args.noise}, baseline mapping network (not retrained)"}[v]
        scores = summ.get("ppcmi") or summ["summary"]  # a `ppcmi simulate` summary, or a reused `ppcmi bench` one
        rows[key] = {"dice": scores["fg_dice"]["mean"], "setting": setting, "headline": headline(a), "succeeded": a["succeeded"],
                   "void": a["void"], "conclusion": a["conclusion"], "defences": a["defences"], "config": to_dict(vcfg)}
    old = args.results / f"privacy-{args.dataset}.json"
    merged = {**(json.loads(old.read_text())["variants"] if old.exists() else {}), **rows}
    atomic_write_json(old, {"dataset": args.dataset, "variants": merged})
    atomic_write_text(args.results / f"privacy-{args.dataset}.md", results_md(args.dataset, merged))
    print(results_md(args.dataset, merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
