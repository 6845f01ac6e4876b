"""Plots for BENCHMARKS.md from the committed results (no training, no data needed).

    .venv/bin/python benchmarks/plots.py --results benchmarks/results

Reads ``bench-<dataset>.json`` (from ``ppcmi bench``) and ``latency-*.json`` (from
``benchmarks/latency.py``) and writes ``dice.png``, ``latency.png`` and ``payload_vs_dice.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ("encode", "map", "decode")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dice(summary: dict) -> tuple[float, float, float] | None:
    d = summary.get("fg_dice") or {}
    if d.get("mean") is None:
        return None
    lo, hi = d.get("ci95") or (d["mean"], d["mean"])
    return 100 * d["mean"], 100 * lo, 100 * hi


def dice_plot(benches: dict[str, dict], out: Path) -> Path:
    """One panel per dataset: merged-foreground Dice per method with its 95 % bootstrap interval."""
    fig, axes = plt.subplots(1, len(benches), figsize=(5.2 * len(benches), 4.2), squeeze=False)
    for ax, (ds, bench) in zip(axes[0], benches.items()):
        rows = [(m, _dice(r["summary"])) for m, r in bench["results"].items()]
        rows += [(f"{m} ({v.replace('_', ' ')})", _dice(s)) for m, r in bench["results"].items()
                 for v, s in r.get("variants", {}).items()]
        rows = [(m, d) for m, d in rows if d is not None]
        names = [m for m, _ in rows]
        means = [d[0] for _, d in rows]
        err = [[d[0] - d[1] for _, d in rows], [d[2] - d[0] for _, d in rows]]
        colors = ["#4c72b0" if m.startswith(("ppcmi", "no_", "per_")) else "#999999" for m in names]
        ax.barh(range(len(rows)), means, xerr=err, color=colors, capsize=3)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        lo = min(d[1] for _, d in rows)
        ax.set_xlim(max(0.0, lo - 5), 100)
        ax.set_xlabel("merged-foreground Dice % (95 % CI)")
        ax.set_title(ds)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, out / "dice.png")


def latency_plot(latency: dict[str, dict], out: Path) -> Path:
    """Stacked per-stage latency per image at batch 1 for every configuration and variant."""
    bars = []
    for lat in latency.values():
        for cfg, c in lat["configs"].items():
            for variant, by_batch in c["latency_ms"].items():
                r = by_batch.get("1")
                if r:
                    bars.append((f"{cfg} {variant.replace('_', ' ')}", [r[s] for s in STAGES]))
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(bars) + 1.4))
    left = [0.0] * len(bars)
    for i, stage in enumerate(STAGES):
        vals = [b[1][i] for b in bars]
        ax.barh(range(len(bars)), vals, left=left, label=stage)
        left = [a + v for a, v in zip(left, vals)]
    ax.axvline(50, color="k", ls="--", lw=1, label="target 50 ms")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per 256x256 image, batch 1 (median of 50, 2-core CPU)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out / "latency.png")


def payload_plot(benches: dict[str, dict], out: Path) -> Path:
    """Bytes per image per direction against Dice, for every PPCMI-SF method (float32 and float16 wire)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for ds, bench in benches.items():
        pts = []
        for m, r in bench["results"].items():
            d, p = _dice(r["summary"]), r.get("payload")
            if d is None or not p:
                continue
            pts.append((p["float32_bytes"] / 1024, d[0], m))
            v = r.get("variants", {}).get("float16_wire")
            if v and _dice(v):
                pts.append((p["float16_bytes"] / 1024, _dice(v)[0], f"{m} f16"))
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=ds)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points", color=sc.get_facecolor()[0])
    ax.axvline(64, color="k", ls="--", lw=1, label="64 KiB target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("payload KiB per image per direction (log2)")
    ax.set_ylabel("merged-foreground Dice %")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "payload_vs_dice.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results", help="folder of results JSON files")
    args = ap.parse_args()
    benches = {json.loads(p.read_text())["dataset"]: json.loads(p.read_text()) for p in sorted(args.results.glob("bench-*.json"))}
    latency = {p.stem: json.loads(p.read_text()) for p in sorted(args.results.glob("latency-*.json"))}
    if not benches and not latency:
        raise SystemExit(f"{args.results}: no bench-*.json or latency-*.json files")
    made = []
    if benches:
        made += [dice_plot(benches, args.results), payload_plot(benches, args.results)]
    if latency:
        made.append(latency_plot(latency, args.results))
    for p in made:
        print(p)


if __name__ == "__main__":
    main()
