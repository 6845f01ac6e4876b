"""The audit's report (auditor side): ``report.md`` and plots from the ``audit.json`` dictionary.

Words follow DESIGN.md section 4: "attack X succeeded", "not exceeded", "void"; never "resistant".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_write_text


def _f(x, d: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{d}f}"


def _m(entry: dict, key: str, d: int = 3) -> str:
    v = entry.get(key)
    return _f(v["mean"], d) if isinstance(v, dict) else "n/a"


def _recon_rows(name: str, per: dict) -> list[str]:
    rows = []
    for v, r in per.items():
        a, b, c = r["attack"], r["baseline"], r["control"]
        rows.append(f"| {name} | {v} | {_m(a, 'ssim')} / {_m(b, 'ssim')} / {_m(c, 'ssim')} | {_m(a, 'psnr', 2)} / {_m(b, 'psnr', 2)} / "
                    f"{_m(c, 'psnr', 2)} | {_m(a, 'dice')} / {_m(b, 'dice')} / {_m(c, 'dice')} | {r['status']} |")
    return rows


def report_md(a: dict) -> str:
    r = a["results"]
    mg = a["margins"]
    roles = a["roles"]
    L = [f"# Privacy audit of run `{a['run']}`", "",
         f"**Conclusion: {a['conclusion']}.**", "",
         f"Threat levels audited: {', '.join(a['threats'])}. Margins (DESIGN.md section 4): SSIM gain ≤ {mg['ssim_gain']}, "
         f"PSNR gain ≤ {mg['psnr_gain_db']} dB, mask Dice gain ≤ {mg['dice_gain']} over the prior-only baseline; linkage top-1 ≤ "
         f"{mg['linkage_top1_x_chance']}× chance with ≥ {mg['min_pool']} candidates; membership TPR ≤ {mg['mia_tpr_at_1pct_fpr']:.0%} "
         f"at 1 % FPR (upper 95 % bound ≤ {mg['mia_tpr_upper95']:.0%}), AUC in [{mg['auc'][0]}, {mg['auc'][1]}]. An attack whose "
         "positive control (no transform, or key known) does not exceed the margins is **void**.", "",
         "## Roles", ""]
    for h, v in roles["victims"].items():
        L.append(f"- victim **{h}**: {v['slices']} training slices of patients {', '.join(v['patients'])}; sent {v['rows_sent']} keyed rows "
                 "(originals first, then augmented copies)")
    ax = roles["aux"]
    L.append(f"- aux (public data of the same modality, T2): {ax['source']}: {ax['slices']} slices of patients "
             f"{', '.join(ax['patients'])}, disjoint from every victim (checked)")
    mem = roles.get("membership")
    if mem:
        L.append(f"- members (T5): {mem['n_members']} train-message rows the mapping network was fitted on "
                 f"(patients {', '.join(mem['member_patients'])}); {mem['n_validation_rows_excluded']} validation rows are in neither set")
        L.append(f"- non-members: {mem['n_nonmembers']} rows of patients {', '.join(mem['nonmember_patients'])} (each hospital's "
                 "keying of the test slices and augmented copies), never in training or validation; the split refuses any shared patient")
    L += ["", "## What each attacker holds", "",
          "Each attack's procedure takes only the views listed; its threat level is derived from them (DESIGN.md "
          "section 4). The victims' images, masks and plain latents, and their keys for the positive controls, are the "
          "referee's alone.", "",
          "| attack | threat | views | what it is |", "|---|---|---|---|"]
    for name, e in r.items():
        if "views" in e:
            L.append(f"| {name} | {e['threat']} | {', '.join(e['views'])} | {e['description']} |")
    d = a["defences"]
    L += ["", "## Defences in this run", "",
          f"KLT {'on' if d['klt'] else 'off'}; skips {'sent' if d['skips'] else 'not sent (bottleneck only)'}; latent noise std "
          f"{d['send_noise']}" + (f" ({', '.join(f'{s} {v:.2f}' for s, v in d['send_noise_relative'].items())} of the latent std)"
                                  if d.get("send_noise_relative") else "") + "; DP-SGD "
          + (f"ε = {_f(d['dp']['epsilon'], 2)} at δ = {d['dp']['delta']:.2g} per training row (noise {_f(d['dp']['noise_multiplier'], 2)}, "
             f"clip {d['dp']['max_grad_norm']})" if d.get("dp") else "off")
          + (f"; a patient (the split's group) sent {d['dp']['rows_per_patient']['mean']:.1f} rows on average, at most "
             f"{d['dp']['rows_per_patient']['max']}, so it is protected only by group privacy over that many rows"
             if (d.get("dp") or {}).get("rows_per_patient") else "")
          + f"; run Dice (merged foreground) {_f(a.get('run_dice'), 4)}.", ""]

    L += ["## Reconstruction attacks", "",
          "Cells are attack / prior-only baseline / positive control, means over the victim's slices; SSIM and PSNR after a "
          "per-image affine intensity fit (applied alike to all three).", "",
          "| attack | victim | SSIM | PSNR dB | mask Dice | status |", "|---|---|---|---|---|---|"]
    for name in ("A1", "A5", "A6", "A8"):
        if name in r:
            L += _recon_rows(name, r[name]["per_victim"])
    if "A1" in r:
        rule = r["A1"]["mask_rule"]
        L += ["", f"A1: principal-component maps of the keyed latents, fitted on every row the server holds; the image score takes the "
                  f"best of the 3 leading components per slice (selected with the victim's truth: an upper bound for the attacker). "
                  f"Mask: component {rule['component']} of scale {rule['scale']}, sign by skewness, z-threshold {rule['threshold']}, all "
                  f"chosen on aux data only (aux Dice {_f(rule['aux_dice'])}). Agreement of keyed and plain component maps "
                  "(smallest |correlation| over the 3 leading components): "
                  + "; ".join(f"{h}: " + ", ".join(f"{s} {_f(c, 6)}" for s, c in v["pc_agreement_min_abs_corr"].items())
                              for h, v in r["A1"]["per_victim"].items()) + "."]
    if "A5" in r:
        L += ["", "### A5: key recovery by orthogonal Procrustes from k leaked (plain, keyed) latent pairs", "",
              f"A key counts as recovered when the held-out latent error is ≤ {r['A5']['recovered_below']:g} (relative to the "
              "latents' spread). Key error is ‖M̂ − M‖/‖M‖ with M = P·Qᵀ (permutation and rotation as one orthogonal matrix), "
              "over the channels that are ever non-zero (a channel the ReLU never opens carries nothing and cannot be identified; "
              "its column is irrelevant to decoding).", "",
              "| victim | latent | channels (active) | pixels per slice | " + " | ".join(f"k={k} key err / held-out err" for k in r["A5"]["k"]) +
              " | smallest k |", "|---|---|---|---|" + "---|" * len(r["A5"]["k"]) + "---|"]
        for h, v in r["A5"]["per_victim"].items():
            for lat, t in v["key_recovery"].items():
                cells = " | ".join(f"{x['key_rel_error_active']:.1e} / {x['heldout_latent_error']:.1e}" for x in t["rows"])
                act = t["rows"][0]["active_channels"]
                L.append(f"| {h} | {lat} | {t['channels']} ({act}) | {t['pixels_per_image']} | {cells} | {t['smallest_k'] or '> ' + str(max(r['A5']['k']))} |")
        L += ["", "The A5 row in the table above decodes the victim's held-out latents with the key recovered from "
                  f"k = {next(iter(r['A5']['per_victim'].values()))['decode_with_k']} pairs and the victim's own decoder; its positive "
                  "control is the true key (T4: a stolen key)."]
    if "A6" in r:
        L += ["", "### A6: learned inversion (attacker autoencoder trained on aux; 1x1 least-squares map fitted on k leaked (image, keyed latent) pairs)", "",
              "| victim | k used | SSIM att / base / ctrl | PSNR att / base / ctrl | Dice att / base / ctrl | status |", "|---|---|---|---|---|---|"]
        for h, v in r["A6"]["per_victim"].items():
            b = v["baseline"]
            for k, e in v["per_k"].items():
                L.append(f"| {h} | {e['k_used']} (asked {k}) | {_m(e['attack'], 'ssim')} / {_m(b, 'ssim')} / {_m(e['control'], 'ssim')} | "
                         f"{_m(e['attack'], 'psnr', 2)} / {_m(b, 'psnr', 2)} / {_m(e['control'], 'psnr', 2)} | {_m(e['attack'], 'dice')} / "
                         f"{_m(b, 'dice')} / {_m(e['control'], 'dice')} | {e['status']} |")
    if "A8" in r:
        L += ["", "A8 (the paper's attack): `A<-B` decodes hospital A's keyed latents with hospital B's key and decoder. Raw SSIM (no "
                  "intensity fit, as in the paper), cross-decoder vs no transform at all (B's decoder on A's plain latents, the "
                  "Privacy-SF-like case): " + "; ".join(f"{p}: {_m(v['attack'], 'ssim_raw')} vs {_m(v['no_transform'], 'ssim_raw')}"
                                                         for p, v in r["A8"]["per_pair"].items()) + "."]
    if "A7" in r:
        a7 = r["A7"]
        L += ["", "## A7: linkage", "",
              f"Pool: {a7['pool']} candidate slices (every hospital's training slices and the aux slices); chance top-1 "
              f"{_f(a7['chance_top1'], 4)}, top-5 {_f(a7['chance_top5'], 4)}; scale {a7['scale']}."
              + ("" if a7["pool_meets_minimum"] else f" **The pool is smaller than the {mg['min_pool']} candidates the margin asks for, "
                                                     "so this verdict is indicative only.**"), "",
              "| victim | method | top-1 | top-5 | limit top-1 | control top-1 (key known) | status |", "|---|---|---|---|---|---|---|"]
        for h, v in a7["per_victim"].items():
            for meth, s in v["methods"].items():
                L.append(f"| {h} | {meth} | {_f(s['top1'])} | {_f(s['top5'])} | {_f(v['top1_limit'], 4)} | {_f(v['control']['top1'])} | "
                         f"{v['status'] if meth == v['best_method'] else ''} |")
        L += ["", "pca_r2: R² of each candidate (pooled to the latent grid) on the target's 8 leading component maps, no key and no "
                  "encoder; norm_corr: correlation of rotation-invariant centred per-pixel latent norms, candidates encoded by the "
                  "attacker's aux-trained encoder."]
    for name in ("M1", "M3"):
        if name in r:
            e = r[name]
            at, ct = e["attack"], e["control"]
            t, tc = at["tpr_at_1pct_fpr"], ct["tpr_at_1pct_fpr"]
            L += ["", f"## {name}: {e['description']}", "",
                  f"Status: **{e['status']}**" + (f" (exceeded: {', '.join(e['exceeded'])})" if e["exceeded"] else ""), "",
                  "| model | AUC | TPR at 1 % FPR [95 % CI] | achieved FPR | members / non-members |", "|---|---|---|---|---|",
                  f"| target (the run's mapping network) | {_f(at['auc'])} | {_f(t['tpr'], 4)} [{_f(t['tpr_ci95'][0], 4)}, "
                  f"{_f(t['tpr_ci95'][1], 4)}] | {_f(t['achieved_fpr'], 4)} | {t['n_members']} / {t['n_nonmembers']} |",
                  f"| positive control (memorising network) | {_f(ct['auc'])} | {_f(tc['tpr'], 4)} [{_f(tc['tpr_ci95'][0], 4)}, "
                  f"{_f(tc['tpr_ci95'][1], 4)}] | {_f(tc['achieved_fpr'], 4)} | {tc['n_members']} / {tc['n_nonmembers']} |"]
            if at.get("tpr_at_0.1pct_fpr") is None:
                L.append(f"\nTPR at 0.1 % FPR is not reported: it needs ≥ {mg['min_nonmembers_0.1pct']} non-members.")
            if name == "M3":
                L.append(f"\n{e['reference_models']} reference networks of {e['reference_epochs']} epochs, each trained on half of the "
                         "slices (a slice and its augmented copies together) drawn from members and non-members alike; their "
                         "non-member rows are keyed with the hospitals' keys, so this attacker is stronger than a real server.")
            L.append(f"\nNote: {e['note']}.")
    L += [""] + (["![ROC](roc.png)", ""] if {"M1", "M3"} & set(r) else []) + (["![A1 maps](a1_maps.png)", ""] if "A1" in r else [])
    L += [f"Wall time: {a['timings_s']['total']:.0f} s."]
    return "\n".join(L) + "\n"


def plots(a: dict, out: Path, examples: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = a["results"]
    if not {"M1", "M3"} & set(r):
        return plots_examples(out, examples)
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in ("M1", "M3"):
        if name in r:
            for which, style in (("attack", "-"), ("control", ":")):
                roc = r[name][which]["roc"]
                f, t = np.maximum(roc["fpr"], 1e-4), np.maximum(roc["tpr"], 1e-4)
                ax.plot(f, t, style, label=f"{name} {'target' if which == 'attack' else 'memorising control'} (AUC {r[name][which]['auc']:.3f})")
    x = np.logspace(-4, 0, 50)
    ax.plot(x, x, "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("membership inference (log-log ROC)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=90)
    plt.close(fig)
    plots_examples(out, examples)


def plots_examples(out: Path, examples: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if examples:
        n = len(examples["rows"])
        fig, axes = plt.subplots(n, len(examples["cols"]), figsize=(2.2 * len(examples["cols"]), 2.2 * n), squeeze=False)
        for i, row in enumerate(examples["rows"]):
            for j, img in enumerate(row):
                axes[i, j].imshow(img, cmap="gray")
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
                if i == 0:
                    axes[i, j].set_title(examples["cols"][j], fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "a1_maps.png", dpi=90)
        plt.close(fig)


def write_report(a: dict, out: Path, examples: dict | None = None) -> None:
    plots(a, out, examples)
    atomic_write_text(out / "report.md", report_md(a))
