"""The federated mapping core's vocabulary (both sides): settings, SecAgg+ parameters, the app folder, the core's arrays.

``mapping.scope = "federated"`` (bench method ``ppcmi_federated``): each hospital trains the mapping network on its own
keyed latents, which never leave it; only the shared core (:func:`ppcmi.models.core_state`) crosses, summed by Flower's
SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with the client mod ``flwr.client.mod.secaggplus_mod``) and averaged
by Flower's legacy ``FedAvg``. What crosses, per round and hospital, in SecAgg+'s four steps (all ``train`` messages)::

    setup        down: SecAgg+ settings (ConfigRecord)                 up: two public keys
    share keys   down: the other hospitals' public keys                up: encrypted key shares, one per other hospital
    collect      down: the global core (ArrayRecord, legacy FitIns)    up: the masked, quantized core (bytes of one integer
                      and the shares addressed to it                       array per core tensor, plus SecAgg+'s one-element
                                                                           weight factor), num_examples, the metrics below
    unmask       down: which hospitals are active                      up: its shares of the others' mask seeds

After the last round one ``evaluate`` message carries the final global core to every hospital, which stores its local
model (global core + its own adapters) and replies with the loss on its own pairs. The metrics a hospital sends are
its site id, its training loss and its core's largest magnitude; its row count travels as Flower's ``num_examples``
(the FedAvg weight). The coordinator sees the sum, never one hospital's core.

SecAgg+ parameters (:func:`secagg_parameters`): every hospital shares its secrets with every other (``num_shares``
1.0: all sampled nodes) and the coordinator needs every share to unmask (``reconstruction_threshold`` 1.0), so with
2 hospitals num_shares = threshold = 2 and with 3, 3; a hospital that drops out stops the round (as for the U-Net
baselines). With 2 hospitals a colluding hospital learns the other's core from the sum; SecAgg+ protects one hospital's
core from the coordinator and from any coalition short of all the others.

Clipping and quantization: a hospital's core tensors ``w`` are multiplied by its weight ratio ``n / max_weight`` (<= 1:
:attr:`FedCoreSettings.max_weight` bounds every hospital's rows), clipped by Flower to ``[-clip, clip]`` and
stochastically rounded to integers in ``[0, quantization]``. A value outside the range would be clipped silently by
Flower, so each hospital refuses to send a core with any scaled value beyond ``clip``
(:func:`ppcmi.client.fedcore.check_clipping`): a run either averages exactly what the hospitals trained, up to the
quantization, or stops naming ``fedcore.clip``. With ``mapping.federated_norm = "shared"`` the largest core values are
BatchNorm running variances: 20.3 on Sunnybrook and 24.4 on PSFHS after one round of 5 local epochs at the bench's widths
(the weights stay near 1), which Flower's default ``clip`` of 8 refused; ``clip`` 128 leaves a factor 5. With "local"
(the default, FedBN) the normalisation layers stay at the hospitals and only convolutions cross. Flower quantizes in float32, so more than
2**24 levels would add nothing (float32 holds integers exactly up to 2**24): ``quantization`` is 2**24, a level
``2 clip / 2**24`` (about 1.5e-5). The aggregate then differs from the exact weighted average by at most
:func:`quantization_tolerance` per value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import Config
from ..errors import ConfigError
from ..models import AEConfig, MappingConfig, MappingNet, core_state
from ..training import seeded_init
from .wire import FlowerSettings, read_app_run_config, write_app

_SECTION = "fedcore"
MODULUS = 2**32  # SecAgg+'s modulus_range (Flower's default and largest)
FINAL = "final"  # the evaluate message's config key saying it carries the final global core


@dataclass(frozen=True)
class FedCoreSettings:
    """How the federated core trains and is securely aggregated (run config keys ``fedcore.*``)."""

    rounds: int = 1                 # federated rounds (rounds x local_epochs = mapping.epochs)
    local_epochs: int = 1           # epochs each hospital trains per round
    clip: float = 128.0             # SecAgg+ clipping_range: bound on every core value times n / max_weight
    quantization: int = 2**24       # SecAgg+ quantization_range: integer levels over [-clip, clip] (float32's exact integers)
    max_weight: int = 1000          # SecAgg+ max_weight: at least every hospital's training rows (its FedAvg weight)

    def __post_init__(self) -> None:
        for name, hi in (("rounds", 100_000), ("local_epochs", 100_000), ("max_weight", 10**9)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ConfigError(f"fedcore.{name}: must be an integer from 1 to {hi}, got {v!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (0 < self.clip < 1e6):
            raise ConfigError(f"fedcore.clip: must be a positive number below 1e6, got {self.clip!r}")
        q = self.quantization
        if isinstance(q, bool) or not isinstance(q, int) or not 2**8 <= q <= 2**24:
            raise ConfigError(f"fedcore.quantization: must be an integer from 256 to 2**24 (Flower quantizes in float32), got {q!r}")

    def check_nodes(self, n: int) -> None:
        """SecAgg+ needs 2 hospitals or more, and their summed integers must stay below the modulus 2**32."""
        if n < 2:
            raise ConfigError(f"mapping.scope: \"federated\" needs at least 2 hospitals for secure aggregation, got {n}")
        if n * self.quantization >= MODULUS:
            raise ConfigError(f"fedcore.quantization: {n} hospitals x {self.quantization} levels reach SecAgg+'s modulus 2**32; "
                              f"choose at most {MODULUS // n - 1}")


def secagg_parameters(fed: FedCoreSettings) -> dict[str, Any]:
    """The keyword arguments of ``SecAggPlusWorkflow`` (see the module docstring for the choice)."""
    return {"num_shares": 1.0, "reconstruction_threshold": 1.0, "clipping_range": float(fed.clip),
            "quantization_range": int(fed.quantization), "modulus_range": MODULUS, "max_weight": float(fed.max_weight)}


def quantization_tolerance(fed: FedCoreSettings, rows: list[int]) -> float:
    """Largest difference per value between SecAgg+'s aggregate and the exact weighted average of the hospitals' cores
    (``rows``: each hospital's weight). Per hospital, in levels of ``2 clip / quantization``: under 1 from the stochastic
    rounding, ``quantization * 2**-23`` from float32 rounding of Flower's product with its quantizer (and of the
    quantizer), ``3 * quantization * 2**-25`` from float32 rounding of ``w * ratio`` and of ``+ clip``; the sum over
    hospitals is divided by the summed weight ratios."""
    q = fed.quantization
    levels = 1.0 + q * 2.0**-23 + 3.0 * q * 2.0**-25
    return len(rows) * levels * (2.0 * fed.clip / q) / (sum(rows) / fed.max_weight)


def write_core_app(out: str | Path, cfg: Config, settings: FlowerSettings, fed: FedCoreSettings) -> Path:
    """The Flower app folder of a federated-core run (one pyproject.toml; the code is the installed ppcmi)."""
    return write_app(out, cfg, settings, name="ppcmi-fedcore",
                     description="PPCMI-SF federated core: hospitals train on their own keyed latents; SecAgg+ sums the cores",
                     serverapp="ppcmi.flower.core_server_app:app", clientapp="ppcmi.flower.core_client_app:app",
                     extra={_SECTION: {k.replace("_", "-"): v for k, v in asdict(fed).items()}})


def read_core_run_config(rc: Mapping[str, Any]) -> tuple[Config, FlowerSettings, FedCoreSettings]:
    """Inverse of the run configuration :func:`write_core_app` wrote, on Flower's flattened ``context.run_config``."""
    return read_app_run_config(dict(rc), _SECTION, FedCoreSettings)


# ----------------------------------------------------------------------------- the core


def initial_core(cfg: Config) -> dict[str, np.ndarray]:
    """The seeded initial core every run starts from (as stage 2's network starts: ``seeded_init`` from the shared seed),
    built from shared settings only: the latent channels follow from ``autoencoder.width`` and ``autoencoder.skips``."""
    ch = AEConfig(width=cfg.autoencoder.width, skips=cfg.autoencoder.skips).latent_channels()
    if not cfg.autoencoder.skips:
        ch = {"b": ch["b"]}
    mcfg = MappingConfig(**{f: getattr(cfg.mapping, f) for f in MappingConfig.__dataclass_fields__})
    net = seeded_init(lambda: MappingNet(ch, ch, [], mcfg), cfg.seed)
    return {k: v.numpy().copy() for k, v in core_state(net, norm=cfg.mapping.federated_norm).items()}
