"""The federated mapping core's Flower ServerApp (AT THE COORDINATOR): Flower's legacy FedAvg under SecAgg+.

Flower 1.41 offers secure aggregation only through its legacy API, so this is a ``ServerApp`` with ``@app.main()``
running ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext`` holding a legacy
``flwr.server.strategy.FedAvg`` whose initial parameters are the seeded initial core
(:func:`ppcmi.flower.core_wire.initial_core`). SecAgg+ hands FedAvg only the unmasked sum (every hospital's result
carries the same aggregate), so the average is Flower's: SecAgg+'s weighted sum divided by the summed weights. The
SecAgg+ parameters are :func:`ppcmi.flower.core_wire.secagg_parameters`'s. After the last round one ``evaluate``
message takes the final global core to every hospital, which writes its local model and replies with its loss.

The workflows talk to the SuperNodes through :class:`RecordingGrid`, which only watches: it writes every message
that crosses, each way, to ``messages.jsonl`` (round, SecAgg+ step, node, site; for every array its record, name,
dtype, shape and bytes, including the integer arrays inside SecAgg+'s masked vectors; for every other value its
record, key, type, items and bytes, never the value itself; and the seconds since the run began), counts the bytes per hospital, and stops the run on an
error reply or a missing one: SecAgg+ would otherwise halt quietly and leave the global core as it was.

Output folder ``$PPCMI_SERVER_DIR/run-<run id>/``::

    config.json       the shared run configuration and the flower / fedcore settings
    messages.jsonl    what crossed (described above): the evidence that no per-image array did
    global.safetensors the final global core as Flower aggregated it (cast to float32), named as in the core's state dict
    summary.json      rounds, SecAgg+ parameters, bytes per hospital, per-round global digests, timings

This module imports no hospital code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from safetensors.numpy import save

from ..config import Config, to_dict
from ..errors import PpcmiError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_dir
from ..metrics import write_summary
from .core_wire import FINAL, FedCoreSettings, initial_core, read_core_run_config, secagg_parameters
from .server_app import PROGRESS_PREFIX, Coordinator, WatchedGrid, server_dir
from .wire import FlowerSettings, attach_log

log = logging.getLogger(__name__)

app = ServerApp()
BYTES_COUNTED = ("payload of every message each way: ArrayRecord.count_bytes() of its ArrayRecords (array data with its NumPy "
                 "header, and key names) plus the bytes and strings in its ConfigRecords (SecAgg+'s keys, shares and masked "
                 "vectors); no numbers, no gRPC framing or Flower object headers")


def digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 over the dtypes, shapes and bytes of a list of arrays, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str};{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _value_bytes(v: Any) -> int:
    if isinstance(v, (bytes, str)):
        return len(v)
    if isinstance(v, list):
        return sum(_value_bytes(x) for x in v)
    return 0


def describe(content: RecordDict) -> tuple[list[dict], list[dict], int]:
    """(arrays, other values, payload bytes) of a message's content; values themselves are never kept."""
    arrays, values, total = [], [], 0
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            total += rec.count_bytes()
            for k in rec.keys():
                a = rec[k]
                dtype, shape = a.dtype, list(a.shape)
                if not dtype and not shape:  # a legacy Parameters tensor: NumPy's own serialisation, read for its header
                    x = bytes_to_ndarray(a.data)
                    dtype, shape = x.dtype.str, list(x.shape)
                arrays.append({"record": name, "name": k, "dtype": dtype, "shape": shape, "bytes": len(a.data)})
        elif isinstance(rec, ConfigRecord):
            for k, v in rec.items():
                n = _value_bytes(v)
                total += n
                if name == RECORD_KEY_CONFIGS and k == Key.MASKED_PARAMETERS:  # SecAgg+'s masked vector: integer arrays
                    for i, b in enumerate(v):
                        a = bytes_to_ndarray(b)
                        arrays.append({"record": f"{name}.{k}", "name": str(i), "dtype": a.dtype.str, "shape": list(a.shape),
                                       "bytes": len(b)})
                    continue
                kind = (type(v[0]).__name__ if v else "empty") if isinstance(v, list) else type(v).__name__
                values.append({"record": name, "key": k, "type": f"list[{kind}]" if isinstance(v, list) else kind,
                               "items": len(v) if isinstance(v, list) else 1, "bytes": n})
        elif isinstance(rec, MetricRecord):
            values += [{"record": name, "key": k, "type": "metric", "items": 1, "bytes": 0} for k in rec.keys()]
    return arrays, values, total


