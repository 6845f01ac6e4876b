"""The federated mapping core's Flower ClientApp (AT A HOSPITAL): a legacy NumPyClient behind Flower's ``secaggplus_mod``.

Flower 1.41 offers SecAgg+ only through its legacy API, so this is a ``ClientApp(client_fn=..., mods=[secaggplus_mod])``:
the mod answers SecAgg+'s setup, key-sharing and unmasking steps itself and, in the step that collects masked vectors,
calls :meth:`HospitalCore.fit`, then masks and quantizes what ``fit`` returned before anything leaves the hospital (the
plain core never crosses). ``fit`` trains one round (:func:`ppcmi.client.fedcore.local_round`) on this hospital's cached
keyed pairs and refuses a core SecAgg+ would clip (:func:`ppcmi.client.fedcore.check_clipping`); ``evaluate``, sent once
with the final global core, writes the hospital's local model (:func:`ppcmi.client.fedcore.save_local_model`) and
replies with its loss on its own pairs.

Its site folder, data and seed come from the SuperNode's ``node_config`` (:class:`ppcmi.client.node.NodeSite`). As in
the other apps, a failure is logged in full in the SuperNode's log, which stays at the hospital, and the error that
travels names only the site and the exception class. Heavy imports wait for ``fit``: SecAgg+'s other steps start a
ClientApp process too and need none of them (``ppcmi.config`` alone imports torch: about 1 s a process).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

log = logging.getLogger(__name__)


class HospitalCore(NumPyClient):
    """One hospital's answers to the legacy FitIns / EvaluateIns of the federated core."""

    def __init__(self, context: Context):
        self.context = context

    def _setup(self):
        from ..client.fedcore import training_pairs
        from ..client.node import NodeSite, cases_of, labels_of
        from ..client.stages import prepare
        from .core_wire import read_core_run_config
        from .wire import attach_log

        attach_log("%(asctime)s %(levelname)s %(name)s: %(message)s")  # to the SuperNode's log, which stays at the hospital
        node = NodeSite.from_node_config(self.context.node_config)
        cfg, _, fed = read_core_run_config(dict(self.context.run_config))
        cfg = node.settings(cfg)
        if node.threads:
            import torch

            torch.set_num_threads(node.threads)
        pairs = training_pairs(node.hospital(), lambda: prepare(cases_of(node.data_dir, cfg), cfg, labels_of(cfg)), cfg, node.site_dir)
        return node, cfg, fed, pairs

    def _named(self, parameters: list, node, cfg, pairs) -> dict:
        import torch

        from ..client.fedcore import core_names

        names = core_names(node.name, pairs, cfg.mapping)
        if len(parameters) != len(names):
            from ..errors import PpcmiError

            raise PpcmiError(f"global core: {len(parameters)} arrays, this hospital's core has {len(names)}")
        return {k: torch.from_numpy(a.astype("float32")) for k, a in zip(names, parameters)}

    def fit(self, parameters: list, config: dict[str, Any]):
        node = None
        try:
            from ..client.fedcore import check_clipping, local_round, pair_groups

            node, cfg, fed, pairs = self._setup()
            round_, rounds, epochs = int(config["server-round"]), int(config["rounds"]), int(config["local-epochs"])
            r = local_round(self._named(parameters, node, cfg, pairs), pairs, cfg.mapping, site=node.name, site_dir=node.site_dir,
                            round_=round_, rounds=rounds, local_epochs=epochs, seed=node.site_seed(cfg), init_seed=cfg.seed,
                            device=node.device, groups=pair_groups(node.site_dir) if _needs_groups(cfg.mapping) else None,
                            decoder=node.hospital().keyed_decoder() if cfg.mapping.federated_loss == "decoded" else None)
            scaled = check_clipping(r, clip=fed.clip, max_weight=fed.max_weight)
            log.info("core round %d/%d: %d local epoch(s) on %d keyed pairs: train loss %.4f; largest core value %.4g "
                     "(%.4g of SecAgg+'s clipping range +-%g after the weight ratio)%s", round_, rounds, epochs, r.n_rows,
                     r.train_loss, r.max_abs, scaled, fed.clip,
                     "" if r.epsilon is None else f"; DP-SGD: epsilon {r.epsilon:.3g} per patient so far")
            # with mapping.dp the training loss is not private: NaN crosses in its place, with the epsilon spent so far
            metrics = {"site": node.name, "train-loss": r.train_loss, "max-abs": r.max_abs}
            if r.epsilon is not None:
                metrics["epsilon"] = r.epsilon
            return [v.numpy() for v in r.core.values()], r.n_rows, metrics
        except Exception as e:  # noqa: BLE001 - every failure is reported, without its text
            log.exception("core round failed")
            who = node.name if node is not None else "SuperNode"
            raise RuntimeError(f"{who}: core round failed ({type(e).__name__}); details are in this SuperNode's log") from None

    def evaluate(self, parameters: list, config: dict[str, Any]):
        node = None
        try:
            from ..client.fedcore import pair_groups, pairs_loss, save_local_model
            from .core_wire import FINAL

            node, cfg, fed, pairs = self._setup()
            if not config.get(FINAL):
                raise RuntimeError("only the final global core is evaluated")
            folder = save_local_model(self._named(parameters, node, cfg, pairs), pairs, cfg.mapping, site=node.name,
                                      site_dir=node.site_dir, init_seed=cfg.seed,
                                      extra={"rounds": fed.rounds, "local_epochs": fed.local_epochs}, seed=node.site_seed(cfg),
                                      groups=pair_groups(node.site_dir) if _needs_groups(cfg.mapping) else None)
            # (with mapping.dp its loss on its own pairs is not private: NaN is sent instead)
            loss = float("nan") if cfg.mapping.dp else pairs_loss(folder, pairs, cfg.mapping, site=node.name, init_seed=cfg.seed)
            n = int(next(iter(pairs.values())).shape[0])
            log.info("final global core: local model written to %s; loss on its %d keyed pairs %.4f", folder, n, loss)
            return loss, n, {"site": node.name}
        except Exception as e:  # noqa: BLE001
            log.exception("final evaluation failed")
            who = node.name if node is not None else "SuperNode"
            raise RuntimeError(f"{who}: final evaluation failed ({type(e).__name__}); details are in this SuperNode's log") from None


def _needs_groups(cfg) -> bool:
    """Whether a round needs the patient of each training row: patient-level DP, or a held-out set of patients."""
    return bool(cfg.dp) or cfg.federated_select == "val"


def client_fn(context: Context) -> Client:
    return HospitalCore(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
