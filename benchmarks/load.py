"""Load on the HTTPS inference service: 1, 4 and 16 concurrent hospitals over loopback mutual TLS.

In a temporary folder it builds a mapping model at the package's CPU widths for 256×256 inputs
(full-width autoencoder latents) with seeded, untrained weights and one adapter pair per
hospital (the cost of a query does not depend on the weights' values, as in latency.py), a CA,
the server certificate and one client certificate per hospital. It starts the real
``ppcmi server serve`` in its own process, then, for each concurrency level, runs one thread
per hospital, each with its own certificate and keep-alive connection, sending ``--requests``
queries of batch 1 back to back (closed loop) after ``--warmup`` untimed ones. A query is the
protocol bytes of keyed image latents drawn from a seeded generator (the server cannot tell
them from encoded images; the hospitals' encoding is left out so that the load generator takes
as little CPU as possible from the server on the same machine).

Reported per level: throughput (images/s over the level's wall time), p50/p99/max latency per
request as the hospital sees it (TLS, HTTP, parse, map, serialise), error count, the server
process's resident memory after the level and its peak (VmRSS, VmHWM from /proc), and the
machine. Writes ``load.json`` and ``load.md`` into --out. Target: at 4 hospitals,
>= 20 images/s and p99 <= 200 ms on 2 cores.

    .venv/bin/python benchmarks/load.py                 # the measurement -> benchmarks/results/load.{json,md}
    .venv/bin/python benchmarks/load.py --quick         # smoke check (3 requests each) -> runs/load-quick/
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ppcmi import certs, protocol
from ppcmi.experiment import machine, untrained_model, wait_for_service
from ppcmi.client.remote import tls_context
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.models import AEConfig, MappingConfig, count_parameters

TARGET = {"hospitals": 4, "min_images_per_s": 20.0, "max_p99_ms": 200.0}


def build_model(root: Path, hospitals: list[str], size: int, n_classes: int = 3) -> tuple[Path, dict, int]:
    """A server model folder (CPU widths, seeded untrained weights) serving ``hospitals``.

    Returns the folder, the image latent shapes and the parameters of one hospital's path
    (shared core plus its adapters)."""
    shapes = {kind: AEConfig(in_channels=cin, width=1.0).latent_shapes(size) for kind, cin in (("image", 1), ("mask", n_classes))}
    model, net = untrained_model(root, hospitals, shapes, MappingConfig())
    params = count_parameters(net.cores) + count_parameters(net.in_adapters[hospitals[0]]) + count_parameters(net.out_adapters[hospitals[0]])
    return model, shapes["image"], params


def query_bytes(name: str, shapes: dict, batch: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {f"zt_img_{s}": rng.standard_normal((batch, *shape), dtype=np.float32) for s, shape in shapes.items()}
    return protocol.encode(protocol.LatentBatch("query", name, arrays))


def rss_mb(pid: int) -> dict:
    """Current and peak resident memory of a process, from /proc (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    return out


def start_server(model: Path, tls: Path, port: int, concurrency: int, probe_ctx) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ppcmi.cli", "server", "serve", "--model", str(model), "--cert", str(tls / "server.pem"),
           "--key", str(tls / "server.key"), "--client-ca", str(tls / "ca.pem"), "--port", str(port),
           "--concurrency", str(concurrency), "--max-bytes", str(64 * 1024 * 1024), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_for_service(proc, f"https://127.0.0.1:{port}", probe_ctx, lambda: proc.stderr.read().decode())


def run_level(url: str, contexts: dict, queries: dict, n_hospitals: int, requests: int, warmup: int) -> dict:
    """One thread per hospital, each with its own connection: warm-up, a barrier, then timed requests."""
    import httpx

    names = list(queries)[:n_hospitals]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_hospitals + 1)

    def hospital(name: str) -> None:
        mine, errs = [], []
        with httpx.Client(base_url=url, verify=contexts[name], timeout=60) as c:
            def post() -> None:
                r = c.post("/v1/map", content=queries[name], headers={"content-type": "application/octet-stream"})
                if r.status_code != 200:
                    errs.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
            try:
                for _ in range(warmup):
                    post()
                protocol.decode(c.post("/v1/map", content=queries[name],
                                       headers={"content-type": "application/octet-stream"}).content)  # a well-formed reply
            except Exception as e:  # counted, not raised: the level still reports
                errs.append(f"{name}: warm-up: {type(e).__name__}: {e}")
            barrier.wait()
            for _ in range(requests):
                t = time.perf_counter()
                try:
                    post()
                except Exception as e:
                    errs.append(f"{name}: {type(e).__name__}: {e}")
                mine.append((time.perf_counter() - t) * 1000)
        with lock:
            latencies.extend(mine)
            errors.extend(errs)

    threads = [threading.Thread(target=hospital, args=(n,)) for n in names]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"hospitals": n_hospitals, "requests_per_hospital": requests, "images": n_hospitals * requests, "wall_s": wall,
            "throughput_images_per_s": n_hospitals * requests / wall,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "mean": float(lat.mean()), "max": float(lat.max())},
            "errors": len(errors), "error_samples": errors[:5]}


