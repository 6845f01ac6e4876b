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
import torch

from .baselines import predict_unet, reference_schedule, train_reference_unet
from .models import make_unet
from .training import load_weights
from .config import Config, from_dict, load_config, to_dict
from .data import load_arrays
from .device import Device, resolve_device
from .errors import PpcmiError
from .fileio import atomic_write_json, atomic_write_text
from .metrics import evaluate_cases, summarize, volume_summary, write_evaluation
from .client.site import Hospital
from .server.mapping import MappingServer
from .experiment import DATASETS, DEFAULT_PROXIMAL_MU, FEDERATED, MATCHED, METHODS, PUBLISHED_EPOCHS, dataset_config
from .server.plan import apply_plan
from .simulate import infer_and_score, load_test, plan, plan_run, run_simulation, volume_rows, volume_table, write_plan

log = logging.getLogger(__name__)

def _score_unet(model, test: dict, labels, site: str, device: Device = None) -> tuple[list[dict], list[np.ndarray]]:
    """Per-case rows of a U-Net's predictions on the test cases, on their native grids (every U-Net method's scoring),
    and the predictions."""
    pred = predict_unet(model, test["images"], test["geometries"], device=device)
    return evaluate_cases(pred, test["native_masks"], test["case_ids"], labels.n_classes, spacings=test["native_spacings"],
                          class_names=list(labels.names), extra=[{"site": site}] * len(pred)), pred


def _volumes(preds: dict[str, list[np.ndarray]], test: dict, pl) -> dict:
    """``{"volumes": whole-volume Dice by site}`` when the test planes were cut from 3D volumes, else ``{}``."""
    rows = volume_rows(preds, test, pl)
    return {"volumes": volume_summary(rows, group_key="site")} if rows else {}


def _unet(cfg: Config, data: Path, out: Path, local: bool, progress: bool, device: Device = None) -> tuple[list[dict], dict]:
    """Centralized (pooled hospitals) or local (one U-Net per hospital) reference, evaluated on the test cases."""
    pl = plan(cfg, data)
    test = load_test(pl)
    arrays = {h: load_arrays(c, pl.prep, pl.labels) for h, c in pl.hospitals.items()}
    groups = {h: [a] for h, a in arrays.items()} if local else {"pooled": list(arrays.values())}
    rows: list[dict] = []
    preds: dict[str, list[np.ndarray]] = {}
    seconds = 0.0
    for g, parts in groups.items():
        t0 = time.perf_counter()
        model, _ = train_reference_unet(cfg, parts, pl.labels.n_classes, out / g, desc=f"U-Net {g}", progress=progress,
                                        device=device)
        seconds += time.perf_counter() - t0
        got, preds[g] = _score_unet(model, test, pl.labels, g, device)
        rows += got
    return rows, {"timings_s": {"train_s": seconds}, **_volumes(preds, test, pl)}


def _fed_unet(method: str, cfg: Config, data: Path, out: Path, *, local_epochs: int, proximal_mu: float,
              device: Device = None) -> tuple[list[dict], dict]:
    """A federated U-Net baseline (Flower's FedAvg or FedProx on a real federation of the same hospitals:
    :mod:`ppcmi.flower.fedunet`); its final global model segments the test cases as the centralized one does."""
    from .flower.fedunet import fed_rounds, train_federated_unets
    from .flower.unet_wire import FedUnetSettings

    strategy = FEDERATED[method]
    fed = FedUnetSettings(strategy=strategy, rounds=fed_rounds(cfg, local_epochs), local_epochs=local_epochs,
                          proximal_mu=proximal_mu if strategy == "fedprox" else 0.0)
    if (out / "federation").exists():  # an unfinished earlier attempt (a Flower run cannot resume): start again
        log.info("%s: removing the unfinished federation of an earlier attempt", out / "federation")
        shutil.rmtree(out / "federation")
    runs, pl = train_federated_unets(cfg, data, out / "federation", {method: fed},
                                     device="cpu" if device is None else str(device))
    s = runs[method]
    test = load_test(pl)
    model = make_unet(s["in_channels"], pl.labels.n_classes)
    load_weights(model, Path(s["server_dir"]) / "global.safetensors")
    rows, pred = _score_unet(model, test, pl.labels, "global", device)
    keep = ("strategy", "proximal_mu", "rounds", "local_epochs", "epochs", "payload_bytes", "bytes_counted", "hospitals", "server_dir")
    return rows, {"timings_s": {"train_s": s["timings_s"]["train_s"], "flwr_run_s": s["wall_s"]},
                  "federated": {k: s[k] for k in keep}, **_volumes({"global": pred}, test, pl)}