class RecordingGrid(WatchedGrid):
    """The Grid as the workflows see it: passes every call through, logs every message, stops on a failed reply."""

    def __init__(self, grid, nodes: list[int], log_path: Path):
        super().__init__(grid, nodes)
        self.path = log_path
        self.fit_metrics: dict[int, dict[int, dict]] = {}  # round -> node -> metrics of its masked-vector reply
        self.eval_metrics: dict[int, dict] = {}  # node -> the final evaluation's loss and rows
        self.messages = 0
        self.t0 = time.perf_counter()

    def _write(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.messages += 1

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        sent: dict[int, tuple[str, str]] = {}
        for m in messages:
            n = self.addressed(m, "workflow")
            conf = m.content.config_records.get(RECORD_KEY_CONFIGS)
            step = str(conf[Key.STAGE]) if conf is not None and Key.STAGE in conf else m.metadata.message_type
            arrays, values, size = describe(m.content)
            self.downloaded[n] += size
            sent[n] = (step, m.metadata.group_id)
            self._write({"t": round(time.perf_counter() - self.t0, 3), "round": int(m.metadata.group_id), "step": step, "direction": "down", "node": n,
                         "site": self.sites.get(n), "message_type": m.metadata.message_type, "bytes": size,
                         "arrays": arrays, "values": values})
        step, group = next(iter(sent.values()))
        replies, got = self.exchange(messages, sent, timeout=timeout, label=f"round {group}, {step}")
        for n, r in got.items():
            arrays, values, size = describe(r.content)
            self.uploaded[n] += size
            self._read_metrics(n, int(group), sent[n][0], r.content)
            self._write({"t": round(time.perf_counter() - self.t0, 3), "round": int(group), "step": sent[n][0], "direction": "up", "node": n, "site": self.sites.get(n),
                         "message_type": r.metadata.message_type, "bytes": size, "arrays": arrays, "values": values})
        return replies

    def _read_metrics(self, node: int, round_: int, step: str, content: RecordDict) -> None:
        kind = {"collect_masked_vectors": "fitres", "evaluate": "evaluateres"}.get(step)
        if kind is None:
            return
        try:
            metrics = dict(content.config_records[f"{kind}.metrics"])
            n = int(content.metric_records[f"{kind}.num_examples"]["num_examples"])
            site = metrics["site"]
        except KeyError as e:
            raise PpcmiError(f"round {round_}: reply of {self.who(node)} lacks {e}") from None
        if not isinstance(site, str) or self.sites.setdefault(node, site) != site or list(self.sites.values()).count(site) > 1:
            raise PpcmiError(f"round {round_}: {self.who(node)} names site {site!r}, not the one it used before, or another node's")
        if kind == "fitres":
            self.fit_metrics.setdefault(round_, {})[node] = {"num_examples": n, **metrics}
        else:
            loss = float(content.metric_records["evaluateres.loss"]["loss"]) if "evaluateres.loss" in content.metric_records else None
            self.eval_metrics[node] = {"num_examples": n, "loss": loss}


class FedAvgFloat32(FedAvg):
    """Flower's legacy FedAvg, its aggregate cast to float32 (the dtype every hospital trains in) before it is stored and
    sent on: SecAgg+'s dequantization yields float64, which would double every later download for no precision the
    hospitals keep. The average itself is Flower's."""

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            params = ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(params)])
        return params, metrics


def _final_evaluation(rounds: int):
    """Flower's evaluate workflow, run once: after the last round, to hand every hospital the final global core."""

    def workflow(grid, context: LegacyContext) -> None:
        if int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]) == rounds:
            default_evaluate_workflow(grid, context)

    return workflow


