"""Run configuration (both sides): typed, frozen dataclasses loaded from TOML with typed overrides.

A TOML file has the sections ``[data]``, ``[autoencoder]``, ``[mapping]``, ``[unet]`` and top-level keys;
unknown sections or keys are rejected. Overrides are ``section.key=value`` strings parsed to the
field's type (``--set autoencoder.epochs=5 --set data.size=128``). The resolved configuration is
saved as ``config.json`` next to every output, with its ``version``; :func:`migrate` reads older ones.
No secret ever belongs here: keys live in key files.

Who reads a setting (:func:`reader`): *shared* settings (preprocessing, labels, network and
training settings, the seed) cross to the coordinator in the run configuration and every hospital
applies them; *hospital* settings (:data:`HOSPITAL`: how it groups its own files, the noise it adds
before sending) stay at a hospital, in a SuperNode's ``node_config``; *experiment* settings
(:data:`EXPERIMENT`: how many hospitals, how one dataset is dealt and split, the U-Net reference's schedule) are
read only by ``simulate``, ``demo``, ``bench`` and ``deploy``. :func:`shared_settings` is all that
may cross.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, check_bool, check_int, check_real
from .fileio import read_text
from .models import NORM_SCOPES, AEShape, MappingConfig
from .protocol import CHUNK_BYTES, MAX_BYTES, MIN_CHUNK_BYTES

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")
INTENSITY_MODES = ("minmax", "percentile", "window", "zscore", "ct")
# data.size: 8x the published 256. Every plane of a dataset is held in memory at this
# size (16 MiB per float32 plane) and the autoencoder's first stage is 16 x size x size per image.
MAX_SIZE = 2048
MAX_SEED = 2**32 - 1  # numpy's SeedSequence and torch's manual_seed both take it, and seed x 1e6 + epoch stays in 64 bits


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """How a raw plane becomes a network input: intensity scaling, colour, region (roi or crop), resize (to a target
    spacing, or to fit) and padding to size x size."""

    size: int = 256
    intensity: str = "minmax"  # minmax | percentile | window | zscore (per image) | ct (pooled statistics, from a plan)
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = None  # (low, high) after subtracting offset, e.g. (-1000, 1000)
    offset: float = 0.0  # subtracted from raw values first (CT stored as HU+1024 -> 1024)
    color: str = "gray"  # gray (luminance) | rgb (3 channels; gray repeated)
    crop: float = 1.0  # keep the central fraction of each side before resizing (1.0: whole plane; the central case of roi)
    roi: tuple[float, float, float, float] | None = None  # (top, bottom, left, right) fractions of the field kept (None: crop)
    spacing: tuple[float, float] | None = None  # target in-plane (row_mm, col_mm): planes with a spacing are resampled to it first
    resize: str = "pad"  # pad: longer side to size, aspect kept, symmetric padding | squash: both sides to size (before config version 3)
    stats: tuple[float, float] | None = None  # ct: the pooled foreground (mean, std) after offset (a plan writes it)
    zrange: float = 4.0  # zscore, ct: z-scores in [-zrange, zrange] map linearly onto [0, 1] (beyond: clipped)
    max_clipped: float = 0.5  # a training plane with more of its foreground clipped than this share is an error

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 1 <= self.size <= MAX_SIZE:
            raise DataError(f"data.size: must be an integer from 1 to {MAX_SIZE} (8x the published 256; every plane is "
                            f"held in memory at this size), got {self.size!r}")
        if self.intensity not in INTENSITY_MODES:
            raise DataError(f"data.intensity: must be one of {', '.join(INTENSITY_MODES)}, got {self.intensity!r}")
        if self.color not in ("gray", "rgb"):
            raise DataError(f"data.color: must be gray or rgb, got {self.color!r}")
        lo, hi = (check_real("data.percentiles", v, 0.0, 100.0, error=DataError) for v in self.percentiles)
        if not 0 <= lo < hi <= 100:
            raise DataError(f"data.percentiles: need 0 <= low < high <= 100, got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", (lo, hi))
        if self.window is not None:
            wl, wh = (check_real("data.window", v, -math.inf, error=DataError) for v in self.window)
            if not wl < wh:
                raise DataError(f"data.window: need low < high, got {self.window!r}")
            object.__setattr__(self, "window", (wl, wh))
        elif self.intensity in ("window", "ct"):
            raise DataError(f"data.window: intensity {self.intensity!r} needs a window (low, high)")
        if self.stats is not None:
            mean = check_real("data.stats", self.stats[0], -math.inf, error=DataError)
            std = check_real("data.stats", self.stats[1], 0.0, lo_open=True, why=" (the std)", error=DataError)
            object.__setattr__(self, "stats", (mean, std))
        elif self.intensity == "ct":
            raise DataError("data.stats: intensity 'ct' needs the pooled foreground (mean, std) (ppcmi plan writes both)")
        object.__setattr__(self, "zrange", check_real("data.zrange", self.zrange, 0.0, lo_open=True, error=DataError))
        object.__setattr__(self, "max_clipped", check_real("data.max_clipped", self.max_clipped, 0.0, 1.0, lo_open=True,
                                                           error=DataError))
        object.__setattr__(self, "offset", check_real("data.offset", self.offset, -math.inf, error=DataError))
        object.__setattr__(self, "crop", check_real("data.crop", self.crop, 0.0, 1.0, lo_open=True, error=DataError))
        if self.resize not in ("pad", "squash"):
            raise DataError(f"data.resize: must be pad or squash, got {self.resize!r}")
        if self.roi is not None:
            t, b, left, r = (check_real("data.roi", v, 0.0, 1.0, error=DataError) for v in self.roi)
            if not (0.0 <= t < b <= 1.0 and 0.0 <= left < r <= 1.0):
                raise DataError(f"data.roi: need 0 <= top < bottom <= 1 and 0 <= left < right <= 1 (fractions of the field), "
                                f"got {self.roi!r}")
            if self.crop != 1.0:
                raise DataError(f"data.roi and data.crop: both set ({self.roi!r}, {self.crop:g}); data.crop is the central "
                                "special case of data.roi, set one")
            object.__setattr__(self, "roi", (t, b, left, r))
        if self.spacing is not None:
            sr, sc = (check_real("data.spacing", v, 0.0, lo_open=True, why=" (mm per pixel, row and column)", error=DataError)
                      for v in self.spacing)
            if self.resize != "pad":
                raise DataError(f"data.spacing: a target spacing needs data.resize = pad, got {self.resize!r}")
            object.__setattr__(self, "spacing", (sr, sc))


@dataclass(frozen=True)
class DataConfig(Preprocess):
    """The ``[data]`` settings: the shared preprocessing (:class:`Preprocess`), labels, grouping and splits."""

    labels: str | None = None          # "0,1,2" (raw mask values in class order); None: discover
    class_names: str | None = None     # "background,ps,fh"
    rois: str | None = None            # RTSTRUCT masks: "GTV-1,Lung-Left" (classes 1, 2, ... in this order); None: every ROI, sorted
    group_regex: str | None = None     # patient id from the file stem, e.g. "^(patient\\d+)_"
    group_csv: str | None = None
    volume_regex: str | None = None    # 2D files that are planes of volumes: the volume from the stem, e.g.
    #                                    "^(patient\\d+_frame\\d+)_"; whole test volumes are then scored too
    split_lists: dict[str, str] | None = None  # {"train": "...", "val": "...", "test": "..."}
    test_frac: float = 0.2
    partition: str = "group"           # iid | group | site

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.size, int) or self.size < 32 or self.size % 32:
            raise ConfigError(f"data.size: must be a multiple of 32 (the autoencoder halves it five times), got {self.size!r}")
        object.__setattr__(self, "test_frac", check_real("data.test_frac", self.test_frac, 0.0, 1.0, hi_open=True))
        _choice("data.partition", self.partition, ("iid", "group", "site"))
        for name in ("labels", "class_names", "rois", "group_regex", "group_csv", "volume_regex"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"data.{name}: must be a string, got {getattr(self, name)!r}")
        if self.rois is not None:
            names = self.roi_names() or ()
            if not all(names):
                raise ConfigError(f"data.rois: comma-separated RTSTRUCT ROI names, none empty, got {self.rois!r}")
            if len(set(names)) != len(names):
                raise ConfigError(f"data.rois: each ROI may be named once, got {self.rois!r}")

    def roi_names(self) -> tuple[str, ...] | None:
        """``rois`` as the names :func:`ppcmi.data.discover_cases` takes (None: every ROI of the RTSTRUCT, sorted)."""
        if self.rois is None:
            return None
        return tuple(n.strip() for n in self.rois.split(","))

    def preprocess(self) -> Preprocess:
        """The preprocessing part of these settings."""
        return Preprocess(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Preprocess)})


@dataclass(frozen=True)
class AutoencoderConfig(AEShape):
    """The ``[autoencoder]`` settings: its topology (:class:`ppcmi.models.AEShape`), training and what it sends."""

    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"      # constant (published) | cosine
    patience: int = 15
    val_frac: float = 0.2
    augment: bool = False              # random rotation/flip/scale/intensity of training batches (also for the U-Net baseline)
    send_copies: int = 1               # stage 2: each training pair plus send_copies-1 augmented copies (1-32)
    send_noise: float = 0.0            # std of Gaussian noise added to plain latents before the KLT (train and query); a defence knob, no DP claim
    mask_noise: float = 0.0            # the mask autoencoder trains decoding its latents plus Gaussian noise of this std relative to
    #                                    each latent channel's spread in the batch, so it decodes the mapping network's inexact latents

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_training("autoencoder", self)
        check_bool("autoencoder.augment", self.augment)
        check_int("autoencoder.send_copies", self.send_copies, 1, 32, why=" (each pair plus up to 31 augmented copies)")
        object.__setattr__(self, "send_noise", check_real("autoencoder.send_noise", self.send_noise, 0.0, 1e6))
        object.__setattr__(self, "mask_noise", check_real("autoencoder.mask_noise", self.mask_noise, 0.0, 10.0))


@dataclass(frozen=True)
class MappingTrainConfig(MappingConfig):
    """The ``[mapping]`` settings: the network (:class:`ppcmi.models.MappingConfig`), its training, scope and DP."""

    epochs: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"      # constant (published) | cosine
    scope: str = "shared"              # shared (one network, per-hospital adapters) | per_hospital (no collaboration)
    #                                    | federated: each hospital trains on its own keyed latents, which never leave it; only
    #                                      the shared core's weights cross, combined by Flower with SecAgg+; adapters stay local
    federated_norm: str = "local"      # scope federated: where the core's normalisation layers live: local (FedBN: each hospital
    #                                    keeps its own affines and running statistics; only the convolutions cross) | shared
    federated_select: str = "last"     # scope federated: the local model a hospital keeps: last (the final global core) | val
    #                                    (the round whose global core, with its own adapters, scored lowest on its own held-out
    #                                    patients, mapping.val_frac of them, never trained on: stage 2's best-epoch rule)
    federated_loss: str = "latent"     # scope federated: what a hospital's rounds minimise: latent (stage 2's MSE on keyed latents)
    #                                    | decoded (that plus the mask autoencoder's loss of the prediction decoded by the hospital's
    #                                    own key and mask decoder, against its decoded target; possible only where the decoder is)
    adapter_init: str = "pca"          # pca: fixed per-hospital frames (principal axes of its keyed latents) around its adapters | identity (published)
    patience: int = 20
    val_frac: float = 0.2
    dp: bool = False                   # DP-SGD (Opacus): needs norm = "group"; fixed epochs, no early stopping or best-epoch pick
    dp_noise: float = 1.0              # noise multiplier (ignored when dp_epsilon is set)
    dp_clip: float = 1.0               # per-sample gradient norm bound
    dp_epsilon: float | None = None    # target epsilon at delta = 1/N (N = training rows; scope federated: patients); sets the noise
    dp_patients: int = 16              # scope federated: expected patients per DP-SGD step (Poisson sampling at each hospital)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_training("mapping", self)
        check_bool("mapping.dp", self.dp)
        _choice("mapping.scope", self.scope, ("shared", "per_hospital", "federated"))
        _choice("mapping.federated_norm", self.federated_norm, NORM_SCOPES)
        _choice("mapping.federated_select", self.federated_select, ("last", "val"))
        if self.dp and self.federated_select == "val":
            raise ConfigError('mapping.dp: DP-SGD trains a fixed budget and keeps its last weights (choosing a round by a held-out '
                              'loss is outside its accounting); set mapping.federated_select = "last" with mapping.dp')
        _choice("mapping.federated_loss", self.federated_loss, ("latent", "decoded"))
        if self.federated_loss == "decoded" and self.scope != "federated":
            raise ConfigError('mapping.federated_loss: "decoded" needs mapping.scope = "federated" (only a hospital holds its key '
                              f'and mask decoder; the coordinator of scope {self.scope!r} never does)')
        if self.dp and self.federated_loss == "decoded":
            raise ConfigError('mapping.dp: patient-level DP-SGD is implemented for the latent loss only; set '
                              'mapping.federated_loss = "latent" with mapping.dp')
        _choice("mapping.adapter_init", self.adapter_init, ("identity", "pca"))
        if self.dp and self.adapter_init == "pca":
            raise ConfigError('mapping.dp: the default mapping.adapter_init = "pca" reads each hospital\'s latent statistics without '
                              'noise, which DP-SGD\'s accounting does not cover; set mapping.adapter_init = "identity" with mapping.dp')
        if self.dp and self.norm != "group":
            raise ConfigError('mapping.dp: DP-SGD needs mapping.norm = "group" (BatchNorm mixes samples, so per-sample or '
                              'per-patient gradients are undefined, and cannot normalise a patient with one row)')
        check_int("mapping.dp_patients", self.dp_patients, 1, 10**6)
        object.__setattr__(self, "dp_noise", check_real("mapping.dp_noise", self.dp_noise, 0.0, 1e6))
        object.__setattr__(self, "dp_clip", check_real("mapping.dp_clip", self.dp_clip, 0.0, 1e6, lo_open=True))
        if self.dp_epsilon is not None:
            object.__setattr__(self, "dp_epsilon", check_real("mapping.dp_epsilon", self.dp_epsilon, 0.0, 1e6, lo_open=True))


@dataclass(frozen=True)
class UNetConfig:
    """The ``[unet]`` settings: the schedule of the centralized U-Net reference that ``demo`` and ``bench`` train
    next to PPCMI-SF (experiment settings). ``None``: as many augmented pairs as the mapping network sees
    (``mapping.epochs`` x ``autoencoder.send_copies`` epochs over the pooled data, patience likewise); a plan sets
    them so that the U-Net gets the run's time budget."""

    epochs: int | None = None
    patience: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "patience"):
            if getattr(self, name) is not None:
                check_int(f"unet.{name}", getattr(self, name), 1, 100_000)


