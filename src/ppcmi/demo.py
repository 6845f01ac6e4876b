"""The demo (plays both sides): PPCMI-SF across simulated hospitals next to a centralized MONAI U-Net.

On the bundled Sunnybrook LV subset (CC0, 5 patients) it holds out one patient for testing
and partitions the other four by patient into 3 hospitals; ``--data DIR`` runs the same on any
dataset in the ``images/`` + ``masks/`` layout. Writes ``summary.json``, ``per_case.csv``, ``report.md``,
``loss_curves.png`` and ``overlays.png`` into the run folder.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .baselines import predict_unet, train_reference_unet
from .client.site import Hospital
from .config import AutoencoderConfig, Config, DataConfig, MappingTrainConfig, from_dict, to_dict
from .data import Case, crop_plane, load_arrays, read_image
from .device import resolve_device
from .fileio import atomic_write_json, atomic_write_text
from .metrics import EMPTY_RULE, evaluate_cases, summarize, volume_summary, write_evaluation, write_per_case_csv
from .server.mapping import MappingServer
from .experiment import measure_latency
from .simulate import plan, prepare_run_dir, public_summary, run_simulation, volume_rows, volume_table

log = logging.getLogger(__name__)


def bundled_data() -> Path:
    """The Sunnybrook LV subset shipped in the repository (``data/sunnybrook_lv``)."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        p = base / "data" / "sunnybrook_lv"
        if (p / "images").is_dir():
            return p
    return Path("data") / "sunnybrook_lv"


def demo_config(bundled: bool = True, **over) -> Config:
    """A configuration that finishes within minutes on 2 CPU cores.

    For the bundled data (``bundled``): the central 37.5 % of each side (96 x 96 pixels of the 256 x 256 Sunnybrook slices, which
    holds the heart) is the network input; autoencoders at half the published widths; every
    hospital sends its training pairs plus 7 augmented copies; the mapping network trains for
    50 epochs with a cosine learning-rate decay.
    """
    return Config(
        seed=0, clients=3,
        data=DataConfig(size=96, crop=0.375, intensity="percentile", group_regex=r"^(SCD\d+)_", test_frac=0.2, partition="group"),
        autoencoder=AutoencoderConfig(width=0.5, epochs=60, patience=15, batch_size=16, augment=True, send_copies=8),
        mapping=MappingTrainConfig(widen=(16, 32, 64), mid=(64, 128), down=(32, 16, 8), epochs=50, patience=50, batch_size=16,
                                   lr_schedule="cosine"),
        **over,
    ) if bundled else Config(
        seed=0, clients=3,  # any other dataset: whole planes at 128 x 128, cases split at random
        data=DataConfig(size=128, intensity="percentile", test_frac=0.2, partition="iid"),
        autoencoder=AutoencoderConfig(width=0.5, epochs=60, patience=15, batch_size=16, augment=True, send_copies=2),
        mapping=MappingTrainConfig(widen=(16, 32, 64), mid=(64, 128), down=(32, 16, 8), epochs=30, patience=30, batch_size=16,
                                   lr_schedule="cosine"),
        **over,
    )


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{100 * x:.2f}" if pct else f"{x:.2f}"


def table(summary: dict, structure: str = "fg") -> str:
    """Markdown table: Dice (%), HD95 and ASD (pixels) per hospital and overall, for both methods."""
    lines = ["| method | hospital | Dice % | HD95 px | ASD px | n |", "|---|---|---|---|---|---|"]
    for method, s in summary["methods"].items():
        groups = list(s.get("by_group", {}).items()) + [("overall", s)]
        for g, gs in groups:
            m = lambda k: gs.get(f"{structure}_{k}", {}).get("mean", float("nan"))  # noqa: E731
            lines.append(f"| {method} | {g} | {_fmt(m('dice'), True)} | {_fmt(m('hd95_px'))} | {_fmt(m('asd_px'))} | {gs.get('n_cases', '')} |")
    return "\n".join(lines)


