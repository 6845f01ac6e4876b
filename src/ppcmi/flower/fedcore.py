"""The federated mapping core on a real Flower federation on one machine (plays every role; ``ppcmi bench``).

``mapping.scope = "federated"``: deals the dataset exactly as ``ppcmi deploy`` and the other bench methods do
(:func:`ppcmi.flower.deploy.deal`), trains every hospital's autoencoders in its own site folder through the stage API
(:func:`ppcmi.client.stages.train_autoencoders`, each hospital on its own cases, with the site seed ``simulate`` gives
it), starts the same federation (:func:`ppcmi.flower.deploy.federation`: SuperLink with TLS and SuperNode
authentication, one SuperNode per hospital) and runs the core app (:mod:`ppcmi.flower.core_server_app`,
:mod:`ppcmi.flower.core_client_app`) with ``flwr run``. Its budget is stage 2's: ``rounds x local_epochs`` =
``mapping.epochs``. Each hospital ends with its local model in ``sites/NAME/site/fedcore/model/`` (a stage-2 model
folder: global core + its own adapters), which answers its own queries at the hospital.

Run folder: as ``ppcmi deploy``'s (``coordinator/``, ``sites/NAME/``, ``logs/``), with the app in ``app/`` and the
ServerApp's output (``messages.jsonl``, ``global.safetensors``, ``summary.json``) in ``coordinator/server/run-ID/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..client.fedcore import FOLDER
from ..client.site import Hospital
from ..client.stages import prepare, site_seed, train_autoencoders
from ..config import Config, from_dict, to_dict
from ..device import resolve_device
from ..errors import PpcmiError
from ..fileio import atomic_write_json
from ..metrics import summarize, write_evaluation
from ..server.mapping import MappingServer
from ..simulate import Plan, infer_and_score, load_test
from .core_wire import FedCoreSettings, write_core_app
from .deploy import DeployError, deal, federation, node_config, run_app
from .wire import FlowerSettings

log = logging.getLogger(__name__)


def core_rounds(cfg: Config, local_epochs: int = 1) -> int:
    """Rounds of ``local_epochs`` each that sum to stage 2's ``mapping.epochs``."""
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
        raise PpcmiError(f"--local-epochs: must be a positive integer, got {local_epochs!r}")
    if cfg.mapping.epochs % local_epochs:
        raise PpcmiError(f"--local-epochs: {local_epochs} does not divide mapping.epochs = {cfg.mapping.epochs}, "
                         "so the rounds could not sum to stage 2's budget")
    return cfg.mapping.epochs // local_epochs


