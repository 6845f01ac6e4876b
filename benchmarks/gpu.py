"""PPCMI-SF on a CUDA GPU: PSFHS at 256x256 with the published widths and schedule, per-stage latency, throughput and
peak GPU memory.

The run is ``ppcmi.simulate.run_simulation`` (every role in one process, through protocol bytes) on ``--device``:
three hospitals train their autoencoders (published width, 16..256 channels; at most 100 epochs, patience 15), the
coordinator trains the published mapping network (60.5 M parameters; at most 150 epochs, patience 20), and every
hospital segments the held-out test images, scored at their native resolution. Everything else is the package's
defaults; ``--set`` changes any setting. Training runs under the device's default precision (bf16 autocast, or
fp16 with a gradient scaler where the GPU has no bf16). Then the trained networks are timed
(``ppcmi.experiment.measure_latency``: hospital encode + KLT, server map, hospital inverse KLT + decode, protocol
bytes included) at batch 1 and 16, in float32 and in mixed precision, with the peak GPU memory of each phase
(``torch.cuda.max_memory_allocated``).

    .venv/bin/python benchmarks/gpu.py            # the full schedule          -> benchmarks/results/gpu.{json,md}
    .venv/bin/python benchmarks/gpu.py --quick    # 2 + 2 epochs, same data    -> benchmarks/results/gpu-quick.{json,md}
    make bench-gpu [QUICK=1]

``--quick`` trains 2 epochs per stage on the whole data (a few minutes of GPU time), times the networks as the full
run does, and prints how long the full schedule would take, extrapolated from the measured epoch times (an upper
estimate: every stage runs to its epoch limit and the first, slower epoch counts). Without a CUDA GPU it refuses in
one line. It needs only this repository and ``../shared/data/psfhs``.

Targets (issue 15): PSFHS Dice >= 0.905 with the published configuration; end to end <= 5 ms per 256x256 image at
batch 1; at batch 16 >= 10x the batch-1 throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "psfhs"
FULL = {"autoencoder.epochs": 100, "autoencoder.patience": 15, "mapping.epochs": 150, "mapping.patience": 20}
QUICK = {"autoencoder.epochs": 2, "autoencoder.patience": 2, "mapping.epochs": 2, "mapping.patience": 2}
TARGETS = {"dice": 0.905, "latency_ms_batch1": 5.0, "throughput_ratio_16_to_1": 10.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PSFHS in the images/ + masks/ layout (default ../shared/data/psfhs)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/bench-gpu[-quick], -2, -3 ... if taken)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where gpu[-quick].{json,md} go")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    p.add_argument("--quick", action="store_true", help="2 epochs per stage, then the latency table and the full run's estimate")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per latency cell (median; default 20)")
    p.add_argument("--batches", default="1,16", help="batch sizes of the latency table, the first the reference of the "
                   "throughput ratio (default 1,16)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting on top of the benchmark's (repeatable), e.g. --set mapping.adapter_init=identity")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps: must be at least 1")
    try:
        a.batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches: comma-separated positive integers, got {a.batches!r}")
    if len(a.batches) < 2 or min(a.batches) < 1:
        p.error(f"--batches: at least two positive batch sizes, got {a.batches}")
    return a


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def config(a: argparse.Namespace):
    """The benchmark's configuration: PSFHS (the bench preset's labels and split) at 256 x 256, the published
    autoencoder and mapping widths, the published schedule (or the quick one), the package's defaults otherwise."""
    from dataclasses import replace

    from ppcmi.config import Config, load_config
    from ppcmi.experiment import DATASETS
    from ppcmi.models import MappingConfig

    pub = MappingConfig.published()
    schedule = QUICK if a.quick else FULL
    sets = ["autoencoder.width=1.0", f"mapping.widen={list(pub.widen)}", f"mapping.mid={list(pub.mid)}", f"mapping.down={list(pub.down)}",
            *(f"{k}={v}" for k, v in schedule.items()), *a.sets]
    return load_config(None, sets, base=replace(Config(), data=replace(DATASETS["psfhs"], size=256)))