def markdown(res: dict) -> str:
    m, c = res["machine"], res["config"]
    lines = [f"Machine: {m['node']} ({m['cpu']}, {m['logical_cores']} logical cores), torch {m['torch']}, Python {m['python']}. "
             f"Service and load generator on the same machine over loopback mutual TLS (TLS 1.3); input {c['size']}×{c['size']}, "
             f"batch {c['batch']}, query {c['query_bytes']:,} B, reply {c['reply_bytes']:,} B; mapping network at CPU widths "
             f"({c['mapping_params'] / 1e6:.2f} M parameters per hospital path, seeded untrained weights); server --concurrency {c['server_concurrency']}; "
             f"{c['requests']} timed requests per hospital after {c['warmup']} warm-up ones.", "",
             "| hospitals | images | throughput img/s | p50 ms | p99 ms | max ms | errors | server RSS MB (peak) |",
             "|---|---|---|---|---|---|---|---|"]
    for lv in res["levels"]:
        lat = lv["latency_ms"]
        lines.append(f"| {lv['hospitals']} | {lv['images']} | {lv['throughput_images_per_s']:.1f} | {lat['p50']:.1f} | {lat['p99']:.1f} "
                     f"| {lat['max']:.1f} | {lv['errors']} | {lv['server_rss_mb']:.0f} ({lv['server_peak_rss_mb']:.0f}) |")
    t = res["target"]
    lines += ["", f"Target at {t['hospitals']} hospitals: >= {t['min_images_per_s']:.0f} images/s and p99 <= {t['max_p99_ms']:.0f} ms: "
              + ("met." if t.get("met") else "not met." if t.get("met") is False else "level not measured.")]
    return "\n".join(lines) + "\n"


def run(out: Path, levels: list[int], requests: int, warmup: int, size: int, batch: int, concurrency: int, port: int) -> dict:
    hospitals = [f"hospital{i:02d}" for i in range(1, max(levels) + 1)]
    with tempfile.TemporaryDirectory(prefix="ppcmi-load-") as tmp:
        root = Path(tmp)
        model, shapes, params = build_model(root, hospitals, size)
        tls = root / "tls"
        certs.init_ca(tls)
        contexts = {}
        for h in hospitals:
            cert, key = certs.issue_client(h, tls)
            contexts[h] = tls_context(cert, key, tls / "ca.pem")
        queries = {h: query_bytes(h, shapes, batch, seed=i) for i, h in enumerate(hospitals)}
        proc = start_server(model, tls, port, concurrency, contexts[hospitals[0]])
        try:
            url = f"https://127.0.0.1:{port}"
            import httpx

            with httpx.Client(base_url=url, verify=contexts[hospitals[0]], timeout=60) as c:
                reply_bytes = len(c.post("/v1/map", content=queries[hospitals[0]], headers={"content-type": "application/octet-stream"}).content)
            results = []
            for n in levels:
                lv = run_level(url, contexts, queries, n, requests, warmup)
                mem = rss_mb(proc.pid)
                lv.update({"server_rss_mb": mem["rss_mb"], "server_peak_rss_mb": mem["peak_rss_mb"]})
                lat = lv["latency_ms"]
                print(f"{n:2d} hospitals: {lv['throughput_images_per_s']:.1f} images/s, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
                      f"errors {lv['errors']}, server RSS {mem['rss_mb']:.0f} MB (peak {mem['peak_rss_mb']:.0f})", flush=True)
                results.append(lv)
        finally:
            proc.terminate()
            proc.wait(30)
    target = dict(TARGET)
    at = [lv for lv in results if lv["hospitals"] == TARGET["hospitals"]]
    if at:
        target["met"] = bool(at[0]["throughput_images_per_s"] >= TARGET["min_images_per_s"]
                             and at[0]["latency_ms"]["p99"] <= TARGET["max_p99_ms"] and at[0]["errors"] == 0)
    res = {"machine": {**machine(), "node": platform.node()},
           "config": {"size": size, "batch": batch, "requests": requests, "warmup": warmup, "server_concurrency": concurrency,
                      "query_bytes": len(next(iter(queries.values()))), "reply_bytes": reply_bytes, "mapping_params": params,
                      "weights": "seeded, untrained", "transport": "HTTPS/1.1, mutual TLS, loopback"},
           "levels": results, "target": target}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "load.json", res)
    atomic_write_text(out / "load.md", markdown(res))
    print(f"results: {out / 'load.json'}, {out / 'load.md'}")
    return res


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; runs/load-quick with --quick)")
    ap.add_argument("--levels", default="1,4,16", help="concurrent hospitals per level, comma-separated")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per hospital and level")
    ap.add_argument("--warmup", type=int, default=3, help="untimed requests per hospital before each level")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1, help="the service's --concurrency (queries mapped at once)")
    ap.add_argument("--port", type=int, default=0, help="loopback port for the service (default: a free one)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 3 requests per hospital, 1 warm-up")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.warmup = 3, 1
    out = a.out or (Path("runs/load-quick") if a.quick else Path("benchmarks/results"))
    res = run(out, [int(x) for x in a.levels.split(",")], a.requests, a.warmup, a.size, a.batch, a.concurrency, a.port or _free_port())
    if any(lv["errors"] for lv in res["levels"]):
        print("errors: " + "; ".join(e for lv in res["levels"] for e in lv["error_samples"]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
