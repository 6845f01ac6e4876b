"""Plays every role in one process (hospitals and server) through the same protocol bytes a network carries.

Each hospital gets its own site folder and key, trains its autoencoders on its own cases only,
and hands the server nothing but serialised :class:`~ppcmi.protocol.LatentBatch` bytes (also
written to ``OUT/wire/`` so the traffic can be inspected). The server decodes those bytes,
trains the mapping network, and answers test queries with reply bytes; each hospital decodes
its replies and scores its own predictions on the held-out test patients.

Output folder::

    OUT/config.json            resolved configuration
    OUT/plan.json              the federated plan the configuration came from (when the run was planned)
    OUT/sites/<hospital>/      site folders (in a real deployment each stays at its hospital)
    OUT/wire/                  every message that crossed, exactly as sent (a hospital's training set is a
                               folder of chunks, OUT/wire/<hospital>.train/chunk-00000.ppcmi ...; its fingerprint
                               OUT/wire/<hospital>.fingerprint.json when the run was planned)
    OUT/server/                the mapping network (OUT/server/<hospital>/ with mapping.scope = per_hospital)
    OUT/eval/                  per_case.csv and summary.json (per hospital and overall)
    OUT/summary.json           the run's headline numbers
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import protocol
from .client import stages
from .client.site import Hospital
from .config import Config, Preprocess, to_dict
from .data import Case, discover_cases, discover_labels, load_arrays, split_cases, split_from_lists
from .device import Device
from .experiment import partition, payload
from .labels import LabelMap, parse_labels
from .errors import PpcmiError
from .fileio import atomic_write_bytes, atomic_write_json, ensure_dir
from .metrics import evaluate_cases, summarize, volume_dice, write_evaluation
from .server import stages as server_stages
from .server.inbox import open_sets
from .server.mapping import MappingServer
from .server.plan import DEFAULT_BUDGET_MIN, apply_plan, make_plan

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Who holds which cases: one list per hospital, plus the held-out test cases."""

    labels: LabelMap
    prep: Preprocess
    hospitals: dict[str, list[Case]]
    test: list[Case]


def plan(cfg: Config, data_dir: str | Path) -> Plan:
    """Discover the dataset, split off test patients, and partition the rest into hospitals."""
    d = cfg.data
    cases = discover_cases(data_dir, group_regex=d.group_regex, group_csv=d.group_csv, rois=d.roi_names(), volume_regex=d.volume_regex)
    labels = parse_labels(d.labels, d.class_names) or discover_labels(cases)
    if d.split_lists:
        sp = split_from_lists(cases, d.split_lists)
        dev, test = sp.get("train", []) + sp.get("val", []), sp.get("test", [])
    else:
        sp = split_cases(cases, val_frac=0.0, test_frac=d.test_frac, seed=cfg.seed, by_group=True)
        dev, test = sp["train"] + sp["val"], sp["test"]
    if not test:
        raise PpcmiError(f"{data_dir}: no test cases after splitting (data.test_frac={d.test_frac})")
    parts = partition(dev, cfg.clients, mode=d.partition, seed=cfg.seed)
    return Plan(labels, cfg.data.preprocess(), {f"hospital{i + 1}": p for i, p in enumerate(parts)}, test)


def plan_run(cfg: Config, data_dir: str | Path, *, explicit: tuple[str, ...] | list[str] = (),
             budget_min: float = DEFAULT_BUDGET_MIN, modality: str | None = None,
             threads: int | None = None) -> tuple[Config, dict, dict[str, bytes]]:
    """The federated plan of a simulated run: every hospital fingerprints its own training partition
    (:func:`ppcmi.client.stages.fingerprint`), the fingerprints cross as protocol bytes, and the coordinator
    combines them (:func:`ppcmi.server.plan.make_plan`). Returns the run's configuration (the plan's settings
    under ``cfg``'s values for the ``explicit`` keys, which are recorded as overrides), the plan, and the
    fingerprint bytes per hospital. ``threads``: the torch threads each training will get (``make_plan``'s)."""
    pl = plan(cfg, data_dir)
    wire = {name: protocol.encode_fingerprint(stages.fingerprint(cases, cfg, pl.labels, client=name, modality=modality,
                                                                 data_dir=data_dir))
            for name, cases in pl.hospitals.items()}
    fingerprints = [protocol.decode_fingerprint(b) for b in wire.values()]
    planned = make_plan(fingerprints, cfg, budget_min=budget_min, class_names=pl.labels.names, sequential=True, threads=threads)
    run_cfg, planned = apply_plan(cfg, planned, explicit)
    for w in planned["warnings"]:
        log.warning("plan: %s", w)
    return run_cfg, planned, wire