def run(grid, context: Context, cfg: Config, settings: FlowerSettings, fed: FedCoreSettings, out: Path) -> dict:
    """Flower's FedAvg under SecAgg+ over the SuperNodes behind ``grid``; writes ``out`` and returns the summary."""
    ensure_dir(out)
    atomic_write_json(out / "config.json", {**to_dict(cfg), "flower": asdict(settings), "fedcore": asdict(fed)})
    nodes = Coordinator(grid, settings, out).wait_for_nodes()
    n = len(nodes)
    fed.check_nodes(n)
    initial = initial_core(cfg)
    names = list(initial)
    digests: list[str] = []
    t0 = time.perf_counter()

    def after_round(round_: int, arrays: list[np.ndarray], _config: dict) -> None:  # Flower's centralized-evaluation hook
        digests.append(digest(arrays))
        if round_:
            got = sorted(rec.fit_metrics.get(round_, {}).values(), key=lambda m: m["site"])
            log.info("%s  round %d/%d (%.0f s): %s", PROGRESS_PREFIX, round_, fed.rounds, time.perf_counter() - t0,
                     ", ".join(f"{m['site']}: train {m['train-loss']:.4f}" + (f" (epsilon {m['epsilon']:.3g})" if "epsilon" in m else "")
                               for m in got))
        return None

    strategy = FedAvgFloat32(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n, min_evaluate_clients=n, min_available_clients=n,
                      accept_failures=False, initial_parameters=ndarrays_to_parameters(list(initial.values())),
                      evaluate_fn=after_round,
                      on_fit_config_fn=lambda r: {"server-round": r, "rounds": fed.rounds, "local-epochs": fed.local_epochs},
                      on_evaluate_config_fn=lambda r: {"server-round": r, "rounds": fed.rounds, FINAL: r == fed.rounds})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=fed.rounds, round_timeout=settings.timeout), strategy=strategy)
    rec = RecordingGrid(grid, nodes, out / "messages.jsonl")
    sa = secagg_parameters(fed)
    log.info("%s%d SuperNodes connected; FedAvg under SecAgg+ (%d shares, threshold %d, clipping +-%g, %d levels): "
             "%d rounds of %d local epoch(s); a core of %d tensors, %.2f MB in float32", PROGRESS_PREFIX, n, n, n, fed.clip,
             fed.quantization, fed.rounds, fed.local_epochs, len(names), sum(a.nbytes for a in initial.values()) / 1e6)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(**sa, timeout=settings.timeout),
                               evaluate_workflow=_final_evaluation(fed.rounds))
    workflow(rec, legacy)
    seconds = time.perf_counter() - t0
    if sorted(rec.fit_metrics) != list(range(1, fed.rounds + 1)) or any(len(v) != n for v in rec.fit_metrics.values()):
        raise PpcmiError(f"SecAgg+ completed {len(rec.fit_metrics)} of {fed.rounds} rounds with every hospital")
    if len(rec.eval_metrics) != n:
        raise PpcmiError(f"{len(rec.eval_metrics)} of {n} hospitals received the final global core")
    final = parameters_to_ndarrays(arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    if len(final) != len(names) or any(a.shape != initial[k].shape for a, k in zip(final, names)):
        raise PpcmiError("the aggregate does not have the core's tensors")
    atomic_write_bytes(out / "global.safetensors", save({k: np.ascontiguousarray(a) for k, a in zip(names, final)}))
    summary = {
        "strategy": "FedAvg under SecAgg+", "rounds": fed.rounds,
        "local_epochs": fed.local_epochs, "epochs": fed.rounds * fed.local_epochs, "secagg": {**sa, "num_shares_resolved": n,
                                                                                           "threshold_resolved": n},
        "core_tensors": len(names), "core_parameters": int(sum(a.size for a in initial.values())),
        "payload_bytes_float32": int(sum(a.nbytes for a in initial.values())), "bytes_counted": BYTES_COUNTED,
        "messages": rec.messages, "initial_sha256": digests[0] if digests else None, "global_sha256": digest(final),
        "hospitals": {rec.sites[m]: {"node": m, "num_examples": rec.fit_metrics[fed.rounds][m]["num_examples"],
                                     "downloaded_bytes": rec.downloaded[m], "uploaded_bytes": rec.uploaded[m],
                                     "final_loss": rec.eval_metrics[m]["loss"],
                                     **({"epsilon": rec.fit_metrics[fed.rounds][m]["epsilon"]}
                                        if "epsilon" in rec.fit_metrics[fed.rounds][m] else {})}
                      for m in sorted(nodes, key=rec.sites.__getitem__)},
        "history": [{"round": r, "global_sha256": d, "hospitals": {rec.sites[m]: {"train_loss": v["train-loss"], "max_abs": v["max-abs"],
                                                                                 **({"epsilon": v["epsilon"]} if "epsilon" in v else {}),
                                                                                 "num_examples": v["num_examples"]}
                                                                   for m, v in sorted(rec.fit_metrics[r].items())}}
                    for r, d in zip(range(1, fed.rounds + 1), digests[1:])],
        "timings_s": {"train_s": seconds},
    }
    write_summary(summary, out / "summary.json")
    log.info("%sdone: FedAvg under SecAgg+ after %d rounds; summary in %s", PROGRESS_PREFIX, fed.rounds, out / "summary.json")
    return summary


@app.main()
def main(grid, context: Context) -> None:
    attach_log("%(message)s", propagate=False)  # progress lines reach `flwr run --stream` through the ServerApp's log
    try:
        cfg, settings, fed = read_core_run_config(dict(context.run_config))
        run(grid, context, cfg, settings, fed, server_dir(context.run_id))
    except PpcmiError as e:
        log.error("%serror: %s", PROGRESS_PREFIX, e)
        raise
