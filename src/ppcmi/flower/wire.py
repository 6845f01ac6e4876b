"""Flower's records for what crosses between a hospital's SuperNode and the coordinator (both sides).

The vocabulary (message types, record names, site statuses, the metric summary) is
:mod:`ppcmi.protocol`'s; this module only carries it in Flower's records and builds the app's run
configuration. Four message types, each answered by the hospital with a fixed set of records:

==========================  ==================================================  ==============================
message type                asks the hospital to                                it replies with
==========================  ==================================================  ==============================
``train.autoencoders``      train its autoencoders on its own data (stage 1)    ``site`` + ``metrics``
``query.train_latents``     send chunk k of its keyed training pairs (stage 2)  ``ppcmi``: that ``train`` chunk
``query.test_latents``      send keyed latents of its test images               ``ppcmi``: a ``query`` message,
                                                                                or ``site`` (no test data)
``evaluate.score``          decode the mapped reply and score it locally        ``metrics``
==========================  ==================================================  ==============================

``ppcmi`` is an ArrayRecord holding exactly one uint8 array: the bytes of one protocol message
(:mod:`ppcmi.protocol`), which the receiver checks with ``protocol.decode`` before using any
array. ``site`` is a ConfigRecord with only ``site`` (the pseudonymous site id, the protocol's
``client``) and ``status``. ``metrics`` is a MetricRecord of numbers: epochs and seconds of
stage 1, or a flattened metric summary. Any other record, key or value is refused with a
:class:`~ppcmi.errors.ProtocolError`.

A ``query.train_latents`` request carries a ConfigRecord ``chunk``: the chunk ``index`` (0 asks the hospital
to encode a new set), the ``set`` id of a later chunk, and the coordinator's chunk byte target ``bytes``
(:data:`ppcmi.protocol.CHUNK_BYTES`). One chunk per message keeps every Flower message far below gRPC's
limit (Flower 1.41 sets ``grpc.max_send_message_length`` / ``max_receive_message_length`` to
``flwr.common.GRPC_MAX_MESSAGE_LENGTH``, 2 GiB - 1, and sends an array as objects of at most 5 MiB), and the
SuperLink holds one chunk per hospital at a time.

The run configuration every node sees (``[tool.flwr.app.config]`` of the app's pyproject.toml)
holds only shared, public settings: preprocessing, label values, network and training
settings, and the orchestration settings under ``flower.``. Data locations, keys and site
folders are each SuperNode's own ``node_config``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .. import protocol
from ..protocol import FPRINT, METRICS, PLAN, REPLY_RECORDS, SITE, WIRE
from ..config import Config, load_config, reader, setting_names, shared_settings
from ..errors import ConfigError, ProtocolError
from ..fileio import atomic_write_text

_WIRE_ARRAY = "bytes"


@dataclass(frozen=True)
class FlowerSettings:
    """Orchestration settings (run config keys ``flower.*``)."""

    nodes: int = 1                  # SuperNodes the ServerApp waits for before stage 1
    retries: int = 2                # extra attempts per node after an error reply or no reply
    timeout: float = 3600.0         # seconds to wait for the replies of one step
    connect_timeout: float = 300.0  # seconds to wait for the SuperNodes to connect
    plan: bool = False              # a fingerprint round first; the plan's settings travel with every later step
    budget: float = 20.0            # the plan's time budget in minutes (hospitals train stage 1 in parallel)
    keep: str = ""                  # comma-separated settings the plan must not change (what the user set)
    server_device: str = "auto"     # where the ServerApp (the coordinator) computes; each SuperNode's is its node_config device

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.retries < 0 or self.timeout <= 0 or self.connect_timeout <= 0 or not self.budget > 0:
            raise ConfigError(f"flower: nodes >= 1, retries >= 0, positive timeouts and budget required, got {asdict(self)}")


# ----------------------------------------------------------------------------- run configuration


def _toml_value(v: Any) -> Any:
    """A run-config value: TOML scalars pass, None and sequences become strings load_config parses."""
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return v


def run_config(cfg: Config, settings: FlowerSettings) -> dict[str, Any]:
    """The nested run configuration (``[tool.flwr.app.config]``) for ``cfg``: its shared settings only
    (:func:`ppcmi.config.shared_settings`); hospital settings go to each SuperNode's ``node_config``."""
    shared = shared_settings(cfg)
    return {
        **{k: _toml_value(v) for k, v in shared.items() if not isinstance(v, dict)},
        **{section: {k: _toml_value(v) for k, v in values.items()} for section, values in shared.items() if isinstance(values, dict)},
        "flower": {k.replace("_", "-"): v for k, v in asdict(settings).items()},
    }


