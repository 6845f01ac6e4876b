"""A hospital's part of the federated mapping core (hospital side), free of any framework: ``mapping.scope = "federated"``.

The hospital trains the mapping network of stage 2 on its own keyed training pairs (the very rows it would have sent
the coordinator: :func:`ppcmi.client.stages.training_batch`), with stage 2's loss (:func:`ppcmi.models.mapping_loss`)
and a network of one client, itself. A round starts from the global core it received, trains ``local_epochs`` epochs
and returns the core (:func:`ppcmi.models.core_state`) and its row count; its adapters, frames and latents stay here,
and so, with ``mapping.federated_norm = "local"`` (the default; FedBN, Li et al., ICLR 2021), do the core's normalisation
layers: each hospital keeps its own affines and running statistics, fitted to its own latents, and only the
convolutions are averaged.
After the last round :func:`save_local_model` writes its local model (global core + its own adapters) in the format of a
stage-2 model folder, so :class:`ppcmi.server.mapping.MappingServer` (or any code reading one) maps its queries locally.

What it keeps, in ``SITE/fedcore/`` (it never leaves the hospital)::

    pairs.safetensors     its keyed training pairs, computed once (recomputed only when the settings behind them change)
    own.safetensors       its adapters, frames, normalisation counters (and with federated_norm "local" its normalisation
                          layers) after the last round it trained
    rounds/round-R.*      the core it sent in round R (safetensors) and its row count, loss and largest value (json)
    best.*                with mapping.federated_select = "val": the best local model so far by its held-out loss
    model/                its final local model: mapping.safetensors + config.json (a stage-2 model folder)

Training follows stage 2 where it can: the same rows, loss, batch size and initial adapters and frames
(``mapping.adapter_init``); the learning rate of round R is ``mapping.lr_schedule``'s at its first epoch (constant within
the round), with a fresh Adam each round, as Flower's examples do. There is no validation part and no early stopping:
the budget is fixed (rounds x local epochs = ``mapping.epochs``); within a round ``fit`` keeps the epoch of lowest
training loss, with one local epoch the only one. With ``mapping.federated_select = "val"`` a hospital holds out
``mapping.val_frac`` of its patients (:func:`holdout_rows`; it never trains on them), scores each global core it receives
(with its own adapters and normalisation layers) on them, and keeps as its local model the lowest-scoring one, the last
included: stage 2's best-epoch rule, applied at the hospital; the scores never leave it.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..config import CONFIG_VERSION, Config, MappingTrainConfig
from ..device import Device, resolve_device
from ..errors import CheckpointError, PpcmiError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_dir
from ..latent import principal_frame
from ..models import SCALES, MappingConfig, MappingNet, core_state, mapping_loss, set_frames
from ..training import FitConfig, evaluate_loss, fit, host_state, mask_loss, recalibrate_batchnorm, save_weights, seeded_init
from .site import Hospital
from .stages import training_batch

log = logging.getLogger(__name__)

FOLDER = "fedcore"


@dataclass(frozen=True)
class CoreRound:
    core: dict[str, torch.Tensor]  # the core after the local epochs (CPU, float32): what this hospital sends
    n_rows: int                    # its training rows: its weight in Flower's average
    train_loss: float              # of the epoch fit kept (NaN with mapping.dp: not private, not sent)
    max_abs: float                 # the largest magnitude in ``core``
    epsilon: float | None = None   # with mapping.dp: this hospital's epsilon per patient after this round (delta = 1/patients)


def _mapping_config(cfg: MappingTrainConfig) -> MappingConfig:
    return MappingConfig(**{f.name: getattr(cfg, f.name) for f in fields(MappingConfig)})


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    return atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


# ----------------------------------------------------------------------------- its training pairs


def _pairs_record(hospital: Hospital, cfg: Config) -> dict[str, str]:
    """What the cached pairs depend on (no secret: the key's fingerprint, never the key)."""
    return {"site": hospital.name, "key": hospital.key_fingerprint, "seed": str(cfg.seed),
            "send_copies": str(cfg.autoencoder.send_copies), "send_noise": repr(float(cfg.autoencoder.send_noise)),
            "data": json.dumps(asdict(cfg.data), sort_keys=True, default=str)}


def training_pairs(hospital: Hospital, arrays: Callable[[], dict], cfg: Config, site_dir: str | Path) -> dict[str, torch.Tensor]:
    """This hospital's keyed training pairs ``{zt_img_<scale>, zt_msk_<scale>: (N, C, H, W)}``: the rows of its stage-2
    message, computed once from ``arrays()`` (its prepared cases) and cached in ``SITE/fedcore/pairs.safetensors``; a
    cache made under other settings (or another key) is computed again."""
    path = _pairs_path(site_dir)
    want = _pairs_record(hospital, cfg)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if {k: v for k, v in meta.items() if k != "groups"} == want and "groups" in meta:
                return {k: f.get_tensor(k) for k in f.keys()}
        log.info("%s: cached training pairs were made under other settings; computing them again", path)
    prepared = arrays()
    batch = training_batch(hospital, prepared, cfg)
    pairs = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in batch.arrays.items()}
    # the patient of every plane, for patient-level DP (mapping.dp): kept with the pairs, at the hospital
    _save_tensors(pairs, path, metadata={**want, "groups": json.dumps([str(g) for g in prepared["groups"]])})
    return pairs


