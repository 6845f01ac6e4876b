"""The privacy audit of a finished run folder (auditor side: plays every attacker and the referee).

``run_audit(RUN)`` loads the run (:class:`ppcmi.privacy.run.Run`: config, site folders with their keys, the train
messages exactly as sent in ``RUN/wire``, the mapping network in ``RUN/server``), runs the attacks of DESIGN.md
section 4 for the chosen threat levels and writes ``RUN/audit/report.md``, ``audit.json`` and plots. Key bytes, Q
and b are never written: only errors against them are.

Each attack is one row of :data:`ppcmi.privacy.suite.SUITE`: the views it takes, its procedure
(:mod:`ppcmi.privacy.procedures`) and the referee's scoring (:mod:`ppcmi.privacy.referee`). For each attack the
audit builds only the views it declares, calls the procedure with them, and hands the estimates to the referee;
the threat label recorded for it is derived from its views.

Roles (recorded in ``audit.json`` under ``roles``):

- victim: each hospital in turn; its records are its training slices, which it sent to the
  server keyed (the originals are the first N rows of its train message, then augmented copies).
- aux (T2 public data): by default the run's held-out test patients' images and masks, which are
  patient-disjoint from every hospital's records by construction of the split (checked);
  or ``aux_dir`` (checked for identical images).
- members (T5): the train-message rows the mapping network was fitted on (its validation rows
  are neither members nor non-members); non-members: the test patients' slices and augmented
  copies, encoded and keyed by each hospital, never in training or validation. The split is
  built by :func:`ppcmi.privacy.membership.make_split`, which refuses any shared patient.

Every attack has a positive control (no transform or key known) and a prior-only baseline; an
attack whose positive control does not exceed the margins is void. Margins: DESIGN.md section 4.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..config import to_dict
from ..errors import PpcmiError
from ..fileio import atomic_write_json
from . import attacks as A
from .referee import AuditSettings, Referee
from .run import Run
from .suite import SUITE, Attack
from .verdicts import MARGINS
from .views import (CandidatePool, LeakedPairs, MembershipChallenge, OtherHospital, PublicData, ServerView, StolenKey,
                    TargetModel, VictimDecoder)

log = logging.getLogger(__name__)

THREATS = {
    "T0": "network eavesdropper (sees the messages; with TLS nothing, without it what T1 sees)",
    "T1": "curious server: keyed latents only",
    "T2": "T1 plus public images and masks of the same modality (aux)",
    "T3": "T2 plus k leaked pairs (plain latent or image, with its keyed latent)",
    "T4": "stolen key (and the hospital's decoder)",
    "T5": "membership attacker with the mapping network's weights or query access",
}


def parse_threats(spec: str | None) -> list[str]:
    if not spec:
        return list(THREATS)
    out = [t.strip().upper() for t in spec.split(",") if t.strip()]
    bad = [t for t in out if t not in THREATS]
    if bad or not out:
        raise PpcmiError(f"--threats: unknown threat {', '.join(bad) or repr(spec)}; known: {','.join(THREATS)}")
    return out


def select(chosen: list[str], *, shadow_models: int) -> list[Attack]:
    """The attacks whose derived threat level is among ``chosen``, in suite order (``shadow_models = 0`` skips M3)."""
    wanted = [a for a in SUITE if set(a.threat.levels) & set(chosen) and (a.name != "M3" or shadow_models)]
    if not wanted:
        raise PpcmiError(f"--threats {','.join(chosen)}: no attack in this suite is at these levels; "
                         + "; ".join(f"{a.name}: {a.threat.label}" for a in SUITE))
    return wanted


# ----------------------------------------------------------------------------- dispatch: build the declared views, run, score

PER_VICTIM = (LeakedPairs, VictimDecoder, StolenKey)  # views of one victim: such an attack runs once per victim
BUILDERS = {  # view -> how the audit builds it from the run, for one attack and scope
    ServerView: lambda run, attack, scope, s: run.server_view(),
    PublicData: lambda run, attack, scope, s: run.public_data(s.work, s.progress, s.device),
    CandidatePool: lambda run, attack, scope, s: run.candidate_pool(),
    LeakedPairs: lambda run, attack, scope, s: run.leaked_pairs(scope, attack.leaks),
    VictimDecoder: lambda run, attack, scope, s: run.victim_decoder(scope),
    StolenKey: lambda run, attack, scope, s: run.stolen_key(scope),
    OtherHospital: lambda run, attack, scope, s: run.other_hospital(*scope),
    TargetModel: lambda run, attack, scope, s: run.target_model(),
    MembershipChallenge: lambda run, attack, scope, s: run.membership()[0],
}


def scopes(attack: Attack, names: list[str]) -> list:
    """Whom one call of the attack is against: every ordered pair (victim, other hospital) for an attack that
    takes another hospital's key, every victim for one that takes a victim's views, else the whole run (None)."""
    if OtherHospital in attack.needs:
        return [(a, b) for a in names for b in names if b != a]
    if any(v in attack.needs for v in PER_VICTIM):
        return list(names)
    return [None]


def build_views(attack: Attack, run: Run, scope, settings: AuditSettings) -> tuple:
    """The views ``attack`` declares, built for ``scope``, in its order; nothing else is built."""
    return tuple(BUILDERS[v](run, attack, scope, settings) for v in attack.needs)


def run_attack(attack: Attack, run: Run, referee: Referee, settings: AuditSettings) -> dict:
    """Run one attack on its views for every scope, and return the referee's entry for it."""
    tuning = attack.tuning(settings) if attack.tuning else {}
    runs = {}
    for scope in scopes(attack, run.names):
        views = build_views(attack, run, scope, settings)
        runs[scope] = (views, attack.run(*views, **tuning))
    res = attack.score(referee, runs)
    res.update(threats=list(attack.threat.levels), threat=attack.threat.label, views=[v.__name__ for v in attack.needs],
               description=attack.description)
    return res


