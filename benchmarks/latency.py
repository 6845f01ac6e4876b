"""Inference latency per stage, payload, parameters and FLOPs per network.

For each configuration (published widths, CPU widths, a compact one) it builds a hospital site
and a server model folder with seeded, untrained weights (latency and FLOPs do not depend on
the weights' values) and times the real code path, protocol bytes included:

    hospital encode + KLT + serialise | server parse + map + serialise | hospital parse + inverse KLT + decode

at batch 1 and batch 16, median of --reps runs after a warm-up, for several execution variants
(contiguous NCHW tensors, channels-last memory format, which is the package's default, and
bfloat16 autocast). It writes
``latency.json`` and ``latency.md`` into --out.

    .venv/bin/python benchmarks/latency.py --out benchmarks/results --configs cpu,compact --tag cpu
    .venv/bin/python benchmarks/latency.py --out benchmarks/results --configs published --tag published
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ppcmi.experiment import machine
from ppcmi.client.keys import key_path, keygen
from ppcmi.client.site import Hospital
from ppcmi.config import DataConfig
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.models import AEConfig, Autoencoder, MappingConfig, MappingNet, count_parameters
from ppcmi.server.mapping import MappingServer
from ppcmi.experiment import measure_latency
from ppcmi.training import save_weights, seeded_init

CONFIGS = {
    # name: (autoencoder width, mapping widths, wire dtype)
    "published": (1.0, MappingConfig.published(), "float32"),
    "cpu": (1.0, MappingConfig(), "float32"),
    "compact": (0.5, MappingConfig(widen=(16, 32, 64), mid=(64, 128), down=(32, 16, 8)), "float16"),
}
VARIANTS = ("contiguous", "channels_last", "bf16_autocast")  # all under torch.inference_mode



def build(root: Path, width: float, mcfg: MappingConfig, size: int, n_classes: int = 3) -> tuple[Hospital, MappingServer]:
    """A site folder and a server model folder with seeded untrained weights and a fresh key."""
    site, server = root / "site", root / "server"
    site.mkdir(parents=True)
    keygen(key_path(site))
    atomic_write_json(site / "site.json", {"site": "bench", "n_classes": n_classes, "klt": True,
                                           "data": asdict(DataConfig(size=size))})
    shapes = {}
    for i, (kind, cin) in enumerate((("image", 1), ("mask", n_classes))):
        cfg = AEConfig(in_channels=cin, width=width)
        save_weights(seeded_init(lambda: Autoencoder(cfg), i), site / f"{kind}_ae" / "model.safetensors")
        atomic_write_json(site / f"{kind}_ae" / "config.json", {"autoencoder": asdict(cfg)})
        shapes[kind] = cfg.latent_shapes(size)
    net = seeded_init(lambda: MappingNet({s: v[0] for s, v in shapes["image"].items()},
                                         {s: v[0] for s, v in shapes["mask"].items()}, ["bench"], mcfg), 2)
    save_weights(net, server / "mapping.safetensors")
    atomic_write_json(server / "config.json", {"mapping": asdict(mcfg), "clients": ["bench"],
                                               "image_shapes": shapes["image"], "mask_shapes": shapes["mask"]})
    return Hospital(site), MappingServer(server)


def flops(hospital: Hospital, server: MappingServer, size: int) -> dict:
    x = torch.rand(1, 1, size, size)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            z = hospital.models["image"].encode(x)
        out["image_encoder"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            y = server.model(z, "bench")
        out["mapping"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            hospital.models["mask"].decode(y)
        out["mask_decoder"] = fc.get_total_flops()
    return out


@contextlib.contextmanager
def variant(name: str, hospital: Hospital, server: MappingServer):
    """contiguous: NCHW memory format; channels_last: the default of Hospital and MappingServer;
    bf16_autocast: channels-last under CPU autocast to bfloat16."""
    modules = [hospital.models["image"], hospital.models["mask"], server.model]
    fmt = torch.contiguous_format if name == "contiguous" else torch.channels_last
    for m in modules:
        m.to(memory_format=fmt)
    try:
        if name == "bf16_autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        for m in modules:
            m.to(memory_format=torch.channels_last)


def run(out: Path, reps: int, size: int, configs: list[str], batches: list[int], tag: str = "") -> dict:
    res = {"machine": machine(), "size": size, "reps": reps, "weights": "seeded, untrained", "configs": {}}
    rng = np.random.default_rng(0)
    images = rng.random((16, 1, size, size), dtype=np.float32)
    for name in configs:
        width, mcfg, wire_dtype = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            h, srv = build(Path(tmp), width, mcfg, size)
            values = sum(int(np.prod(s)) for s in h.latent_shapes().values())
            entry = {
                "autoencoder_width": width, "mapping": asdict(mcfg), "wire_dtype": wire_dtype,
                "params": {"image_autoencoder": count_parameters(h.models["image"]),
                           "mask_autoencoder": count_parameters(h.models["mask"]), "mapping": count_parameters(srv.model)},
                "flops_per_image": flops(h, srv, size),
                "payload_per_image": {"values": values, "float32_bytes": 4 * values, "float16_bytes": 2 * values},
                "latency_ms": {},
            }
            for v in VARIANTS:
                entry["latency_ms"][v] = {}
                for b in batches:
                    with variant(v, h, srv):
                        t0 = time.perf_counter()
                        lat = measure_latency(h, srv, images, reps=reps, batch=b)
                    lat["per_image_total"] = lat["total"] / b
                    entry["latency_ms"][v][str(b)] = lat
                    print(f"{name:10s} {v:15s} batch {b:2d}: encode {lat['encode']:.1f} map {lat['map']:.1f} "
                          f"decode {lat['decode']:.1f} total {lat['total']:.1f} ms ({time.perf_counter() - t0:.0f} s)", flush=True)
            res["configs"][name] = entry
    out.mkdir(parents=True, exist_ok=True)
    stem = f"latency-{tag}" if tag else "latency"
    atomic_write_json(out / f"{stem}.json", res)
    atomic_write_text(out / f"{stem}.md", markdown(res))
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} with {m['torch_threads']} threads. "
             f"Input {res['size']}×{res['size']}; median of {res['reps']} runs after a warm-up; {res['weights']} weights.", "",
             "| config | params image AE / mask AE / mapping | GFLOPs encode / map / decode | payload per image per direction |",
             "|---|---|---|---|"]
    for name, e in res["configs"].items():
        p, f, pl = e["params"], e["flops_per_image"], e["payload_per_image"]
        dt = e["wire_dtype"]
        lines.append(f"| {name} | {p['image_autoencoder'] / 1e6:.2f} M / {p['mask_autoencoder'] / 1e6:.2f} M / {p['mapping'] / 1e6:.2f} M "
                     f"| {f['image_encoder'] / 1e9:.2f} / {f['mapping'] / 1e9:.2f} / {f['mask_decoder'] / 1e9:.2f} "
                     f"| {pl[dt + '_bytes']:,} B ({dt}; {pl['values']:,} values) |")
    lines += ["", "| config | variant | batch | encode + KLT ms | map ms | inverse KLT + decode ms | total ms | per image ms |",
              "|---|---|---|---|---|---|---|---|"]
    for name, e in res["configs"].items():
        for v, by_batch in e["latency_ms"].items():
            for b, lat in by_batch.items():
                lines.append(f"| {name} | {v} | {b} | {lat['encode']:.1f} | {lat['map']:.1f} | {lat['decode']:.1f} | "
                             f"{lat['total']:.1f} | {lat['per_image_total']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--reps", type=int, default=50, help="timed runs per measurement (median reported)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tag", default="", help="suffix of the output files (latency-TAG.json)")
    a = ap.parse_args()
    run(a.out, a.reps, a.size, a.configs.split(","), [int(b) for b in a.batches.split(",")], a.tag)


if __name__ == "__main__":
    main()