def _check_training(section: str, cfg: AutoencoderConfig | MappingTrainConfig) -> None:
    """The training settings both networks have: positive counts, a finite positive rate, a validation fraction."""
    check_int(f"{section}.epochs", cfg.epochs, 1)
    check_int(f"{section}.batch_size", cfg.batch_size, 1)
    check_int(f"{section}.patience", cfg.patience, 1)
    object.__setattr__(cfg, "lr", check_real(f"{section}.lr", cfg.lr, 0.0, 10.0, lo_open=True))
    object.__setattr__(cfg, "val_frac", check_real(f"{section}.val_frac", cfg.val_frac, 0.0, 1.0, hi_open=True))
    _choice(f"{section}.lr_schedule", cfg.lr_schedule, SCHEDULES)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    clients: int = 3
    klt: bool = True                   # False: the "no KLT" ablation (latents sent in the clear)
    chunk_bytes: int = CHUNK_BYTES     # stage 2: a hospital's training set travels in chunks of at most this many bytes
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    mapping: MappingTrainConfig = field(default_factory=MappingTrainConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def __post_init__(self) -> None:
        if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int) or \
                not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_BYTES:
            raise ConfigError(f"chunk_bytes: must be an integer from {MIN_CHUNK_BYTES} to {MAX_BYTES}, got {self.chunk_bytes!r}")
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("clients", self.clients, 1, 1000)
        check_bool("klt", self.klt)