def _plots(out: Path, result: dict, unet_hist: list[dict], test: dict, preds: dict, unet_pred: list[np.ndarray],
           cases: list[Case]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, st in result.get("stage1", {}).items():
        for kind, r in st.items():
            axes[0].plot([h["val_loss"] for h in r["history"]], label=f"{name} {kind}")
    axes[0].set_title("stage 1: autoencoders (val loss)")
    axes[0].legend(fontsize=7)
    h2 = result.get("stage2", {}).get("history", [])
    axes[1].plot([h["train_loss"] for h in h2], label="train")
    axes[1].plot([h["val_loss"] for h in h2], label="val")
    axes[1].set_title("stage 2: mapping network (sum of MSE)")
    axes[1].legend()
    axes[2].plot([h["train_loss"] for h in unet_hist], label="train")
    axes[2].plot([h["val_loss"] for h in unet_hist], label="val")
    axes[2].set_title("centralized U-Net (Dice+CE)")
    axes[2].legend()
    for a in axes:
        a.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=90)
    plt.close(fig)

    first = next(iter(preds))
    idx = np.linspace(0, len(test["images"]) - 1, num=min(4, len(test["images"]))).astype(int)
    cols = ["image", "ground truth", f"PPCMI-SF ({first})", "centralized U-Net"]
    fig, axes = plt.subplots(len(idx), 4, figsize=(10, 2.6 * len(idx)), squeeze=False)
    for r, i in enumerate(idx):  # on the native plane, within the region the networks see
        g = test["geometries"][i]
        img = crop_plane(read_image(cases[i].image_path, cases[i].slice_index)[0].mean(0), g)
        for c, lab in enumerate([None, test["native_masks"][i], preds[first][i], unet_pred[i]]):
            lab = None if lab is None else crop_plane(lab, g)
            ax = axes[r, c]
            ax.imshow(img, cmap="gray")
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab, 0), cmap="autumn", alpha=0.45, vmin=0, vmax=max(1, lab.max()))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(test["case_ids"][i], fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "overlays.png", dpi=90)
    plt.close(fig)


