"""Seconds per training step of each network at a few working sizes: the table the planner's cost model uses.

For the default widths (``Config()``: autoencoder width 1.0, the default mapping widths), batch 16, it times
``--reps`` bare training steps (forward, loss, backward, Adam) after two warm-up steps, on random inputs (the
time does not depend on the values; the U-Net is the centralized reference of demo and bench), keeps the fastest and the median, and counts each step's FLOPs with
``ppcmi.server.plan.training_gflop``. It writes ``plan_costs.json`` (with the CPU and the load average, since
other work on the machine slows every step) and ``plan_costs.md`` into ``--out``; sizes measured in separate
runs are merged. ``ppcmi.server.plan.COST_TABLE`` holds the numbers; what the training loop adds around a bare
step (augmentation, validation, checkpoints) is its ``OVERHEAD``.

    .venv/bin/python benchmarks/plan_costs.py --out benchmarks/results
    .venv/bin/python benchmarks/plan_costs.py --out benchmarks/results --threads 1   # -> plan_costs-1thread.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ppcmi.config import Config
from ppcmi.experiment import machine
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.models import AEConfig, Autoencoder, MappingConfig, MappingNet, make_unet
from ppcmi.server.plan import training_gflop, unet_gflop
from ppcmi.training import bce_dice_loss


def _time(step, reps: int) -> tuple[float, float]:
    """The fastest of ``reps`` steps after two warm-up steps: on a machine shared with other work, the step least
    disturbed by it estimates an idle machine (the median is reported too)."""
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(min(times)), float(sorted(times)[len(times) // 2])


NETWORKS = ("image_ae", "mask_ae", "mapping", "unet")


def measure(size: int, reps: int, n_classes: int = 2, batch: int = 16, networks=NETWORKS) -> dict[str, tuple[float, float]]:
    cfg = Config()
    gen = torch.Generator().manual_seed(0)
    out = {}
    if "unet" in networks:  # the centralized reference of demo and bench, with its loss
        from monai.losses import DiceCELoss

        unet = make_unet(1, n_classes).train()
        uopt = torch.optim.Adam(unet.parameters(), lr=1e-3)
        ux = torch.rand(batch, 1, size, size, generator=gen)
        uy = torch.randint(0, n_classes, (batch, 1, size, size), generator=gen)
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

        def unet_step():
            uopt.zero_grad(set_to_none=True)
            dice_ce(unet(ux), uy).backward()
            uopt.step()

        out["unet"] = _time(unet_step, reps)
    for name, cin in (("image_ae", 1), ("mask_ae", n_classes)):
        if name not in networks:
            continue
        model = Autoencoder(AEConfig(in_channels=cin, width=cfg.autoencoder.width)).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(batch, cin, size, size, generator=gen)

        def step(model=model, opt=opt, x=x):
            opt.zero_grad(set_to_none=True)
            bce_dice_loss(model(x), x).backward()
            opt.step()

        out[name] = _time(step, reps)
    if "mapping" not in networks:
        return out
    shapes = AEConfig(width=cfg.autoencoder.width).latent_shapes(size)
    ch = {s: c for s, (c, _, _) in shapes.items()}
    net = MappingNet(ch, ch, ["h"], MappingConfig()).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    z = {s: torch.randn(batch, *shp, generator=gen) for s, shp in shapes.items()}

    def map_step():
        opt.zero_grad(set_to_none=True)
        pred = net(z, "h")
        sum(torch.nn.functional.mse_loss(pred[s], z[s]) for s in z).backward()
        opt.step()

    out["mapping"] = _time(map_step, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--networks", default=",".join(NETWORKS),
                    help="which steps to time (comma-separated; the others keep the values an earlier run wrote)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, every core); other than 2, results go to plan_costs-Nthread.{json,md} "
                         "(the planner's table for a training that gets N threads, e.g. the demo's two concurrent trainings)")
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads: must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    stem = "plan_costs" if torch.get_num_threads() == 2 else f"plan_costs-{torch.get_num_threads()}thread"
    rows = {}
    for size in (int(s) for s in args.sizes.split(",")):
        networks = tuple(n for n in args.networks.split(",") if n)
        if not networks or set(networks) - set(NETWORKS):
            ap.error(f"--networks: a comma-separated subset of {','.join(NETWORKS)}, got {args.networks!r}")
        sec = measure(size, args.reps, networks=networks)
        g = {**training_gflop(size, Config(), 2), "unet": unet_gflop(size, 2)}
        rows[size] = {k: {"seconds": round(sec[k][0], 4), "median_s": round(sec[k][1], 4), "gflop": round(g[k], 3)} for k in sec}
        print(size, rows[size], flush=True)
    meta = {"cpu": machine()["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": 16, "reps": args.reps,
            "load_average_1min": round(os.getloadavg()[0], 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "sizes" in old:  # sizes (and networks) measured in separate runs land in one table (plan_costs.json was merged by hand)
        earlier = {int(k): v for k, v in old["sizes"].items()}
        rows = {**earlier, **{k: {**earlier.get(k, {}), **v} for k, v in rows.items()}}
        meta = {**meta, "earlier_runs": old["meta"]}
    elif old:  # the hand-merged form: kept whole inside the new file, never dropped
        meta = {**meta, "earlier_file": old}
    rows = dict(sorted(rows.items()))
    atomic_write_json(path, {"meta": meta, "sizes": rows})
    md = [f"Seconds per bare training step (fastest of {args.reps}), batch 16, default widths ({meta['cpu']}, {meta['threads']} threads, torch {meta['torch']})", "",
          "| size | image AE s | mask AE s | mapping s | U-Net s | image AE GFLOP | mask AE GFLOP | mapping GFLOP | U-Net GFLOP |",
          "|---|---|---|---|---|---|---|---|---|"]
    cell = lambda r, k, f: format(r[k][f], ".3f" if f == "seconds" else ".2f") if k in r else ""  # noqa: E731
    for size, r in rows.items():
        md.append(f"| {size} | " + " | ".join(cell(r, k, "seconds") for k in NETWORKS) + " | "
                  + " | ".join(cell(r, k, "gflop") for k in NETWORKS) + " |")
    atomic_write_text(args.out / f"{stem}.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
