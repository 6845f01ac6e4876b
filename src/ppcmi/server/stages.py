"""The coordinator's stages, defined once (coordinator side): train the mapping network(s) under
``mapping.scope`` from the hospitals' keyed training messages, and load what answers their queries.
``ppcmi server train``, ``simulate`` (and so ``demo`` and ``bench``) and the Flower ServerApp call these.

``mapping.scope = "shared"``: one network for every hospital in ``OUT/``. ``"per_hospital"`` (the
no-collaboration baseline): one network per hospital, each on its own pairs only, in ``OUT/<hospital>/``.
``"federated"`` never reaches the coordinator's stage 2: the hospitals train the core themselves through Flower
(:mod:`ppcmi.flower.fedcore`), so :func:`train_mappings` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import MappingTrainConfig
from ..device import Device
from ..errors import ConfigError, ProtocolError
from ..protocol import LatentBatch
from ..training import FitResult
from .inbox import TrainingSet
from .mapping import MappingServer, train_mapping


@dataclass(frozen=True)
class TrainedMapping:
    """Where each hospital's mapping network is, and the fit of every network trained in this call."""

    model_dirs: dict[str, Path]
    fits: dict[str, FitResult] = field(default_factory=dict)  # "" (shared) or the hospital -> its fit

    def servers(self, *, device: Device = None) -> dict[str, MappingServer]:
        """One loaded :class:`MappingServer` per hospital (hospitals sharing a network share the object), on ``device``."""
        loaded: dict[Path, MappingServer] = {}
        for d in self.model_dirs.values():
            if d not in loaded:
                loaded[d] = MappingServer(d, device=device)
        return {c: loaded[d] for c, d in self.model_dirs.items()}

    def summary(self) -> dict:
        """Epochs and validation losses: of the shared network, or ``{"per_hospital": {hospital: ...}}``."""
        rows = {sub: {"epochs": len(r.history), "best_epoch": r.best_epoch, "best_val": r.best_val, "history": r.history}
                for sub, r in self.fits.items()}
        if not rows or "" in rows:
            return rows.get("", {})
        return {"per_hospital": rows}


def refuse_federated(cfg: MappingTrainConfig, runner: str) -> None:
    """A one-line :class:`ConfigError` when ``cfg.scope`` is ``"federated"``, which ``runner`` does not run: that scope keeps
    the latents at the hospitals and trains the core through Flower with secure aggregation. Runners call it before any
    work, so a wrong scope never costs a stage 1."""
    if cfg.scope == "federated":
        raise ConfigError(f"mapping.scope: \"federated\" keeps the latents at the hospitals and trains the core through Flower "
                          f"with secure aggregation (ppcmi simulate, ppcmi deploy or ppcmi bench --methods ppcmi_federated "
                          f"run it on a loopback federation); {runner} does not")


def train_mappings(batches: list[LatentBatch] | list[TrainingSet], cfg: MappingTrainConfig, out_dir: str | Path, *, seed: int,
                   resume: bool = False, reuse: bool = False, progress: bool = True, device: Device = None) -> TrainedMapping:
    """Stage 2 under ``cfg.scope`` on messages in memory or training sets opened from chunk files
    (:func:`ppcmi.server.inbox.open_sets`). ``reuse`` keeps a network already trained in its folder (a re-run of
    a finished stage); ``resume`` continues an interrupted one. ``device`` is the coordinator's own choice of where to
    train (:func:`ppcmi.device.resolve_device`; None is the CPU), never a shared setting."""
    out = Path(out_dir)
    refuse_federated(cfg, "the coordinator's stage 2")
    if not batches:
        raise ProtocolError("inbox: no training messages received")
    groups: dict[str, list] = {}
    if cfg.scope == "shared":
        groups[""] = batches
    else:
        for b in batches:
            groups.setdefault(b.client, []).append(b)
    model_dirs: dict[str, Path] = {}
    fits: dict[str, FitResult] = {}
    for sub, group in groups.items():
        model_dir = out / sub if sub else out
        if not (reuse and (model_dir / "mapping.safetensors").exists()):
            _, fits[sub] = train_mapping(group, cfg, model_dir, seed=seed, resume=resume, progress=progress, device=device)
        for b in group:
            model_dirs[b.client] = model_dir
    return TrainedMapping(model_dirs, fits)
