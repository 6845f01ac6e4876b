"""M1 and M3 against the federated core's final model, measured on a finished ``ppcmi_federated`` run (plays the referee).

The run is a folder ``ppcmi bench --methods ppcmi_federated`` (or ``ppcmi simulate --set mapping.scope=federated``)
wrote: ``federation/config.json``, ``federation/sites/NAME/site/`` (each hospital's autoencoders, key, cached keyed
pairs and local model ``fedcore/model``: the final global core with its own adapters).

Who can attack, with what:

  * **the coordinator alone** holds the final global core and the per-round aggregates. Every membership score needs a
    record's loss, and a loss needs the record keyed and framed by a hospital (its autoencoders, key, frames and
    adapters), none of which crossed (``messages.jsonl``: ``tests/test_fedcore.py``). M1 and M3 have no input there;
    nothing is run for it.
  * **the coordinator with a colluding hospital B** (this script): B hands over its whole site, so the attacker holds the
    final core, B's adapters, frames, autoencoders and key. Given candidate records (a patient's slices and masks), it
    encodes each with B's autoencoders and key into a keyed pair, as B would for its own training (the slice and
    ``send_copies - 1`` augmented copies), and scores it under B's local model: M1, the loss threshold; M3, offline
    LiRA against reference networks B trains itself, each on a random half of the candidate slices (with their copies),
    by stage 2's recipe in its own frame (:func:`ppcmi.privacy.procedures.m3`). Members: the slices the other hospitals
    (the victims) trained on; non-members: the held-out test patients' slices. Members and non-members are different
    patients, so beside each AUC the referee also gives what the patients alone produce: the AUC's null range when the
    member label is dealt to random whole patients (:func:`ppcmi.privacy.membership.patient_permutation`).
  * **the positive control**: the same attack on B's own training rows (the exact pairs it trained the core on, its
    cached ``fedcore/pairs.safetensors``) against the same non-members, through the same local model. If the final
    model memorised what it was trained on in B's frame, the attack sees it there; a void control means the attack
    cannot tell members from non-members even where it has every advantage.

Verdicts use the audit's margins (:mod:`ppcmi.privacy.verdicts`: TPR at 1 % FPR <= 0.02 with its 95 % upper bound <=
0.05, AUC in [0.45, 0.55]); beside every TPR is the formal bound TPR <= e^eps FPR + delta, which without differential
privacy (eps infinite) bounds nothing. Passing the margins empirically is not a guarantee.

Writes ``OUT/core-membership-TAG.json`` and ``.md``. Usage::

    PYTHONPATH=src python benchmarks/core_membership.py --run runs/bench-sunnybrook_lv/ppcmi_federated --tag sunnybrook_lv
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ppcmi.client import fedcore  # noqa: E402
from ppcmi.client.site import Hospital  # noqa: E402
from ppcmi.client.stages import prepare  # noqa: E402
from ppcmi.config import from_dict  # noqa: E402
from ppcmi.privacy import membership as M  # noqa: E402
from ppcmi.privacy import procedures as P  # noqa: E402
from ppcmi.privacy import verdicts as V  # noqa: E402
from ppcmi.privacy.views import ChallengePart, MembershipChallenge, TargetModel  # noqa: E402
from ppcmi.protocol import LatentBatch  # noqa: E402
from ppcmi.server.mapping import MappingServer  # noqa: E402
from ppcmi.simulate import plan  # noqa: E402

CANDIDATE_SEED = 9173  # the attacker's own augmentation draws for the candidates' copies (not the hospitals')
PERMUTATION_SEED = 0    # the referee's patient permutations


def say(msg: str) -> None:
    print(f"[core-membership {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def keyed_rows(hosp: Hospital, arrays: dict, cfg, tag: str) -> tuple[LatentBatch, list[str]]:
    """Candidate records keyed by the colluding hospital as it keys its own training pairs, and a unit id per row (a
    slice and its copies share one: rows run copy after copy, so row i is slice i mod n)."""
    batch = hosp.training_batch(arrays["images"], arrays["masks"], copies=cfg.autoencoder.send_copies,
                                noise=cfg.autoencoder.send_noise, seed=CANDIDATE_SEED)
    n = len(arrays["images"])
    return batch, [f"{tag}/{i % n}" for i in range(batch.n)]


def row_patients(groups, n_rows: int) -> np.ndarray:
    """The patient of each of ``n_rows`` keyed rows (copy after copy of the planes, so row i is plane i mod n)."""
    g = np.asarray(groups, dtype=str)
    return g[np.arange(n_rows) % len(g)]


def own_rows(site_dir: Path, name: str, n_slices: int) -> tuple[LatentBatch, list[str]]:
    """The exact keyed pairs the hospital trained the core on (its cache), and their unit ids."""
    from safetensors.numpy import load_file

    pairs = load_file(str(site_dir / fedcore.FOLDER / "pairs.safetensors"))
    batch = LatentBatch("train", name, pairs)
    return batch, [f"own/{i % n_slices}" for i in range(batch.n)]


def held_out(fed_dir: Path, name: str, groups: list[str], n_rows: int, cfg) -> np.ndarray:
    """Which of ``n_rows`` rows (copy after copy of planes with patients ``groups``) hospital ``name`` held out of its
    training with ``mapping.federated_select = "val"`` (:func:`ppcmi.client.fedcore.holdout_rows`); none otherwise."""
    out = np.zeros(n_rows, dtype=bool)
    if cfg.mapping.federated_select == "val":
        meta = json.loads((fed_dir / "sites" / name / "site" / fedcore.FOLDER / "model" / "config.json").read_text())
        seed = meta["selected"].get("holdout_seed")
        if seed is not None:
            out[fedcore.holdout_rows(groups, n_rows, seed, cfg.mapping.val_frac)[1].numpy()] = True
    return out


def victims_dp(fed_dir: Path, victims: list[str]) -> dict | None:
    """The victims' differential privacy (``mapping.dp``): the largest epsilon per patient any victim reached after its
    last round, with its delta, from the round records each keeps; None where a victim trained without DP."""
    worst = None
    for v in victims:
        rounds = sorted((fed_dir / "sites" / v / "site" / fedcore.FOLDER / "rounds").glob("round-*.json"),
                        key=lambda p: int(p.stem.split("-")[1]))
        dp = json.loads(rounds[-1].read_text()).get("dp") if rounds else None
        if dp is None:
            return None
        if worst is None or dp["epsilon"] > worst["epsilon"]:
            worst = {"epsilon": dp["epsilon"], "delta": dp["delta"], "unit": dp["unit"], "hospital": v}
    return worst


def bound(tpr: dict, dp: dict | None) -> str:
    fpr = tpr["achieved_fpr"]
    if dp is None:
        return f"TPR <= e^eps x {fpr:.4f} + delta: no bound without DP (eps infinite)"
    b = min(1.0, math.exp(dp["epsilon"]) * fpr + dp["delta"])
    return f"TPR <= e^{dp['epsilon']:.3g} x {fpr:.4f} + {dp['delta']:.3g} = {b:.4f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished ppcmi_federated run folder (holds federation/)")
    ap.add_argument("--colluder", default=None, help="the colluding hospital (default: the first)")
    ap.add_argument("--references", type=int, default=2, help="M3's reference networks (0: M1 only)")
    ap.add_argument("--ref-epochs", type=int, default=None, help="their epochs (default: the run's mapping.epochs)")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    run = Path(args.run)
    fed_dir = run / "federation"
    raw = json.loads((fed_dir / "config.json").read_text())
    data = raw.pop("data_dir")
    cfg = from_dict(raw)
    pl = plan(cfg, data)
    names = list(pl.hospitals)
    colluder = args.colluder or names[0]
    if colluder not in names:
        raise SystemExit(f"--colluder: {colluder!r} is not one of {names}")
    victims = [h for h in names if h != colluder]
    site = fed_dir / "sites" / colluder / "site"
    hosp = Hospital(site)
    net = MappingServer(site / fedcore.FOLDER / "model").model.to(memory_format=torch.contiguous_format).eval()
    say(f"colluder {colluder}, victims {victims}; {len(pl.test)} held-out test slices")

    parts, roles, patients = [], [], []  # roles: "member" (a victim's training slice), "non" (a test slice), "own" (the control's members)
    for v in victims:  # the victims' training slices, as candidates the attacker keys itself
        arrays = prepare(pl.hospitals[v], cfg, pl.labels)
        b, u = keyed_rows(hosp, arrays, cfg, f"{v}/m")
        parts.append(ChallengePart(colluder, b, tuple(u)))
        roles.append(np.where(held_out(fed_dir, v, list(arrays["groups"]), b.n, cfg), "held", "member"))
        patients.append(row_patients(arrays["groups"], b.n))
    test = prepare(pl.test, cfg, pl.labels)
    b, u = keyed_rows(hosp, test, cfg, "test/n")
    parts.append(ChallengePart(colluder, b, tuple(u)))
    roles.append(np.full(b.n, "non"))
    patients.append(row_patients(test["groups"], b.n))
    b, u = own_rows(site, colluder, len(pl.hospitals[colluder]))
    parts.append(ChallengePart(colluder, b, tuple(u)))
    roles.append(np.where(held_out(fed_dir, colluder, fedcore.pair_groups(site), b.n, cfg), "held", "own"))
    patients.append(np.full(b.n, ""))  # the control's rows: not in the permutation
    row_patient = np.concatenate(patients)
    row_role = np.concatenate(roles)  # ("held": a hospital's held-out patients, never trained on: left out of every set)
    member, nonmember, control = (row_role == "member"), (row_role == "non"), (row_role == "own")
    challenge = MembershipChallenge(tuple(parts))
    target = TargetModel(lambda h: net, cfg.mapping)
    say(f"{int(member.sum())} victim member rows, {int(nonmember.sum())} non-member rows, {int(control.sum())} own rows (control)")

    dp = victims_dp(fed_dir, victims)
    def judged(s: np.ndarray) -> dict:
        """An attack's entry from its scores: the margins' verdict with its control, and the patients-alone null."""
        e = V.mia_entry(M.evaluate_scores(s[member], s[nonmember]), M.evaluate_scores(s[control], s[nonmember]))
        e["patient_permutation"] = M.patient_permutation(s[member], row_patient[member], s[nonmember],
                                                         row_patient[nonmember], seed=PERMUTATION_SEED)
        return e

    results: dict = {"M1": judged(P.m1(target, challenge))}
    say(f"M1: AUC {results['M1']['attack']['auc']:.3f}, control AUC {results['M1']['control']['auc']:.3f}: {results['M1']['status']}")
    if args.references:
        work = Path(tempfile.mkdtemp(prefix="core-membership-"))
        try:
            m3 = P.m3(target, challenge, references=args.references, epochs=args.ref_epochs, work=work, progress=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results["M3"] = judged(m3["scores"])
        results["M3"]["references"] = {"n": args.references, "epochs": m3["references"].epochs}
        say(f"M3: AUC {results['M3']['attack']['auc']:.3f}, control AUC {results['M3']['control']['auc']:.3f}: {results['M3']['status']}")
    for r in results.values():
        for k in ("attack", "control"):
            r[k].pop("roc", None)
            r[k]["formal_bound"] = bound(r[k]["tpr_at_1pct_fpr"], dp if k == "attack" else None)
    out = {"run": str(run) if not run.is_absolute() else "/".join(run.parts[-3:]), "tag": args.tag, "colluder": colluder, "victims": victims, "margins": V.MARGINS, "dp": dp,
           "rows": {"victim_members": int(member.sum()), "nonmembers": int(nonmember.sum()), "control_members": int(control.sum()),
                    "held_out": int((row_role == "held").sum())},
           "rounds": json.loads((site / fedcore.FOLDER / "model" / "config.json").read_text()).get("rounds"),
           "results": results, "seconds": time.perf_counter() - t0,
           "machine": {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}}
    dest = Path(args.out) / f"core-membership-{args.tag}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    dest.with_suffix(".md").write_text(markdown(out))
    say(f"wrote {dest}.json and .md ({out['seconds']:.0f} s)")
    return out


def permutation_cell(e: dict) -> str:
    q = e.get("patient_permutation")
    if q is None:
        return "not run"
    lo, _, hi = q["null_auc_percentiles"]
    return f"[{lo:.3f}, {hi:.3f}], p = {q['p_two_sided']:.3f} ({q['member_patients']} / {q['nonmember_patients']} patients)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(r: dict) -> str:
    lines = [f"# Membership against the federated core's final model: {r['tag']}", "",
             f"Colluding hospital {r['colluder']} (the attacker holds its whole site and the final core); victims "
             f"{', '.join(r['victims'])}. Rows: {r['rows']['victim_members']} victim member rows, {r['rows']['nonmembers']} "
             f"non-member rows (held-out test patients), {r['rows']['control_members']} of the colluder's own training rows "
             "(the positive control). The coordinator alone has no input for either attack (no hospital's frames, "
             "adapters, autoencoders or key crossed).", "",
             "| attack | AUC | TPR at 1 % FPR [95 % CP] | achieved FPR | control AUC | control TPR at 1 % FPR [95 % CP] | verdict "
             "| AUC of patients alone: null 95 % range, p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in r["results"].items():
        a, c = e["attack"], e["control"]
        ta, tc = a["tpr_at_1pct_fpr"], c["tpr_at_1pct_fpr"]
        lines.append(f"| {name} | {a['auc']:.3f} | {ta['tpr']:.3f} [{ta['tpr_ci95'][0]:.3f}, {ta['tpr_ci95'][1]:.3f}] | "
                     f"{ta['achieved_fpr']:.4f} | {c['auc']:.3f} | {tc['tpr']:.3f} [{tc['tpr_ci95'][0]:.3f}, {tc['tpr_ci95'][1]:.3f}] | "
                     f"{e['status']}{' (' + ', '.join(e['exceeded']) + ')' if e['exceeded'] else ''} | {permutation_cell(e)} |")
    dp = r.get("dp")
    if dp is None:
        words = ("Formal bound beside every TPR: TPR <= e^eps x FPR + delta; this run has no differential privacy (eps "
                 "infinite), so it bounds nothing.")
    else:
        words = (f"Formal bound: the victims trained with patient-level DP-SGD, epsilon {dp['epsilon']:.3g} at delta "
                 f"{dp['delta']:.3g} per patient (the largest, {dp['hospital']}'s), which bounds every row of a patient: "
                 + "; ".join(f"{n}: {e['attack']['formal_bound']}" for n, e in r["results"].items())
                 + " (the control's rows are the colluder's own: no bound applies).")
    lines += ["", words + " Passing the margins empirically is not a guarantee.", "",
              "The last column: members and non-members are different patients, so the AUC can stray from 0.5 through "
              "the patients alone. The referee deals the member label to random patients (every row of a patient with "
              "it, as many patients as the victims have) and recomputes the AUC; the column gives that null's central "
              "95 % and the two-sided p-value of the observed |AUC - 0.5| among the draws. A p-value that is not small "
              "says the observed AUC is what patient differences alone produce; the margins' verdict stands either way.", "",
              f"Machine: {r['machine']['cpu']}, torch {r['machine']['torch']}; {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
