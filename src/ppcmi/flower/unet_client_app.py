"""The federated U-Net baselines' Flower ClientApp (AT A HOSPITAL): one round of local training per message.

Answers Flower's ``train`` messages of FedAvg and FedProx (:mod:`ppcmi.flower.unet_server_app`): reads its
cases from the SuperNode's ``node_config`` (as the ppcmi app does: :class:`ppcmi.client.node.NodeSite`),
trains the global weights it received (:func:`ppcmi.client.fedunet.local_round`) and replies with its
weights, counts and losses. As in the ppcmi app, a failure is logged in full in the SuperNode's own log and
the error that travels names only the site and the exception class.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client.fedunet import local_round
from ..client.node import NodeSite, cases_of, labels_of
from ..client.stages import prepare
from ..training import FitConfig
from .unet_wire import ARRAYS, CONFIG, METRICS, SITE, read_unet_run_config, site_reply, weights_digest
from .wire import attach_log

log = logging.getLogger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    attach_log("%(asctime)s %(levelname)s %(name)s: %(message)s")  # to the SuperNode's log, which stays at the hospital
    node = None
    try:
        node = NodeSite.from_node_config(ctx.node_config)
        cfg, _, _ = read_unet_run_config(ctx.run_config)
        if node.threads:
            import torch

            torch.set_num_threads(node.threads)
        arrays: ArrayRecord = msg.content[ARRAYS]
        conf = msg.content[CONFIG]
        round_, epochs, rounds = int(conf["server-round"]), int(conf["local-epochs"]), int(conf["rounds"])
        mu = float(conf.get("proximal-mu", 0.0))  # FedProx puts it there; FedAvg sends none
        lr = FitConfig(epochs=rounds * epochs, lr=float(conf["lr"]), schedule=cfg.mapping.lr_schedule).lr_at((round_ - 1) * epochs + 1)
        labels = labels_of(cfg)
        data = prepare(cases_of(node.data_dir, cfg), cfg, labels)
        r = local_round(data["images"], data["masks"], labels.n_classes, arrays.to_torch_state_dict(), round_=round_,
                        local_epochs=epochs, lr=lr, batch_size=cfg.mapping.batch_size, seed=node.site_seed(cfg),
                        augment=cfg.autoencoder.augment, mu=mu, work_dir=node.site_dir / "fedunet",
                        device=node.device)
        log.info("round %d/%d: %d local epoch(s) on %d images (lr %.2e, mu %g): train loss %.4f, global val loss %.4f",
                 round_, rounds, epochs, r.n_train, lr, mu, r.train_loss, r.val_loss)
        content = RecordDict({
            ARRAYS: ArrayRecord(r.state),
            METRICS: MetricRecord({"num-examples": r.n_train, "val-examples": r.n_val, "train-loss": r.train_loss,
                                   "val-loss": r.val_loss if r.n_val else 0.0}),
            SITE: site_reply(node.name, weights_digest(arrays)),
        })
        return Message(content, reply_to=msg)
    except Exception as e:  # noqa: BLE001 - every failure is reported, without its text
        log.exception("U-Net round failed")
        who = node.name if node is not None else "SuperNode"
        raise RuntimeError(f"{who}: U-Net round failed ({type(e).__name__}); details are in this SuperNode's log") from None