def fresh_folder(base: Path) -> Path:
    out, k = base, 1
    while out.exists() and any(out.iterdir()):
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last reset, in MiB (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _device_record(device) -> dict:
    import torch

    from ppcmi.device import describe

    if device.type != "cuda":
        return {"name": describe(device), "index": None, "cuda": None}
    props = torch.cuda.get_device_properties(device)
    return {"name": torch.cuda.get_device_name(device), "index": device.index, "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30}


def latency_table(run: Path, images, device, reps: int, batches: list[int]) -> tuple[list[dict], dict]:
    """Per-stage median latency, throughput and peak GPU memory of the trained networks at batch 1 and 16, in float32
    and in the device's mixed precision (the CPU's default is float32 too: then both rows time the same path)."""
    import torch

    from ppcmi.client.site import Hospital
    from ppcmi.device import mixed_dtype
    from ppcmi.experiment import measure_latency
    from ppcmi.server.mapping import MappingServer

    site = sorted((run / "sites").iterdir())[0]
    rows, peaks = [], {}
    for precision, mixed in (("fp32", False), ("mixed", None)):
        dtype = mixed_dtype(device, mixed)
        hospital, server = Hospital(site, device=device, mixed=mixed), MappingServer(run / "server", device=device, mixed=mixed)
        for batch in batches:
            _reset_peak(device)
            lat = measure_latency(hospital, server, images, reps=reps, batch=batch)
            peak = _peak_mib(device)
            rows.append({"precision": precision, "dtype": str(dtype or torch.float32).replace("torch.", ""), "batch": batch,
                         "encode_ms": lat["encode"], "map_ms": lat["map"], "decode_ms": lat["decode"], "total_ms": lat["total"],
                         "ms_per_image": lat["total"] / batch, "images_per_s": 1000.0 * batch / lat["total"],
                         "peak_gpu_mib": peak, "reps": reps})
            peaks[f"latency_{precision}_b{batch}"] = peak
        del hospital, server
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, peaks


def estimate(result: dict, run: Path, schedule: dict) -> dict:
    """The full schedule's stage times from this run's mean epoch times (every stage to its epoch limit)."""
    s1_epochs = sum(r["epochs"] for h in result["stage1"].values() for r in h.values())
    s1_seconds = sum(r["seconds"] for h in result["stage1"].values() for r in h.values())
    n_aes = sum(len(h) for h in result["stage1"].values())
    server = json.loads((run / "server" / "config.json").read_text())
    s2_epoch = server["train_seconds"] / max(1, server["epochs_run"])
    s1_epoch = s1_seconds / max(1, s1_epochs)  # one autoencoder epoch (hospitals in turn, as simulate runs them)
    full_s1 = s1_epoch * schedule["autoencoder.epochs"] * n_aes
    full_s2 = s2_epoch * schedule["mapping.epochs"]
    return {"stage1_epoch_s": s1_epoch, "stage2_epoch_s": s2_epoch, "autoencoders": n_aes,
            "stage1_full_s": full_s1, "stage2_full_s": full_s2, "total_full_s": full_s1 + full_s2,
            "stage1_full_s_in_parallel": full_s1 / max(1, len(result["stage1"])),
            "note": "upper estimate: each stage to its epoch limit (no early stop); first epochs included"}


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def markdown(r: dict) -> str:
    d, t, lat = r["dice"], r["timings_s"], r["latency"]
    size = r["config"]["data"]["size"]
    lines = [f"### PPCMI-SF on {r['device']['name']} ({'quick: ' if r['quick'] else ''}PSFHS {size}x{size}, published widths)", "",
             f"Schedule: stage 1 <= {r['schedule']['autoencoder.epochs']} epochs (patience {r['schedule']['autoencoder.patience']}), "
             f"stage 2 <= {r['schedule']['mapping.epochs']} epochs (patience {r['schedule']['mapping.patience']}); "
             f"training precision {r['training_precision']}; torch {r['machine']['torch']}, CUDA {r['device']['cuda']}.", "",
             "| merged-foreground Dice | target | stage 1 s | stage 2 s | inference s | stage 1 epochs (per AE) | stage 2 epochs |",
             "|---|---|---|---|---|---|---|",
             f"| {d:.4f} | >= {TARGETS['dice']} | {t['stage1_s']:.0f} | {t['stage2_s']:.0f} | {t['inference_s']:.0f} | "
             f"{', '.join(str(x) for x in r['stage1_epochs'])} | {r['stage2_epochs']} |", "",
             "| precision | batch | encode+KLT ms | map ms | inverse KLT+decode ms | total ms | ms per image | images/s | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in lat:
        lines.append(f"| {row['precision']} ({row['dtype']}) | {row['batch']} | {row['encode_ms']:.2f} | {row['map_ms']:.2f} | "
                     f"{row['decode_ms']:.2f} | {row['total_ms']:.2f} | {row['ms_per_image']:.2f} | {row['images_per_s']:.0f} | "
                     f"{_mib(row['peak_gpu_mib'])} |")
    lines += ["", "Peak GPU memory (MiB): " + ", ".join(f"{k} {_mib(v)}" for k, v in r["peak_gpu_mib"].items()) + ".", ""]
    g = r["targets"]
    lines.append(f"Targets: Dice {'met' if g['dice'] else 'missed'}; batch-1 latency (best precision) "
                 f"{g['best_batch1_ms']:.2f} ms ({'met' if g['latency'] else 'missed'}, <= {TARGETS['latency_ms_batch1']} ms); "
                 f"batch-16 throughput {g['throughput_ratio']:.1f}x batch 1 ({'met' if g['throughput'] else 'missed'}, "
                 f">= {TARGETS['throughput_ratio_16_to_1']}x).")
    if r["quick"]:
        e = r["estimate"]
        lines += ["", f"Full schedule, extrapolated ({e['note']}): stage 1 {e['stage1_full_s'] / 60:.0f} min "
                      f"({e['stage1_full_s_in_parallel'] / 60:.0f} min with the hospitals in parallel), stage 2 "
                      f"{e['stage2_full_s'] / 60:.0f} min; total {e['total_full_s'] / 60:.0f} min "
                      f"(epochs: autoencoder {e['stage1_epoch_s']:.1f} s, mapping {e['stage2_epoch_s']:.1f} s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        refuse(f"bench-gpu needs a CUDA GPU (torch {torch.__version__} sees none); run it on a machine with one")
    sys.path.insert(0, str(ROOT / "src"))  # the repository's ppcmi, installed or not
    from ppcmi.device import resolve_device
    from ppcmi.errors import PpcmiError

    try:
        device = resolve_device(a.device)
        if device.type != "cuda":
            refuse(f"--device: bench-gpu measures a CUDA GPU, got {a.device!r}")
        if not (a.data / "images").is_dir() or not (a.data / "masks").is_dir():
            refuse(f"{a.data}: PSFHS not found (images/ + masks/); pass --data")
        record = run(a, device)
    except PpcmiError as e:
        refuse(str(e))
    if a.quick:
        e = record["estimate"]
        print(f"the full schedule would take at most about {e['total_full_s'] / 60:.0f} min on this GPU "
              f"(stage 1 {e['stage1_full_s'] / 60:.0f} min, stage 2 {e['stage2_full_s'] / 60:.0f} min)")
    return 0


def run(a: argparse.Namespace, device) -> dict:
    """Train, score and time on ``device`` (any device: the tests run it on the CPU on tiny data); writes
    ``--results/gpu[-quick].{json,md}`` and returns the record."""
    import torch

    from ppcmi.device import describe, mixed_dtype
    from ppcmi.errors import PpcmiError
    from ppcmi.experiment import machine
    from ppcmi.fileio import atomic_write_json, atomic_write_text
    from ppcmi.simulate import public_summary, run_simulation

    cfg = config(a)
    out = a.out or fresh_folder(ROOT / "runs" / ("bench-gpu-quick" if a.quick else "bench-gpu"))
    if out.exists() and any(out.iterdir()):
        raise PpcmiError(f"{out}: folder is not empty; choose another --out")
    tag = "gpu-quick" if a.quick else "gpu"
    print(f"bench-gpu: {describe(device)}; {'quick' if a.quick else 'full'} schedule; run folder {out}", flush=True)
    t0 = time.perf_counter()
    _reset_peak(device)
    result = run_simulation(cfg, a.data, out, progress=True, device=device)
    train_peak = _peak_mib(device)
    print(f"bench-gpu: trained and scored in {time.perf_counter() - t0:.0f} s; timing the networks", flush=True)
    lat, peaks = latency_table(out, result["_arrays"]["test"]["images"], device, a.reps, a.batches)
    schedule = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in FULL}  # as run (--set included)
    one, many = a.batches[0], a.batches[-1]
    best1 = min(r["ms_per_image"] for r in lat if r["batch"] == one)
    best_tp = {b: max(r["images_per_s"] for r in lat if r["batch"] == b) for b in (one, many)}
    summary = public_summary(result)
    dice = summary["ppcmi"]["fg_dice"]["mean"]  # merged foreground over every hospital's test predictions
    record = {
        "quick": a.quick, "schedule": schedule, "data": str(a.data), "run": str(out),
        "device": _device_record(device),
        "machine": machine(), "training_precision": str(mixed_dtype(device) or torch.float32).replace("torch.", ""),
        "dice": dice, "ppcmi": summary["ppcmi"], "timings_s": summary["timings_s"],
        "stage1_epochs": [r["epochs"] for h in summary["stage1"].values() for r in h.values()],
        "stage2_epochs": summary["stage2"].get("epochs"),
        "latency": lat, "peak_gpu_mib": {"training_and_scoring": train_peak, **peaks},
        "targets": {"dice": dice >= TARGETS["dice"], "best_batch1_ms": best1, "latency": best1 <= TARGETS["latency_ms_batch1"],
                    "throughput_ratio": best_tp[many] / best_tp[one],
                    "throughput": best_tp[many] / best_tp[one] >= TARGETS["throughput_ratio_16_to_1"]},
        "estimate": estimate(summary, out, FULL), "payload": summary["payload"], "config": json.loads((out / "config.json").read_text()),
    }
    a.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.results / f"{tag}.json", record)
    md = markdown(record)
    atomic_write_text(a.results / f"{tag}.md", md)
    print(md)
    print(f"results: {a.results / (tag + '.json')}, {a.results / (tag + '.md')}")
    return record


if __name__ == "__main__":
    sys.exit(main())