# ----------------------------------------------------------------------------- orchestration


def run_audit(run: str | Path, *, threats: str | None = None, aux_dir: str | Path | None = None, data_dir: str | Path | None = None,
              out: str | Path | None = None, shadow_models: int = 4, shadow_epochs: int | None = None, control_epochs: int = 150,
              progress: bool = True, device=None) -> dict:
    """Audit a finished run; writes ``OUT/report.md``, ``OUT/audit.json`` and plots (``OUT`` = ``RUN/audit``).
    ``device``: where the attacker's autoencoders, the reference and control networks train (None is the CPU)."""
    from .report import write_report

    chosen = parse_threats(threats)
    wanted = select(chosen, shadow_models=shadow_models)
    run = Path(run)
    out = Path(out) if out is not None else run / "audit"
    if (out / "audit.json").exists():
        raise PpcmiError(f"{out}: holds an audit already; choose another --out")
    # an interrupted audit continues: networks it finished under OUT/work are loaded, not retrained
    t0 = time.perf_counter()
    rd = Run(run, Path(data_dir) if data_dir else None, Path(aux_dir) if aux_dir else None)
    out.mkdir(parents=True, exist_ok=True)
    settings = AuditSettings(work=out / "work", shadow_models=shadow_models, shadow_epochs=shadow_epochs,
                             control_epochs=control_epochs, progress=progress, device=device)
    referee = Referee(rd, settings)
    results: dict = {}
    timings: dict = {}
    for attack in wanted:
        t = time.perf_counter()
        log.info("audit: %s (%s)", attack.name, attack.threat.label)
        results[attack.name] = run_attack(attack, rd, referee, settings)
        timings[attack.name] = time.perf_counter() - t
    summary_path = run / "summary.json"
    run_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    server_meta = json.loads((run / "server" / "config.json").read_text()) if (run / "server" / "config.json").exists() else {}
    succeeded = [a for a, r in results.items() if r.get("status") == "succeeded"]
    void = [a for a, r in results.items() if r.get("status") == "void"]
    audit = {
        "run": run.name, "threats": chosen, "attacks_run": list(results), "margins": MARGINS,
        "roles": _roles(rd, results),
        "defences": {"klt": rd.cfg.klt, "skips": rd.cfg.autoencoder.skips, "send_noise": rd.cfg.autoencoder.send_noise,
                     "send_noise_relative": _noise_relative(rd),
                     "dp": {**server_meta["dp"], "rows_per_patient": _rows_per_patient(rd)} if server_meta.get("dp") else None,
                     "send_copies": rd.cfg.autoencoder.send_copies},
        "run_dice": (run_summary.get("ppcmi") or run_summary.get("summary") or {}).get("fg_dice", {}).get("mean"),
        "results": results, "succeeded": succeeded, "void": void,
        "conclusion": (f"attack(s) {', '.join(succeeded)} succeeded" if succeeded else
                       "no attack in this suite exceeded the margins") + (f"; {', '.join(void)} void (positive control failed)" if void else ""),
        "timings_s": {**timings, "total": time.perf_counter() - t0},
        "config": to_dict(rd.cfg),
    }
    atomic_write_json(out / "audit.json", audit)
    write_report(audit, out, _examples(rd) if "A1" in results else None)
    return audit


