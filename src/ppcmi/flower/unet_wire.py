"""The federated U-Net baselines' vocabulary (both sides): settings, the app folder, weights in Flower records.

``unet_fedavg`` and ``unet_fedprox`` train the centralized reference's MONAI U-Net
(:func:`ppcmi.models.make_unet`) with Flower's own FedAvg and FedProx (``flwr.serverapp.strategy``). What
crosses, per round and hospital::

    coordinator -> hospital   Flower's train message: ArrayRecord ``arrays`` (the global weights, float32) and
                              ConfigRecord ``config`` (server-round, local-epochs, lr; FedProx adds proximal-mu)
    hospital -> coordinator   ArrayRecord ``arrays`` (its weights after the local epochs), MetricRecord ``metrics``
                              (num-examples, the weight of its average; val-examples, train-loss, val-loss) and
                              ConfigRecord ``site`` (its site id and the SHA-256 of the weights it received)

Unlike PPCMI-SF, no per-image array crosses, but every round sends the whole network both ways.

The run configuration (``[tool.flwr.app.config]``) holds the shared ppcmi settings and the ``flower.*``
settings as for the ppcmi app (:func:`ppcmi.flower.wire.run_config`) plus the ``fedunet.*`` settings
(:class:`FedUnetSettings`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..config import Config
from ..errors import ConfigError, ProtocolError
from ..protocol import CLIENT_RE
from .wire import FlowerSettings, read_app_run_config, write_app

STRATEGIES = ("fedavg", "fedprox")
ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"  # Flower's record names, and the site's own
REPLY_METRICS = ("num-examples", "val-examples", "train-loss", "val-loss")
_SECTION = "fedunet"
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class FedUnetSettings:
    """How the U-Net federation trains (run config keys ``fedunet.*``)."""

    strategy: str = "fedavg"    # fedavg | fedprox (Flower's FedAvg / FedProx)
    rounds: int = 1             # federated rounds
    local_epochs: int = 1       # epochs each hospital trains per round (rounds x local_epochs = the reference's epochs)
    proximal_mu: float = 0.0    # FedProx: mu of the proximal term mu/2 ||w - w_global||^2 (0 for FedAvg)
    lr: float = 1e-3            # Adam's learning rate at round 1 (the centralized reference's; mapping.lr_schedule over rounds)
    in_channels: int = 1        # image channels of the network input (the data's; the coordinator holds none)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"fedunet.strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("rounds", "local_epochs", "in_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
                raise ConfigError(f"fedunet.{name}: must be an integer from 1 to 100000, got {v!r}")
        if not (self.proximal_mu >= 0 and np.isfinite(self.proximal_mu)):
            raise ConfigError(f"fedunet.proximal_mu: must be a finite number >= 0, got {self.proximal_mu!r}")
        if self.strategy == "fedavg" and self.proximal_mu != 0:
            raise ConfigError(f"fedunet.proximal_mu: {self.proximal_mu} is FedProx's; FedAvg has no proximal term")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"fedunet.lr: must be a positive number, got {self.lr!r}")


def write_unet_app(out: str | Path, cfg: Config, settings: FlowerSettings, fed: FedUnetSettings) -> Path:
    """The Flower app folder of a federated U-Net run (one pyproject.toml; the code is the installed ppcmi)."""
    return write_app(out, cfg, settings, name="ppcmi-fedunet",
                     description=f"U-Net baseline: Flower {fed.strategy} over the hospitals' model updates",
                     serverapp="ppcmi.flower.unet_server_app:app", clientapp="ppcmi.flower.unet_client_app:app",
                     extra={_SECTION: {k.replace("_", "-"): v for k, v in asdict(fed).items()}})


def read_unet_run_config(rc: Mapping[str, Any]) -> tuple[Config, FlowerSettings, FedUnetSettings]:
    """Inverse of the run configuration :func:`write_unet_app` wrote, on Flower's flattened ``context.run_config``."""
    return read_app_run_config(dict(rc), _SECTION, FedUnetSettings)


# ----------------------------------------------------------------------------- weights


def weights_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of an ArrayRecord's arrays, in name order."""
    h = hashlib.sha256()
    for k in sorted(arrays.keys()):
        a = np.ascontiguousarray(arrays[k].numpy())
        h.update(f"{k};{a.dtype.str};{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def array_bytes(content: RecordDict) -> int:
    """The bytes of every ArrayRecord in ``content`` (Flower's ``ArrayRecord.count_bytes``: array data and key names)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def site_reply(site: str, received: str) -> ConfigRecord:
    """The hospital's record beside its weights: its site id and the digest of the global weights it trained from."""
    return ConfigRecord({"site": site, "received": received})


def read_site_reply(content: RecordDict) -> tuple[str, str]:
    """(site id, digest of the weights it received) from a hospital's reply; anything else is refused by name."""
    rec = content[SITE] if SITE in content else None
    if not isinstance(rec, ConfigRecord) or set(rec.keys()) != {"site", "received"}:
        raise ProtocolError(f"record {SITE!r}: expected a ConfigRecord with exactly site and received")
    site, received = rec["site"], rec["received"]
    if not isinstance(site, str) or not CLIENT_RE.match(site):
        raise ProtocolError(f"record {SITE!r}: site {site!r} is not a valid site id")
    if not isinstance(received, str) or not _HEX64.match(received):
        raise ProtocolError(f"record {SITE!r}: received must be a SHA-256 in hex, got {received!r}")
    return site, received