def read_run_config(rc: dict[str, Any]) -> tuple[Config, FlowerSettings]:
    """Inverse of :func:`run_config` on Flower's flattened ``context.run_config``."""
    overrides, flower = [], {}
    for key, value in rc.items():
        if key.startswith("flower."):
            name = key[len("flower."):].replace("-", "_")
            if name not in FlowerSettings.__dataclass_fields__:
                raise ConfigError(f"run config: unknown key {key!r}")
            flower[name] = value
        else:
            overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    try:
        settings = FlowerSettings(**{k: (int(v) if k in ("nodes", "retries") else _bool(v) if k == "plan" else
                                         str(v) if k in ("keep", "server_device") else float(v)) for k, v in flower.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"run config: flower.* settings: {e}") from None
    return load_config(None, overrides), settings


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "false"):
        return str(v).lower() == "true"
    raise ValueError(f"flower.plan: expected true or false, got {v!r}")


def _toml(obj: dict[str, Any], prefix: str) -> list[str]:
    lines, tables = [f"[{prefix}]"], []
    for k, v in obj.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{prefix}.{k}: {v} cannot be written to TOML")
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    for k, v in tables:
        lines += [""] + _toml(v, f"{prefix}.{k}")
    return lines


def read_app_run_config(rc: dict[str, Any], section: str, settings_cls: type) -> tuple[Config, FlowerSettings, Any]:
    """Inverse of :func:`write_app` with ``extra={section: asdict(settings)}``: the shared configuration, the Flower
    settings and the app's own ``settings_cls`` (a dataclass of str, int and float fields, keys ``section.name-with-dashes``),
    each value cast to its field's type; an unknown or uncastable key is a one-line :class:`ConfigError` naming it."""
    own: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in rc.items():
        if key.startswith(section + "."):
            name = key[len(section) + 1:].replace("-", "_")
            if name not in settings_cls.__dataclass_fields__:
                raise ConfigError(f"run config: unknown key {key!r}")
            own[name] = value
        else:
            rest[key] = value
    cfg, settings = read_run_config(rest)
    kinds = {f.name: f.type for f in settings_cls.__dataclass_fields__.values()}  # (the annotations' names, as strings)
    try:
        own = {k: (str(v) if kinds[k] == "str" else int(v) if kinds[k] == "int" else float(v)) for k, v in own.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"run config: {section}.* settings: {e}") from None
    return cfg, settings, settings_cls(**own)