def _pairs_path(site_dir: str | Path) -> Path:
    return Path(site_dir) / FOLDER / "pairs.safetensors"


def pair_groups(site_dir: str | Path) -> list[str]:
    """The patient of each prepared plane behind the cached training pairs (:func:`training_pairs`)."""
    from safetensors import safe_open

    path = _pairs_path(site_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: no training pairs cached here yet")
    with safe_open(str(path), "pt") as f:
        groups = (f.metadata() or {}).get("groups")
    if groups is None:
        raise CheckpointError(f"{path}: the cached training pairs do not record their patients")
    return json.loads(groups)


def _scales(pairs: Mapping[str, torch.Tensor]) -> list[str]:
    scales = [s for s in SCALES if f"zt_img_{s}" in pairs]
    if not scales or set(pairs) != {f"zt_{kind}_{s}" for kind in ("img", "msk") for s in scales}:
        raise PpcmiError(f"training pairs: expected zt_img_<scale> and zt_msk_<scale> for the same scales, got {sorted(pairs)}")
    n = {int(v.shape[0]) for v in pairs.values()}
    if len(n) != 1 or 0 in n:
        raise PpcmiError(f"training pairs: every latent needs the same positive number of rows, got {sorted(n)}")
    return scales


def local_network(site: str, pairs: Mapping[str, torch.Tensor], cfg: MappingTrainConfig, init_seed: int, *,
                  frames: bool = True) -> MappingNet:
    """This hospital's mapping network (one client: itself) for latents shaped as ``pairs``, its weights drawn from the
    shared ``init_seed`` as stage 2's are, adapters and frames initialised as stage 2 does for ``mapping.adapter_init``
    (``frames=False``: identity frames, for a network whose frames are loaded next)."""
    scales = _scales(pairs)
    ch_in = {s: int(pairs[f"zt_img_{s}"].shape[1]) for s in scales}
    ch_out = {s: int(pairs[f"zt_msk_{s}"].shape[1]) for s in scales}
    net = seeded_init(lambda: MappingNet(ch_in, ch_out, [site], _mapping_config(cfg)), init_seed)
    if frames and cfg.adapter_init == "pca":  # its canonical frames from every one of its rows, as stage 2 computes them
        set_frames(net, site, {s: principal_frame(pairs[f"zt_img_{s}"].numpy()) for s in scales},
                   {s: principal_frame(pairs[f"zt_msk_{s}"].numpy()) for s in scales})
    return net


def core_names(site: str, pairs: Mapping[str, torch.Tensor], cfg: MappingTrainConfig) -> list[str]:
    """The names of the core tensors, in the order the federation sends them."""
    return list(core_state(local_network(site, pairs, cfg, 0, frames=False), norm=cfg.federated_norm))


def _load_core(net: MappingNet, core: Mapping[str, torch.Tensor], norm: str) -> None:
    """Put the global ``core`` (:func:`ppcmi.models.core_state` with ``norm``) into ``net``; a core of another network is
    refused naming the first difference."""
    own = core_state(net, norm=norm)
    missing, extra = [k for k in own if k not in core], [k for k in core if k not in own]
    if missing or extra:
        raise PpcmiError(f"global core: does not fit this hospital's mapping network ({len(core)} tensors for {len(own)}; "
                         f"{'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    for k, v in own.items():
        got = torch.as_tensor(core[k])
        if tuple(got.shape) != tuple(v.shape):
            raise PpcmiError(f"global core: {k} has shape {tuple(got.shape)}, this hospital's mapping network {tuple(v.shape)}")
        if not torch.isfinite(got).all():
            raise PpcmiError(f"global core: {k} holds non-finite values")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(torch.as_tensor(core[k]))  # (the state dict's tensors share storage with the network's)


def _own_path(site_dir: Path) -> Path:
    return site_dir / FOLDER / "own.safetensors"


def _restore(net: MappingNet, site_dir: Path, round_: int, norm: str) -> None:
    """Round 1 starts from fresh adapters and frames; a later round from what this hospital kept after the previous one."""
    if round_ == 1:
        return
    path = _own_path(site_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: round {round_} needs the adapters this hospital kept after round {round_ - 1}")
    own = load_file(str(path))
    crossing = core_state(net, norm=norm)
    expected = {k for k in net.state_dict() if k not in crossing}
    if set(own) != expected:
        raise CheckpointError(f"{path}: holds other tensors than this hospital's adapters, frames and normalisation layers "
                              f"(mapping.federated_norm = {norm!r})")
    net.load_state_dict({**net.state_dict(), **own})


def _tensors(pairs: Mapping[str, torch.Tensor], scales: list[str]) -> list[torch.Tensor]:
    n = int(pairs[f"zt_img_{scales[0]}"].shape[0])
    return [torch.zeros(n, dtype=torch.long), *(pairs[f"zt_img_{s}"] for s in scales), *(pairs[f"zt_msk_{s}"] for s in scales)]


def holdout_rows(groups: Sequence[str], n_rows: int, seed: int, val_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of a hospital's pairs for ``mapping.federated_select = "val"``: a seeded
    ``val_frac`` of its patients (at least one, at most all but one; none below 4 patients) with every row of theirs.
    ``groups`` is the patient of each prepared plane; row ``r`` comes from plane ``r mod len(groups)`` (the planes, then
    blocks of their augmented copies: :func:`ppcmi.client.dp.patients_of_rows`), so no copy of a held-out plane is
    trained on."""
    from .dp import patients_of_rows

    patient, names = patients_of_rows(groups, n_rows, setting="mapping.federated_select")
    n_val = min(len(names) - 1, max(1, int(round(len(names) * val_frac)))) if len(names) >= 4 and val_frac > 0 else 0
    is_val = torch.isin(patient, torch.from_numpy(np.random.default_rng(seed).permutation(len(names))[:n_val]))
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def _best_paths(site_dir: Path) -> tuple[Path, Path]:
    return site_dir / FOLDER / "best.safetensors", site_dir / FOLDER / "best.json"


def _score(net: MappingNet, rows: list[torch.Tensor], tr: torch.Tensor, va: torch.Tensor, cfg: MappingTrainConfig,
           scales: list[str], device: Device) -> float:
    """Recalibrate ``net``'s BatchNorm statistics on the training rows, then its loss on the held-out ones (in place)."""
    loss = mapping_loss(scales)
    net.to(resolve_device(device))
    recalibrate_batchnorm(net, loss, [t[tr] for t in rows], cfg.batch_size, device=device)
    return evaluate_loss(net, loss, [t[va] for t in rows], cfg.batch_size, device=device)


def _best_so_far(site_dir: Path) -> dict | None:
    """The round and held-out loss of the best local model the rounds kept, or None."""
    meta = _best_paths(site_dir)[1]
    return json.loads(meta.read_text()) if meta.exists() else None


def _keep_if_best(net: MappingNet, val_loss: float, site_dir: Path, round_: int) -> None:
    """Keep ``net`` (already scored) as this hospital's best local model when its held-out loss is the lowest yet."""
    best = _best_so_far(site_dir)
    if best is None or val_loss < best["val_loss"]:
        weights, meta = _best_paths(site_dir)
        save_weights(net, weights)
        atomic_write_json(meta, {"round": round_, "val_loss": val_loss})


Decoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # keyed mask latents -> class logits (Hospital.keyed_decoder)


@torch.no_grad()
def decoded_targets(decoder: Decoder, pairs: Mapping[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """(N, S, S) uint8: the class map this hospital's own key and mask decoder give each training pair's keyed mask latents
    (what the mask autoencoder makes of the true mask), the target of ``mapping.federated_loss = "decoded"``."""
    scales = _scales(pairs)
    n = int(pairs[f"zt_msk_{scales[0]}"].shape[0])
    parts = [decoder({s: pairs[f"zt_msk_{s}"][i:i + batch_size] for s in scales}).argmax(1).to(torch.uint8)
             for i in range(0, n, batch_size)]
    return torch.cat(parts)


def round_loss(scales: list[str], decoder: Decoder | None = None):
    """The loss of a federated round: stage 2's (:func:`ppcmi.models.mapping_loss`), plus with a ``decoder``
    (``mapping.federated_loss = "decoded"``) the mask autoencoder's loss (:func:`ppcmi.training.mask_loss`) of the
    decoded prediction against the decoded target, the batch's last tensor (:func:`decoded_targets`). The latent term keeps
    the prediction where the decoder was trained; the decoded one weighs what the latents encode by what it does to the
    segmentation (a thin structure held by few latent dimensions counts as much as the background)."""
    if decoder is None:
        return mapping_loss(scales)

    def decoded(pred: dict, target: dict, more: list[torch.Tensor]) -> torch.Tensor:
        logits = decoder(pred)
        truth = torch.nn.functional.one_hot(more[0].long(), logits.shape[1]).permute(0, 3, 1, 2)
        return mask_loss(logits, truth)

    return mapping_loss(scales, decoded)


def round_lr(cfg: MappingTrainConfig, round_: int, rounds: int, local_epochs: int) -> float:
    """The learning rate of round ``round_`` (1-based): the schedule's at the round's first epoch of the whole budget."""
    return FitConfig(epochs=rounds * local_epochs, lr=cfg.lr, schedule=cfg.lr_schedule).lr_at((round_ - 1) * local_epochs + 1)


def local_round(core: Mapping[str, torch.Tensor], pairs: Mapping[str, torch.Tensor], cfg: MappingTrainConfig, *, site: str,
                site_dir: str | Path, round_: int, rounds: int, local_epochs: int, seed: int, init_seed: int,
                device: Device = None, groups: Sequence[str] | None = None, decoder: Decoder | None = None) -> CoreRound:
    """One round at this hospital: load the global ``core`` (name -> tensor, :func:`ppcmi.models.core_state` of a network
    like this hospital's) into its network, train ``local_epochs`` epochs on its ``pairs`` and return the core.

    ``seed`` (its site seed) and ``round_`` seed the batch order and dropout (the same inputs give the same core);
    ``init_seed`` (the shared seed) draws the initial adapters. Its adapters and frames are read from and written back
    to ``site_dir`` (``SITE/fedcore/own.safetensors``); only the core is returned.

    With ``mapping.dp`` the round is patient-level DP-SGD (:mod:`ppcmi.client.dp`; ``groups``: the patient of each
    prepared plane, :func:`pair_groups`): the mechanism is fixed for the whole budget before round 1, the steps of every
    round compose, the final weights of the round are kept (no selection by a loss), and the returned training loss is
    NaN (it is not private, so it is not sent).

    With ``mapping.federated_select = "val"`` (``groups`` needed too) the round trains on its training rows only
    (:func:`holdout_rows`), and from round 2 first scores the global core it received, with this hospital's adapters of
    the round before, on its held-out rows, keeping it in ``SITE/fedcore/best.*`` when it is the best yet (scored by
    stage 2's latent loss, whatever the round trains on).

    With ``mapping.federated_loss = "decoded"`` (``decoder``: this hospital's :meth:`ppcmi.client.site.Hospital.keyed_decoder`
    needed) the round trains on :func:`round_loss` with the decoder."""
    if not 1 <= round_ <= rounds:
        raise PpcmiError(f"server-round: must be from 1 to {rounds}, got {round_}")
    site_dir = Path(site_dir)
    scales = _scales(pairs)
    net = local_network(site, pairs, cfg, init_seed, frames=round_ == 1)  # (later rounds restore the frames of round 1)
    _load_core(net, core, cfg.federated_norm)
    _restore(net, site_dir, round_, cfg.federated_norm)
    rows = _tensors(pairs, scales)
    if cfg.federated_loss == "decoded":
        if decoder is None:
            raise PpcmiError('mapping.federated_loss: "decoded" needs this hospital\'s keyed mask decoder')
        rows.append(decoded_targets(decoder, pairs))
    else:
        decoder = None
    work = ensure_dir(site_dir / FOLDER)
    lr = round_lr(cfg, round_, rounds, local_epochs)
    dp_report, received_val = None, None
    if cfg.federated_select == "val":
        if groups is None:
            raise PpcmiError('mapping.federated_select: "val" needs the patient of every training row')
        tr, va = holdout_rows(groups, int(rows[0].shape[0]), seed, cfg.val_frac)
        if round_ == 1:
            for p in _best_paths(site_dir):
                p.unlink(missing_ok=True)  # (a best model of an earlier federation in this folder)
        elif len(va):
            cand = copy.deepcopy(net)
            received_val = _score(cand, rows, tr, va, cfg, scales, device)
            _keep_if_best(cand, received_val, site_dir, round_ - 1)
        rows = [t[tr] for t in rows]
    if cfg.dp:
        from .dp import fit_patients, patients_of_rows, plan_dp

        if groups is None:
            raise PpcmiError("mapping.dp: a DP round needs the patient of every training row")
        patient, names = patients_of_rows(groups, int(rows[0].shape[0]))
        mech = plan_dp(cfg, len(names), rounds * local_epochs)
        net.to(resolve_device(device))
        losses = fit_patients(net, mapping_loss(scales), rows, patient, mech, epochs=local_epochs, lr=lr,
                              seed=seed * 100_019 + round_, batch_size=cfg.batch_size)
        dp_report = mech.report(round_ * local_epochs * mech.steps_per_epoch)
        dp_report["local_train_loss"] = losses[-1]  # (kept at the hospital: not private)
        train_loss = float("nan")
    else:
        with tempfile.TemporaryDirectory(dir=work, prefix=f"round-{round_}-") as tmp:
            res = fit(net, round_loss(scales, decoder), rows, None,
                      FitConfig(epochs=local_epochs, batch_size=cfg.batch_size, lr=lr, patience=local_epochs,
                                seed=seed * 100_019 + round_, schedule="constant"),
                      tmp, desc=f"{site} core round {round_}", progress=False, device=device)
        train_loss = float(res.history[res.best_epoch - 1]["train_loss"])
    state = host_state(net)
    crossing = core_state(net, norm=cfg.federated_norm)  # (names in the order they cross)
    _save_tensors({k: v for k, v in state.items() if k not in crossing}, _own_path(site_dir))
    out = {k: state[k] for k in crossing}
    max_abs = max(float(v.abs().max()) for v in out.values())
    result = CoreRound(out, int(rows[0].shape[0]), train_loss, max_abs, None if dp_report is None else dp_report["epsilon"])
    _save_tensors(out, site_dir / FOLDER / "rounds" / f"round-{round_}.safetensors")
    atomic_write_json(site_dir / FOLDER / "rounds" / f"round-{round_}.json",
                      {"round": round_, "rows": result.n_rows, "train_loss": None if cfg.dp else result.train_loss,
                       "max_abs": max_abs, "lr": lr, "local_epochs": local_epochs, "dp": dp_report,
                       "received_val_loss": received_val})
    return result


def check_clipping(result: CoreRound, *, clip: float, max_weight: int) -> float:
    """The largest value SecAgg+ will quantize (a core value times ``n_rows / max_weight``), checked against ``clip``.

    Flower clips anything outside ``[-clip, clip]`` without a word, which would change the average; so a core with such a
    value is refused here, naming the setting to raise (and ``max_weight`` must bound the rows, or the ratio exceeds 1)."""
    if result.n_rows > max_weight:
        raise PpcmiError(f"fedcore.max_weight: {max_weight} is below this hospital's {result.n_rows} training rows; "
                         "SecAgg+ weights would overflow its range")
    scaled = result.max_abs * result.n_rows / max_weight
    if scaled * (1 + 1e-6) > clip:
        raise PpcmiError(f"fedcore.clip: a core value of magnitude {result.max_abs:.4g} (x {result.n_rows}/{max_weight} rows = "
                         f"{scaled:.4g}) lies outside SecAgg+'s clipping range +-{clip:g}, where Flower would clip it; "
                         "raise fedcore.clip")
    return scaled


# ----------------------------------------------------------------------------- its local model


def save_local_model(core: Mapping[str, torch.Tensor], pairs: Mapping[str, torch.Tensor], cfg: MappingTrainConfig, *,
                     site: str, site_dir: str | Path, init_seed: int, out_dir: str | Path | None = None,
                     extra: dict | None = None, seed: int | None = None, groups: Sequence[str] | None = None) -> Path:
    """Write this hospital's local model, the final global ``core`` with its own adapters and frames, as a stage-2 model
    folder (``mapping.safetensors`` + ``config.json`` naming one hospital, itself) in ``out_dir``
    (default ``SITE/fedcore/model``); returns the folder. Its adapters (and with ``federated_norm = "local"`` its
    normalisation layers) are those of the last round it trained; its BatchNorm running statistics are re-estimated on its
    own ``pairs`` (:func:`ppcmi.training.recalibrate_batchnorm`): with "shared" they would be the global core's average,
    with "local" the moving average of its training batches, neither the statistics of its pairs in evaluation mode.

    With ``mapping.federated_select = "val"`` (``seed``, its site seed, and ``groups`` needed) the statistics come from
    its training rows, the final model is scored on its held-out rows, and the folder gets the lowest-scoring of it and
    the best kept by the rounds; ``config.json``'s ``selected`` says which round and why."""
    site_dir = Path(site_dir)
    out = Path(out_dir) if out_dir is not None else site_dir / FOLDER / "model"
    scales = _scales(pairs)
    net = local_network(site, pairs, cfg, init_seed, frames=False)  # (its frames are in its own tensors)
    _load_core(net, core, cfg.federated_norm)
    path = _own_path(site_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: no adapters trained here yet; a local model needs at least one round")
    net.load_state_dict({**net.state_dict(), **load_file(str(path))})
    # the global core's BatchNorm statistics are an average over hospitals whose latents live in different frames; in
    # evaluation mode they gave 3 to 4 times the training loss on a hospital's own pairs (Sunnybrook, 10 rounds): the local
    # model re-estimates them on this hospital's pairs (they never leave it)
    rows = _tensors(pairs, scales)
    selected = {"rule": cfg.federated_select, "round": "last"}
    va = ()
    if cfg.federated_select == "val":
        if seed is None or groups is None:
            raise PpcmiError('mapping.federated_select: "val" needs the site seed and the patient of every training row')
        tr, va = holdout_rows(groups, int(rows[0].shape[0]), seed, cfg.val_frac)
    if len(va):
        final = _score(net, rows, tr, va, cfg, scales, None)
        selected.update(val_loss=final, last_val_loss=final, val_rows=int(len(va)), holdout_seed=seed)
        best = _best_so_far(site_dir)
        if best is not None and best["val_loss"] <= final:  # (a tie keeps the earlier round, as the rounds do)
            net.load_state_dict(load_file(str(_best_paths(site_dir)[0])))
            selected.update(best)
        log.info("%s: keeps the global core of round %s (loss %.4f on %d held-out rows; the last core's %.4f)", site,
                 selected["round"], selected["val_loss"], len(va), final)
    else:
        if cfg.federated_select == "val":
            log.warning("%s: fewer than 4 patients, none held out: mapping.federated_select = \"val\" keeps the last core", site)
        recalibrate_batchnorm(net, mapping_loss(scales), rows, cfg.batch_size)
    save_weights(net, out / "mapping.safetensors")
    n = int(pairs[f"zt_img_{scales[0]}"].shape[0])
    atomic_write_json(out / "config.json", {
        "version": CONFIG_VERSION, "mapping": asdict(_mapping_config(cfg)), "train": asdict(cfg), "clients": [site],
        "image_shapes": {s: list(pairs[f"zt_img_{s}"].shape[1:]) for s in scales},
        "mask_shapes": {s: list(pairs[f"zt_msk_{s}"].shape[1:]) for s in scales},
        "n_pairs": {site: n}, "n_train_rows": n - len(va), "n_val_rows": len(va), "scope": "federated", "selected": selected,
        **(extra or {})})
    return out


def local_model_dir(site_dir: str | Path) -> Path | None:
    """This site's local model folder (:func:`save_local_model`'s default), or None where it trained none."""
    d = Path(site_dir) / FOLDER / "model"
    return d if (d / "mapping.safetensors").is_file() else None


def pairs_loss(net_dir: str | Path, pairs: Mapping[str, torch.Tensor], cfg: MappingTrainConfig, *, site: str,
               init_seed: int) -> float:
    """Stage 2's loss of the local model in ``net_dir`` on this hospital's own pairs (in evaluation mode)."""
    from ..training import load_weights

    scales = _scales(pairs)
    net = local_network(site, pairs, cfg, init_seed, frames=False)
    load_weights(net, Path(net_dir) / "mapping.safetensors")
    return float(evaluate_loss(net, mapping_loss(scales), _tensors(pairs, scales), cfg.batch_size))
