"""No size ceiling, measured: PSFHS at 256x256 with the published autoencoder widths and 8 augmented copies per
pair through stage 2, with the peak memory of encoding and of stage 2.

Each hospital trains its autoencoders (published widths, 16..256 channels; ``--ae-epochs``, few: the
measurement is about sizes and memory, not Dice), encodes and keys its training pairs and writes them as a
set of chunks (``ppcmi.protocol.CHUNK_BYTES`` each at most), one chunk at a time; the coordinator checks
every chunk and trains the mapping network (CPU widths; ``--map-epochs``) reading the rows from the chunk
files. Each phase runs in its own process, so its peak resident memory (``ru_maxrss``, and a sampling
thread's timeline of VmRSS) is its own. Writes ``scale[-quick].json`` and ``scale[-quick].md`` to --results.

    .venv/bin/python benchmarks/scale.py                 # the full measurement (hours on 2 cores; see the .md)
    .venv/bin/python benchmarks/scale.py --quick         # 16 training cases, small chunks: a few minutes

With ``--clients 1`` (the default) one hospital holds the whole training split, 1086 pairs x 8 = 8688 rows,
about 8 GB of float32 latents: 29 times what one message could carry before chunks (~292 pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



class _Sampler(threading.Thread):
    """VmRSS of this process every ``period`` seconds (MiB), for a memory timeline beside the peak."""

    def __init__(self, period: float = 1.0):
        super().__init__(daemon=True)
        self.period, self.samples, self.t0 = period, [], time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((round(time.perf_counter() - self.t0, 1), int(line.split()[1]) // 1024))
            except OSError:
                break
            self._halt.wait(self.period)

    def stop(self) -> list:
        self._halt.set()
        self.join()
        return self.samples


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(a):
    from ppcmi.experiment import dataset_config

    sets = ["data.size=256", "autoencoder.width=1.0", f"autoencoder.send_copies={a.copies}",
            f"autoencoder.epochs={a.ae_epochs}", f"autoencoder.patience={a.ae_epochs}", f"mapping.epochs={a.map_epochs}",
            f"mapping.patience={a.map_epochs}", f"clients={a.clients}"]
    return dataset_config("psfhs", overrides=sets)


def _hospitals(a, cfg):
    from ppcmi.simulate import plan

    pl = plan(cfg, a.data)
    hospitals = dict(pl.hospitals)
    if a.limit:
        hospitals = {h: c[:a.limit] for h, c in hospitals.items()}
    return pl, hospitals


def phase_train(a) -> dict:
    """Stage 1 at every hospital (published widths)."""
    from ppcmi.client import stages

    cfg = _config(a)
    pl, hospitals = _hospitals(a, cfg)
    out = {}
    for i, (name, cases) in enumerate(hospitals.items()):
        site = a.out / "sites" / name
        if (site / "mask_ae" / "model.safetensors").exists():
            out[name] = {"cases": len(cases), "reused": True}
            continue
        t0 = time.perf_counter()
        arr = stages.prepare(cases, cfg, pl.labels)
        stages.train_autoencoders(site, name, arr, cfg, pl.labels, seed=stages.site_seed(cfg.seed, i), resume=True, progress=False)
        out[name] = {"cases": len(cases), "seconds": time.perf_counter() - t0}
    return out


def phase_encode(a) -> dict:
    """Every hospital encodes, keys and writes its training set, one chunk at a time."""
    import numpy as np

    from ppcmi import protocol
    from ppcmi.client import stages
    from ppcmi.client.site import Hospital

    cfg = _config(a)
    pl, hospitals = _hospitals(a, cfg)
    out = {}
    for name, cases in hospitals.items():
        t0 = time.perf_counter()
        arr = stages.prepare(cases, cfg, pl.labels)
        t_prep = time.perf_counter() - t0
        h = Hospital(a.out / "sites" / name)
        dest = a.out / "wire" / f"{name}.train"
        n, nbytes, chunks = stages.write_training_set(stages.training_chunks(h, arr, cfg, target=a.chunk_bytes), dest)
        out[name] = {"cases": len(cases), "pairs": n, "bytes": nbytes, "chunks": chunks, "row_bytes": h.row_bytes(cfg.data.size),
                     "rows_per_chunk": protocol.rows_per_chunk(h.row_bytes(cfg.data.size), a.chunk_bytes),
                     "input_bytes": int(arr["images"].nbytes + arr["masks"].nbytes), "prepare_s": t_prep,
                     "seconds": time.perf_counter() - t0,
                     "one_message_max_pairs": int((protocol.MAX_BYTES - 4096) // h.row_bytes(cfg.data.size))}
        del arr
        np.random.default_rng(0)  # (nothing held between hospitals)
    return out


def phase_stage2(a) -> dict:
    """The coordinator: check every chunk, train the mapping network streaming rows from the chunk files."""
    from ppcmi.server.inbox import open_sets
    from ppcmi.server.stages import train_mappings

    cfg = _config(a)
    t0 = time.perf_counter()
    sets = open_sets(sorted((a.out / "wire").iterdir()))
    t_check = time.perf_counter() - t0
    peak_check = _peak_mib()
    t1 = time.perf_counter()
    trained = train_mappings(sets, cfg.mapping, a.out / "server", seed=cfg.seed, reuse=False, progress=a.progress)
    fit = trained.fits[""]
    meta = json.loads((a.out / "server" / "config.json").read_text())
    return {"check_s": t_check, "peak_after_check_mib": peak_check, "train_s": time.perf_counter() - t1,
            "epochs": len(fit.history), "epoch_s": fit.seconds / max(len(fit.history), 1), "history": fit.history,
            "rows": sum(s.n for s in sets), "n_train_rows": meta["n_train_rows"], "n_val_rows": meta["n_val_rows"],
            "chunks": {s.client: s.chunks for s in sets}, "bytes": {s.client: s.nbytes for s in sets},
            "float32_bytes_in_one_array": sum(s.n for s in sets) * sum(
                4 * int(__import__("numpy").prod(v)) for v in sets[0].shapes.values())}


PHASES = {"train": phase_train, "encode": phase_encode, "stage2": phase_stage2}


def run_phase(a) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    res = PHASES[a.phase](a)
    res = {"result": res, "wall_s": time.perf_counter() - t0, "peak_rss_mib": _peak_mib(), "rss_timeline_mib": sampler.stop(),
           "threads": torch.get_num_threads(), "load_average_1min_at_end": os.getloadavg()[0]}
    (a.out / f"phase-{a.phase}.json").write_text(json.dumps(res, indent=2))


def _table(rep: dict) -> str:
    enc, s2 = rep["phases"]["encode"], rep["phases"]["stage2"]
    lines = [f"# Scale: PSFHS at {rep['size']}x{rep['size']}, published autoencoder widths, {rep['copies']} copies per pair"
             f"{' (quick mode)' if rep['quick'] else ''}", "",
             f"Machine: {rep['cpu']}, {rep['cores']} cores, torch threads {rep['threads']}; chunk target "
             f"{rep['chunk_bytes'] / 2**20:.0f} MiB; message limit {rep['max_bytes'] / 2**20:.0f} MiB; load average at the end of "
             f"each phase {', '.join(str(round(p.get('load_average_1min_at_end', float('nan')), 1)) for p in rep['phases'].values())} "
             f"(other work on the machine slows every phase).", "",
             "| hospital | cases | pairs sent | bytes | chunks | pairs per chunk | one message could carry | encode s |",
             "|---|---|---|---|---|---|---|---|"]
    for h, r in enc["result"].items():
        lines.append(f"| {h} | {r['cases']} | {r['pairs']} | {r['bytes'] / 2**20:.1f} MiB | {r['chunks']} | {r['rows_per_chunk']} | "
                     f"{r['one_message_max_pairs']} pairs | {r['seconds']:.0f} |")
    lines += ["", "| phase | wall s | peak RSS | note |", "|---|---|---|---|"]
    tr = rep["phases"].get("train")
    if tr:
        lines.append(f"| stage 1 (autoencoders, {rep['ae_epochs']} epoch(s)) | {tr['wall_s']:.0f} | {tr['peak_rss_mib']:.0f} MiB | |")
    lines.append(f"| encoding (all hospitals) | {enc['wall_s']:.0f} | {enc['peak_rss_mib']:.0f} MiB | "
                 f"inputs held: {sum(r['input_bytes'] for r in enc['result'].values()) / 2**20:.0f} MiB |")
    r2 = s2["result"]
    lines.append(f"| stage 2 (check {r2['check_s']:.0f} s, {r2['epochs']} epoch(s) at {r2['epoch_s']:.0f} s) | {s2['wall_s']:.0f} | "
                 f"{s2['peak_rss_mib']:.0f} MiB | every latent in one float32 array would take "
                 f"{r2['float32_bytes_in_one_array'] / 2**20:.0f} MiB |")
    lines += ["", rep["note"], ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "psfhs")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/scale or runs/scale-quick)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--ae-epochs", type=int, default=1)
    p.add_argument("--map-epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="at most this many training cases per hospital (0: all)")
    p.add_argument("--chunk-bytes", type=int, default=None, help="chunk target (default ppcmi.protocol.CHUNK_BYTES)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 cases, 1 epoch each stage, 8 MiB chunks: a few minutes")
    p.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args()
    from ppcmi import protocol
    from ppcmi.experiment import machine

    if a.quick:
        a.limit = a.limit or 16
        a.chunk_bytes = a.chunk_bytes or 8 * 2**20
    a.chunk_bytes = a.chunk_bytes or protocol.CHUNK_BYTES
    a.out = a.out or ROOT / "runs" / ("scale-quick" if a.quick else "scale")
    if a.phase:
        return run_phase(a)
    if not (a.data / "images").is_dir():
        raise SystemExit(f"error: {a.data}: no images/ folder (PSFHS is read from ../shared/data/psfhs)")
    if (a.out / "wire").exists() or (a.out / "server").exists():
        raise SystemExit(f"error: {a.out}: holds an earlier measurement's wire/ or server/; remove them or choose --out")
    a.out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(Path(__file__).resolve()), "--data", str(a.data), "--out", str(a.out), "--clients", str(a.clients),
            "--copies", str(a.copies), "--ae-epochs", str(a.ae_epochs), "--map-epochs", str(a.map_epochs), "--limit", str(a.limit),
            "--chunk-bytes", str(a.chunk_bytes), "--threads", str(a.threads)]
    phases = {}
    t0 = time.perf_counter()
    for ph in PHASES:
        print(f"[scale] {ph} ...", flush=True)
        subprocess.run(args + ["--phase", ph], check=True)
        phases[ph] = json.loads((a.out / f"phase-{ph}.json").read_text())
        print(f"[scale] {ph}: {phases[ph]['wall_s']:.0f} s, peak RSS {phases[ph]['peak_rss_mib']:.0f} MiB", flush=True)
    import torch

    rep = {"quick": a.quick, "size": 256, "copies": a.copies, "clients": a.clients, "limit": a.limit, "ae_epochs": a.ae_epochs,
           "map_epochs": a.map_epochs, "chunk_bytes": a.chunk_bytes, "max_bytes": protocol.MAX_BYTES, "cpu": machine()["cpu"],
           "cores": os.cpu_count(), "threads": phases["stage2"]["threads"], "torch": torch.__version__,
           "total_s": time.perf_counter() - t0, "phases": phases}
    enc = phases["encode"]["result"]
    pairs = sum(r["pairs"] for r in enc.values())
    epoch_s = phases["stage2"]["result"]["epoch_s"]
    rep["note"] = (f"Stage 2 epoch time on {pairs} pairs: {epoch_s:.0f} s, about {epoch_s / max(pairs, 1) * 1000:.0f} ms per pair; "
                   f"peak RSS is the phase process's maximum resident set (ru_maxrss), page cache not included.")
    tag = "scale-quick" if a.quick else "scale"
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"{tag}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (a.results / f"{tag}.md").write_text(_table(rep))
    print(_table(rep))


if __name__ == "__main__":
    main()
