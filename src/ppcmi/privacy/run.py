"""A finished run folder, loaded, and the views of it (auditor side: the one audit module that reads keys).

:class:`Run` reads ``RUN/config.json``, the site folders (keys included: the referee builds ground truth and
positive controls from them), the train messages exactly as sent (``RUN/wire``) and the mapping network's folder
(``RUN/server``), and checks that the messages are the sites' encodings of their cases and that the public data
is disjoint from every victim. Its methods build one view each (:mod:`ppcmi.privacy.views`); the audit builds
for an attack only the views the attack declares. Key bytes, Q and b are never written anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import protocol
from ..config import from_dict
from ..errors import PpcmiError
from ..fileio import read_record
from . import membership as M
from .procedures import subset_rows
from .views import (CandidatePool, ChallengePart, GroundTruth, LeakedPairs, MembershipChallenge, MembershipTruth,
                    OtherHospital, PublicData, ServerView, SiteKit, StolenKey, TargetModel, VictimDecoder)


@dataclass(frozen=True)
class Aux:
    """The public data (T2) and who it comes from: the run's held-out test patients, or ``--aux DIR``."""

    source: str
    images: np.ndarray  # (N, C, S, S)
    masks: np.ndarray   # (N, S, S) int
    groups: np.ndarray  # (N,) patient
    case_ids: list


@dataclass(frozen=True)
class _Site:
    hospital: object  # ppcmi.client.site.Hospital: for the re-encoding check and the non-members' keying
    kit: SiteKit
    msg: protocol.LatentBatch
    truth: GroundTruth


