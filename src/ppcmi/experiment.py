"""Experiment-only helpers (simulation, demo and benchmarks; never part of a hospital's deployment): dealing
one dataset's cases to simulated hospitals, synthetic sites, the benchmark presets (datasets, budgets,
methods) and the latency and payload measurements.

``measure_latency`` and ``payload`` take a hospital (:class:`ppcmi.client.site.Hospital`) and a mapping
server (:class:`ppcmi.server.mapping.MappingServer`) from their caller: this module imports neither side.
"""

from __future__ import annotations

import io
import logging
import math
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import protocol
from .config import MAX_SIZE, Config, DataConfig, load_config
from .data.discovery import Case
from .errors import DataError, PpcmiError, check_int
from .fileio import refuse_existing, write_files
from .models import MappingConfig

log = logging.getLogger(__name__)


def wait_for_service(proc, url: str, ctx, log_tail, timeout: float = 120.0):
    """Return ``proc`` (a started ``ppcmi server serve``) once ``url/healthz`` answers 200 over ``ctx`` (an SSL
    context with a client certificate); if it exits or ``timeout`` passes first, kill it and stop with the last
    of its log (``log_tail()``)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", verify=ctx, timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the service did not start: {log_tail()[-2000:]}")
        time.sleep(0.2)

def untrained_model(root: Path, hospitals: list[str], shapes: dict, mcfg: MappingConfig):
    """A coordinator model folder ``root/model`` with seeded untrained weights for ``hospitals``, for the service
    benchmarks (a query's cost and checks do not depend on the weights); ``shapes`` are the image and mask latent
    shapes. Returns (the folder, the network)."""
    from dataclasses import asdict

    from .fileio import atomic_write_json
    from .models import MappingNet
    from .training import save_weights, seeded_init

    net = seeded_init(lambda: MappingNet({s: v[0] for s, v in shapes["image"].items()},
                                         {s: v[0] for s, v in shapes["mask"].items()}, hospitals, mcfg), 0)
    model = Path(root) / "model"
    save_weights(net, model / "mapping.safetensors")
    atomic_write_json(model / "config.json", {"mapping": asdict(mcfg), "clients": hospitals,
                                              "image_shapes": shapes["image"], "mask_shapes": shapes["mask"]})
    return model, net

def machine() -> dict:
    """The machine a benchmark ran on, for its results file: the CPU model (``/proc/cpuinfo``), cores, torch threads
    and versions. Timings are compared only within one machine."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "system": platform.platform()}

def partition(cases: Sequence[Case], n_sites: int, *, mode: str = "group", seed: int = 0) -> list[list[Case]]:
    """Deal cases to ``n_sites`` simulated hospitals; each site's list is sorted by case_id.

    "iid": shuffle cases, deal round-robin. "group": shuffle groups, then greedily give the
    largest remaining group to the site with the fewest cases (whole patients per site).
    "site": the sorted unique ``Case.site`` labels are the sites (their count must be n_sites).
    """
    if n_sites < 1:
        raise DataError(f"partition: n_sites must be at least 1, got {n_sites}")
    cases = list(cases)
    rng = np.random.default_rng(seed)
    parts: list[list[Case]] = [[] for _ in range(n_sites)]
    if mode == "iid":
        if len(cases) < n_sites:
            raise DataError(f"partition: {len(cases)} cases cannot fill {n_sites} sites")
        for rank, i in enumerate(rng.permutation(len(cases))):
            parts[rank % n_sites].append(cases[i])
    elif mode == "group":
        by_group: dict[str, list[Case]] = {}
        for c in cases:
            by_group.setdefault(c.group, []).append(c)
        groups = sorted(by_group)
        if len(groups) < n_sites:
            raise DataError(f"partition: {len(groups)} groups cannot fill {n_sites} sites (mode 'group')")
        shuffled = [groups[i] for i in rng.permutation(len(groups))]
        shuffled.sort(key=lambda g: -len(by_group[g]))  # stable: ties keep the shuffled order
        for g in shuffled:
            target = min(range(n_sites), key=lambda k: (len(parts[k]), k))
            parts[target].extend(by_group[g])
    elif mode == "site":
        missing = [c for c in cases if c.site is None]
        if missing:
            raise DataError(f"{missing[0].image_path}: case {missing[0].case_id!r} has no site label "
                            "(mode 'site' needs a group CSV with a 'site' column)")
        labels = sorted({c.site for c in cases if c.site is not None})
        if len(labels) != n_sites:
            raise DataError(f"partition: {len(labels)} site labels {labels} but {n_sites} sites requested")
        index = {s: k for k, s in enumerate(labels)}
        for c in cases:
            parts[index[c.site]].append(c)  # type: ignore[index]
    else:
        raise DataError(f"data.partition: must be iid, group or site, got {mode!r}")
    for p in parts:
        p.sort(key=lambda c: c.case_id)
    log.info("partition (%s, seed %d): %s cases per site", mode, seed, [len(p) for p in parts])
    return parts


# ----------------------------------------------------------------------------- synthetic sites

_SYNTH_RE = re.compile(r"^site\d+_p\d+_s\d+\.png$")


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float) -> np.ndarray:
    ct, st = math.cos(theta), math.sin(theta)
    u = (xx - cx) * ct + (yy - cy) * st
    v = -(xx - cx) * st + (yy - cy) * ct
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


