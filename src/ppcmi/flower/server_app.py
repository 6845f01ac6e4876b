"""The Flower ServerApp (AT THE COORDINATOR): both training stages and the evaluation round over real SuperNodes.

0. With ``flower.plan``: asks each for the fingerprint of its training data (``query.fingerprint``;
   aggregates only), combines them into the plan (:mod:`ppcmi.server.plan`; ``flower.keep`` names the
   settings it must leave alone) and sends the plan's settings with every later message.
1. Waits for ``flower.nodes`` SuperNodes, then asks each to train its autoencoders locally
   (``train.autoencoders``); each answers with its site id and epoch counts, never weights.
2. Asks each for its keyed training pairs (``query.train_latents``), one chunk per message (chunk 0
   first, which tells the set's id and chunk count, then the rest), checks every reply with
   ``protocol.decode`` (the message must name the site that node announced and be the chunk asked for),
   writes it to ``wire/``, checks each hospital's set as a whole, and trains the mapping network
   on the pool, reading the rows from ``wire/`` as it needs them.
3. Asks each for keyed latents of its test images (``query.test_latents``), maps them with that
   hospital's adapters and sends the reply back (``evaluate.score``); the hospital decodes and
   scores locally and only its metric summary returns. Writes the aggregate summary.

A reply carrying an error, or none within ``flower.timeout`` seconds, is asked again up to
``flower.retries`` times; then the run stops with an error naming the node and its site.

Output folder ``$PPCMI_SERVER_DIR/run-<run id>/`` (default ``./ppcmi-server/run-<run id>/``)::

    config.json        the shared run configuration (the plan's settings applied, with flower.plan)
    plan.json          the plan, its reasons and overrides (with flower.plan)
    mapping/           the mapping network (``ppcmi server map --model`` reads it; mapping/<hospital>/ each with mapping.scope = per_hospital)
    wire/              every protocol message received, exactly as received (<site>.train/chunk-00000.ppcmi ... per set;
                       <site>.fingerprint.json with flower.plan)
    received.jsonl     one line per reply: step, node, site, and the names of its records and keys
    summary.json       per-hospital and pooled metrics, stage-1 numbers, timings

This module imports no hospital code and never sees a key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..config import Config, to_dict
from ..errors import PpcmiError, ProtocolError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_dir
from ..metrics import pool_summaries, write_summary
from ..labels import parse_labels
from ..server.inbox import open_sets
from ..server.plan import apply_plan, describe, make_plan
from ..device import resolve_device
from ..server.stages import train_mappings
from ..protocol import (CHUNK_BYTES, FINGERPRINT_STEP, METRICS, SCORE, SITE, STAGE1, TEST_LATENTS, TRAIN_LATENTS, WIRE, chunk_name,
                        unflatten_summary)
from .wire import (FlowerSettings, attach_log, check_reply, chunk_request, read_fingerprint, read_run_config, read_wire, summary_structures,
                   wire_record, with_plan)

log = logging.getLogger(__name__)

SERVER_DIR_ENV = "PPCMI_SERVER_DIR"
PROGRESS_PREFIX = "[ppcmi] "

app = ServerApp()


def server_dir(run_id: int) -> Path:
    return Path(os.environ.get(SERVER_DIR_ENV) or Path.cwd() / "ppcmi-server") / f"run-{run_id}"


def _describe(content: RecordDict) -> dict[str, Any]:
    """Names of the records and keys in a reply (what the coordinator received, for inspection)."""
    out = {}
    for name, rec in content.items():
        entry: dict[str, Any] = {"type": type(rec).__name__, "keys": sorted(rec.keys())}
        if name == SITE:
            entry["values"] = dict(rec)
        out[name] = entry
    return out


class WatchedGrid:
    """The Grid as a federated baseline's strategy or workflow sees it: every call passes through to the real Grid;
    :meth:`exchange` sends one batch of messages and returns each addressed hospital's first reply, stopping the run on
    a missing or an error reply (a round without every hospital). Subclasses record what crossed."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self.grid, self.nodes = grid, list(nodes)
        self.sites: dict[int, str] = {}
        self.downloaded = {n: 0 for n in nodes}  # coordinator -> hospital
        self.uploaded = {n: 0 for n in nodes}  # hospital -> coordinator

    def __getattr__(self, name: str) -> Any:  # get_node_ids and the rest: the real Grid's
        return getattr(self.grid, name)

    def who(self, node: int) -> str:
        return f"{self.sites[node]} (node {node})" if node in self.sites else f"node {node}"

    def addressed(self, m: Message, sender: str) -> int:
        """The hospital node ``m`` goes to; a node outside the federation is refused, naming ``sender``."""
        n = m.metadata.dst_node_id
        if n not in self.downloaded:
            raise PpcmiError(f"the {sender} addressed node {n}, which is not one of the {len(self.nodes)} hospitals")
        return n

    def exchange(self, messages: list[Message], nodes, *, timeout: float | None, label: str) -> tuple[list[Message], dict[int, Message]]:
        """Send ``messages`` to ``nodes`` (those they address); (every reply, each node's first one). A node without a
        reply or with an error reply stops the run in one line starting with ``label``."""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        got: dict[int, Message] = {}
        for r in replies:
            if r.metadata.src_node_id in nodes and r.metadata.src_node_id not in got:
                got[r.metadata.src_node_id] = r
        problems = [f"{self.who(n)}: no reply" + (f" within {timeout:.0f} s" if timeout else "") if n not in got
                    else f"{self.who(n)}: error reply ({got[n].error.reason})" for n in nodes
                    if n not in got or got[n].has_error()]
        if problems:
            raise PpcmiError(f"{label}: " + "; ".join(problems) + " (a round without every hospital stops the run)")
        return replies, got


