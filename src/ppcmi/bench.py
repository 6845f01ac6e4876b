"""Benchmark harness (plays every role): PPCMI-SF, its ablations and U-Net baselines on one dataset.

Every method uses the same split, the same hospitals and the same epoch budget. PPCMI-SF variants
run through :func:`ppcmi.simulate.run_simulation` (protocol bytes and all); the U-Nets are the
privacy-agnostic references. Results go to ``OUT/<method>/`` and ``OUT/results.json`` +
``OUT/results.md``; a finished method is skipped when the harness is run again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
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
from .client.site import Hospital
from .server.mapping import MappingServer
from .simulate import infer_and_score, load_test, plan, run_simulation

log = logging.getLogger(__name__)

# Working size 128 (every method, so the comparison is fair and a full PSFHS run fits the CPU budget);
# scores at 256x256, the paper's grid, from bilinearly resampled class probabilities.
_FAST = dict(size=128, eval_size=256)
DATASETS: dict[str, DataConfig] = {
    # seeded 80/20 split of cases, training part spread over the hospitals at random
    "psfhs": DataConfig(**_FAST, intensity="minmax", labels="0,1,2", class_names="background,ps,fh", test_frac=0.2,
                        partition="iid"),
    # the provided patient lists; training and validation patients partitioned into hospitals by patient
    "acdc": DataConfig(**_FAST, intensity="minmax", labels="0,1,2,3", class_names="background,rv,myo,lv",
                       group_regex=r"^(patient\d+)_", split_lists={"train": "train.list", "val": "val.list", "test": "test.list"},
                       partition="group"),
    # the LV sits in the middle of the field of view: the central 37.5 % (as in the demo), by patient;
    # scored at the crop's native 96x96 pixels
    "sunnybrook_lv": DataConfig(size=128, eval_size=96, intensity="percentile", crop=0.375, group_regex=r"^(SCD\d+)_",
                                test_frac=0.2, partition="group"),
}
# the epoch budget shared by every method of a dataset (the U-Nets get mapping.epochs x send_copies epochs)
BUDGETS: dict[str, list[str]] = {
    "psfhs": ["autoencoder.epochs=25", "autoencoder.patience=8", "mapping.epochs=30", "mapping.patience=30"],
    "acdc": ["autoencoder.epochs=25", "autoencoder.patience=8", "mapping.epochs=30", "mapping.patience=30"],
    "sunnybrook_lv": ["autoencoder.epochs=60", "autoencoder.patience=15", "mapping.epochs=50", "mapping.patience=50",
                      "autoencoder.send_copies=8"],
}
# ppcmi_cpu and its ablations keep the published identity-initialised adapters; ppcmi_cpu_pca is the
# package default (canonical frames, mapping.adapter_init = "pca").
_COMMON = ["autoencoder.augment=true", "autoencoder.lr_schedule=cosine", "mapping.lr_schedule=cosine", "mapping.adapter_init=identity"]

_PUB = MappingConfig.published()
_PUB_WIDTHS = [f"mapping.widen={list(_PUB.widen)}", f"mapping.mid={list(_PUB.mid)}", f"mapping.down={list(_PUB.down)}"]
# The published mapping network costs ~10x the CPU one per step, so it gets a shorter epoch budget
# (``published_epochs``), and ``ppcmi_cpu_matched`` repeats the CPU widths at that same budget: the
# fair FLOPs-versus-Dice pair.
METHODS: dict[str, list[str]] = {
    "ppcmi_cpu": [],
    "ppcmi_published": _PUB_WIDTHS,
    "ppcmi_cpu_matched": [],
    "ppcmi_cpu_pca": ["mapping.adapter_init=pca"],
    "no_klt": ["klt=false"],
    "no_skips": ["autoencoder.skips=false"],
    "no_pyramid": ["mapping.pyramid=false"],
    "per_hospital_mapping": ["mapping.scope=per_hospital"],
    "unet_centralized": [],
    "unet_local": [],
}
MATCHED = ("ppcmi_published", "ppcmi_cpu_matched")
PUBLISHED_EPOCHS = {"psfhs": 6, "acdc": 6, "sunnybrook_lv": 15}  # what the committed results ran


def dataset_config(dataset: str, config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    if dataset not in DATASETS:
        raise PpcmiError(f"--dataset: unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    base = load_config(None, _COMMON + BUDGETS[dataset], base=replace(Config(), data=DATASETS[dataset]))
    return load_config(config, overrides or [], base=base)


def _unet(cfg: Config, data: Path, out: Path, local: bool, progress: bool) -> tuple[list[dict], dict]:
    """Centralized (pooled hospitals) or local (one U-Net per hospital) reference, evaluated on the test cases."""
    pl = plan(cfg, data)
    test = load_test(pl, cfg)
    arrays = {h: load_arrays(c, pl.prep, pl.labels) for h, c in pl.hospitals.items()}
    groups = {h: [a] for h, a in arrays.items()} if local else {"pooled": list(arrays.values())}
    rows: list[dict] = []
    seconds = 0.0
    for g, parts in groups.items():
        t0 = time.perf_counter()
        model, _ = train_reference_unet(cfg, parts, pl.labels.n_classes, out / g, desc=f"U-Net {g}", progress=progress)
        seconds += time.perf_counter() - t0
        pred = predict_unet(model, test["images"], size=cfg.data.eval_size)
        rows += evaluate_cases(pred, test["eval_masks"], test["case_ids"], pl.labels.n_classes, spacings=test["eval_spacings"],
                               class_names=list(pl.labels.names), extra=[{"site": g}] * len(pred))
    return rows, {"train_s": seconds}


def _reuse_stage1(src: Path, dst: Path, klt: bool) -> bool:
    """Start a variant from the autoencoders of ``src`` (an earlier run with the same autoencoder settings) so
    the comparison isolates what the variant changes. Keys are not copied: every run draws fresh keys."""
    sites = sorted(p for p in (src / "sites").glob("*") if (p / "mask_ae" / "model.safetensors").exists())
    if not sites or (dst / "sites").exists():
        return False
    for site in sites:
        d = dst / "sites" / site.name
        for kind in ("image_ae", "mask_ae"):
            (d / kind).mkdir(parents=True, exist_ok=True)
            for f in ("model.safetensors", "config.json"):
                shutil.copy2(site / kind / f, d / kind / f)
        meta = json.loads((site / "site.json").read_text())
        atomic_write_json(d / "site.json", {**meta, "klt": klt})
    return True


def _inference_variants(cfg: Config, data: Path, run: Path) -> dict:
    """Dice of a finished run when the wire carries float16, and when every network runs under bf16 autocast."""
    pl = plan(cfg, data)
    test = load_test(pl, cfg)
    hospitals = {h: Hospital(run / "sites" / h) for h in pl.hospitals}
    srv = MappingServer(run / "server")
    servers = {h: srv for h in hospitals}
    out = {}
    for name, kw in (("float16_wire", {"dtype": np.float16}), ("bf16_autocast", {"bf16": True})):
        _, rows = infer_and_score(hospitals, servers, test, pl.labels, size=cfg.data.eval_size, **kw)
        out[name] = summarize(rows, group_key="site")
    return out


def run_method(method: str, cfg: Config, data: Path, out: Path, *, published_epochs: int | None = None,
               progress: bool = True) -> dict:
    """One method end to end; returns its summary (also written to ``OUT/summary.json``)."""
    if method not in METHODS:
        raise PpcmiError(f"--methods: unknown method {method!r}; known: {', '.join(METHODS)}")
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    extra = [f"mapping.epochs={published_epochs}", f"mapping.patience={published_epochs}"] if method in MATCHED and published_epochs else []
    mcfg = load_config(None, METHODS[method] + extra, base=cfg)
    t0 = time.perf_counter()
    result: dict = {}
    if method.startswith("unet_"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**to_dict(mcfg), "data_dir": str(data)})
        rows, timings = _unet(mcfg, data, out, local=method == "unet_local", progress=progress)
        summ = summarize(rows, group_key="site")
        write_evaluation(rows, summ, out / "eval")
        result = {"summary": summ, "timings_s": timings}
    else:
        source = out.parent / "ppcmi_cpu"
        if method != "ppcmi_cpu" and mcfg.autoencoder == cfg.autoencoder and (source / "summary.json").exists():
            if _reuse_stage1(source, out, mcfg.klt):
                result["stage1_from"] = "ppcmi_cpu"
        res = run_simulation(mcfg, data, out, resume=True, progress=progress, latency_reps=0)
        res.pop("_arrays", None)
        if "stage1_from" in result:  # the autoencoders were trained once, by ppcmi_cpu
            res["timings_s"]["stage1_s"] = json.loads((source / "summary.json").read_text())["timings_s"]["stage1_s"]
        result.update(summary=res["ppcmi"], timings_s=res["timings_s"], payload=res["payload"])
        if method == "ppcmi_cpu":
            result["variants"] = _inference_variants(mcfg, data, out)
    result.update(method=method, wall_s=time.perf_counter() - t0, config=to_dict(mcfg))
    atomic_write_json(out / "summary.json", result)
    return result


def _fmt(v: dict | None, digits: int = 4) -> str:
    if not isinstance(v, dict) or v.get("mean") is None or not math.isfinite(v["mean"]):
        return "n/a"
    ci = v.get("ci95") or [float("nan")] * 2
    return f"{v['mean']:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _row(method: str, s: dict) -> str:
    by = [g.get("fg_dice", {}).get("mean") for g in s.get("by_group", {}).values()]
    spread = f"{np.mean(by):.4f} ± {np.std(by):.4f}" if len(by) > 1 else "n/a"
    per_class = ", ".join(f"{k[:-5]} {v['mean']:.4f}" for k, v in s.items()
                          if k.endswith("_dice") and k != "fg_dice" and isinstance(v, dict) and v.get("mean") is not None)
    return (f"| {method} | {_fmt(s.get('fg_dice'))} | {spread} | {per_class or 'n/a'} | {_fmt(s.get('fg_hd95_px'), 2)} | "
            f"{_fmt(s.get('fg_asd_px'), 2)} | {_fmt(s.get('fg_hd95_mm'), 2)} | {s.get('n_cases', '')} |")


def results_md(dataset: str, results: dict[str, dict]) -> str:
    lines = [f"### {dataset}", "",
             "| method | merged-foreground Dice [95 % CI] | Dice mean ± std over hospitals | Dice per class | HD95 px [95 % CI] | "
             "ASD px [95 % CI] | HD95 mm [95 % CI] | n |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(_row(m, r["summary"]))
        for v, summ in r.get("variants", {}).items():
            lines.append(_row(f"{m} ({v.replace('_', ' ')})", summ))
    lines += ["", "| method | epochs (U-Net: mapping epochs x copies) | wall time s | stage times s |", "|---|---|---|---|"]
    for m, r in results.items():
        t = ", ".join(f"{k} {v:.0f}" + (" (shared with ppcmi_cpu)" if k == "stage1_s" and r.get("stage1_from") else "")
                      for k, v in r.get("timings_s", {}).items())
        c = r["config"]
        epochs = c["mapping"]["epochs"] * (c["autoencoder"]["send_copies"] if m.startswith("unet_") else 1)
        lines.append(f"| {m} | {epochs} | {r['wall_s']:.0f} | {t} |")
    return "\n".join(lines) + "\n"


def run_bench(dataset: str, data: str | Path, out: str | Path, methods: list[str], *, config: str | Path | None = None,
              overrides: list[str] | None = None, published_epochs: int | None = None, progress: bool = True) -> dict:
    """Run ``methods`` in order (finished ones are skipped) and rewrite ``OUT/results.{json,md}`` with every
    finished method after each one."""
    data, out = Path(data), Path(out)
    cfg = dataset_config(dataset, config, overrides)
    if cfg.data.split_lists:  # list files live in the dataset folder
        cfg = replace(cfg, data=replace(cfg.data, split_lists={k: str(data / v) for k, v in cfg.data.split_lists.items()}))
    epochs = published_epochs or PUBLISHED_EPOCHS[dataset]
    for m in methods:
        log.info("bench %s: %s", dataset, m)
        run_method(m, cfg, data, out / m, published_epochs=epochs, progress=progress)
        results = {k: json.loads((out / k / "summary.json").read_text()) for k in METHODS if (out / k / "summary.json").exists()}
        atomic_write_json(out / "results.json", {"dataset": dataset, "data": str(data), "results": results})
        atomic_write_text(out / "results.md", results_md(dataset, results))
    return {k: json.loads((out / k / "summary.json").read_text()) for k in methods}


__all__ = ["DATASETS", "METHODS", "dataset_config", "run_method", "run_bench", "results_md"]
