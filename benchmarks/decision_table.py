"""One table a reader can decide from: every way to segment together, per dataset, from the committed result files.

Reads ``benchmarks/results/bench-DATASET.json`` (Dice, the federated methods' bytes and rows), ``privacy-DATASET.json``
(the audit's verdicts on the default's kind of messages), ``core-membership-DATASET.json`` and ``core-inversion.json``
(the attacks on the federated core) and writes ``benchmarks/results/decision-table.{json,md}``. Nothing is measured
here: a cell whose source file lacks it says so.

Bytes per hospital for training: the federated methods' are what Flower counted (``bytes_counted`` in their results);
PPCMI-SF's shared and per-hospital scopes send the keyed pairs once (the hospital's rows, counted by its federated run on
the same split and copies, times one image and one mask latent in float32: both autoencoders have the same widths) and
receive nothing. Per inference: a keyed query up and keyed mask latents down (same size) where the coordinator maps; 0
where the model is at the hospital.

Usage::

    python benchmarks/decision_table.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("psfhs", "acdc", "sunnybrook_lv")
ROWS = [  # (method in the bench results, label, where the model runs at inference, what the coordinator sees)
    ("ppcmi_cpu_pca", "PPCMI-SF default (coordinator maps keyed latents)", "coordinator",
     "every training pair and every query as keyed latents; it holds the mapping network"),
    ("ppcmi_federated", "PPCMI-SF federated core (`mapping.scope = \"federated\"`; FedBN: normalisation layers stay local)",
     "hospital", "the SecAgg+ sum of the cores' convolutions each round, row counts, training losses; no per-image array"),
    ("ppcmi_federated_decoded", "PPCMI-SF federated core, decoded loss (`mapping.federated_loss = \"decoded\"`)",
     "hospital", "the SecAgg+ sum of the cores' convolutions each round, row counts, training losses; no per-image array"),
    ("ppcmi_federated_shared_norm", "PPCMI-SF federated core, normalisation layers averaged too (`federated_norm = \"shared\"`)",
     "hospital", "the SecAgg+ sum of the whole cores (BatchNorm statistics included) each round, row counts, training losses; "
     "no per-image array"),
    ("per_hospital_mapping", "per-hospital mapping (no pooling)", "coordinator",
     "every training pair and every query as keyed latents; one network per hospital"),
    ("unet_fedavg", "U-Net FedAvg (Flower)", "hospital", "every hospital's U-Net weights each round (no SecAgg+)"),
    ("unet_fedprox", "U-Net FedProx (Flower)", "hospital", "every hospital's U-Net weights each round (no SecAgg+)"),
    ("unet_local", "local U-Nets (no collaboration)", "hospital", "nothing"),
    ("unet_centralized", "centralized U-Net (data pooled)", "coordinator", "every image and mask in the clear"),
]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def training_bytes(method: str, res: dict, rows: dict | None) -> str:
    r = res.get(method)
    if r is None:
        return "not run"
    if "federated" in r:
        h = r["federated"]["hospitals"]
        up = [v["uploaded_bytes"] for v in h.values()]
        down = [v["downloaded_bytes"] for v in h.values()]
        return f"{_mb(min(up))}–{_mb(max(up))} up / {_mb(min(down))}–{_mb(max(down))} down"
    if method.startswith("ppcmi") or method == "per_hospital_mapping":
        if rows is None:
            return "n/a (rows per hospital come from the federated run)"
        pair = 2 * r["payload"]["float32_bytes"]
        sent = [n * pair for n in rows.values()]
        return f"{_mb(min(sent))}–{_mb(max(sent))} up / 0 down"
    if method == "unet_local":
        return "0"
    return "every image and mask, once"


def inference_bytes(method: str, res: dict, where: str) -> str:
    r = res.get(method)
    if r is None:
        return "not run"
    if where == "hospital":
        return "0 (the model is at the hospital)"
    if "payload" in r:
        q = r["payload"]["wire_bytes_query"]
        return f"{q / 1e3:.0f} kB up + {q / 1e3:.0f} kB down"
    return "the image up, the label map down"


FEDCORE = {"ppcmi_federated": "", "ppcmi_federated_shared_norm": "-shared-norm", "ppcmi_federated_decoded": "-decoded"}
# (method -> its membership file's suffix; a run of another schedule, METHOD@TAG from bench-DATASET-fedcore-TAG.json, adds
# "-TAG" before it)


def schedule_runs(ds: str, results: Path) -> dict[str, dict]:
    """The federated-core runs of other schedules, ``bench-DS-fedcore-TAG.json`` (e.g. TAG "15x2"), as ``{METHOD@TAG: result}``."""
    out = {}
    for path in sorted(results.glob(f"bench-{ds}-fedcore-*.json")):
        tag = path.stem[len(f"bench-{ds}-fedcore-"):]
        out.update({f"{m}@{tag}": r for m, r in json.loads(path.read_text())["results"].items()})
    return out


def _schedule(r: dict) -> str:
    f = r.get("federated", {})
    return f"{f['rounds']} x {f['local_epochs']}" if "rounds" in f else "?"


def _rows(res: dict) -> list[tuple[str, str, str, str]]:
    """ROWS, each federated-core row followed by its runs of other schedules present in ``res`` (labelled with theirs)."""
    out = []
    for method, label, where, sees in ROWS:
        if method not in FEDCORE:
            out.append((method, label, where, sees))
            continue
        runs = [k for k in res if k == method or k.startswith(method + "@")]
        if not runs and method != "ppcmi_federated":  # (a variant run on no schedule here: no row)
            continue
        for key in sorted(runs, key=lambda k: (k != method, k)) or [method]:
            out.append((key, f"{label}, {_schedule(res[key])} rounds x local epochs" if key in res else label, where, sees))
    return out


def attacks(method: str, ds: str, results: Path) -> str:
    priv = _load(results / f"privacy-{ds}.json")
    base = (priv or {}).get("variants", {}).get("baseline", {})
    if method == "ppcmi_cpu_pca":
        got = ", ".join(base.get("succeeded", [])) or "none"
        return f"{got} (audited on the identity-adapter network's messages, the same kind)" if base else "not audited"
    if method == "per_hospital_mapping":
        return "A1, A5, A6, A7 apply unchanged (the same messages reach the coordinator); not re-run"
    base, _, tag = method.partition("@")
    if base in FEDCORE:
        parts = ["A1–A8: no input (no per-image array crosses: tests/test_fedcore.py)"]
        inv = _load(results / "core-inversion.json")
        if inv:
            st = sorted({v["status"] for v in inv["verdicts"].values()})
            parts.append(f"A9 (update inversion, Sunnybrook, normalisation layers shared): {'/'.join(st)}")
        mem = _load(results / f"core-membership-{ds}{'-' + tag if tag else ''}{FEDCORE[base]}.json")
        if mem:
            for name in ("M1", "M3"):
                e = mem["results"].get(name)
                q = (e or {}).get("patient_permutation")
                shift = f" (AUC {e['attack']['auc']:.3f}; patients alone: p = {q['p_two_sided']:.3f})" if q else ""
                parts.append(f"{name} from a colluding hospital: {e['status'] if e else 'not run'}{shift}")
        else:
            parts.append("M1/M3: not run against this core")
        return "; ".join(parts)
    if method in ("unet_fedavg", "unet_fedprox"):
        return "not audited (the coordinator holds every hospital's weights each round)"
    if method == "unet_local":
        return "none apply (nothing crosses)"
    return "none needed: it holds the data"


def build(results: Path) -> dict:
    out: dict = {}
    for ds in DATASETS:
        bench = _load(results / f"bench-{ds}.json")
        if bench is None:
            continue
        res = {**bench["results"], **schedule_runs(ds, results)}
        fed = (res.get("ppcmi_federated") or res.get("ppcmi_federated_shared_norm") or {}).get("federated")
        rows = {h: v["num_examples"] for h, v in fed["hospitals"].items()} if fed else None
        table = []
        for method, label, where, sees in _rows(res):
            r = res.get(method)
            table.append({"method": method, "label": label,
                          "dice": None if r is None else r["summary"]["fg_dice"]["mean"],
                          "training_bytes_per_hospital": training_bytes(method, res, rows),
                          "inference_bytes_per_image": inference_bytes(method, res, where),
                          "coordinator_sees": sees, "attacks_succeeded": attacks(method, ds, results)})
        d = {r["method"]: r["dice"] for r in table}
        verdicts = []  # every federated core run against the two targets and FedAvg
        for r in table:
            if r["method"].partition("@")[0] in FEDCORE and r["dice"] is not None:
                f = r["dice"]
                verdicts.append({"method": r["method"], "schedule": _schedule(res[r["method"]]),
                                 "federated_minus_default_points": 100 * (f - d["ppcmi_cpu_pca"]),
                                 "federated_minus_per_hospital_points": 100 * (f - d["per_hospital_mapping"]),
                                 "federated_minus_fedavg_points": 100 * (f - d["unet_fedavg"]) if d.get("unet_fedavg") is not None else None})
        out[ds] = {"rows": table, "targets": verdicts}
    return out


def markdown(t: dict) -> str:
    lines = ["# Decision table (from the committed result files; `python benchmarks/decision_table.py`)", ""]
    for ds, v in t.items():
        lines += [f"## {ds}", "", "| method | Dice | training MB per hospital | per inference (one image) | what the coordinator sees | attacks that succeeded |",
                  "|---|---|---|---|---|---|"]
        for r in v["rows"]:
            dice = "not run" if r["dice"] is None else f"{r['dice']:.4f}"
            lines.append(f"| {r['label']} | {dice} | {r['training_bytes_per_hospital']} | {r['inference_bytes_per_image']} | "
                         f"{r['coordinator_sees']} | {r['attacks_succeeded']} |")
        if v["targets"]:
            def one(g: dict) -> str:
                fa = g["federated_minus_fedavg_points"]
                met = g["federated_minus_default_points"] >= -1 and g["federated_minus_per_hospital_points"] > 0
                return (f"{g['method'].partition('@')[0]} ({g['schedule']}): {g['federated_minus_default_points']:+.2f} / "
                        f"{g['federated_minus_per_hospital_points']:+.2f} / {'n/a' if fa is None else f'{fa:+.2f}'}"
                        f"{' (both met)' if met else ''}")
            lines += ["", "Federated core against the default (target: within 1 point), per-hospital mapping (target: above) "
                      "and U-Net FedAvg, in points: " + "; ".join(one(g) for g in v["targets"]) + "."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    results = Path(args.results)
    t = build(results)
    (results / "decision-table.json").write_text(json.dumps(t, indent=1) + "\n")
    (results / "decision-table.md").write_text(markdown(t))
    print(markdown(t))
    return t


if __name__ == "__main__":
    main()