def default_local_epochs(epochs: int, rounds: int = 15) -> int:
    """The local epochs per round for a run that does not say: the divisor of ``epochs`` whose round count is nearest
    ``rounds`` (ties: more rounds). Every Flower round costs SecAgg+'s four message steps, about a minute on 2 cores, so
    one epoch a round would spend much of a run waiting; averaging often keeps the hospitals' cores close to each other:
    at 30 epochs, 15 rounds of 2 beat 6 of 5 by 0.85 Dice points on PSFHS and 10.1 on ACDC, and 30 of 1 did no better
    on ACDC (BENCHMARKS.md)."""
    divisors = [d for d in range(1, epochs + 1) if epochs % d == 0]
    return min(divisors, key=lambda d: (abs(epochs // d - rounds), d))


def train_federated_core(cfg: Config, data: str | Path, out: str | Path, *, local_epochs: int = 1,
                         fed: FedCoreSettings | None = None, settings: FlowerSettings | None = None, port: int | None = None,
                         echo: Callable[[str], None] = log.info, run_timeout: float = 24 * 3600.0, progress: bool = False,
                         device: str = "cpu", stage1_from: str | Path | None = None) -> tuple[dict, Plan, dict[str, Path]]:
    """Stage 1 at every hospital, then the federated core over ``cfg.clients`` hospitals; returns the ServerApp's summary
    (with ``server_dir`` and ``wall_s``, ``flwr run`` included), the split, and each hospital's site folder (its local
    model is in ``SITE/fedcore/model``). ``fed`` (default: rounds from ``local_epochs``, ``max_weight`` from the split)
    sets the SecAgg+ parameters. ``stage1_from``: the federation folder of an earlier run whose stage 1 was made under the
    same data, split, autoencoder and key settings (:func:`reuse_stage1`); its hospitals' autoencoders and keys are
    copied instead of trained again (each hospital reusing its own, as a rerun at the same hospitals would)."""
    if cfg.mapping.scope != "federated":
        raise PpcmiError(f"mapping.scope: train_federated_core runs scope \"federated\", got {cfg.mapping.scope!r}")
    run = Path(out).absolute()
    if run.exists() and any(run.iterdir()):
        raise DeployError(f"{run}: folder is not empty; choose another folder")
    rounds = core_rounds(cfg, local_epochs)
    cfg, pl = deal(cfg, data, run)
    names = list(pl.hospitals)
    if len(names) < 2:
        raise PpcmiError(f"clients: mapping.scope \"federated\" needs at least 2 hospitals for secure aggregation, got {len(names)}")
    settings = replace(settings or FlowerSettings(), nodes=len(names))
    atomic_write_json(run / "config.json", {**to_dict(cfg), "data_dir": str(Path(data).absolute())})
    echo(f"{len(names)} hospitals: " + ", ".join(f"{n} ({len(pl.hospitals[n])} images)" for n in names)
         + f"; {len(pl.test)} held-out test images")
    sites = {n: run / "sites" / n / "site" for n in names}
    t0 = time.perf_counter()
    rows = {}
    if stage1_from is not None:
        reuse_stage1(stage1_from, run, sites)
    for i, n in enumerate(names):  # stage 1, each hospital on its own cases (what its SuperNode would run first)
        arrays = prepare(pl.hospitals[n], cfg, pl.labels)
        rows[n] = int(arrays["images"].shape[0]) * cfg.autoencoder.send_copies  # the keyed pairs it will train on
        if stage1_from is None:
            train_autoencoders(sites[n], n, arrays, cfg, pl.labels, seed=site_seed(cfg.seed, i), progress=progress, device=device)
    stage1_s = time.perf_counter() - t0
    # SecAgg+'s max_weight bounds every hospital's weight: here the largest hospital's rows (a count that crosses anyway,
    # as Flower's num_examples), so that its weight ratio is 1 and the quantization keeps the most precision
    fed = fed or FedCoreSettings(rounds=rounds, local_epochs=local_epochs, max_weight=max(rows.values()))
    if fed.rounds * fed.local_epochs != cfg.mapping.epochs:
        raise PpcmiError(f"fedcore: {fed.rounds} rounds x {fed.local_epochs} local epochs differ from mapping.epochs = {cfg.mapping.epochs}")
    write_core_app(run / "app", cfg, settings, fed)
    threads = max(1, (os.cpu_count() or 1) // len(names))
    node_configs = {n: node_config(run / "sites" / n, n, threads, site_seed(cfg.seed, i), 0.0, device=device)
                    for i, n in enumerate(names)}
    echo(f"federated core: FedAvg under SecAgg+, {fed.rounds} rounds of {fed.local_epochs} local epoch(s) (flwr run)")
    with federation(run, node_configs, port=port, echo=echo) as fed_:
        t0 = time.perf_counter()
        summary = run_app(run / "app", fed_.cli_env, fed_.procs, fed_.server, echo, run_timeout)
        summary["wall_s"] = time.perf_counter() - t0
        summary["deployment"] = {"sites": names, "superlink": fed_.superlink, "tls": True, "supernode_auth": True}
    summary["stage1_s"] = stage1_s
    missing = [n for n, s in sites.items() if not (s / FOLDER / "model" / "mapping.safetensors").exists()]
    if missing:
        raise PpcmiError(f"{', '.join(missing)}: no local model after the run (see the SuperNode logs in {run / 'logs'})")
    return summary, pl, sites


STAGE1_SETTINGS = ("data_dir", "seed", "clients", "klt", "data", "autoencoder")  # what a reused stage 1 must share


def stage1_difference(before: dict, now: dict) -> str | None:
    """The first of :data:`STAGE1_SETTINGS` in which two federation ``config.json`` records differ, or None. Both are
    read as settings first (:func:`ppcmi.config.from_dict`), so a setting added since, at its default, is no difference."""
    def settings(raw: dict) -> dict:
        rest = {k: v for k, v in raw.items() if k != "data_dir"}
        return {**to_dict(from_dict(rest)), "data_dir": raw.get("data_dir")}

    a, b = settings(before), settings(now)
    return next((k for k in STAGE1_SETTINGS if a.get(k) != b.get(k)), None)


def reuse_stage1(src: str | Path, run: Path, sites: dict[str, Path]) -> None:
    """Copy every hospital's stage 1 (its site folder without ``fedcore/``: autoencoders, key, site record) from the
    federation folder ``src`` of an earlier run into ``sites`` of the federation folder ``run``; refused, naming the
    first setting that differs, where the two runs' ``config.json`` differ in data, split, autoencoder or key settings."""
    src = Path(src)
    try:
        before = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PpcmiError(f"{src / 'config.json'}: cannot read the earlier run's settings ({e})") from None
    key = stage1_difference(before, json.loads((run / "config.json").read_text()))
    if key is not None:
        raise PpcmiError(f"{src}: its stage 1 was made with other {key!r} settings; train stage 1 again")
    for n, dst in sites.items():
        site = src / "sites" / n / "site"
        if not (site / "site.json").is_file():
            raise PpcmiError(f"{site}: no stage 1 of hospital {n} there")
        shutil.copytree(site, dst, ignore=shutil.ignore_patterns(FOLDER), dirs_exist_ok=False)


# what a federated run's summary keeps of the ServerApp's (per-round digests and messages stay in its folder)
KEEP = ("strategy", "rounds", "local_epochs", "epochs", "secagg", "core_parameters", "payload_bytes_float32", "bytes_counted",
        "messages", "hospitals", "server_dir")


def score_local_models(cfg: Config, pl: Plan, sites: dict[str, Path], eval_dir: str | Path, *, device: str = "cpu"):
    """Every hospital segments the held-out test cases of ``pl`` with its own local model (``SITE/fedcore/model``) through
    protocol bytes and scores them (:func:`ppcmi.simulate.infer_and_score`); per-case CSV and summary in ``eval_dir``.
    Returns (test arrays, predictions per hospital, per-case rows, summary)."""
    test = load_test(pl)
    dev = resolve_device(device)
    hospitals = {h: Hospital(sites[h], device=dev) for h in pl.hospitals}
    servers = {h: MappingServer(sites[h] / FOLDER / "model", device=dev) for h in pl.hospitals}  # each its own local model
    preds, rows = infer_and_score(hospitals, servers, test, pl.labels, noise=cfg.autoencoder.send_noise)
    summ = summarize(rows, group_key="site")
    write_evaluation(rows, summ, eval_dir)
    return test, preds, rows, summ


def run_federated_core(cfg: Config, data: str | Path, out: str | Path, *, local_epochs: int | None = None,
                       settings: FlowerSettings | None = None, port: int | None = None, echo: Callable[[str], None] = log.info,
                       run_timeout: float = 24 * 3600.0, progress: bool = False, device: str = "cpu",
                       stage1_from: str | Path | None = None) -> dict:
    """The federated scope end to end, as ``ppcmi simulate``, ``ppcmi deploy`` and ``ppcmi bench`` run it: stage 1 and the
    federated core (:func:`train_federated_core`, in ``out/federation``), then every hospital segments the held-out test
    cases through its own local model (global core + its adapters, at the hospital) over the same protocol bytes and
    scoring as the shared scope (:func:`ppcmi.simulate.infer_and_score`); per-case CSVs in ``out/eval``. Returns the
    summary (``ppcmi``: the scores; ``federated``: rounds, SecAgg+, bytes per hospital; ``timings_s``) with the arrays
    under ``_arrays`` as :func:`ppcmi.simulate.run_simulation` does. ``local_epochs`` defaults to
    :func:`default_local_epochs`; ``stage1_from`` as :func:`train_federated_core` takes it."""
    out = Path(out)
    if (out / "summary.json").exists():
        raise PpcmiError(f"{out}: holds a finished run; choose another --out")
    if (out / "federation").exists():  # an unfinished earlier attempt (a Flower run cannot resume): start again
        log.info("%s: removing the unfinished federation of an earlier attempt", out / "federation")
        shutil.rmtree(out / "federation")
    local_epochs = default_local_epochs(cfg.mapping.epochs) if local_epochs is None else local_epochs
    core_rounds(cfg, local_epochs)  # a bad --local-epochs fails before stage 1
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**to_dict(cfg), "data_dir": str(data)})
    s, pl, sites = train_federated_core(cfg, data, out / "federation", local_epochs=local_epochs, settings=settings, port=port,
                                        echo=echo, run_timeout=run_timeout, progress=progress, device=device,
                                        stage1_from=stage1_from)
    t0 = time.perf_counter()
    test, preds, rows, summ = score_local_models(cfg, pl, sites, out / "eval", device=device)
    return {"dataset": str(data), "hospitals": {h: len(c) for h, c in pl.hospitals.items()}, "n_test": len(pl.test),
            "labels": {"values": list(pl.labels.values), "names": list(pl.labels.names)}, "ppcmi": summ,
            "timings_s": {"stage1_s": s["stage1_s"], "train_s": s["timings_s"]["train_s"], "flwr_run_s": s["wall_s"],
                          "inference_s": time.perf_counter() - t0},
            "federated": {k: s[k] for k in KEEP}, "deployment": s["deployment"],
            "_arrays": {"test": test, "preds": preds, "plan": pl, "rows": rows}}
