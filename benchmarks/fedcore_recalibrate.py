"""Rewrite a finished federated-core run's local models as the current final step writes them, and score them again.

A ``ppcmi_federated`` run made before the hospitals re-estimated BatchNorm statistics on their own pairs
(:func:`ppcmi.training.recalibrate_batchnorm`, called by :func:`ppcmi.client.fedcore.save_local_model`) kept the
global average of those statistics in each local model. The rounds do not depend on that final step, so this script
redoes only it: each hospital's local model from the run's own final global core (``global.safetensors``), its own
adapters and frames and its cached pairs, exactly as the final ``evaluate`` message now does at the SuperNode; then it
scores every hospital's test predictions as the bench does (:func:`ppcmi.flower.fedcore.score_local_models`, into
``RUN/eval-recalibrated``). The previous local models move to ``SITE/fedcore/model-before-recalibration`` and
``summary.json`` keeps the previous scores under ``before_recalibration``.

Usage::

    PYTHONPATH=src python benchmarks/fedcore_recalibrate.py --run runs/bench-sunnybrook_lv/ppcmi_federated
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ppcmi.client import fedcore  # noqa: E402
from ppcmi.config import from_dict  # noqa: E402
from ppcmi.fileio import atomic_write_json  # noqa: E402
from ppcmi.flower.fedcore import score_local_models  # noqa: E402
from ppcmi.simulate import plan  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished ppcmi_federated run folder (summary.json, federation/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    if "before_recalibration" in summary:
        raise SystemExit(f"{run}: already recalibrated")
    raw = json.loads((run / "federation" / "config.json").read_text())
    data = raw.pop("data_dir")
    cfg = from_dict(raw)
    pl = plan(cfg, data)
    server_dir = Path(summary["federated"]["server_dir"])
    if not server_dir.is_absolute() and not server_dir.exists():
        server_dir = run / "federation" / "coordinator" / "server" / server_dir.name
    core = load_file(str(server_dir / "global.safetensors"))
    sites = {h: run / "federation" / "sites" / h / "site" for h in pl.hospitals}
    t0 = time.perf_counter()
    for h, site in sites.items():
        model = site / fedcore.FOLDER / "model"
        meta = json.loads((model / "config.json").read_text())
        keep = site / fedcore.FOLDER / "model-before-recalibration"
        shutil.move(str(model), str(keep))
        pairs = load_file(str(site / fedcore.FOLDER / "pairs.safetensors"))
        fedcore.save_local_model(core, pairs, cfg.mapping, site=h, site_dir=site, init_seed=cfg.seed,
                                 extra={k: meta[k] for k in ("rounds", "local_epochs") if k in meta})
        print(f"{h}: loss on its own pairs {fedcore.pairs_loss(keep, pairs, cfg.mapping, site=h, init_seed=cfg.seed):.4f} "
              f"with the averaged statistics, {fedcore.pairs_loss(model, pairs, cfg.mapping, site=h, init_seed=cfg.seed):.4f} "
              "with its own", flush=True)
    _, _, _, summ = score_local_models(cfg, pl, sites, run / "eval-recalibrated")
    before = {"summary": summary["summary"], "eval": "eval"}
    summary.update(summary=summ, before_recalibration=before, recalibrated_s=time.perf_counter() - t0)
    atomic_write_json(run / "summary.json", summary)
    print(f"Dice {before['summary']['fg_dice']['mean']:.4f} -> {summ['fg_dice']['mean']:.4f}")
    return summary


if __name__ == "__main__":
    main()