class Coordinator:
    """Sends one message type to a set of SuperNodes and collects checked replies, with bounded retries."""

    def __init__(self, grid: Grid, settings: FlowerSettings, out: Path):
        self.grid, self.settings, self.out = grid, settings, out
        self.sites: dict[int, str] = {}

    def who(self, node: int) -> str:
        return f"{self.sites[node]} (node {node})" if node in self.sites else f"node {node}"

    def wait_for_nodes(self) -> list[int]:
        want, deadline = self.settings.nodes, time.monotonic() + self.settings.connect_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want:
                return nodes
            if time.monotonic() > deadline:
                raise PpcmiError(f"only {len(nodes)} of {want} SuperNodes connected within {self.settings.connect_timeout:.0f} s")
            time.sleep(1.0)

    def _record(self, step: str, node: int, reply: Message) -> None:
        entry = {"step": step, "node": node, "site": self.sites.get(node)}
        if entry["site"] is None and not reply.has_error() and isinstance(reply.content.get(SITE), ConfigRecord):
            entry["site"] = reply.content[SITE].get("site")  # as announced in stage 1, before it is checked
        if reply.has_error():
            entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            entry["records"] = _describe(reply.content)
        with open(self.out / "received.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def ask(self, nodes: list[int], message_type: str, parse: Callable[[int, RecordDict], Any],
            content: Callable[[int], RecordDict] = lambda n: RecordDict()) -> dict[int, Any]:
        """Send ``message_type`` to ``nodes``; ``parse(node, content)`` checks each reply and may raise.

        An error reply, a reply ``parse`` refuses, or no reply within the timeout is retried;
        after ``retries`` extra attempts the step fails naming every node still without an answer.
        """
        got: dict[int, Any] = {}
        failures: dict[int, str] = {}
        pending = list(nodes)
        for attempt in range(1, self.settings.retries + 2):
            msgs = [Message(content(n), dst_node_id=n, message_type=message_type, group_id=message_type) for n in pending]
            answered = set()
            for reply in self.grid.send_and_receive(msgs, timeout=self.settings.timeout):
                n = reply.metadata.src_node_id
                if n not in pending or n in answered:
                    continue
                answered.add(n)
                self._record(message_type, n, reply)
                if reply.has_error():
                    failures[n] = f"error reply ({reply.error.reason})"
                    continue
                try:
                    check_reply(reply.content, message_type)
                    got[n] = parse(n, reply.content)
                except (PpcmiError, KeyError, TypeError, ValueError) as e:  # whatever a malformed reply trips
                    failures[n] = f"invalid reply ({e if isinstance(e, PpcmiError) else type(e).__name__ + ': ' + str(e)})"
            for n in pending:
                if n not in answered:
                    failures[n] = f"no reply within {self.settings.timeout:.0f} s"
            pending = [n for n in pending if n not in got]
            if not pending:
                return got
            for n in pending:
                left = self.settings.retries + 1 - attempt
                log.warning("%s%s: %s from %s; %s", PROGRESS_PREFIX, message_type, failures[n], self.who(n),
                            f"asking again ({left} attempt{'s' if left != 1 else ''} left)" if left else "giving up")
        raise PpcmiError(f"{message_type}: " + "; ".join(f"{self.who(n)}: {failures[n]}" for n in pending)
                         + f" (after {self.settings.retries + 1} attempts)")