MAX_SYNTH_PIXELS = 2**30  # synth renders every case (image + mask) in memory before writing any


def synth(out: str | Path, *, sites: int = 3, patients_per_site: int = 4, slices_per_patient: int = 8, size: int = 128,
          n_classes: int = 3, seed: int = 0, overwrite: bool = False) -> Path:
    """Write synthetic multi-site, multi-class phantoms in the images/ + masks/ layout and return ``out``.

    Stems are ``site{k}_p{patient:02d}_s{slice:02d}``; ``groups.csv`` maps each to its patient
    group and site. Per slice: a smooth background texture, an ellipse (class 1, semi-axes
    18-32 % of the size) and, for more classes, discs inside it (class 2, 3, ...). Every class has
    its own mean intensity; every site its own gain, offset and noise level. Shapes vary smoothly
    along a patient's slices. Everything is drawn from ``np.random.default_rng(seed)``.
    """
    # bounds: every case is rendered in memory before any file is written (size at most the largest data.size)
    for name, v, lo, hi in (("sites", sites, 1, 100), ("patients_per_site", patients_per_site, 1, 1000),
                            ("slices_per_patient", slices_per_patient, 1, 1000), ("size", size, 16, MAX_SIZE)):
        check_int(f"synth: {name}", v, lo, hi, error=DataError)
    if sites * patients_per_site * slices_per_patient * size * size > MAX_SYNTH_PIXELS:
        raise DataError(f"synth: {sites} x {patients_per_site} x {slices_per_patient} cases of {size}x{size} pixels exceed "
                        f"{MAX_SYNTH_PIXELS} pixels in all (every case is held in memory before the files are written)")
    if not 2 <= n_classes <= 8:
        raise DataError(f"synth: n_classes must be between 2 and 8, got {n_classes}")
    out = Path(out)
    img_dir, mask_dir = out / "images", out / "masks"
    existing = [p for d in (img_dir, mask_dir) if d.is_dir() for p in sorted(d.iterdir()) if not p.name.startswith(".")]
    hint = " (pass --overwrite to replace an earlier 'ppcmi synth' output)"
    if not overwrite:  # nothing is written into a folder that holds any of it
        try:
            refuse_existing([*existing[:1], out / "groups.csv", out / "README.md"], hint)
        except PpcmiError as e:
            raise DataError(str(e)) from None
    foreign = [p for p in existing if not (p.is_file() and _SYNTH_RE.match(p.name))]
    if foreign:
        raise DataError(f"{foreign[0]}: not a file 'ppcmi synth' wrote; refusing to mix synthetic cases into this folder "
                        "(choose another one)")
    files: dict[Path, bytes] = {}

    rng = np.random.default_rng(seed)
    levels = np.linspace(30.0, 200.0, n_classes)
    gap = float(levels[1] - levels[0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    rows = ["case,group,site"]
    n_inner = n_classes - 2
    for k in range(1, sites + 1):
        gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-15.0, 15.0)
        sigma = gap * rng.uniform(0.05, 0.12)
        for p in range(1, patients_per_site + 1):
            cx0, cy0 = rng.uniform(0.4, 0.6, 2) * size
            a0, b0 = rng.uniform(0.18, 0.32, 2) * size
            theta0, dtheta = rng.uniform(0.0, math.pi), rng.uniform(-0.4, 0.4)
            drift = rng.uniform(-0.05, 0.05, 2) * size
            phi0 = rng.uniform(0.0, 2 * math.pi)
            freqs = rng.uniform(0.5, 2.5, (3, 2)) * rng.choice([-1.0, 1.0], (3, 2))
            phases, dphases = rng.uniform(0.0, 2 * math.pi, 3), rng.uniform(-0.5, 0.5, 3)
            for s in range(slices_per_patient):
                t = 2.0 * s / (slices_per_patient - 1) - 1.0 if slices_per_patient > 1 else 0.0
                scale = 1.0 - 0.25 * t * t
                cx, cy = cx0 + drift[0] * t, cy0 + drift[1] * t
                a, b, theta = a0 * scale, b0 * scale, theta0 + dtheta * t
                label = np.zeros((size, size), np.uint8)
                inside = _ellipse(xx, yy, cx, cy, a, b, theta)
                label[inside] = 1
                ct, st = math.cos(theta), math.sin(theta)
                frac = 0.25 if n_inner == 1 else 0.5
                spread = 0.45 if n_inner == 1 else min(0.4, 0.45 * math.sin(math.pi / max(n_inner, 1)))
                radius = spread * min(a, b)
                for j in range(n_inner):
                    phi = phi0 + 2 * math.pi * j / n_inner
                    u, v = frac * a * math.cos(phi), frac * b * math.sin(phi)
                    dcx, dcy = cx + u * ct - v * st, cy + u * st + v * ct
                    label[inside & ((xx - dcx) ** 2 + (yy - dcy) ** 2 <= radius ** 2)] = 2 + j
                texture = sum(0.08 * gap * np.cos(2 * math.pi * (f[0] * xx + f[1] * yy) / size + ph + dph * t)
                              for f, ph, dph in zip(freqs, phases, dphases))
                noise = rng.normal(0.0, sigma, (size, size))
                image = np.clip(np.round(offset + gain * (levels[label] + texture) + noise), 0, 255).astype(np.uint8)
                stem = f"site{k}_p{p:02d}_s{s:02d}"
                files[img_dir / f"{stem}.png"] = _png(image)
                files[mask_dir / f"{stem}.png"] = _png(label)
                rows.append(f"{stem},site{k}_p{p:02d},site{k}")
    files[out / "groups.csv"] = ("\n".join(rows) + "\n").encode()
    n = sites * patients_per_site * slices_per_patient
    files[out / "README.md"] = (
        "# Synthetic multi-site phantoms (ppcmi synth)\n\n"
        f"{n} 2D slices: {sites} sites x {patients_per_site} patients x {slices_per_patient} slices, "
        f"{size}x{size} pixels, {n_classes} classes (0 = background), seed {seed}.\n\n"
        "- `images/<stem>.png`: 8-bit gray; `masks/<stem>.png`: uint8 labels 0..n_classes-1.\n"
        "- Stems are `site{k}_p{patient:02d}_s{slice:02d}`; `groups.csv` gives each case's patient group and site.\n"
        "- Class 1 is an ellipse, classes 2+ are discs inside it, on a smooth textured background.\n"
        "- Each class has its own mean intensity; each site its own gain, offset and noise level.\n"
        "- Made by `ppcmi.experiment.synth`; no real patient data.\n"
    ).encode()
    # every file is ready before the first is written; with overwrite each replaces its old self atomically
    write_files(files, overwrite=overwrite, hint=hint)
    for p in existing:  # an earlier run's cases this one did not write again (fewer sites, say)
        if p not in files:
            p.unlink(missing_ok=True)
    log.info("%s: wrote %d synthetic cases (%d sites)", out, n, sites)
    return out


# ----------------------------------------------------------------------------- benchmark presets (ppcmi bench)

# Working size 128 (every method, so the comparison is fair and a full PSFHS run fits the CPU budget); every
# method is scored at each test plane's native resolution, from class probabilities resampled to it.
_FAST = dict(size=128)
DATASETS: dict[str, DataConfig] = {
    # seeded 80/20 split of cases, training part spread over the hospitals at random
    "psfhs": DataConfig(**_FAST, intensity="minmax", labels="0,1,2", class_names="background,ps,fh", test_frac=0.2,
                        partition="iid"),
    # the provided patient lists; training and validation patients partitioned into hospitals by patient
    "acdc": DataConfig(**_FAST, intensity="minmax", labels="0,1,2,3", class_names="background,rv,myo,lv",
                       group_regex=r"^(patient\d+)_", split_lists={"train": "train.list", "val": "val.list", "test": "test.list"},
                       partition="group"),
    # the LV sits in the middle of the field of view: the central 37.5 % (as in the demo), by patient
    "sunnybrook_lv": DataConfig(size=128, intensity="percentile", crop=0.375, group_regex=r"^(SCD\d+)_",
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
    "ppcmi_federated": ["mapping.scope=federated"],  # the privacy mode: Flower + SecAgg+ over the cores (ppcmi.flower.fedcore)
    # ... with the core's normalisation layers averaged too (config versions before 5; FedBN's ablation)
    "ppcmi_federated_shared_norm": ["mapping.scope=federated", "mapping.federated_norm=shared"],
    # ... each hospital keeping the round that scored best on its own held-out patients (stage 2's best-epoch rule)
    "ppcmi_federated_val": ["mapping.scope=federated", "mapping.federated_select=val"],
    # ... each hospital's rounds also minimising the segmentation loss of the prediction through its own key and mask decoder
    "ppcmi_federated_decoded": ["mapping.scope=federated", "mapping.federated_loss=decoded"],
    "unet_centralized": [],
    "unet_local": [],
    "unet_fedavg": [],
    "unet_fedprox": [],
}
# The federated U-Net baselines: the centralized reference's network and epochs, trained by Flower's own strategy
# over the same hospitals (ppcmi.flower.fedunet). FedProx's default mu (bench --proximal-mu) is 0.01, from the
# FedProx paper's grid {0.001, 0.01, 0.1, 1}; it is not tuned here.
FEDERATED: dict[str, str] = {"unet_fedavg": "fedavg", "unet_fedprox": "fedprox"}
DEFAULT_PROXIMAL_MU = 0.01
MATCHED = ("ppcmi_published", "ppcmi_cpu_matched")
PUBLISHED_EPOCHS = {"psfhs": 6, "acdc": 6, "sunnybrook_lv": 15}  # what the committed results ran


def dataset_config(dataset: str, config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    if dataset not in DATASETS:
        raise PpcmiError(f"--dataset: unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    base = load_config(None, _COMMON + BUDGETS[dataset], base=replace(Config(), data=DATASETS[dataset]))
    return load_config(config, overrides or [], base=base)


# ----------------------------------------------------------------------------- latency and payload (demo, benchmarks)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure_latency(hospital, server, images: np.ndarray, reps: int = 20, batch: int = 1) -> dict:
    """Median per-stage latency in ms per call at ``batch`` images (protocol bytes included), after one warm-up.

    encode: hospital encode + KLT + serialise; map: server parse + map + serialise; decode: hospital
    parse + inverse KLT + decode + argmax.
    """
    x = np.resize(images, (batch,) + images.shape[1:]).astype(np.float32)
    q = hospital.protect(x)
    wire_q = protocol.encode(q)
    reply = server.handle(protocol.decode(wire_q))
    wire_r = protocol.encode(reply)
    hospital.unprotect(protocol.decode(wire_r))
    enc = _median_ms(lambda: protocol.encode(hospital.protect(x)), reps)
    mp = _median_ms(lambda: protocol.encode(server.handle(protocol.decode(wire_q))), reps)
    dec = _median_ms(lambda: hospital.unprotect(protocol.decode(wire_r)), reps)
    return {"encode": enc, "map": mp, "decode": dec, "total": enc + mp + dec, "batch": batch, "reps": reps,
            "threads": torch.get_num_threads()}


def payload(hospital, images: np.ndarray) -> dict:
    q = hospital.protect(images[:1])
    q16 = hospital.protect(images[:1], dtype=np.float16)
    values = sum(a.size for a in q.arrays.values())
    return {"values_per_image": int(values), "float32_bytes": int(values * 4), "float16_bytes": int(values * 2),
            "wire_bytes_query": len(protocol.encode(q)), "wire_bytes_query_f16": len(protocol.encode(q16))}