class Run:
    """Everything the auditor reads from a run folder, and the views it builds of it."""

    def __init__(self, run: Path, data_dir: Path | None = None, aux_dir: Path | None = None):
        from ..client import stages
        from ..client.keys import key_path, load_key
        from ..client.site import Hospital, training_inputs
        from ..data import discover_cases
        from ..klt import KeyedLatentTransform
        from ..server.inbox import read_set
        from ..simulate import plan

        self.path = run
        cfg_path = run / "config.json"
        if not run.is_dir():
            raise PpcmiError(f"{run}: run folder not found")
        if not cfg_path.exists():
            raise PpcmiError(f"{cfg_path}: missing; not a run folder written by 'ppcmi simulate' or 'ppcmi demo'")
        raw = read_record(cfg_path, "run configuration").raw
        recorded = raw.pop("data_dir", None)
        if recorded is not None and not isinstance(recorded, str):
            raise PpcmiError(f"{cfg_path}: field 'data_dir' must be a folder name, got {recorded!r}")
        try:
            self.cfg = from_dict(raw)
        except PpcmiError as e:
            raise PpcmiError(f"{cfg_path}: {e}") from None
        data = Path(data_dir) if data_dir is not None else Path(recorded) if recorded else None
        if data is None or not (data / "images").is_dir():
            raise PpcmiError(f"{cfg_path}: data_dir {str(recorded)!r} not found from here; pass --data DIR")
        self.data_dir = data
        for sub in ("sites", "wire", "server"):
            if not (run / sub).is_dir():
                raise PpcmiError(f"{run / sub}: missing; the run has not finished stage 2")
        self.plan = plan(self.cfg, data)
        labels = self.plan.labels
        copies = self.cfg.autoencoder.send_copies
        self._sites: dict[str, _Site] = {}
        for name, cases in self.plan.hospitals.items():
            wire_path = run / "wire" / f"{name}.train"  # a set of chunks (a run from before chunks: one .train.ppcmi file)
            if not wire_path.exists() and (run / "wire" / f"{name}.train.ppcmi").exists():
                wire_path = run / "wire" / f"{name}.train.ppcmi"
            if not wire_path.exists():
                raise PpcmiError(f"{wire_path}: missing training set")
            msg = read_set(wire_path)
            hosp = Hospital(run / "sites" / name)
            arr = stages.prepare(cases, self.cfg, labels)
            n = len(cases)
            if msg.n != n * copies:
                raise PpcmiError(f"{wire_path}: {msg.n} rows, expected {n} cases x {copies} copies")
            x_all, y_all = training_inputs(arr["images"], arr["masks"], labels.n_classes, copies=copies, seed=self.cfg.seed)
            again = stages.training_batch(hosp, arr, self.cfg)
            for k, a in msg.arrays.items():
                b = again.arrays[k]
                if np.abs(a.astype(np.float64) - b).max() > 1e-3 * max(np.abs(b).max(), 1.0):
                    raise PpcmiError(f"{wire_path}: {k} does not match the site's re-encoding of its cases; the run folder was changed after stage 2")
            transform = KeyedLatentTransform(load_key(key_path(hosp.dir)), hosp.ae_cfg.latent_channels()) if hosp.klt_enabled else None
            kit = SiteKit(name, hosp.models, transform)
            truth = GroundTruth(victim=name, images=arr["images"][:, 0], fg=arr["masks"] > 0, groups=np.array([c.group for c in cases]),
                                inputs=x_all.numpy(), onehot=y_all.numpy(), src=np.arange(msg.n) % n,
                                z_img=kit.encode_plain(x_all, "image"), z_msk=kit.encode_plain(y_all, "mask"))
            self._sites[name] = _Site(hosp, kit, msg, truth)
        self.names = list(self._sites)
        first = self._sites[self.names[0]]
        self.scales = tuple(first.msg.scales)  # canonical (s3, s4, b): a decoded message's arrays come in no fixed order
        self.ae_architecture = first.hospital.ae_cfg  # public: width and skips
        # ---- aux (T2)
        victim_groups = {g for s in self._sites.values() for g in s.truth.groups}
        if aux_dir is None:
            test = stages.prepare(self.plan.test, self.cfg, labels)
            groups = [c.group for c in self.plan.test]
            overlap = sorted(set(groups) & victim_groups)
            if overlap:
                raise PpcmiError(f"aux: test patients {overlap[:3]} also belong to a hospital; the split is not patient-disjoint")
            source = "the run's held-out test patients"
        else:
            aux_cases = discover_cases(aux_dir, group_regex=self.cfg.data.group_regex, rois=self.cfg.data.roi_names())
            test = stages.prepare(aux_cases, self.cfg, labels)
            groups = [f"aux:{c.group}" for c in aux_cases]
            victim_hashes = {hashlib.sha256(im.tobytes()).hexdigest() for s in self._sites.values() for im in s.truth.images}
            dup = [c for c, im in zip(test["case_ids"], test["images"][:, 0]) if hashlib.sha256(im.tobytes()).hexdigest() in victim_hashes]
            if dup:
                raise PpcmiError(f"{aux_dir}: aux images {dup[:3]} are identical to a hospital's training images; aux must be disjoint from the victims")
            source = f"--aux {aux_dir}"
        self.aux = Aux(source, test["images"], test["masks"], np.array(groups), list(test["case_ids"]))
        self.test_arrays = test if aux_dir is None else stages.prepare(self.plan.test, self.cfg, labels)
        self.test_groups = np.array([c.group for c in self.plan.test])
        self._cache: dict = {}

    # ---- facts of the run (the shared configuration and what the referee knows)

    @property
    def size(self) -> int:
        return self.cfg.data.size

    def message(self, name: str) -> protocol.LatentBatch:
        return self._sites[name].msg

    def truth(self, name: str) -> GroundTruth:
        return self._sites[name].truth

    def _cached(self, key, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ---- the attackers' views

    def server_view(self) -> ServerView:
        return self._cached("server", lambda: ServerView({h: s.msg for h, s in self._sites.items()}, self.scales,
                                                         self.cfg.autoencoder.send_copies, self.size, self.plan.labels.n_classes))

    def plain_server_view(self) -> ServerView:
        """What the server would hold had the hospitals sent their latents without the keyed transform (the
        ``klt = false`` ablation): the referee runs a ciphertext-only attack on it as its positive control."""
        def make():
            msgs = {}
            for h, s in self._sites.items():
                t = s.truth
                msgs[h] = protocol.LatentBatch("train", h, {**{f"zt_img_{sc}": t.z_img[sc] for sc in self.scales},
                                                            **{f"zt_msk_{sc}": t.z_msk[sc] for sc in self.scales}})
            return ServerView(msgs, self.scales, self.cfg.autoencoder.send_copies, self.size, self.plan.labels.n_classes)
        return self._cached("plain_server", make)

    def public_data(self, work: Path, progress: bool, device=None) -> PublicData:
        """The aux images and masks, and the attacker's autoencoders trained on them (once per audit)."""
        from .procedures import train_attacker_autoencoders

        def make():
            models = train_attacker_autoencoders(self.aux.images, self.aux.masks, self.plan.labels.n_classes,
                                                 width=self.ae_architecture.width, skips=self.ae_architecture.skips,
                                                 recipe=self.cfg.autoencoder, work=work, progress=progress, device=device)
            return PublicData(self.aux.source, self.aux.images, self.aux.masks, models)
        return self._cached("public", make)

    def candidate_pool(self) -> CandidatePool:
        """Every hospital's original slices, in the run's order, then the aux slices (see :meth:`pool_offsets`)."""
        return self._cached("pool", lambda: CandidatePool(np.concatenate([s.truth.images for s in self._sites.values()]
                                                                         + [self.aux.images[:, 0]])))

    def pool_offsets(self) -> np.ndarray:
        """The referee's key to the pool: hospital i's slices are candidates offsets[i] .. offsets[i + 1] - 1."""
        return np.cumsum([0] + [len(s.truth.images) for s in self._sites.values()])

    def leaked_pairs(self, victim: str, draw: Callable[[ServerView], dict]) -> LeakedPairs:
        """The victim's leaked pairs under the referee's ``draw`` (server view -> {victim: (rows, targets)}),
        drawn once for every victim."""
        rows, targets = self._cached(("leaks", draw), lambda: draw(self.server_view()))[victim]
        t = self.truth(victim)
        return LeakedPairs(victim, rows, t.inputs[rows], t.onehot[rows], {s: a[rows] for s, a in t.z_img.items()},
                           {s: a[rows] for s, a in t.z_msk.items()}, targets)

    def victim_decoder(self, victim: str) -> VictimDecoder:
        return VictimDecoder(victim, SiteKit(victim, self._sites[victim].kit.autoencoders, None))

    def stolen_key(self, victim: str) -> StolenKey:
        return StolenKey(victim, self._sites[victim].kit)

    def other_hospital(self, victim: str, site: str) -> OtherHospital:
        if site == victim:
            raise PpcmiError(f"other hospital: {site!r} is the victim itself")
        return OtherHospital(victim, self._sites[site].kit)

    def target_model(self) -> TargetModel:
        from ..server.mapping import MappingServer

        def load(name: str):
            d = self.path / "server" if self.cfg.mapping.scope == "shared" else self.path / "server" / name
            return MappingServer(d).model.to(memory_format=torch.contiguous_format)
        return TargetModel(load, self.cfg.mapping)

    def membership(self) -> tuple[MembershipChallenge, MembershipTruth]:
        return self._cached("membership", self._membership)

    def _membership(self) -> tuple[MembershipChallenge, MembershipTruth]:
        """Members: train-message rows in the mapping network's training split. Non-members: the test patients'
        slices (and augmented copies), keyed by each hospital; never in training or validation."""
        from ..server.mapping import mapping_split

        names, cfg = self.names, self.cfg
        copies = cfg.autoencoder.send_copies
        n_rows = [self._sites[h].msg.n for h in names]
        cid = np.concatenate([np.full(k, i) for i, k in enumerate(n_rows)])
        if cfg.mapping.scope == "shared":
            tr, va = mapping_split(cid, cfg.mapping.val_frac, cfg.seed)
        else:
            tr, va = [], []
            off = 0
            for i in range(len(names)):
                t, v = mapping_split(np.zeros(int((cid == i).sum()), np.int64), cfg.mapping.val_frac, cfg.seed)
                tr += (t + off).tolist()
                va += (v + off).tolist()
                off += int((cid == i).sum())
            tr, va = np.array(tr), np.array(va)
        offsets = np.cumsum([0] + n_rows)
        ta = self.test_arrays
        member_rows, member_names, member_groups, non = {}, {}, [], {}
        for i, h in enumerate(names):
            s = self._sites[h]
            rows = tr[(tr >= offsets[i]) & (tr < offsets[i + 1])] - offsets[i]
            member_rows[h] = rows
            member_names[h] = [f"{h}/m/{u}" for u in s.truth.src[rows]]
            member_groups.append(s.truth.groups[s.truth.src[rows]])
            msg = s.hospital.training_batch(ta["images"], ta["masks"], copies=copies, noise=cfg.autoencoder.send_noise, seed=4242)
            src = np.arange(msg.n) % len(ta["images"])
            non[h] = (msg, [f"{h}/n/{u}" for u in src], self.test_groups[src])
        split = M.make_split(np.concatenate(member_groups), np.concatenate([g for _, _, g in non.values()]),
                             trained_groups=[g for s in self._sites.values() for g in s.truth.groups])
        # opaque unit ids that sort as the referee's names do, so the reference draws are what they were
        every = sorted({u for h in names for u in member_names[h] + non[h][1]})
        width = len(str(len(every)))
        opaque = {u: f"u{i:0{width}d}" for i, u in enumerate(every)}
        parts = [ChallengePart(h, subset_rows(self._sites[h].msg, member_rows[h]), tuple(opaque[u] for u in member_names[h])) for h in names]
        parts += [ChallengePart(h, non[h][0], tuple(opaque[u] for u in non[h][1])) for h in names]
        member = np.concatenate([np.ones(p.batch.n, bool) for p in parts[:len(names)]] + [np.zeros(p.batch.n, bool) for p in parts[len(names):]])
        units = {h: {int(r): p.units[j] for j, r in enumerate(member_rows[h])} for h, p in zip(names, parts)}
        return MembershipChallenge(tuple(parts)), MembershipTruth(member, member_rows, units, split, int(len(va)))