def plan_round(co: Coordinator, nodes: list[int], cfg: Config, settings: FlowerSettings, out: Path) -> tuple[Config, dict]:
    """The fingerprint round: every node's fingerprint, checked, combined into the plan; returns the planned
    configuration and the plan (also in ``out/plan.json``; the fingerprints in ``out/wire/``)."""
    log.info("%sfingerprints: each hospital summarises its training data (aggregates only)", PROGRESS_PREFIX)

    def parse(n: int, content: RecordDict):
        fp, blob = read_fingerprint(content)
        if fp.client in co.sites.values() and co.sites.get(n) != fp.client:
            raise ProtocolError(f"site id {fp.client!r} is already used by another SuperNode")
        co.sites[n] = fp.client
        atomic_write_bytes(out / "wire" / f"{fp.client}.fingerprint.json", blob)
        return fp

    fps = co.ask(nodes, FINGERPRINT_STEP, parse)
    labels = parse_labels(cfg.data.labels, cfg.data.class_names)
    planned = make_plan([fps[n] for n in nodes], cfg, budget_min=settings.budget, sequential=False,
                        class_names=list(labels.names) if labels else None)
    cfg, planned = apply_plan(cfg, planned, [k.strip() for k in settings.keep.split(",") if k.strip()])
    atomic_write_json(out / "plan.json", planned)
    for line in describe(planned).splitlines():
        log.info("%s  %s", PROGRESS_PREFIX, line)
    return cfg, planned


def collect_training_sets(co: Coordinator, nodes: list[int], wire: Path, target: int = CHUNK_BYTES,
                          plan_settings: dict | None = None) -> list:
    """Stage 2's uploads: chunk 0 from every node (a new set: its id and chunk count), then chunk k from every
    node whose set has more, one chunk per Flower message, each written to ``wire/<site>.train/`` as received;
    then every set is checked as a whole (:func:`ppcmi.server.inbox.open_sets`) and returned, rows left on disk."""
    got: dict[int, tuple[str, int]] = {}

    def parse(index: int) -> Callable[[int, RecordDict], Any]:
        def check(n: int, content: RecordDict):
            msg, blob = read_wire(content, kind="train", client=co.sites[n])
            if msg.index != index or (index and (msg.set_id, msg.count) != got[n]):
                raise ProtocolError(f"chunk {msg.index} of set {msg.set_id or '(unchunked)'} is not the chunk {index} asked for")
            atomic_write_bytes(wire / f"{co.sites[n]}.train" / chunk_name(index), blob)
            return msg.set_id, msg.count
        return check

    got = co.ask(nodes, TRAIN_LATENTS, parse(0), content=lambda n: with_plan(chunk_request(0, "", target), plan_settings))
    for k in range(1, max(c for _, c in got.values())):
        co.ask([n for n in nodes if got[n][1] > k], TRAIN_LATENTS, parse(k),
               content=lambda n: with_plan(chunk_request(k, got[n][0], target), plan_settings))
        if k % 10 == 0:
            log.info("%s  received chunk %d of up to %d per hospital", PROGRESS_PREFIX, k + 1, max(c for _, c in got.values()))
    return open_sets([wire / f"{co.sites[n]}.train" for n in nodes])


