"""Seconds per training step of each network at a few working sizes: the table the planner's cost model uses.

For the default widths (``Config()``: autoencoder width 1.0, the default mapping widths), batch 16, it runs
the package's own training code on random inputs (the time does not depend on the values): ``fit`` for an
image and a mask autoencoder with augmentation (as a plan sets it) and ``train_mappings`` for the mapping
network on a keyed training message, each on 160 rows (128 training, 32 validation: 8 steps per epoch), once
for 1 epoch and once for 1 + ``--epochs``. The difference divided by the extra steps is the cost of one step
with its share of validation, augmentation and per-epoch checkpoints, without the one-off setup. It counts each
step's FLOPs with ``ppcmi.server.plan.training_gflop`` and writes ``plan_costs.json`` and ``plan_costs.md``
into ``--out``; ``ppcmi.server.plan.COST_TABLE`` holds the numbers, with the CPU they were measured on.

    .venv/bin/python benchmarks/plan_costs.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ppcmi.augment import batch_augmenter
from ppcmi.client.site import one_hot
from ppcmi.config import Config, MappingTrainConfig
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.models import AEConfig, Autoencoder
from ppcmi.protocol import LatentBatch
from ppcmi.server.plan import training_gflop
from ppcmi.server.stages import train_mappings
from ppcmi.training import FitConfig, bce_dice_loss, fit

ROWS, TRAIN, STEPS = 160, 128, 8  # rows per run, of which training rows, and so steps per epoch at batch 16


def _ae(x: torch.Tensor, kind: str, epochs: int, width: float) -> float:
    model = Autoencoder(AEConfig(in_channels=x.shape[1], width=width))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        fit(model, lambda m, b: bce_dice_loss(m(b[0]), b[0]), [x[:TRAIN]], [x[TRAIN:]],
            FitConfig(epochs=epochs, batch_size=16, patience=epochs, seed=0), d, progress=False, augment=batch_augmenter([kind]))
        return time.perf_counter() - t0


def _mapping(msg: LatentBatch, epochs: int) -> float:
    cfg = MappingTrainConfig(epochs=epochs, patience=epochs, batch_size=16)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train_mappings([msg], cfg, d, seed=0, progress=False)
        return time.perf_counter() - t0


def measure(size: int, extra: int, n_classes: int = 2) -> dict[str, float]:
    """Seconds per training step (batch 16) of each network at ``size``."""
    cfg = Config()
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(ROWS, 1, size, size, generator=gen)
    msk = one_hot(torch.randint(0, n_classes, (ROWS, size, size), generator=gen), n_classes)
    shapes = AEConfig(width=cfg.autoencoder.width).latent_shapes(size)
    rng = np.random.default_rng(0)
    arrays = {f"zt_{p}_{s}": rng.standard_normal((ROWS, *shp)).astype(np.float32) for p in ("img", "msk") for s, shp in shapes.items()}
    msg = LatentBatch(kind="train", client="hospital1", arrays=arrays)
    out = {}
    for name, run in (("image_ae", lambda e: _ae(img, "image", e, cfg.autoencoder.width)),
                      ("mask_ae", lambda e: _ae(msk, "mask", e, cfg.autoencoder.width)),
                      ("mapping", lambda e: _mapping(msg, e))):
        out[name] = max(0.0, run(1 + extra) - run(1)) / (extra * STEPS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--epochs", type=int, default=2, help="extra epochs of the longer run")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {}
    for size in (int(s) for s in args.sizes.split(",")):
        sec = measure(size, args.epochs)
        g = training_gflop(size, Config(), 2)
        rows[size] = {k: {"seconds": round(sec[k], 4), "gflop": round(g[k], 3)} for k in sec}
        print(size, rows[size], flush=True)
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    meta = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": 16, "rows": ROWS,
            "extra_epochs": args.epochs, "load_average_1min": round(os.getloadavg()[0], 2)}  # other work on the machine
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "plan_costs.json"
    if path.exists():  # sizes measured in separate runs land in one table
        old = json.loads(path.read_text())
        rows = {**{int(k): v for k, v in old["sizes"].items()}, **rows}
        meta = {**meta, "earlier_runs": old["meta"]}
    rows = dict(sorted(rows.items()))
    atomic_write_json(path, {"meta": meta, "sizes": rows})
    md = [f"Seconds per training step (batch 16, validation, augmentation and checkpoints included), default widths "
          f"({cpu}, {meta['threads']} threads, torch {meta['torch']})", "",
          "| size | image AE s | mask AE s | mapping s | image AE GFLOP | mask AE GFLOP | mapping GFLOP |", "|---|---|---|---|---|---|---|"]
    for size, r in rows.items():
        md.append(f"| {size} | {r['image_ae']['seconds']:.3f} | {r['mask_ae']['seconds']:.3f} | {r['mapping']['seconds']:.3f} | "
                  f"{r['image_ae']['gflop']:.2f} | {r['mask_ae']['gflop']:.2f} | {r['mapping']['gflop']:.2f} |")
    atomic_write_text(args.out / "plan_costs.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
