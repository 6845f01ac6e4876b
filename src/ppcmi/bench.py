"""Benchmark harness (plays every role): PPCMI-SF, its ablations and U-Net baselines on one dataset.

Every method uses the same split, the same hospitals and the same epoch budget. PPCMI-SF variants
run through :func:`ppcmi.simulate.run_simulation` (protocol bytes and all); the U-Nets are the
privacy-agnostic references. Results go to ``OUT/<method>/`` and ``OUT/results.json`` +
``OUT/results.md``; a finished method is skipped when the harness is run again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .baselines import predict_unet, train_reference_unet
from .config import Config, DataConfig, load_config, to_dict
from .data import load_arrays
from .errors import PpcmiError
from .fileio import atomic_write_json, atomic_write_text
from .metrics import evaluate_cases, summarize, write_evaluation
from .models import MappingConfig
from .simulate import plan, run_simulation

log = logging.getLogger(__name__)

DATASETS: dict[str, DataConfig] = {
    # seeded 80/20 split of cases, training part spread over the hospitals at random
    "psfhs": DataConfig(size=256, intensity="minmax", labels="0,1,2", class_names="background,ps,fh", test_frac=0.2,
                        partition="iid"),
    # the provided patient lists; training and validation patients partitioned into hospitals by patient
    "acdc": DataConfig(size=256, intensity="minmax", labels="0,1,2,3", class_names="background,rv,myo,lv",
                       group_regex=r"^(patient\d+)_", split_lists={"train": "train.list", "val": "val.list", "test": "test.list"},
                       partition="group"),
    "sunnybrook_lv": DataConfig(size=256, intensity="percentile", group_regex=r"^(SCD\d+)_", test_frac=0.2, partition="group"),
}

_PUB = MappingConfig.published()
METHODS: dict[str, list[str]] = {
    "ppcmi_cpu": [],
    "ppcmi_published": [f"mapping.widen={list(_PUB.widen)}", f"mapping.mid={list(_PUB.mid)}", f"mapping.down={list(_PUB.down)}"],
    "no_klt": ["klt=false"],
    "no_skips": ["autoencoder.skips=false"],
    "no_pyramid": ["mapping.pyramid=false"],
    "per_hospital_mapping": ["mapping.scope=per_hospital"],
    "unet_centralized": [],
    "unet_local": [],
}


def dataset_config(dataset: str, config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    if dataset not in DATASETS:
        raise PpcmiError(f"--dataset: unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return load_config(config, overrides or [], base=replace(Config(), data=DATASETS[dataset]))


def _unet(cfg: Config, data: Path, out: Path, local: bool, progress: bool) -> tuple[list[dict], dict]:
    """Centralized (pooled hospitals) or local (one U-Net per hospital) reference, evaluated on the test cases."""
    pl = plan(cfg, data)
    test = load_arrays(pl.test, pl.prep, pl.labels)
    arrays = {h: load_arrays(c, pl.prep, pl.labels) for h, c in pl.hospitals.items()}
    groups = {h: [a] for h, a in arrays.items()} if local else {"pooled": list(arrays.values())}
    rows: list[dict] = []
    seconds = 0.0
    for g, parts in groups.items():
        t0 = time.perf_counter()
        model, _ = train_reference_unet(cfg, parts, pl.labels.n_classes, out / g, desc=f"U-Net {g}", progress=progress)
        seconds += time.perf_counter() - t0
        pred = predict_unet(model, test["images"])
        rows += evaluate_cases(pred, test["masks"], test["case_ids"], pl.labels.n_classes, spacings=test["spacings"],
                               class_names=list(pl.labels.names), extra=[{"site": g}] * len(pred))
    return rows, {"train_s": seconds}


def run_method(method: str, cfg: Config, data: Path, out: Path, *, progress: bool = True) -> dict:
    """One method end to end; returns its summary (also written to ``OUT/summary.json``)."""
    if method not in METHODS:
        raise PpcmiError(f"--methods: unknown method {method!r}; known: {', '.join(METHODS)}")
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    mcfg = load_config(None, METHODS[method], base=cfg)
    t0 = time.perf_counter()
    if method.startswith("unet_"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**to_dict(mcfg), "data_dir": str(data)})
        rows, timings = _unet(mcfg, data, out, local=method == "unet_local", progress=progress)
        summ = summarize(rows, group_key="site")
        write_evaluation(rows, summ, out / "eval")
        result = {"summary": summ, "timings_s": timings}
    else:
        res = run_simulation(mcfg, data, out, resume=True, progress=progress, latency_reps=0)
        res.pop("_arrays", None)
        result = {"summary": res["ppcmi"], "timings_s": res["timings_s"], "payload": res["payload"]}
    result.update(method=method, wall_s=time.perf_counter() - t0, config=to_dict(mcfg))
    atomic_write_json(out / "summary.json", result)
    return result


def _row(method: str, s: dict) -> str:
    def m(k: str) -> str:
        v = s.get(k, {})
        if not isinstance(v, dict) or v.get("mean") is None:
            return "n/a"
        ci = v.get("ci95") or [float("nan")] * 2
        return f"{v['mean']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"

    by = [g.get("fg_dice", {}).get("mean") for g in s.get("by_group", {}).values()]
    spread = f"{np.mean(by):.4f} ± {np.std(by):.4f}" if by else "n/a"
    return f"| {method} | {m('fg_dice')} | {spread} | {m('fg_hd95_px')} | {m('fg_asd_px')} | {s.get('n_cases', '')} |"


def results_md(dataset: str, results: dict[str, dict]) -> str:
    lines = [f"### {dataset}", "",
             "| method | merged-foreground Dice [95 % CI] | Dice mean ± std over hospitals | HD95 px [95 % CI] | ASD px [95 % CI] | n |",
             "|---|---|---|---|---|---|"]
    lines += [_row(m, r["summary"]) for m, r in results.items()]
    lines += ["", "| method | wall time s | stage times s |", "|---|---|---|"]
    for m, r in results.items():
        t = ", ".join(f"{k} {v:.0f}" for k, v in r.get("timings_s", {}).items())
        lines.append(f"| {m} | {r['wall_s']:.0f} | {t} |")
    return "\n".join(lines) + "\n"


def run_bench(dataset: str, data: str | Path, out: str | Path, methods: list[str], *, config: str | Path | None = None,
              overrides: list[str] | None = None, progress: bool = True) -> dict:
    data, out = Path(data), Path(out)
    cfg = dataset_config(dataset, config, overrides)
    if cfg.data.split_lists:  # list files live in the dataset folder
        cfg = replace(cfg, data=replace(cfg.data, split_lists={k: str(data / v) for k, v in cfg.data.split_lists.items()}))
    results = {}
    for m in methods:
        log.info("bench %s: %s", dataset, m)
        results[m] = run_method(m, cfg, data, out / m, progress=progress)
        atomic_write_json(out / "results.json", {"dataset": dataset, "data": str(data), "results": results})
        atomic_write_text(out / "results.md", results_md(dataset, results))
    return results


__all__ = ["DATASETS", "METHODS", "dataset_config", "run_method", "run_bench", "results_md"]
