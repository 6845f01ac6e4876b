"""The federated core's Dice against epsilon: patient-level DP-SGD at every hospital (issue 16, section 2).

Each point is a real federated run (``ppcmi.flower.fedcore.run_federated_core``: a loopback Flower federation with
TLS, SuperNode authentication and SecAgg+), on a bench preset, with only the DP settings changing between points:

    none   no DP (the anchor: the federated core as ``ppcmi bench --methods ppcmi_federated`` trains it)
    shared no DP, the core's normalisation layers averaged too (``mapping.federated_norm = "shared"``: FedBN's ablation)
    group  no DP, GroupNorm instead of BatchNorm (``mapping.norm = "group"``, which DP-SGD needs): the DP points' anchor
    inf    DP-SGD's mechanism (GroupNorm) without noise (patient-level clipping and Poisson sampling only: epsilon infinite),
           which separates what clipping and few steps cost from what the noise costs
    EPS    DP-SGD (GroupNorm) with ``mapping.dp_epsilon = EPS`` per patient at delta = 1/patients, over the whole budget
    EPS@B  the same with ``mapping.dp_patients = B`` expected patients per step (a larger logical batch: De et al. 2022)

The first point trains stage 1 (or ``--stage1-from`` names an earlier run's); the others copy its hospitals'
autoencoders and keys (the same data, split and autoencoder settings: :func:`ppcmi.flower.fedcore.reuse_stage1`), so
the points differ only in stage 2.

Writes ``OUT/POINT/`` (each run) and ``benchmarks/results/fedcore-dp-TAG.{json,md}``. Usage::

    PYTHONPATH=src python benchmarks/fedcore_dp_curve.py --dataset sunnybrook_lv --data data/sunnybrook_lv \\
        --out runs/dp-curve-sunnybrook_lv --points none,inf,8,1 --local-epochs 5 --set mapping.epochs=10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ppcmi.config import load_config  # noqa: E402
from ppcmi.experiment import METHODS, dataset_config, machine  # noqa: E402
from ppcmi.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from ppcmi.flower.fedcore import run_federated_core  # noqa: E402


def point_settings(point: str) -> list[str]:
    if point == "none":
        return []
    if point == "shared":
        return ["mapping.federated_norm=shared"]
    if point == "group":
        return ["mapping.norm=group"]
    if point == "inf":
        return ["mapping.norm=group", "mapping.dp=true", "mapping.dp_noise=0"]
    eps_text, _, batch = point.partition("@")
    try:
        eps, patients = float(eps_text), int(batch) if batch else None
    except ValueError:
        eps, patients = math.nan, None
    if not (math.isfinite(eps) and eps > 0) or (patients is not None and patients < 1):
        raise SystemExit(f"--points: {point!r} is not none, shared, group, inf, a positive epsilon or EPSILON@PATIENTS")
    return ["mapping.norm=group", "mapping.dp=true", f"mapping.dp_epsilon={eps:g}",
            *([f"mapping.dp_patients={patients}"] if patients else [])]


def row(point: str, res: dict, patients_per_step: int | None) -> dict:
    s, f = res["ppcmi"], res["federated"]
    per_class = {k[:-len("_dice")]: s[k]["mean"] for k in s if k.endswith("_dice") and k != "fg_dice"}
    eps = [h.get("epsilon") for h in f["hospitals"].values()]
    return {"point": point, "fg_dice": s["fg_dice"]["mean"], "fg_dice_ci95": s["fg_dice"]["ci95"], "class_dice": per_class,
            "epsilon_per_hospital": {n: h.get("epsilon") for n, h in f["hospitals"].items()},
            "epsilon_max": max(e for e in eps) if all(e is not None for e in eps) else None,
            "dp_patients": patients_per_step,
            "rounds": f["rounds"], "local_epochs": f["local_epochs"], "timings_s": res["timings_s"]}


def table(tag: str, meta: dict, rows: list[dict]) -> str:
    lines = [f"# Federated core: Dice against epsilon per patient ({tag})", "",
             f"{meta['rounds']} rounds x {meta['local_epochs']} local epochs; {meta['settings']}; "
             f"expected patients per step: {meta['dp_patients']} unless a row says; clip {meta['dp_clip']}; machine: {meta['cpu']}.", "",
             "| point | epsilon per patient (largest hospital's; delta = 1/patients) | patients per step | foreground Dice | 95 % CI | "
             "per class | stage 2 (flwr run) s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = {"none": "no DP", "shared": "no DP (normalisation layers averaged)", "group": "no DP (GroupNorm)", "inf": "inf (no noise)"}.get(
            r["point"], None) or f"{r['epsilon_max']:.3g}"
        ci = r["fg_dice_ci95"]
        cls = ", ".join(f"{k} {v:.3f}" for k, v in r["class_dice"].items())
        lines.append(f"| {r['point']} | {eps} | {r.get('dp_patients') or '-'} | {r['fg_dice']:.4f} | [{ci[0]:.3f}, {ci[1]:.3f}] | {cls} | "
                     f"{r['timings_s']['flwr_run_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="a bench preset: psfhs, acdc or sunnybrook_lv")
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--points", default="none,inf,8,1", help="comma-separated: none, shared, group, inf, or epsilons")
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every point (e.g. mapping.epochs=10)")
    ap.add_argument("--stage1-from", type=Path, default=None,
                    help="the federation folder of an earlier federated run on the same data and stage-1 settings (e.g. a "
                         "bench ppcmi_federated run's OUT/ppcmi_federated/federation): every point reuses its stage 1")
    ap.add_argument("--tag", default=None, help="results name (default: the dataset)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    tag = args.tag or args.dataset
    base = dataset_config(args.dataset, None, [*METHODS["ppcmi_federated"], *args.sets])
    if base.data.split_lists:
        from dataclasses import replace

        base = replace(base, data=replace(base.data, split_lists={k: str(args.data / v) for k, v in base.data.split_lists.items()}))
    rows, first = [], args.stage1_from
    for point in [p.strip() for p in args.points.split(",") if p.strip()]:
        cfg = load_config(None, point_settings(point), base=base)
        out = args.out / point
        if (out / "summary.json").exists():
            res = json.loads((out / "summary.json").read_text())
        else:
            t0 = time.perf_counter()
            res = run_federated_core(cfg, args.data, out, local_epochs=args.local_epochs, stage1_from=first, echo=print)
            res.pop("_arrays")
            res["wall_s"] = time.perf_counter() - t0
            atomic_write_json(out / "summary.json", res)
        first = first or out / "federation"
        rows.append(row(point, res, cfg.mapping.dp_patients if cfg.mapping.dp else None))  # (None: no DP-SGD steps)
        print(f"{point}: Dice {rows[-1]['fg_dice']:.4f}, epsilon {rows[-1]['epsilon_max']}")
    m = base.mapping
    meta = {"dataset": args.dataset, "cpu": machine()["cpu"], "rounds": rows[0]["rounds"], "local_epochs": rows[0]["local_epochs"],
            "settings": ", ".join(args.sets) or "the preset's budget", "dp_patients": m.dp_patients, "dp_clip": m.dp_clip,
            "command": "PYTHONPATH=src python benchmarks/fedcore_dp_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    doc = {"meta": meta, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / f"fedcore-dp-{tag}.json", doc)
    atomic_write_text(args.results / f"fedcore-dp-{tag}.md", table(tag, meta, rows))
    print(table(tag, meta, rows))
    return doc


if __name__ == "__main__":
    main()
