"""The Flower ClientApp (AT A HOSPITAL): one handler per message type, thin over :mod:`ppcmi.client.node`.

Flower starts a fresh process for every message, so each handler reloads what it needs from the
site folder named by the SuperNode's ``node_config``. A failure is logged in full here, in the
SuperNode's own log, and the error that travels back names only the site id, the step and the
exception class: an exception text can hold a file name or a case id, which must not leave.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client import node as site_work
from ..client.node import NodeSite
from ..protocol import (FINGERPRINT_STEP, METRICS, SCORE, SITE, STAGE1, STAGE1_METRICS, TEST_LATENTS, TRAIN_LATENTS,
                        flatten_summary)
from .wire import (apply_plan_record, attach_log, fingerprint_record, read_chunk_request, read_run_config, read_wire, site_record,
                   wire_record)

log = logging.getLogger(__name__)

app = ClientApp()


def _handle(msg: Message, ctx: Context, step: str, fn: Callable[[NodeSite, object, Message, Context], RecordDict]) -> Message:
    attach_log("%(asctime)s %(levelname)s %(name)s: %(message)s")  # to the SuperNode's log, which stays at the hospital
    node = None
    try:
        node = NodeSite.from_node_config(ctx.node_config)
        cfg, _ = read_run_config(ctx.run_config)
        cfg = apply_plan_record(cfg, msg.content)  # the federation's plan, when the coordinator made one
        if node.threads:
            import torch

            torch.set_num_threads(node.threads)
        return Message(fn(node, cfg, msg, ctx), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - every failure is reported, without its text
        log.exception("%s failed", step)
        who = node.name if node is not None else "SuperNode"
        raise RuntimeError(f"{who}: {step} failed ({type(e).__name__}); details are in this SuperNode's log") from None


def _on(message_type: str, step: str):
    """Register ``work(node, cfg, msg, ctx) -> RecordDict`` as the handler of ``message_type`` (``category.action``)."""
    category, action = message_type.split(".")

    def register(work: Callable[[NodeSite, object, Message, Context], RecordDict]):
        def handler(msg: Message, ctx: Context) -> Message:
            return _handle(msg, ctx, step, work)

        getattr(app, category)(action)(handler)
        return work

    return register


@_on(FINGERPRINT_STEP, "fingerprint")
def _fingerprint(node: NodeSite, cfg, msg: Message, ctx: Context) -> RecordDict:
    return fingerprint_record(site_work.fingerprint(node, cfg))


@_on(STAGE1, "stage 1 (autoencoder training)")
def _stage1(node: NodeSite, cfg, msg: Message, ctx: Context) -> RecordDict:
    r = site_work.train_autoencoders(node, cfg)
    nums = MetricRecord({k: float(r[k]) if k == "seconds" else int(r[k]) for k in STAGE1_METRICS})
    return RecordDict({SITE: site_record(node.name, r["status"]), METRICS: nums})


@_on(TRAIN_LATENTS, "stage 2 (keyed training latents)")
def _train_latents(node: NodeSite, cfg, msg: Message, ctx: Context) -> RecordDict:
    index, set_id, target = read_chunk_request(msg.content)
    return wire_record(site_work.train_latents(node, cfg, index, set_id, target))


@_on(TEST_LATENTS, "evaluation (keyed test latents)")
def _test_latents(node: NodeSite, cfg, msg: Message, ctx: Context) -> RecordDict:
    q = site_work.test_latents(node, cfg)
    return RecordDict({SITE: site_record(node.name, "no-test-data")}) if q is None else wire_record(q)


@_on(SCORE, "evaluation (decode and score)")
def _score(node: NodeSite, cfg, msg: Message, ctx: Context) -> RecordDict:
    reply, _ = read_wire(msg.content, kind="reply", client=node.name)
    summ = site_work.score(node, cfg, reply, node.site_dir / "eval" / f"run-{ctx.run_id}")
    return RecordDict({METRICS: MetricRecord(flatten_summary(summ))})