def write_plan(out: str | Path, planned: dict, wire: dict[str, bytes]) -> None:
    """``OUT/plan.json`` and every hospital's fingerprint as it crossed (``OUT/wire/<hospital>.fingerprint.json``)."""
    out = Path(out)
    atomic_write_json(out / "plan.json", planned)
    for name, b in wire.items():
        atomic_write_bytes(out / "wire" / f"{name}.fingerprint.json", b)


def load_test(pl: Plan) -> dict:
    """The test arrays at the working size, with each plane's geometry and its native mask and spacing (what
    predictions are scored against; :func:`ppcmi.data.load_arrays` with ``native``)."""
    return load_arrays(pl.test, pl.prep, pl.labels, progress=False, native=True)


def infer_and_score(hospitals: dict[str, Hospital], servers: dict[str, MappingServer], test: dict, labels: LabelMap, *,
                    dtype=np.float32, batch: int = 16, noise: float = 0.0) -> tuple[dict, list[dict]]:
    """Every hospital segments every test image through protocol bytes (hospital -> server -> hospital) and
    scores its own predictions at native resolution (against ``test["native_masks"]``, in mm where
    ``test["native_spacings"]`` knows the spacing). ``dtype`` is the wire dtype; ``noise`` is the std of
    Gaussian noise on the plain latents before the KLT (``autoencoder.send_noise``). Returns the native label
    maps per hospital (a list per hospital, in test order) and per-case metric rows."""
    preds: dict[str, list[np.ndarray]] = {}
    rows: list[dict] = []
    for name, hosp in hospitals.items():
        preds[name] = []
        for s in range(0, len(test["images"]), batch):
            q = protocol.encode(stages.query(hosp, test["images"][s:s + batch], noise=noise, start=s, dtype=dtype))
            r = protocol.encode(servers[name].handle(protocol.decode(q)))
            preds[name] += hosp.segment(protocol.decode(r), test["geometries"][s:s + batch], batch=batch)
        rows += evaluate_cases(preds[name], test["native_masks"], test["case_ids"], labels.n_classes,
                               spacings=test["native_spacings"], class_names=list(labels.names),
                               extra=[{"site": name, "method": "ppcmi"}] * len(preds[name]))
    return preds, rows


def volume_rows(preds: dict[str, list[np.ndarray]], test: dict, pl: Plan) -> list[dict]:
    """Whole-volume Dice rows (:func:`ppcmi.metrics.volume_dice`, one per test volume and site) of each site's native label
    maps ``preds`` (in test order) when the test planes of ``pl`` were cut from volumes; [] for 2D data."""
    if not any(c.volume is not None for c in pl.test):
        return []
    vols, k, names = [c.volume for c in pl.test], pl.labels.n_classes, list(pl.labels.names)
    return [r for site, p in preds.items() for r in volume_dice(p, test["native_masks"], vols, k, class_names=names, extra={"site": site})]


def volume_table(methods: dict[str, dict], class_names: list[str]) -> str:
    """Markdown table of :func:`ppcmi.metrics.volume_summary` results: Dice (%) per structure of whole test volumes,
    per hospital and overall."""
    structures = [*class_names[1:], "fg"]
    pct = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| method | hospital | volumes | " + " | ".join(f"{'merged' if n == 'fg' else n} Dice %" for n in structures) + " |",
             "|---|---|---|" + "---|" * len(structures)]
    for method, vs in methods.items():
        for g, gs in [*vs.get("by_group", {}).items(), ("overall", vs)]:
            lines.append(f"| {method} | {g} | {gs['n_volumes']} | " + " | ".join(pct(gs.get(f"{n}_dice", float("nan"))) for n in structures) + " |")
    return "\n".join(lines)


def prepare_run_dir(cfg: Config, data_dir: str | Path, out: str | Path, *, resume: bool = False) -> Path:
    """Create the run folder and save the resolved config in it; never reuse a folder holding other things."""
    out = Path(out)
    if (out / "summary.json").exists() and not resume:
        raise PpcmiError(f"{out}: holds a finished run; choose another --out (or --resume to reuse its stages)")
    if out.exists() and any(out.iterdir()) and not resume and not (out / "config.json").exists():
        raise PpcmiError(f"{out}: folder is not empty; choose another --out")
    ensure_dir(out)
    atomic_write_json(out / "config.json", {**to_dict(cfg), "data_dir": str(data_dir)})
    return out