def _examples(rd: Run, n: int = 3) -> dict:
    """Three slices of the first victim next to the leading component maps of its keyed and plain latents."""
    server, t = rd.server_view(), rd.truth(rd.names[0])
    zt = server.keyed(rd.names[0], "image")
    s = max(rd.scales, key=lambda sc: zt[sc].shape[-1])  # the finest latent grid
    m = len(t.images)
    k = A.upsample(A.pca_maps(zt[s], 3)[:m], rd.size)
    p = A.upsample(A.pca_maps(t.z_img[s], 3)[:m], rd.size)
    idx = np.linspace(0, m - 1, num=min(n, m)).astype(int)
    return {"cols": ["slice", f"keyed PC1 ({s})", "keyed PC2", "keyed PC3", "plain PC1"],
            "rows": [[t.images[i], k[i, 0], k[i, 1], k[i, 2], p[i, 0]] for i in idx]}


def _noise_relative(rd: Run) -> dict:
    """The latent noise std as a fraction of each scale's plain image-latent std (pooled over hospitals)."""
    if not rd.cfg.autoencoder.send_noise:
        return {}
    sd = {s: float(np.mean([rd.truth(h).z_img[s].std() for h in rd.names])) for s in rd.scales}
    return {s: rd.cfg.autoencoder.send_noise / max(v, 1e-12) for s, v in sd.items()}


def _rows_per_patient(rd: Run) -> dict:
    """How many sent rows each patient (the split's group) contributed: DP-SGD's epsilon is per row, so a
    patient is protected only by group privacy over this many rows."""
    counts = np.unique(np.concatenate([t.groups[t.src] for t in map(rd.truth, rd.names)]), return_counts=True)[1]
    return {"mean": float(counts.mean()), "max": int(counts.max()), "patients": int(len(counts))}


def _roles(rd: Run, results: dict) -> dict:
    return {
        "victims": {h: {"slices": int(len(rd.truth(h).images)), "patients": sorted(set(rd.truth(h).groups.tolist())),
                        "rows_sent": int(rd.message(h).n)} for h in rd.names},
        "aux": {"source": rd.aux.source, "slices": int(len(rd.aux.images)), "patients": sorted(set(rd.aux.groups.tolist()))},
        "membership": results.get("M1", {}).get("roles"),
    }


__all__ = ["THREATS", "MARGINS", "SUITE", "parse_threats", "select", "run_audit", "run_attack", "build_views", "scopes"]