def run(grid: Grid, cfg: Config, settings: FlowerSettings, out: Path) -> dict:
    """All stages against the SuperNodes behind ``grid``; writes ``out`` and returns the summary. The mapping network
    trains and maps on ``settings.server_device`` (the coordinator's own device; run config ``flower.server-device``)."""
    device = resolve_device(settings.server_device, where="run config flower.server-device")
    ensure_dir(out)
    atomic_write_json(out / "config.json", {**to_dict(cfg), "flower": settings.__dict__})
    co = Coordinator(grid, settings, out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    nodes = co.wait_for_nodes()
    plan_settings = None
    if settings.plan:
        cfg, planned = plan_round(co, nodes, cfg, settings, out)
        plan_settings = {k: v for k, v in planned["settings"].items() if k not in planned["overrides"]}
        atomic_write_json(out / "config.json", {**to_dict(cfg), "flower": settings.__dict__})
        timings["plan_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    planned_content = lambda n: with_plan(RecordDict(), plan_settings)  # noqa: E731
    log.info("%s%d SuperNodes connected; stage 1: each trains its autoencoders on its own data", PROGRESS_PREFIX, len(nodes))

    def parse_stage1(n: int, content: RecordDict) -> dict:
        site = content[SITE]["site"]
        if site in co.sites.values() and co.sites.get(n) != site:
            raise ProtocolError(f"site id {site!r} is already used by another SuperNode")
        if n in co.sites and co.sites[n] != site:
            raise ProtocolError(f"site id {site!r} differs from {co.sites[n]!r}, which this node's fingerprint named")
        co.sites[n] = site
        return {"status": content[SITE]["status"], **{k: v for k, v in content[METRICS].items()}}

    stage1 = co.ask(nodes, STAGE1, parse_stage1, content=planned_content)
    for n, r in stage1.items():
        log.info("%s  %s: autoencoders %s (%d + %d epochs, %.0f s, %d training images)", PROGRESS_PREFIX, co.sites[n],
                 r["status"], r["image_epochs"], r["mask_epochs"], r["seconds"], r["n_train"])
    timings["stage1_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("%sstage 2: collecting keyed training latents", PROGRESS_PREFIX)

    def parse_latents(kind: str, tag: str) -> Callable[[int, RecordDict], Any]:
        def parse(n: int, content: RecordDict):
            msg, blob = read_wire(content, kind=kind, client=co.sites[n])
            atomic_write_bytes(out / "wire" / f"{co.sites[n]}.{tag}.ppcmi", blob)
            return msg
        return parse

    sets = collect_training_sets(co, nodes, out / "wire", target=cfg.chunk_bytes, plan_settings=plan_settings)
    log.info("%s  received %s; training the mapping network (at most %d epochs)", PROGRESS_PREFIX,
             ", ".join(f"{s.client}: {s.n} pairs in {s.chunks} chunks" for s in sets), cfg.mapping.epochs)
    trained = train_mappings(sets, cfg.mapping, out / "mapping", seed=cfg.seed, progress=False, device=device)
    for sub, mres in trained.fits.items():
        log.info("%s  mapping network%s: best validation loss %.4f at epoch %d of %d", PROGRESS_PREFIX,
                 f" for {sub}" if sub else "", mres.best_val, mres.best_epoch, len(mres.history))
    timings["stage2_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("%sevaluation: each hospital sends keyed test latents, decodes the mapped reply and scores it", PROGRESS_PREFIX)

    servers = trained.servers(device=device)

    def map_query(n: int, content: RecordDict):  # a query the mapping network refuses counts as an invalid reply
        return servers[co.sites[n]].handle(parse_latents("query", "query")(n, content)) if WIRE in content else None

    replies = {n: r for n, r in co.ask(nodes, TEST_LATENTS, map_query, content=planned_content).items() if r is not None}
    scored = sorted(replies)
    structures = summary_structures(cfg)
    summaries = co.ask(scored, SCORE, lambda n, content: unflatten_summary(dict(content[METRICS]), structures),
                       content=lambda n: with_plan(wire_record(replies[n]), plan_settings)) if scored else {}
    timings["evaluation_s"] = time.perf_counter() - t0
    by_site = {co.sites[n]: summaries[n] for n in scored}
    summary = {
        "hospitals": {co.sites[n]: {"node": n, "stage1": stage1[n], "evaluated": co.sites[n] in by_site} for n in nodes},
        "not_evaluated": sorted(co.sites[n] for n in nodes if co.sites[n] not in by_site),
        "ppcmi": pool_summaries(by_site) if by_site else None,
        "stage2": {**{k: v for k, v in trained.summary().items() if k != "history"},
                   "pairs": {s.client: s.n for s in sets}, "chunks": {s.client: s.chunks for s in sets}},
        "timings_s": timings,
    }
    write_summary(summary, out / "summary.json")
    for site, s in by_site.items():
        log.info("%s  %s: merged-foreground Dice %.4f on %d test images", PROGRESS_PREFIX, site, s["fg_dice"]["mean"], s["n_cases"])
    log.info("%sdone: summary in %s", PROGRESS_PREFIX, out / "summary.json")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    attach_log("%(message)s", propagate=False)  # progress lines reach `flwr run --stream` through the ServerApp's log
    try:
        cfg, settings = read_run_config(dict(context.run_config))
        run(grid, cfg, settings, server_dir(context.run_id))
    except PpcmiError as e:
        log.error("%serror: %s", PROGRESS_PREFIX, e)
        raise