def _fed_core(method: str, cfg: Config, data: Path, out: Path, *, local_epochs: int, device: Device = None) -> dict:
    """The federated mapping core (``mapping.scope = "federated"``) as ``simulate`` and ``deploy`` run it
    (:func:`ppcmi.flower.fedcore.run_federated_core`: a real federation with SecAgg+, then every hospital segments the
    test cases through its own local model; it writes ``OUT/config.json`` and ``OUT/eval``). A variant of
    ``ppcmi_federated`` starts from that finished run's stage 1 (autoencoders and keys) where it was made under the same
    settings, so the comparison isolates what the variant changes."""
    from .flower.fedcore import run_federated_core, stage1_difference

    source = out.parent / "ppcmi_federated"
    stage1_from, source_summary = None, None
    if method != "ppcmi_federated" and (source / "summary.json").exists():
        before = json.loads((source / "federation" / "config.json").read_text())
        if stage1_difference(before, {**to_dict(cfg), "data_dir": str(Path(data).absolute())}) is None:
            stage1_from, source_summary = source / "federation", json.loads((source / "summary.json").read_text())
    res = run_federated_core(cfg, data, out, local_epochs=local_epochs, device="cpu" if device is None else str(device),
                             stage1_from=stage1_from)
    arrays = res.pop("_arrays")
    if source_summary is not None:  # (its own stage 1 only copied the folders)
        res["timings_s"]["stage1_s"] = source_summary["timings_s"]["stage1_s"]
    return {"summary": res["ppcmi"], "timings_s": res["timings_s"], "federated": res["federated"],
            **_volumes(arrays["preds"], arrays["test"], arrays["plan"]),
            **({"stage1_from": "ppcmi_federated"} if stage1_from is not None else {})}


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


def _inference_variants(cfg: Config, data: Path, run: Path, device: Device = None) -> dict:
    """Dice of a finished run when the wire carries float16, and when every network runs under bf16 autocast."""
    pl = plan(cfg, data)
    test = load_test(pl)
    dev = resolve_device(device)
    hospitals = {h: Hospital(run / "sites" / h, device=dev, mixed=False) for h in pl.hospitals}
    srv = MappingServer(run / "server", device=dev, mixed=False)
    servers = {h: srv for h in hospitals}
    out = {}
    for name, dtype, bf16 in (("float16_wire", np.float16, False), ("bf16_autocast", np.float32, True)):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):  # every network of the round trip
            _, rows = infer_and_score(hospitals, servers, test, pl.labels, dtype=dtype)
        out[name] = summarize(rows, group_key="site")
    return out


def run_method(method: str, cfg: Config, data: Path, out: Path, *, published_epochs: int | None = None,
               progress: bool = True, device: Device = None, local_epochs: int = 1,
               proximal_mu: float = DEFAULT_PROXIMAL_MU) -> dict:
    """One method end to end on ``device`` (None is the CPU); returns its summary (also written to ``OUT/summary.json``).
    ``local_epochs`` and ``proximal_mu`` are the federated U-Nets' (``unet_fedavg``, ``unet_fedprox``); ``local_epochs`` is also
    the federated core's (``ppcmi_federated``: rounds = ``mapping.epochs`` / it)."""
    if method not in METHODS:
        raise PpcmiError(f"--methods: unknown method {method!r}; known: {', '.join(METHODS)}")
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    extra = [f"mapping.epochs={published_epochs}", f"mapping.patience={published_epochs}"] if method in MATCHED and published_epochs else []
    mcfg = load_config(None, METHODS[method] + extra, base=cfg)
    t0 = time.perf_counter()
    result: dict = {}
    if method in FEDERATED:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**to_dict(mcfg), "data_dir": str(data)})
        rows, result = _fed_unet(method, mcfg, data, out, local_epochs=local_epochs, proximal_mu=proximal_mu, device=device)
        summ = summarize(rows, group_key="site")
        write_evaluation(rows, summ, out / "eval")
        result["summary"] = summ
    elif mcfg.mapping.scope == "federated":
        result = _fed_core(method, mcfg, data, out, local_epochs=local_epochs, device=device)
    elif method.startswith("unet_"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**to_dict(mcfg), "data_dir": str(data)})
        rows, result = _unet(mcfg, data, out, local=method == "unet_local", progress=progress, device=device)
        summ = summarize(rows, group_key="site")
        write_evaluation(rows, summ, out / "eval")
        result["summary"] = summ
    else:
        source = out.parent / "ppcmi_cpu"
        if method != "ppcmi_cpu" and mcfg.autoencoder == cfg.autoencoder and (source / "summary.json").exists():
            if _reuse_stage1(source, out, mcfg.klt):
                result["stage1_from"] = "ppcmi_cpu"
        res = run_simulation(mcfg, data, out, resume=True, progress=progress, device=device)
        arrays = res.pop("_arrays", None)
        if arrays is not None:
            result.update(_volumes(arrays["preds"], arrays["test"], arrays["plan"]))
        if "stage1_from" in result:  # the autoencoders were trained once, by ppcmi_cpu
            res["timings_s"]["stage1_s"] = json.loads((source / "summary.json").read_text())["timings_s"]["stage1_s"]
        result.update(summary=res["ppcmi"], timings_s=res["timings_s"], payload=res["payload"])
        if method == "ppcmi_cpu":
            result["variants"] = _inference_variants(mcfg, data, out, device)
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
    lines += ["", "| method | epochs (mapping network; U-Net: its own) | wall time s | stage times s |", "|---|---|---|---|"]
    for m, r in results.items():
        t = ", ".join(f"{k} {v:.0f}" + (f" (shared with {r['stage1_from']})" if k == "stage1_s" and r.get("stage1_from") else "")
                      for k, v in r.get("timings_s", {}).items())
        c = from_dict(r["config"])
        epochs = reference_schedule(c)[0] if m.startswith("unet_") else c.mapping.epochs
        lines.append(f"| {m} | {epochs} | {r['wall_s']:.0f} | {t} |")
    vols = {m: r["volumes"] for m, r in results.items() if "volumes" in r}
    if vols:
        first = next(iter(vols.values()))  # its structures, in class order (volume_dice's)
        names = ["background", *[k[:-5] for k in first if k.endswith("_dice") and k != "fg_dice"]]
        lines += ["", "Whole test volumes (the 3D Dice of each restacked test volume; the table above averages planes):", "",
                  volume_table(vols, names)]
    fed = {m: r["federated"] for m, r in results.items() if "federated" in r}
    if fed:
        lines += ["", "| method | Flower strategy | rounds x local epochs | MB per hospital, uploaded / downloaded (ArrayRecord bytes; ppcmi_federated: and SecAgg+'s) |",
                  "|---|---|---|---|"]
        for m, f in fed.items():
            per = ", ".join(f"{h} {v['uploaded_bytes'] / 1e6:.1f} / {v['downloaded_bytes'] / 1e6:.1f}" for h, v in f["hospitals"].items())
            mu = f" (mu {f['proximal_mu']:g})" if f.get("proximal_mu") is not None else ""
            lines.append(f"| {m} | {f['strategy']}{mu} | {f['rounds']} x {f['local_epochs']} | {per} |")
    return "\n".join(lines) + "\n"


