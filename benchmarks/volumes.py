"""Whole-volume Dice of a finished ``ppcmi demo`` run on 3D data, from the models it saved (no training).

``ppcmi demo`` scores whole test volumes itself since ``metrics.volume_dice`` exists; this rescoring is for runs
made before. It reloads the run's configuration, deals the same split, lets every hospital segment every test
plane through protocol bytes with its own key and decoders and the run's mapping network
(:func:`ppcmi.simulate.infer_and_score`, the demo's path), predicts the same planes with the centralized U-Net's
best checkpoint (:func:`ppcmi.baselines.predict_unet`), and restacks each test volume's planes
(:func:`ppcmi.metrics.volume_dice`). It also recomputes the mean over planes, which must repeat the run's own
``summary.json``: a check that the reloaded models are the ones that made it. Writes NAME.volumes.{json,md}.

    .venv/bin/python benchmarks/volumes.py runs/planned-hippocampus --out benchmarks/results --name demo-planned-hippocampus
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from ppcmi.baselines import predict_unet
from ppcmi.client.site import Hospital
from ppcmi.config import from_dict
from ppcmi.demo import volume_results
from ppcmi.simulate import volume_table
from ppcmi.experiment import machine
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.metrics import evaluate_cases
from ppcmi.models import make_unet
from ppcmi.server.mapping import MappingServer
from ppcmi.simulate import infer_and_score, load_test, plan
from ppcmi.training import load_weights


def best_unet(run: Path) -> Path:
    """The centralized U-Net's best checkpoint in ``RUN/unet`` (the weights its predictions came from)."""
    found = sorted(run.glob("unet/best-*.safetensors"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    if not found:
        raise SystemExit(f"{run / 'unet'}: no best-N.safetensors (not a demo run folder?)")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished ppcmi demo run folder on 3D data")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default=None, help="results go to NAME.volumes.{json,md} (default: the run folder's name)")
    args = ap.parse_args()
    run = args.run
    raw = json.loads((run / "config.json").read_text())
    cfg = from_dict({k: v for k, v in raw.items() if k != "data_dir"})
    pl = plan(cfg, raw["data_dir"])
    if not any(c.volume is not None for c in pl.test):
        raise SystemExit(f"{run}: its test cases are 2D files, not planes of volumes")
    test = load_test(pl)
    names, k = list(pl.labels.names), pl.labels.n_classes
    hospitals = {h: Hospital(run / "sites" / h) for h in pl.hospitals}
    servers = {h: MappingServer(run / "server") for h in pl.hospitals}
    preds, rows = infer_and_score(hospitals, servers, test, pl.labels, noise=cfg.autoencoder.send_noise)
    unet = make_unet(int(test["images"].shape[1]), k)
    load_weights(unet, best_unet(run))
    upred = predict_unet(unet, test["images"], test["geometries"])
    urows = evaluate_cases(upred, test["native_masks"], test["case_ids"], k, spacings=test["native_spacings"], class_names=names)
    planes = {"ppcmi": float(np.mean([r["fg_dice"] for r in rows])), "unet_centralized": float(np.mean([r["fg_dice"] for r in urows]))}
    saved = json.loads((run / "summary.json").read_text())["methods"]
    vol = volume_results(preds, upred, test, pl)
    result = {"run": run.name, "machine": machine(), "n_test_planes": len(pl.test),
              "planes_mean_fg_dice": planes, "planes_mean_fg_dice_in_run_summary": {m: saved[m]["dice"] for m in planes},
              "volumes": {m: vol[m] for m in ("ppcmi", "unet_centralized")}, "per_volume": vol["per_volume"]}
    name = args.name or run.name
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{name}.volumes.json", result)
    md = (f"# Whole test volumes of `{run.name}`\n\n{result['volumes']['ppcmi']['n_volumes']} test volumes "
          f"({len(pl.test)} planes). Mean over planes, recomputed (in the run's summary): PPCMI-SF "
          f"{100 * planes['ppcmi']:.2f} ({100 * saved['ppcmi']['dice']:.2f}), U-Net {100 * planes['unet_centralized']:.2f} "
          f"({100 * saved['unet_centralized']['dice']:.2f}).\n\n"
          + volume_table({"PPCMI-SF": result["volumes"]["ppcmi"], "centralized U-Net": result["volumes"]["unet_centralized"]},
                         names) + "\n")
    atomic_write_text(args.out / f"{name}.volumes.md", md)
    print(md)


if __name__ == "__main__":
    main()