CONFIG_VERSION = 5  # 2: data.val_frac removed (nothing read it); mapping.adapter_init recorded. 3: data.resize; data.eval_size retired.
# 4: data.spacing (target in-plane spacing) and data.roi (a region-of-interest box). 5: mapping.federated_norm

# settings that no longer exist, and why: naming one (TOML or --set) is an error with this message
RETIRED = {"data.eval_size": "retired in config version 3: test cases are scored at their native resolution (class "
                             "probabilities resampled to each plane's own grid before the argmax); remove the setting"}

HOSPITAL = ("data.group_regex", "data.group_csv", "autoencoder.send_noise")
EXPERIMENT = ("clients", "data.volume_regex", "data.split_lists", "data.test_frac", "data.partition", "unet.epochs", "unet.patience")


def reader(key: str) -> str:
    """``"shared"``, ``"hospital"`` or ``"experiment"`` for a setting named ``section.key`` (or a top-level key)."""
    return "hospital" if key in HOSPITAL else "experiment" if key in EXPERIMENT else "shared"


def _settings(raw: dict, prefix: str = "") -> list[str]:
    return [n for k, v in raw.items() for n in (_settings(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "split_lists"
                                               else [f"{prefix}{k}"])]


def setting_names(cfg: Config | None = None) -> list[str]:
    """Every setting, as ``section.key``."""
    return _settings(dataclasses.asdict(cfg or Config()))


def _shared(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k != "split_lists":  # a section
            out[k] = _shared(v, f"{prefix}{k}.")
        elif reader(f"{prefix}{k}") == "shared":
            out[k] = v
    return out


def shared_settings(cfg: Config) -> dict:
    """The nested settings that cross to the coordinator and every hospital: no hospital or experiment setting."""
    return _shared(json.loads(json.dumps(dataclasses.asdict(cfg))))


def migrate(raw: dict) -> dict:
    """A saved configuration of any version -> the current layout (without ``version``).

    Version 1 (no ``version`` key): ``mapping.adapter_init`` did not exist and its runs used
    ``"identity"``; ``data.val_frac`` existed but nothing read it (dropped). Versions 1 and 2: every plane
    was squashed to size x size (``data.resize = "squash"``); ``data.eval_size`` (a scoring size) is dropped,
    as test cases are now scored at their native resolution (logged when it was set). Versions 1 to 3: no
    plane was resampled to a target spacing (``data.spacing = None``) and the kept region was the central
    ``data.crop`` (``data.roi = None``). Versions 1 to 4: a federated core averaged its normalisation layers with the rest
    (``mapping.federated_norm = "shared"``)."""
    raw = json.loads(json.dumps(raw))
    version = raw.pop("version", 1)
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise ConfigError(f"version: config version {version!r} is not one this ppcmi reads (1 to {CONFIG_VERSION})")
    if version < 2:
        if isinstance(raw.get("mapping"), dict):
            raw["mapping"].setdefault("adapter_init", "identity")
        if isinstance(raw.get("data"), dict):
            raw["data"].pop("val_frac", None)
    if version < 3 and isinstance(raw.get("data"), dict):
        raw["data"].setdefault("resize", "squash")
        if raw["data"].pop("eval_size", None) is not None:
            log.warning("data.eval_size of a version %d configuration ignored: %s", version, RETIRED["data.eval_size"])
    if version < 4 and isinstance(raw.get("data"), dict):
        raw["data"].setdefault("spacing", None)
        raw["data"].setdefault("roi", None)
    if version < 5 and isinstance(raw.get("mapping"), dict):
        raw["mapping"].setdefault("federated_norm", "shared")
    return raw


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if isinstance(value, str):  # "8,16,32" or TOML-style "[8, 16, 32]"
            value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any number, at least one
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{where}: expected one or more comma-separated values, got {value!r}")
            return tuple(_coerce(v, args[0], where) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(value.strip())
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    for k in sorted(unknown):
        _retired(f"{where}.{k}" if where else k, where or "config")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed {sorted(names)}")
    kwargs = {}
    for k, v in raw.items():
        tp = hints[k]
        key = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a table")
            kwargs[k] = _build(tp, v, key)
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def build(cls: type, raw: dict, where: str) -> Any:
    """A settings dataclass ``cls`` (for example :class:`ppcmi.models.AEConfig`) from plain values as a saved
    record holds them: unknown keys refused, each value parsed to its field's type and checked, one
    ConfigError naming ``where.key`` otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    return _build(cls, raw, where)


def to_dict(cfg: Any) -> dict:
    """Plain JSON values; a whole :class:`Config` also carries its ``version`` (what :func:`from_dict` reads back)."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return {"version": CONFIG_VERSION, **d} if isinstance(cfg, Config) else d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Load ``path`` (TOML) on top of ``base`` (defaults), then apply ``section.key=value`` overrides."""
    raw = to_dict(base or Config())
    raw.pop("version")
    if path is not None:
        p = Path(path)
        text = read_text(p, "TOML config file", ConfigError)
        try:
            file_raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
        _merge(raw, file_raw, str(p))
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected section.key=value")
        key, value = ov.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {key}: unknown section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            _retired(key.strip(), f"--set {key}")
            raise ConfigError(f"--set {key}: unknown key {parts[-1]!r}")
        node[parts[-1]] = value
    return _build(Config, raw, "")


def _retired(key: str, where: str) -> None:
    if key in RETIRED:
        raise ConfigError(f"{where}: {key} is {RETIRED[key]}")


def _merge(dst: dict, src: dict, where: str, prefix: str = "") -> None:
    for k, v in src.items():
        if k not in dst:
            _retired(f"{prefix}{k}", where)
            raise ConfigError(f"{where}: unknown key {k!r}; allowed {sorted(dst)}")
        if isinstance(dst[k], dict) and isinstance(v, dict) and k != "split_lists":
            _merge(dst[k], v, f"{where}:{k}", f"{prefix}{k}.")
        else:
            dst[k] = v


def from_dict(raw: dict) -> Config:
    """A saved run's settings (its ``config.json``), of any version (:func:`migrate`); keys added since take
    their defaults."""
    return _build(Config, migrate(raw), "")
