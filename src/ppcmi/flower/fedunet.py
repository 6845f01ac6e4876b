"""Federated U-Net baselines on a real Flower federation on one machine (plays every role; ``ppcmi bench``).

Deals the dataset exactly as ``ppcmi deploy`` and the other bench methods do (:func:`ppcmi.flower.deploy.deal`:
the same hospitals and held-out test cases), starts the same federation (:func:`ppcmi.flower.deploy.federation`:
SuperLink with TLS and SuperNode authentication, one SuperNode per hospital holding only its own cases) and
runs the U-Net app (:mod:`ppcmi.flower.unet_server_app`, :mod:`ppcmi.flower.unet_client_app`) once per
entry of ``runs`` with ``flwr run``, one after the other on the same SuperNodes.

The budget is the centralized reference's: ``rounds x local_epochs`` = :func:`ppcmi.baselines.reference_schedule`'s
epochs (:func:`fed_rounds`). There is no early stopping: the result is the global model after the last round.

Run folder: as ``ppcmi deploy``'s (``coordinator/``, ``sites/NAME/``, ``logs/``), with one app folder per run
(``apps/NAME/``) and each run's ServerApp output in ``coordinator/server/run-ID/``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..baselines import reference_schedule
from ..config import Config, to_dict
from ..data import load_arrays
from ..errors import PpcmiError
from ..fileio import atomic_write_json
from ..simulate import Plan
from ..client.stages import site_seed
from .deploy import DeployError, deal, federation, node_config, run_app
from .unet_wire import FedUnetSettings, write_unet_app
from .wire import FlowerSettings

log = logging.getLogger(__name__)


def fed_rounds(cfg: Config, local_epochs: int = 1) -> int:
    """Rounds of ``local_epochs`` each that sum to the centralized reference's epochs (``reference_schedule``)."""
    epochs = reference_schedule(cfg)[0]
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
        raise PpcmiError(f"--local-epochs: must be a positive integer, got {local_epochs!r}")
    if epochs % local_epochs:
        raise PpcmiError(f"--local-epochs: {local_epochs} does not divide the centralized U-Net's {epochs} epochs, "
                         "so the rounds could not sum to the same budget")
    return epochs // local_epochs


def train_federated_unets(cfg: Config, data: str | Path, out: str | Path, runs: dict[str, FedUnetSettings], *,
                          settings: FlowerSettings | None = None, port: int | None = None,
                          echo: Callable[[str], None] = log.info, run_timeout: float = 24 * 3600.0,
                          device: str = "auto") -> tuple[dict[str, dict], Plan]:
    """Each of ``runs`` (name -> settings; ``in_channels`` is taken from the data) on one federation of
    ``cfg.clients`` hospitals; returns each run's ServerApp summary (with ``server_dir``, where its
    ``global.safetensors`` is, and ``wall_s``, ``flwr run`` included) and the split the hospitals hold."""
    run = Path(out).absolute()
    if run.exists() and any(run.iterdir()):
        raise DeployError(f"{run}: folder is not empty; choose another folder")
    if not runs:
        raise PpcmiError("train_federated_unets: no runs given")
    cfg, pl = deal(cfg, data, run)
    names = list(pl.hospitals)
    first = next(iter(pl.hospitals.values()))
    channels = int(load_arrays(first[:1], pl.prep, pl.labels)["images"].shape[1])
    settings = replace(settings or FlowerSettings(), nodes=len(names))
    atomic_write_json(run / "config.json", {**to_dict(cfg), "data_dir": str(Path(data).absolute())})
    runs = {k: replace(v, in_channels=channels) for k, v in runs.items()}
    for k, fed in runs.items():
        write_unet_app(run / "apps" / k, cfg, settings, fed)
    threads = max(1, (os.cpu_count() or 1) // len(names))
    node_configs = {n: node_config(run / "sites" / n, n, threads, site_seed(cfg.seed, i), 0.0, device=device)
                    for i, n in enumerate(names)}
    echo(f"{len(names)} hospitals: " + ", ".join(f"{n} ({len(pl.hospitals[n])} images)" for n in names)
         + f"; {len(pl.test)} held-out test images")
    results: dict[str, dict] = {}
    with federation(run, node_configs, port=port, echo=echo) as fed_:
        for k, fed in runs.items():
            echo(f"{k}: {fed.strategy}, {fed.rounds} rounds of {fed.local_epochs} local epoch(s) (flwr run)")
            t0 = time.perf_counter()
            results[k] = run_app(run / "apps" / k, fed_.cli_env, fed_.procs, fed_.server, echo, run_timeout)
            results[k]["wall_s"] = time.perf_counter() - t0
            results[k]["deployment"] = {"sites": names, "superlink": fed_.superlink, "tls": True, "supernode_auth": True}
    return results, pl
