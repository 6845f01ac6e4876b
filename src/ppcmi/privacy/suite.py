"""The attack suite (auditor side): every attack, registered once with the views it takes.

Read one row to check an attack's threat model: ``needs`` are the views its procedure takes, positionally and in
that order; its threat label is derived from them (:func:`ppcmi.privacy.views.threat_of`), never written by hand.
``score`` is the referee's judgement of its estimates, ``leaks`` the referee's draw of which pairs leak (for an
attack that declares :class:`~ppcmi.privacy.views.LeakedPairs`), ``tuning`` the keyword arguments (how hard it
tries) that the audit's settings give its procedure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import procedures as P
from . import referee as R
from .views import (CandidatePool, LeakedPairs, MembershipChallenge, OtherHospital, PublicData, ServerView, TargetModel, Threat,
                    VictimDecoder, threat_of)


@dataclass(frozen=True)
class Attack:
    name: str
    description: str
    needs: tuple[type, ...]
    run: Callable          # run(*views, **tuning(settings)) -> estimates
    score: Callable        # score(referee, {scope: (views, estimates)}) -> the result entry
    leaks: Callable | None = None   # ServerView -> {victim: (leaked rows, target rows)}
    tuning: Callable | None = None  # AuditSettings -> keyword arguments of run

    @property
    def threat(self) -> Threat:
        return threat_of(self.needs)


SUITE: tuple[Attack, ...] = (
    Attack("A1", "ciphertext-only principal-component maps of keyed latents",
           (ServerView, PublicData), P.a1, R.score_a1),
    Attack("A5", "known-plaintext key recovery by orthogonal Procrustes",
           (ServerView, LeakedPairs, VictimDecoder), P.a5, R.score_a5, leaks=R.a5_leaks),
    Attack("A6", "learned inversion: aux-trained autoencoder plus a 1x1 map fitted on k leaked pairs",
           (ServerView, PublicData, LeakedPairs), P.a6, R.score_a6, leaks=R.a6_leaks),
    Attack("A7", "linkage of keyed latents to a pool of candidate images",
           (ServerView, PublicData, CandidatePool), P.a7, R.score_a7),
    Attack("A8", "the paper's cross-decoder attack: another hospital's key and decoder",
           (ServerView, OtherHospital), P.a8, R.score_a8),
    Attack("M1", "loss-threshold membership inference on the mapping network",
           (TargetModel, MembershipChallenge), P.m1, R.score_m1),
    Attack("M3", "offline LiRA membership inference with reference mapping networks",
           (TargetModel, MembershipChallenge), P.m3, R.score_m3,
           tuning=lambda s: {"references": s.shadow_models, "epochs": s.shadow_epochs, "work": s.work / "shadow",
                             "progress": s.progress, "device": s.device}),
)
BY_NAME = {a.name: a for a in SUITE}