def run_simulation(cfg: Config, data_dir: str | Path, out: str | Path, *, resume: bool = False, progress: bool = True,
                   planned: tuple[dict, dict[str, bytes]] | None = None, device: Device = None) -> dict:
    """Stage 1 at every hospital, stage 2 at the server, inference and per-hospital evaluation.

    ``planned``: the plan ``cfg`` came from and its fingerprint bytes (:func:`plan_run`), saved in the run folder.
    ``device``: where every role computes (one machine plays them all; :func:`ppcmi.device.resolve_device`, None is
    the CPU)."""
    server_stages.refuse_federated(cfg.mapping, "run_simulation (the shared and per-hospital scopes)")
    out = prepare_run_dir(cfg, data_dir, out, resume=resume)
    if planned is not None:
        write_plan(out, *planned)
    pl = plan(cfg, data_dir)
    timings: dict[str, float] = {}
    log.info("plan: %s; test %d cases", {h: len(c) for h, c in pl.hospitals.items()}, len(pl.test))

    # ---- stage 1: at each hospital, on its own data only
    t0 = time.perf_counter()
    wire: list[Path] = []
    stage1: dict[str, dict] = {}
    for i, (name, cases) in enumerate(pl.hospitals.items()):
        site = out / "sites" / name
        stages.ensure_key(site)  # (a run that reuses another's autoencoders still draws its own keys)
        arr = stages.prepare(cases, cfg, pl.labels)
        done = (site / "mask_ae" / "model.safetensors").exists() and (site / "image_ae" / "model.safetensors").exists()
        if not done:
            res = stages.train_autoencoders(site, name, arr, cfg, pl.labels, seed=stages.site_seed(cfg.seed, i), resume=resume,
                                            progress=progress, device=device)
            stage1[name] = {k: {"epochs": len(r.history), "best_epoch": r.best_epoch, "best_val": r.best_val, "seconds": r.seconds,
                                "history": r.history} for k, r in res.items()}
        wire.append(out / "wire" / f"{name}.train")
        if wire[-1].exists():  # a resumed run sends its set again
            shutil.rmtree(wire[-1])
        stages.write_training_set(stages.training_chunks(Hospital(site, device=device), arr, cfg, target=cfg.chunk_bytes), wire[-1])
    timings["stage1_s"] = time.perf_counter() - t0

    # ---- stage 2: at the server, from the chunks' bytes only (read from disk as training needs them)
    t0 = time.perf_counter()
    sets = open_sets(wire)
    trained = server_stages.train_mappings(sets, cfg.mapping, out / "server", seed=cfg.seed, resume=resume and not cfg.mapping.dp,
                                           reuse=True, progress=progress, device=device)
    stage2 = trained.summary()
    servers = trained.servers(device=device)
    timings["stage2_s"] = time.perf_counter() - t0

    # ---- inference on held-out test patients, through every hospital's own keys and decoders
    test = load_test(pl)
    t0 = time.perf_counter()
    hospitals = {name: Hospital(out / "sites" / name, device=device) for name in pl.hospitals}
    preds, rows = infer_and_score(hospitals, servers, test, pl.labels, noise=cfg.autoencoder.send_noise)
    timings["inference_s"] = time.perf_counter() - t0
    summ = summarize(rows, group_key="site")
    write_evaluation(rows, summ, out / "eval")
    first = Hospital(out / "sites" / next(iter(pl.hospitals)))
    result = {
        "dataset": str(data_dir), "hospitals": {h: len(c) for h, c in pl.hospitals.items()}, "n_test": len(pl.test),
        "labels": {"values": list(pl.labels.values), "names": list(pl.labels.names)},
        "ppcmi": summ, "payload": payload(first, test["images"]), "timings_s": timings,
        "stage1": stage1, "stage2": stage2,
    }
    result["_arrays"] = {"test": test, "preds": preds, "plan": pl, "rows": rows}
    return result


def public_summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


__all__ = ["Plan", "plan", "plan_run", "write_plan", "load_test", "infer_and_score", "volume_rows", "volume_table", "prepare_run_dir", "run_simulation", "public_summary"]
