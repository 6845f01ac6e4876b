"""The federated U-Net baselines' Flower ServerApp (AT THE COORDINATOR): Flower's FedAvg or FedProx, unchanged.

Waits for ``flower.nodes`` SuperNodes, draws the initial U-Net weights from the shared seed (as the
centralized reference does: :func:`ppcmi.models.make_unet` under :func:`ppcmi.training.seeded_init`) and
runs ``fedunet.rounds`` rounds of ``flwr.serverapp.strategy.FedAvg`` (or ``FedProx`` with
``fedunet.proximal_mu``) on every hospital (``fraction_train`` 1, no federated evaluation: the bench
scores the final global model on the held-out test cases). The average is Flower's own
(``aggregate_arrayrecords``, weighted by each hospital's ``num-examples``).

The strategy talks to the SuperNodes through :class:`RecordingGrid`, which only watches: it counts the
bytes of every ArrayRecord each way per hospital (``ArrayRecord.count_bytes``: array data and key names;
the gRPC framing and Flower's object headers are not counted), checks each reply (its site id, that it
trained from the weights it was sent) and stops the run when a hospital's reply is an error or missing,
since averaging over fewer hospitals would silently change the method.

Output folder ``$PPCMI_SERVER_DIR/run-<run id>/``::

    config.json                    the shared run configuration and the flower / fedunet settings
    global.safetensors             the final global weights (what the bench evaluates)
    clients/<site>.safetensors     each hospital's weights of the last round (what was averaged into global)
    summary.json                   strategy, rounds, bytes per hospital, per-round losses and digests, timings

This module imports no hospital code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from safetensors.torch import save

from ..config import Config, to_dict
from ..errors import ConfigError, PpcmiError, ProtocolError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_dir
from ..labels import parse_labels
from ..metrics import write_summary
from ..models import make_unet
from ..training import seeded_init
from .server_app import PROGRESS_PREFIX, Coordinator, WatchedGrid, server_dir
from .unet_wire import (ARRAYS, CONFIG, REPLY_METRICS, FedUnetSettings, array_bytes, read_site_reply, read_unet_run_config,
                        weights_digest)
from .wire import FlowerSettings, attach_log

log = logging.getLogger(__name__)

app = ServerApp()
BYTES_COUNTED = ("ArrayRecord.count_bytes() of every ArrayRecord in the messages Flower's strategy sent and received "
                 "(array data with its NumPy header, and key names; no gRPC framing or Flower object headers)")


class RecordingGrid(WatchedGrid):
    """The Grid as the strategy sees it: passes every call through, counts bytes and checks every round's replies."""

    def __init__(self, grid: Grid, nodes: list[int]):
        super().__init__(grid, nodes)
        self.last: dict[int, tuple[ArrayRecord, dict[str, float]]] = {}  # each hospital's last reply: weights, metrics
        self.rounds: list[dict[str, Any]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:  # FedAvg's evaluation step with fraction_evaluate 0
            return []
        sent: dict[int, str] = {}
        for m in messages:
            n = self.addressed(m, "strategy")
            self.downloaded[n] += array_bytes(m.content)
            sent[n] = weights_digest(m.content[ARRAYS])
        round_ = int(messages[0].content[CONFIG]["server-round"])
        replies, got = self.exchange(messages, sent, timeout=timeout, label=f"round {round_}")
        entry: dict[str, Any] = {"round": round_, "sent_sha256": sorted(set(sent.values())), "hospitals": {}}
        for n, r in got.items():
            self.uploaded[n] += array_bytes(r.content)
            try:
                site, received = read_site_reply(r.content)
                if self.sites.setdefault(n, site) != site or list(self.sites.values()).count(site) > 1:
                    raise ProtocolError(f"site id {site!r} is not the one this node used before, or another node's")
                if received != sent[n]:
                    raise ProtocolError("it trained from other weights than the coordinator sent it")
                metrics = r.content.metric_records
                if set(metrics) != {"metrics"} or set(metrics["metrics"].keys()) != set(REPLY_METRICS):
                    raise ProtocolError(f"expected a MetricRecord 'metrics' with exactly {list(REPLY_METRICS)}")
                arrays = r.content[ARRAYS]
                if set(arrays.keys()) != set(messages[0].content[ARRAYS].keys()):
                    raise ProtocolError("its weights do not name the arrays of the global model")
            except (ProtocolError, KeyError, TypeError) as e:
                raise PpcmiError(f"round {round_}: invalid reply from {self.who(n)} ({e})") from None
            vals = {k: float(v) for k, v in metrics["metrics"].items()}
            self.last[n] = (arrays, vals)
            entry["hospitals"][site] = {"received_sha256": received, **{k.replace("-", "_"): v for k, v in vals.items()}}
        entry["hospitals"] = dict(sorted(entry["hospitals"].items()))
        self.rounds.append(entry)
        return replies


def _state_bytes(arrays: ArrayRecord) -> bytes:
    return save({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()})


def run(grid: Grid, cfg: Config, settings: FlowerSettings, fed: FedUnetSettings, out: Path) -> dict:
    """Flower's strategy over the SuperNodes behind ``grid``; writes ``out`` and returns the summary."""
    ensure_dir(out)
    atomic_write_json(out / "config.json", {**to_dict(cfg), "flower": asdict(settings), "fedunet": asdict(fed)})
    labels = parse_labels(cfg.data.labels, cfg.data.class_names)
    if labels is None:
        raise ConfigError("data.labels: must be set in the run configuration so that every hospital uses the same classes")
    nodes = Coordinator(grid, settings, out).wait_for_nodes()
    n = len(nodes)
    initial = ArrayRecord(seeded_init(lambda: make_unet(fed.in_channels, labels.n_classes), cfg.seed).state_dict())
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_evaluate_nodes=0, min_available_nodes=n)
    strategy = FedProx(**common, proximal_mu=fed.proximal_mu) if fed.strategy == "fedprox" else FedAvg(**common)
    rec = RecordingGrid(grid, nodes)
    log.info("%s%d SuperNodes connected; %s: %d rounds of %d local epoch(s), %.2f MB of weights each way per round and hospital",
             PROGRESS_PREFIX, n, type(strategy).__name__, fed.rounds, fed.local_epochs, initial.count_bytes() / 1e6)
    t0 = time.perf_counter()
    digests: list[str] = []

    def after_round(round_: int, arrays: ArrayRecord) -> MetricRecord | None:  # Flower's hook after every round
        digests.append(weights_digest(arrays))
        if round_:
            losses = ", ".join(f"{s}: train {h['train_loss']:.4f}" + (f" / global val {h['val_loss']:.4f}" if h["val_examples"] else "")
                               for s, h in sorted(rec.rounds[-1]["hospitals"].items()))
            log.info("%s  round %d/%d (%.0f s): %s", PROGRESS_PREFIX, round_, fed.rounds, time.perf_counter() - t0, losses)
        return None

    result = strategy.start(grid=rec, initial_arrays=initial, num_rounds=fed.rounds, timeout=settings.timeout,
                            train_config=ConfigRecord({"local-epochs": fed.local_epochs, "rounds": fed.rounds, "lr": fed.lr}),
                            evaluate_fn=after_round)
    seconds = time.perf_counter() - t0
    if len(rec.rounds) != fed.rounds or not rec.last:
        raise PpcmiError(f"{type(strategy).__name__} ran {len(rec.rounds)} of {fed.rounds} rounds")
    atomic_write_bytes(out / "global.safetensors", _state_bytes(result.arrays))
    for node, (arrays, _) in rec.last.items():
        atomic_write_bytes(out / "clients" / f"{rec.sites[node]}.safetensors", _state_bytes(arrays))
    for r, digest in zip(rec.rounds, digests[1:], strict=True):  # the global weights after each round
        r["global_sha256"] = digest
    summary = {
        "strategy": type(strategy).__name__, "proximal_mu": fed.proximal_mu if fed.strategy == "fedprox" else None,
        "rounds": fed.rounds, "local_epochs": fed.local_epochs, "epochs": fed.rounds * fed.local_epochs, "lr": fed.lr,
        "lr_schedule": cfg.mapping.lr_schedule, "in_channels": fed.in_channels, "n_classes": labels.n_classes,
        "payload_bytes": initial.count_bytes(), "bytes_counted": BYTES_COUNTED,
        "initial_sha256": digests[0], "global_sha256": weights_digest(result.arrays),
        "hospitals": {rec.sites[n]: {"node": n, "num_examples": int(rec.last[n][1]["num-examples"]),
                                     "val_examples": int(rec.last[n][1]["val-examples"]),
                                     "downloaded_bytes": rec.downloaded[n], "uploaded_bytes": rec.uploaded[n]}
                      for n in sorted(nodes, key=rec.sites.__getitem__)},
        "history": rec.rounds,
        "train_metrics": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},  # Flower's weighted means
        "timings_s": {"train_s": seconds},
    }
    write_summary(summary, out / "summary.json")
    log.info("%sdone: %s after %d rounds; summary in %s", PROGRESS_PREFIX, type(strategy).__name__, fed.rounds, out / "summary.json")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    attach_log("%(message)s", propagate=False)  # progress lines reach `flwr run --stream` through the ServerApp's log
    try:
        cfg, settings, fed = read_unet_run_config(dict(context.run_config))
        run(grid, cfg, settings, fed, server_dir(context.run_id))
    except PpcmiError as e:
        log.error("%serror: %s", PROGRESS_PREFIX, e)
        raise