def write_app(out: str | Path, cfg: Config, settings: FlowerSettings, *, name: str = "ppcmi-flower",
              description: str = "PPCMI-SF across hospitals: keyed latents only; the ServerApp trains the mapping network",
              serverapp: str = "ppcmi.flower.server_app:app", clientapp: str = "ppcmi.flower.client_app:app",
              extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the Flower app folder ``out`` (one pyproject.toml; the code is the installed ppcmi).

    ``flwr run OUT CONNECTION`` bundles only this folder, so no data and no key can travel in
    the bundle; every node imports its ``serverapp`` / ``clientapp`` from its own installation. ``extra``
    adds run-config sections of the app's own (the federated U-Net's ``fedunet``).
    """
    out = Path(out)
    head = [
        "# A ppcmi Flower app: written by ppcmi (ppcmi deploy / ppcmi flower app / ppcmi bench); shared settings only.",
        "[project]", f'name = "{name}"', 'version = "0.1.0"',
        f"description = {json.dumps(description)}",
        'license = "Apache-2.0"', 'dependencies = ["flwr>=1.41,<1.42"]', "",
        "[tool.flwr.app]", 'publisher = "ppcmi"', "",
        "[tool.flwr.app.components]",
        f'serverapp = "{serverapp}"', f'clientapp = "{clientapp}"', "",
    ]
    text = "\n".join(head + _toml({**run_config(cfg, settings), **(extra or {})}, "tool.flwr.app.config")) + "\n"
    atomic_write_text(out / "pyproject.toml", text)
    return out


# ----------------------------------------------------------------------------- records


def _bytes_record(name: str, blob: bytes) -> RecordDict:
    """Content carrying ``blob`` as the single uint8 array of the ArrayRecord ``name``."""
    return RecordDict({name: ArrayRecord(array_dict={_WIRE_ARRAY: Array(np.frombuffer(blob, dtype=np.uint8))})})


def _record_bytes(content: RecordDict, name: str) -> bytes:
    """The bytes :func:`_bytes_record` put into ``content``; any other shape of the record ``name`` is refused by name."""
    rec = content[name] if name in content else None
    if not isinstance(rec, ArrayRecord) or set(rec.keys()) != {_WIRE_ARRAY}:
        raise ProtocolError(f"record {name!r}: expected an ArrayRecord with the single array {_WIRE_ARRAY!r}")
    arr = rec[_WIRE_ARRAY].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ProtocolError(f"record {name!r}: expected a 1-D uint8 array, got {arr.dtype} {arr.shape}")
    return arr.tobytes()


def wire_record(msg: protocol.LatentBatch) -> RecordDict:
    """Content carrying one protocol message as a uint8 array."""
    return _bytes_record(WIRE, protocol.encode(msg))


def chunk_request(index: int, set_id: str = "", target: int = protocol.CHUNK_BYTES) -> RecordDict:
    """The content of a ``query.train_latents`` request for chunk ``index`` of set ``set_id``."""
    protocol.check_chunk_request(index, set_id, target)
    return RecordDict({protocol.CHUNK: ConfigRecord({"index": index, "set": set_id, "bytes": target})})


def read_chunk_request(content: RecordDict) -> tuple[int, str, int]:
    """(index, set id, byte target) of a ``query.train_latents`` request; a request without a record is chunk 0.
    (A plan's record travels beside it: :func:`apply_plan_record` reads that one.)"""
    names = set(content.keys()) - {PLAN}
    if not names:
        return 0, "", protocol.CHUNK_BYTES
    rec = content[protocol.CHUNK] if names == {protocol.CHUNK} else None
    if not isinstance(rec, ConfigRecord) or set(rec.keys()) != set(protocol.CHUNK_KEYS):
        raise ProtocolError(f"request: expected only a ConfigRecord {protocol.CHUNK!r} with {list(protocol.CHUNK_KEYS)}")
    index, set_id, target = rec["index"], rec["set"], rec["bytes"]
    protocol.check_chunk_request(index, set_id, target)
    return index, set_id, target


def site_record(site: str, status: str) -> ConfigRecord:
    protocol.check_site(site, status)
    return ConfigRecord({"site": site, "status": status})


def check_reply(content: RecordDict, message_type: str) -> None:
    """Refuse any reply whose records are not exactly one of the sets this message type allows."""
    names = set(content.keys())
    if names not in [set(s) for s in REPLY_RECORDS[message_type]]:
        raise ProtocolError(f"reply to {message_type}: records {sorted(names)} not allowed "
                            f"(expected one of {[sorted(s) for s in REPLY_RECORDS[message_type]]})")
    kinds = {WIRE: ArrayRecord, SITE: ConfigRecord, METRICS: MetricRecord, FPRINT: ArrayRecord}
    for name in names:
        if not isinstance(content[name], kinds[name]):
            raise ProtocolError(f"reply to {message_type}: record {name!r} must be a {kinds[name].__name__}")
    if SITE in names:
        rec = content[SITE]
        if set(rec.keys()) != {"site", "status"} or not all(isinstance(v, str) for v in rec.values()):
            raise ProtocolError(f"reply to {message_type}: record 'site' must hold exactly the strings site and status")
        site_record(rec["site"], rec["status"])


def read_wire(content: RecordDict, *, kind: str, client: str | None = None,
              max_bytes: int = protocol.MAX_BYTES) -> tuple[protocol.LatentBatch, bytes]:
    """The protocol message inside ``content``, decoded and checked; also its raw bytes."""
    blob = _record_bytes(content, WIRE)
    msg = protocol.decode(blob, max_bytes=max_bytes)
    if msg.kind != kind:
        raise ProtocolError(f"kind: expected a {kind!r} message, got {msg.kind!r}")
    if client is not None and msg.client != client:
        raise ProtocolError(f"client: message names site {msg.client!r}, expected {client!r}")
    return msg, blob


def fingerprint_record(fp: protocol.Fingerprint) -> RecordDict:
    """Content carrying one fingerprint's bytes as a uint8 array."""
    return _bytes_record(FPRINT, protocol.encode_fingerprint(fp))


def read_fingerprint(content: RecordDict) -> tuple[protocol.Fingerprint, bytes]:
    """The fingerprint inside ``content``, decoded and validated; also its bytes."""
    blob = _record_bytes(content, FPRINT)
    return protocol.decode_fingerprint(blob), blob


def plan_record(settings: dict[str, Any]) -> ConfigRecord:
    """The plan's settings as a record: ``section.key`` -> the value as JSON text (shared settings only)."""
    _check_plan_keys(settings)
    return ConfigRecord({k: json.dumps(v) for k, v in settings.items()})


def _check_plan_keys(keys: Any) -> None:
    known = set(setting_names())
    for k in keys:
        if k not in known or reader(k) != "shared":
            raise ProtocolError(f"record {PLAN!r}: {k!r} is not a shared setting a plan may set")


def with_plan(content: RecordDict, settings: dict[str, Any] | None) -> RecordDict:
    """``content`` plus the plan's record (unchanged without a plan)."""
    if settings:
        content[PLAN] = plan_record(settings)
    return content


def apply_plan_record(cfg: Config, content: RecordDict) -> Config:
    """``cfg`` with the plan a coordinator's message carries (the run configuration as it is without one).

    Only shared settings are accepted, each parsed and checked as ``--set`` would be."""
    rec = content[PLAN] if PLAN in content else None
    if rec is None:
        return cfg
    if not isinstance(rec, ConfigRecord):
        raise ProtocolError(f"record {PLAN!r}: must be a ConfigRecord")
    _check_plan_keys(rec.keys())
    sets = []
    for k, v in rec.items():
        try:
            value = json.loads(v) if isinstance(v, str) else None
        except ValueError:
            value = None
        if (value is None and v != "null") or isinstance(value, dict):
            raise ProtocolError(f"record {PLAN!r}: {k!r} must carry a JSON number, string, boolean, list or null")
        sets.append(f"{k}={','.join(str(x) for x in value) if isinstance(value, list) else value}")  # null: "None"
    return load_config(None, sets, base=cfg)


def attach_log(fmt: str, *, propagate: bool = True) -> None:
    """Send the ``ppcmi`` loggers' INFO lines to this Flower process's stderr in ``fmt`` (once per process): a
    ClientApp's reach its SuperNode's log, which stays at the hospital; a ServerApp's reach ``flwr run --stream``."""
    pkg = logging.getLogger("ppcmi")
    if not pkg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(fmt))
        pkg.addHandler(h)
        pkg.setLevel(logging.INFO)
        pkg.propagate = propagate


# ----------------------------------------------------------------------------- metric summaries


def summary_structures(cfg: Config) -> set[str]:
    """The structures a hospital's metric summary may name under the shared label map of ``cfg``."""
    from ..labels import parse_labels
    from ..metrics import structure_names

    lm = parse_labels(cfg.data.labels, cfg.data.class_names)
    if lm is None:
        raise ConfigError("data.labels: must be set in the run configuration so that every hospital uses the same classes")
    return set(structure_names(lm.n_classes, list(lm.names)))