def run_bench(dataset: str, data: str | Path, out: str | Path, methods: list[str], *, config: str | Path | None = None,
              overrides: list[str] | None = None, published_epochs: int | None = None, progress: bool = True,
              plan: bool = False, explicit: list[str] | None = None, budget_min: float | None = None,
              modality: str | None = None, device: Device = None, local_epochs: int = 1,
              proximal_mu: float = DEFAULT_PROXIMAL_MU) -> dict:
    """Run ``methods`` in order (finished ones are skipped) and rewrite ``OUT/results.{json,md}`` with every
    finished method after each one.

    A preset is a fixed configuration, so by default nothing is planned. With ``plan`` the hospitals'
    fingerprints plan the run (:func:`ppcmi.simulate.plan_run`): the plan's settings replace the preset's,
    except the ``explicit`` keys (``--set``, ``--config``); labels, split and partition stay the preset's, and
    every method's own settings apply on top. ``OUT/plan.json`` records it, and a rerun applies that plan again.
    ``device``: where every method computes (:func:`ppcmi.device.resolve_device`; None is the CPU)."""
    data, out = Path(data), Path(out)
    cfg = dataset_config(dataset, config, overrides)
    if cfg.data.split_lists:  # list files live in the dataset folder
        cfg = replace(cfg, data=replace(cfg.data, split_lists={k: str(data / v) for k, v in cfg.data.split_lists.items()}))
    if plan:
        if (out / "plan.json").exists():  # a rerun: the same plan, so finished methods stay comparable
            cfg, _ = apply_plan(cfg, json.loads((out / "plan.json").read_text()), explicit or [])
        else:
            cfg, planned, wire = plan_run(cfg, data, explicit=explicit or [], modality=modality,
                                          **({} if budget_min is None else {"budget_min": budget_min}))
            out.mkdir(parents=True, exist_ok=True)
            write_plan(out, planned, wire)
    epochs = published_epochs or PUBLISHED_EPOCHS[dataset]
    for m in methods:
        log.info("bench %s: %s", dataset, m)
        run_method(m, cfg, data, out / m, published_epochs=epochs, progress=progress, device=device, local_epochs=local_epochs,
                   proximal_mu=proximal_mu)
        results = {k: json.loads((out / k / "summary.json").read_text()) for k in METHODS if (out / k / "summary.json").exists()}
        atomic_write_json(out / "results.json", {"dataset": dataset, "data": str(data), "results": results})
        atomic_write_text(out / "results.md", results_md(dataset, results))
    return {k: json.loads((out / k / "summary.json").read_text()) for k in methods}


__all__ = ["DATASETS", "METHODS", "dataset_config", "run_method", "run_bench", "results_md"]