def training_threads() -> int:
    """The torch threads each of the demo's two concurrent trainings (the pipeline and the centralized U-Net) gets:
    half of torch's, at least one (what the demo's plan is costed for: ``make_plan(threads=...)``)."""
    return max(1, torch.get_num_threads() // 2)


def _centralized_unet(cfg_raw: dict, data: str, work_dir: str, threads: int, device: str = "cpu") -> dict:
    """The privacy-agnostic reference, run in its own process: a MONAI U-Net on the hospitals' pooled
    training data (see :func:`ppcmi.baselines.train_reference_unet` for its budget), predicting the
    same test cases."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_raw)
    pl = plan(cfg, data)
    pooled = [load_arrays(c, pl.prep, pl.labels) for c in pl.hospitals.values()]
    test = load_arrays(pl.test, pl.prep, pl.labels)
    t0 = time.perf_counter()
    unet, res = train_reference_unet(cfg, pooled, pl.labels.n_classes, work_dir, progress=False, device=device)
    seconds = time.perf_counter() - t0
    return {"pred": predict_unet(unet, test["images"], test["geometries"], device=device), "history": res.history, "seconds": seconds}


def run_demo(data: str | Path | None = None, out: str | Path = "runs/demo", cfg: Config | None = None, *,
             progress: bool = True, latency_reps: int = 30, planned: tuple[dict, dict[str, bytes]] | None = None,
             device=None) -> dict:
    """PPCMI-SF (all roles, through protocol bytes) and, in a parallel process, the centralized U-Net, every one on
    ``device`` (:func:`ppcmi.device.resolve_device`; None is the CPU).

    The two trainings share the machine's cores (half each, as separate sites would); latency is
    measured afterwards with every core free.
    """
    data = Path(data) if data is not None else bundled_data()
    cfg = cfg or demo_config(bundled=data == bundled_data())
    out = prepare_run_dir(cfg, data, out)
    device = resolve_device(device)
    t_all = time.perf_counter()
    threads, half = torch.get_num_threads(), training_threads()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        unet_job = pool.submit(_centralized_unet, to_dict(cfg), str(data), str(out / "unet"), half, str(device))
        log.info("centralized U-Net training in a parallel process (%d thread(s))", half)
        torch.set_num_threads(half)
        try:
            result = run_simulation(cfg, data, out, progress=progress, planned=planned, device=device)
            if progress:
                print("waiting for the centralized U-Net ...", file=sys.stderr)
            u = unet_job.result()
        finally:
            torch.set_num_threads(threads)
    arrays = result.pop("_arrays")
    test, preds, pl = arrays["test"], arrays["preds"], arrays["plan"]
    result["latency_ms"] = measure_latency(Hospital(out / "sites" / next(iter(pl.hospitals)), device=device),
                                           MappingServer(out / "server", device=device),
                                           test["images"], reps=latency_reps)
    upred, unet_s = u["pred"], u["seconds"]
    names = list(pl.labels.names)
    urows = evaluate_cases(upred, test["native_masks"], test["case_ids"], pl.labels.n_classes, spacings=test["native_spacings"],
                           class_names=names, extra=[{"site": "pooled", "method": "unet_centralized"}] * len(upred))
    usum = summarize(urows)
    write_evaluation(urows, usum, out / "unet" / "eval")

    ppc = result["ppcmi"]
    pick = lambda s: {k: s.get(f"fg_{k}", {}).get("mean") for k in ("dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm", "hd95_pooled_px")}  # noqa: E731
    summary = {
        "dataset": str(data),
        "methods": {"ppcmi": {**pick(ppc), "by_hospital": {g: pick(s) for g, s in ppc.get("by_group", {}).items()}, "full": ppc},
                    "unet_centralized": {**pick(usum), "full": usum}},
        "payload_bytes_per_direction": result["payload"]["float32_bytes"],
        "payload": result["payload"],
        "latency_ms": result.get("latency_ms", {}),
        "timings_s": {**result["timings_s"], "unet_s": unet_s, "total_s": time.perf_counter() - t_all},
        "hospitals": result["hospitals"], "n_test": result["n_test"], "labels": result["labels"],
        "config": to_dict(cfg), "empty_rule": EMPTY_RULE,
    }
    tab = table({"methods": {"PPCMI-SF": ppc, "centralized U-Net": usum}})
    summary["table_md"] = tab
    summary["dice_gap_points"] = 100 * (summary["methods"]["unet_centralized"]["dice"] - summary["methods"]["ppcmi"]["dice"])
    vol = volume_results(preds, upred, test, pl)
    if vol["per_volume"]["ppcmi"]:  # planes cut from volumes: also the 3D Dice of each restacked test volume
        summary["volumes"] = {k: v for k, v in vol.items() if k != "per_volume"}
        summary["volume_table_md"] = volume_table({"PPCMI-SF": summary["volumes"]["ppcmi"],
                                                   "centralized U-Net": summary["volumes"]["unet_centralized"]}, names)
    atomic_write_json(out / "summary.json", summary)
    write_per_case_csv(arrays["rows"] + urows, out / "per_case.csv")  # both methods, one row per case and hospital
    _plots(out, public_summary(result), u["history"], test, preds, upred, pl.test)
    atomic_write_text(out / "report.md", report_md(summary))
    return summary


def volume_results(preds: dict[str, list[np.ndarray]], upred: list[np.ndarray], test: dict, pl) -> dict:
    """Whole-volume Dice (:func:`ppcmi.metrics.volume_dice`) of every hospital's PPCMI-SF predictions and the U-Net's on
    the test planes of ``pl`` (a :class:`ppcmi.simulate.Plan`; ``test`` its arrays, in its order):
    ``{"ppcmi": summary by hospital, "unet_centralized": summary, "per_volume": {method: rows}}``."""
    vp, vu = volume_rows(preds, test, pl), volume_rows({"pooled": upred}, test, pl)
    return {"ppcmi": volume_summary(vp, group_key="site"), "unet_centralized": volume_summary(vu),
            "per_volume": {"ppcmi": vp, "unet_centralized": vu}}


def volume_section(s: dict) -> str:
    """The report's per-volume section ('' for 2D data)."""
    if "volume_table_md" not in s:
        return ""
    return ("\n## Whole test volumes (3D Dice of the restacked planes)\n\nThe table above averages planes; this one counts "
            "every voxel of a test volume together, as 3D datasets are usually reported.\n\n" + s["volume_table_md"] + "\n")


def report_md(s: dict) -> str:
    lat = s.get("latency_ms", {})
    pay = s["payload"]
    t = s["timings_s"]
    return f"""# ppcmi demo report

Dataset: `{Path(s['dataset']).name}`; hospitals (training slices each): {s['hospitals']}; held-out test slices: {s['n_test']}.
Every hospital segments every test slice through its own key and decoders; "overall" averages all of them.

## Merged-foreground segmentation quality

{s['table_md']}

PPCMI-SF's overall Dice is {s['dice_gap_points']:.2f} points below the centralized U-Net's (negative: above it).
{volume_section(s)}

{s['empty_rule'][0].upper() + s['empty_rule'][1:]}.

## What crosses per image (one direction)

{pay['values_per_image']} values: {pay['float32_bytes']} bytes as float32 ({pay['float16_bytes']} as float16); on the wire
(safetensors with header) {pay['wire_bytes_query']} bytes.

## Latency per image at batch 1 (median of {lat.get('reps', 'n/a')} runs, {lat.get('threads', '?')} threads)

| hospital encode + KLT | server map | hospital inverse KLT + decode | total |
|---|---|---|---|
| {lat.get('encode', float('nan')):.1f} ms | {lat.get('map', float('nan')):.1f} ms | {lat.get('decode', float('nan')):.1f} ms | {lat.get('total', float('nan')):.1f} ms |

## Wall time

stage 1 (all hospitals) {t['stage1_s']:.0f} s; stage 2 (server) {t['stage2_s']:.0f} s; inference {t['inference_s']:.1f} s;
centralized U-Net {t['unet_s']:.0f} s (in a parallel process, the cores shared half and half); total {t['total_s']:.0f} s.

![loss curves](loss_curves.png)

![overlays](overlays.png)
"""
