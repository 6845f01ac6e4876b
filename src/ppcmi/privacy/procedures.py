"""The attack procedures (attacker side): each takes only the views its threat model grants and returns estimates.

Every attack function takes, positionally, exactly the views :mod:`ppcmi.privacy.suite` declares for it (keyword
arguments are how hard it tries, never what it holds) and returns what it guesses: reconstructions, keys, link
scores, membership scores. Scoring them against the truth is the referee's (:mod:`ppcmi.privacy.referee`).
Nothing here imports hospital code, key handling, the run loader or the referee (the import contract in
``pyproject.toml`` checks); a key is used only through a :class:`~ppcmi.privacy.views.SiteKit` a view hands over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import protocol
from ..errors import PpcmiError
from . import attacks as A
from . import inversion as INV
from . import membership as M
from .views import (CandidatePool, CoreUpdates, LeakedPairs, MembershipChallenge, OtherHospital, PublicData, ServerView, StolenKey,
                    TargetModel, VictimDecoder, VictimFrames)

K_PROCRUSTES = (1, 2, 5, 10)
K_INVERSION = (10, 100)


# ----------------------------------------------------------------------------- the attacker's own autoencoders (T2)


def train_attacker_autoencoders(images: np.ndarray, masks: np.ndarray, n_classes: int, *, width: float, skips: bool,
                                recipe, work: Path, progress: bool, device=None) -> dict:
    """The attacker trains its own image and mask autoencoders, of the public architecture (``width``,
    ``skips``) and by the public recipe (``recipe``: the run's ``autoencoder`` settings), on public data only:
    ``images`` (N, C, S, S) and ``masks`` (N, S, S). Resumes from ``work`` if an audit was interrupted. Trains on
    ``device`` (None is the CPU); the models are returned on the CPU, where the attacks use them."""
    from ..augment import batch_augmenter
    from ..models import AEConfig, Autoencoder
    from ..training import FitConfig, autoencoder_loss, fit, seeded_init

    x_img = torch.from_numpy(images).float()
    x_msk = torch.nn.functional.one_hot(torch.from_numpy(masks).long(), n_classes).permute(0, 3, 1, 2).float()
    models = {}
    for kind, x in (("image", x_img), ("mask", x_msk)):
        cfg = AEConfig(in_channels=int(x.shape[1]), width=width, skips=skips)
        model = seeded_init(lambda: Autoencoder(cfg), 777 + (kind == "mask"))
        fc = FitConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, patience=recipe.epochs, seed=777,
                       schedule=recipe.lr_schedule)
        d = work / f"attacker_{kind}_ae"
        fit(model, autoencoder_loss(kind), [x], None, fc, d, desc=f"attacker {kind} AE",
            progress=progress, augment=batch_augmenter([kind]) if recipe.augment else None, resume=(d / "state.json").exists(),
            device=device)
        models[kind] = model.cpu().eval()
    return models


@torch.no_grad()
def _enc(model, x: np.ndarray) -> dict[str, np.ndarray]:
    return {s: v.numpy().astype(np.float64) for s, v in model.encode(torch.from_numpy(np.asarray(x, np.float32))).items()}


@torch.no_grad()
def _dec(model, z: dict[str, np.ndarray]) -> np.ndarray:
    return model.decode({s: torch.from_numpy(np.asarray(v, np.float32)) for s, v in z.items()}).numpy()


def fg_of_probs(probs: np.ndarray) -> np.ndarray:
    """(N, K, S, S) class probabilities -> (N, S, S) foreground (argmax is not the background)."""
    return probs.argmax(1) > 0


# ----------------------------------------------------------------------------- A1 (ServerView, PublicData)


def a1(server: ServerView, public: PublicData) -> dict:
    """Ciphertext-only principal-component maps of every keyed row the server holds, and a foreground guess for
    each original slice from a threshold rule (component, sign, z-threshold, scale) chosen on public data only.

    Returns ``{"mask_rule": rule, "victims": {hospital: {"maps": {scale: (N, 3, h, w)}, "fg": (n, S, S) bool}}}``.
    """
    aux_lat = _enc(public.autoencoders["mask"], np.eye(server.n_classes, dtype=np.float32)[public.masks].transpose(0, 3, 1, 2))
    rules = {s: A.fit_threshold_rule(A.pca_maps(aux_lat[s], 3), public.fg) for s in server.scales}
    mscale = max(rules, key=lambda s: rules[s]["aux_dice"])
    rule = {"scale": mscale, **rules[mscale]}
    victims = {}
    for h in server.messages:
        n = server.n_originals(h)
        maps = {s: A.pca_maps(server.keyed(h, "image")[s], 3) for s in server.scales}  # fitted on every row held
        fg = A.apply_threshold_rule(A.pca_maps(server.keyed(h, "mask")[mscale], 3)[:n], rule, server.size)
        victims[h] = {"maps": maps, "fg": fg}
    return {"mask_rule": rule, "victims": victims}


# ----------------------------------------------------------------------------- A5 (ServerView, LeakedPairs, VictimDecoder)


def a5(server: ServerView, leaked: LeakedPairs, decoder: VictimDecoder) -> dict:
    """Known-plaintext key recovery: orthogonal Procrustes on the first k leaked (plain, keyed) latent pairs, for
    each k in ``K_PROCRUSTES``, kind and scale; then the target rows' keyed latents inverted with the key from the
    most pairs and decoded with the victim's decoder.

    Returns ``{"keys": {(kind, scale): [(k_used, M, b), ...]}, "decode_with_k": k, "images": (T, S, S),
    "fg": (T, S, S) bool}`` for ``leaked.targets``.
    """
    v = leaked.victim
    plain = {"image": leaked.z_img, "mask": leaked.z_msk}
    keys: dict = {}
    for kind in ("image", "mask"):
        zt = server.keyed(v, kind)
        for s in server.scales:
            keys[(kind, s)] = []
            for k in K_PROCRUSTES:
                rows = leaked.rows[:k]
                m_hat, b_hat = A.procrustes_key(plain[kind][s][:k], zt[s][rows])
                keys[(kind, s)].append((int(len(rows)), m_hat, b_hat))
    kmax = max(k for k, _, _ in next(iter(keys.values())))
    best = {ks: [(m, b) for k, m, b in rows if k == kmax][-1] for ks, rows in keys.items()}
    t = leaked.targets
    z_img = {s: A.invert_key(server.keyed(v, "image")[s][t], *best[("image", s)]) for s in server.scales}
    z_msk = {s: A.invert_key(server.keyed(v, "mask")[s][t], *best[("mask", s)]) for s in server.scales}
    return {"keys": keys, "decode_with_k": kmax, "images": decoder.decode(z_img, "image")[:, 0],
            "fg": fg_of_probs(decoder.decode(z_msk, "mask"))}


# ----------------------------------------------------------------------------- A6 (ServerView, PublicData, LeakedPairs)


def a6(server: ServerView, public: PublicData, leaked: LeakedPairs) -> dict:
    """Learned inversion: the attacker encodes the first k leaked images and masks with its own (public-data)
    encoders, fits a 1x1 least-squares map from the victim's keyed latents to those, maps the target rows and
    decodes them with its own decoders; for each k in ``K_INVERSION``.

    Returns ``{k: {"k_used": int, "images": (T, S, S), "fg": (T, S, S) bool}}`` for ``leaked.targets``.
    """
    v, t = leaked.victim, leaked.targets
    zt_img, zt_msk = server.keyed(v, "image"), server.keyed(v, "mask")
    img_ae, msk_ae = public.autoencoders["image"], public.autoencoders["mask"]
    out = {}
    for k in K_INVERSION:
        rows = leaked.rows[:k]
        a_img = _enc(img_ae, leaked.images[:k])
        a_msk = _enc(msk_ae, leaked.masks[:k])
        rec_i, rec_m = {}, {}
        for s in server.scales:
            w, c = A.fit_linear_map(zt_img[s][rows], a_img[s])
            rec_i[s] = A.apply_linear_map(zt_img[s][t], w, c)
            w, c = A.fit_linear_map(zt_msk[s][rows], a_msk[s])
            rec_m[s] = A.apply_linear_map(zt_msk[s][t], w, c)
        fg = fg_of_probs(_dec(msk_ae, rec_m)) if server.n_classes > 1 else _dec(msk_ae, rec_m)[:, 0] > 0.5
        out[k] = {"k_used": int(len(rows)), "images": _dec(img_ae, rec_i)[:, 0], "fg": fg}
    return out


# ----------------------------------------------------------------------------- A7 (ServerView, PublicData, CandidatePool)


def a7(server: ServerView, public: PublicData, pool: CandidatePool) -> dict:
    """Linkage of each hospital's original keyed rows to the candidate images, at the finest latent grid, by two
    scores: R² of each candidate on the target's leading component maps (no key, no encoder), and correlation of
    rotation-invariant latent norms, candidates encoded by the attacker's public-data encoder.

    Returns ``{"scale": s, "victims": {hospital: {method: (n, M) scores}}}``; higher is a better match.
    """
    first = next(iter(server.messages))
    s = max(server.scales, key=lambda sc: np.prod(server.keyed(first, "image")[sc].shape[2:]))
    cand = _enc(public.autoencoders["image"], pool.images[:, None])[s]
    victims = {}
    for h in server.messages:
        zt = server.keyed(h, "image")[s][:server.n_originals(h)]
        victims[h] = {"pca_r2": A.linkage_scores_pca(zt, pool.images), "norm_corr": A.linkage_scores_norm(zt, cand)}
    return {"scale": s, "victims": victims}


# ----------------------------------------------------------------------------- A8 (ServerView, OtherHospital)


def a8(server: ServerView, other: OtherHospital) -> dict:
    """The paper's cross-decoder attack: the victim's original keyed rows decoded with another hospital's key and
    decoder. Returns ``{"images": (n, S, S), "fg": (n, S, S) bool}``."""
    n = server.n_originals(other.victim)
    zt_i = {s: a[:n] for s, a in server.keyed(other.victim, "image").items()}
    zt_m = {s: a[:n] for s, a in server.keyed(other.victim, "mask").items()}
    return {"images": other.kit.decode_keyed(zt_i, "image")[:, 0], "fg": fg_of_probs(other.kit.decode_keyed(zt_m, "mask"))}


# ----------------------------------------------------------------------------- A9 (CoreUpdates, PublicData)


def invert_core_updates(updates: CoreUpdates, **tuning) -> INV.Inversion:
    """The inversion half of A9 (:func:`ppcmi.privacy.inversion.invert_update`): without SecAgg+ each hospital's update
    on its own, with it one joint inversion of every hospital's rows against the average, which is all it holds."""
    core = {k: torch.as_tensor(np.asarray(v)) for k, v in updates.global_core.items()}
    if updates.secure:
        weights = {n: float(sp.n_rows) for n, sp in updates.specs.items()}
        return INV.invert_update(core, {k: torch.as_tensor(np.asarray(v)) for k, v in updates.updates["sum"].items()},
                                 updates.specs, weights=weights, **tuning)
    h, t, first, last = {}, {}, [], []
    for n, u in updates.updates.items():
        inv = INV.invert_update(core, {k: torch.as_tensor(np.asarray(v)) for k, v in u.items()}, {n: updates.specs[n]}, **tuning)
        h.update(inv.h)
        t.update(inv.t)
        first.append(inv.objective[0])
        last.append(inv.objective[1])
    return INV.Inversion(h, t, (float(np.mean(first)), float(np.mean(last))))


def public_frames(public: PublicData) -> dict[str, dict]:
    """The attacker's stand-in for a hospital's canonical frames: the principal frames of its own autoencoders'
    latents of the public images and masks (the same sign rule; nothing ties them to the hospital's)."""
    from ..latent import principal_frame

    k = int(public.autoencoders["mask"].cfg.in_channels)  # the mask classes, background included
    onehot = np.eye(k, dtype=np.float32)[public.masks].transpose(0, 3, 1, 2)
    return {"image": {s: principal_frame(z) for s, z in _enc(public.autoencoders["image"], public.images).items()},
            "mask": {s: principal_frame(z) for s, z in _enc(public.autoencoders["mask"], onehot).items()}}


def a9(updates: CoreUpdates, public: PublicData, **tuning) -> dict:
    """Inverting the federated core's round updates: dummy rows whose simulated round 1 update matches what the
    coordinator saw (:func:`invert_core_updates`), in the canonical coordinates of each hospital's latents; then,
    public data only, decoded by the attacker's own autoencoders as if the hospital's canonical frames were the
    principal frames of the attacker's public latents (:func:`public_frames`).

    Returns ``{"inversion": Inversion, "victims": {hospital: {"images": (n, S, S), "fg": (n, S, S) bool}}}``,
    rows in the inversion's order (a batch's update does not order its rows: the referee matches them)."""
    inv = invert_core_updates(updates, **tuning)
    frames = public_frames(public)
    img_ae, msk_ae = public.autoencoders["image"], public.autoencoders["mask"]
    victims = {}
    for n in inv.h:
        z_i = INV.from_canonical({s: v.astype(np.float64) for s, v in inv.h[n].items()}, frames["image"])
        z_m = INV.from_canonical({s: v.astype(np.float64) for s, v in inv.t[n].items()}, frames["mask"])
        probs = _dec(msk_ae, z_m)
        victims[n] = {"images": _dec(img_ae, z_i)[:, 0], "fg": fg_of_probs(probs) if probs.shape[1] > 1 else probs[:, 0] > 0.5}
    return {"inversion": inv, "victims": victims}


def a9_control(updates: CoreUpdates, stolen: StolenKey, frames: VictimFrames, **tuning) -> dict:
    """A9's positive control: the same inversion, and the recovered canonical coordinates mapped back exactly, with the
    victim's own frames (``U c + mu``: its keyed latents), its key and its decoders (:class:`StolenKey`). Where the
    update carries the rows and the inversion finds them, this reconstructs them; returns as :func:`a9` for the victim."""
    if updates.secure or set(updates.updates) != {stolen.victim} or frames.victim != stolen.victim:
        raise PpcmiError(f"A9 control: needs the per-hospital update of the victim {stolen.victim!r} only, and its own frames")
    inv = invert_core_updates(updates, **tuning)
    v = stolen.victim
    zt_i = INV.from_canonical({s: a.astype(np.float64) for s, a in inv.h[v].items()}, frames.image)
    zt_m = INV.from_canonical({s: a.astype(np.float64) for s, a in inv.t[v].items()}, frames.mask)
    return {"inversion": inv, "victims": {v: {"images": stolen.kit.decode_keyed(zt_i, "image")[:, 0],
                                              "fg": fg_of_probs(stolen.kit.decode_keyed(zt_m, "mask"))}}}


# ----------------------------------------------------------------------------- M1, M3 (TargetModel, MembershipChallenge)


def subset_rows(msg: protocol.LatentBatch, rows: np.ndarray) -> protocol.LatentBatch:
    """The given rows of a ``train`` message, as a message."""
    return protocol.LatentBatch("train", msg.client, {k: np.ascontiguousarray(v[rows]) for k, v in msg.arrays.items()})


def record_losses(load, challenge: MembershipChallenge) -> np.ndarray:
    """Per-record loss of the challenge's records, in its order, under ``load(hospital)``'s network."""
    from ..server.mapping import row_losses

    nets: dict = {}
    out = []
    for p in challenge.parts:
        if p.hospital not in nets:
            nets[p.hospital] = load(p.hospital)
        out.append(row_losses(nets[p.hospital], p.batch))
    return np.concatenate(out)


def m1(target: TargetModel, challenge: MembershipChallenge) -> np.ndarray:
    """Loss-threshold membership scores, one per challenge record (higher: more likely a member)."""
    return M.loss_threshold_scores(record_losses(target.load, challenge))


def train_or_load(batches: list, cfg, out: Path, seed: int, progress: bool, device=None):
    """Train a mapping network into ``out`` on ``device`` (None is the CPU), or load it if an interrupted audit already
    trained it there; returned on the CPU in either case, where the attacks compute its losses."""
    from ..server.mapping import MappingServer, train_mapping

    if (out / "mapping.safetensors").exists() and (out / "config.json").exists():
        return MappingServer(out).model.to(memory_format=torch.contiguous_format).eval()
    resume = (out / "train" / "state.json").exists() and not cfg.dp
    if cfg.dp and out.exists():
        import shutil

        shutil.rmtree(out)  # DP-SGD runs cannot resume: start that network again
    model, _ = train_mapping(batches, cfg, out, seed=seed, resume=resume, progress=progress, device=device)
    return model.cpu().to(memory_format=torch.contiguous_format).eval()


@dataclass(frozen=True)
class References:
    """The attacker's reference networks and, per unit id, which of them trained on it: (R,) bool."""

    models: tuple
    unit_in: dict
    epochs: int


def lira_scores(target: TargetModel, challenge: MembershipChallenge, refs: References) -> np.ndarray:
    """Offline-LiRA membership scores of the challenge's records under ``target``, against ``refs``."""
    target_l = record_losses(target.load, challenge)
    ref_l = np.stack([record_losses(lambda h, m=m: m, challenge) for m in refs.models])
    ref_in = np.stack([refs.unit_in[u] for u in challenge.units], 1)
    return M.lira_offline_scores(target_l, ref_l, ref_in)


def m3(target: TargetModel, challenge: MembershipChallenge, *, references: int, epochs: int | None, work: Path,
       progress: bool, device=None) -> dict:
    """Offline LiRA: ``references`` networks of the target's recipe (``epochs`` or the target's), each trained on a
    random half of the challenge's units (a slice with its augmented copies), then each record's target loss
    against its OUT networks' losses. Returns ``{"scores": (n_records,), "references": References}``."""
    units = np.array(challenge.units)
    ref_in = M.reference_assignment(units, references, seed=3)
    cfg = replace(target.config, epochs=epochs or target.config.epochs, patience=epochs or target.config.epochs, scope="shared")
    hospitals = list(dict.fromkeys(p.hospital for p in challenge.parts))
    starts = np.cumsum([0] + [p.batch.n for p in challenge.parts])
    models = []
    for r in range(references):
        batches = []
        for h in hospitals:
            parts = [subset_rows(p.batch, np.flatnonzero(ref_in[r, starts[i]:starts[i + 1]])).arrays
                     for i, p in enumerate(challenge.parts) if p.hospital == h]
            batches.append(protocol.LatentBatch("train", h, {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}))
        models.append(train_or_load(batches, cfg, work / f"ref{r}", 100 + r, progress, device))
    refs = References(tuple(models), {u: ref_in[:, i] for i, u in enumerate(units.tolist())}, cfg.epochs)
    return {"scores": lira_scores(target, challenge, refs), "references": refs}
