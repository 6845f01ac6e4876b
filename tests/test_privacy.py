"""The privacy audit and the defences: attack maths on hand-built latents, the membership pipeline on a
memorising and on an independent model, the audit CLI on a tiny run, key rotation, DP-SGD, bad input."""

from __future__ import annotations

import json
import secrets
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ppcmi import protocol
from ppcmi.cli import app
from ppcmi.config import AutoencoderConfig, Config, ConfigError, DataConfig, MappingTrainConfig
from ppcmi.experiment import synth
from ppcmi.errors import PpcmiError
from ppcmi.klt import KeyedLatentTransform
from ppcmi.models import AEConfig
from ppcmi.privacy import attacks as A
from ppcmi.privacy import membership as M

runner = CliRunner()


def _klt(channels: dict[str, int]) -> KeyedLatentTransform:
    return KeyedLatentTransform(secrets.token_bytes(32), channels)  # a fresh key every run: no fixture holds one


# ----------------------------------------------------------------------------- attack maths


def test_procrustes_recovers_the_key_from_one_latent(rng):
    c = 16
    klt = _klt({"s3": c})
    z = rng.standard_normal((1, c, 8, 8)).astype(np.float32)  # one image: 64 pixel equations for 16 channels
    zt = klt.forward({"s3": torch.from_numpy(z)}, "image")["s3"].numpy()
    m_hat, b_hat = A.procrustes_key(z, zt)
    m, b = klt.matrix("image", "s3").double().numpy(), klt.bias("image", "s3").double().numpy()
    assert A.relative_error(m_hat, m) < 1e-6
    assert A.relative_error(b_hat, b) < 1e-6
    # and the recovered key inverts unseen latents
    z2 = rng.standard_normal((3, c, 8, 8)).astype(np.float32)
    zt2 = klt.forward({"s3": torch.from_numpy(z2)}, "image")["s3"].numpy()
    assert A.latent_error(A.invert_key(zt2, m_hat, b_hat), z2) < 1e-5


def test_principal_component_coordinates_of_keyed_and_plain_latents_agree_up_to_sign(rng):
    c = 12
    klt = _klt({"s4": c})
    scales = np.linspace(3.0, 0.3, c)[None, :, None, None]  # distinct variances, so components are well defined
    z = (rng.standard_normal((6, c, 6, 6)) * scales).astype(np.float32)
    zt = klt.forward({"s4": torch.from_numpy(z)}, "mask")["s4"].numpy()
    p, k = A.pca_maps(z, 4), A.pca_maps(zt, 4)
    for comp in range(4):
        a, b = p[:, comp].ravel(), k[:, comp].ravel()
        sign = np.sign(a @ b)
        assert np.allclose(a, sign * b, atol=1e-4 * np.abs(a).max())


def test_linear_map_and_linkage_and_scores_on_known_cases(rng):
    src = rng.standard_normal((4, 5, 6, 6))
    w_true = rng.standard_normal((3, 5))
    dst = np.einsum("ij,njhw->nihw", w_true, src) + 0.5
    w, c = A.fit_linear_map(src, dst, ridge=1e-12)
    assert np.allclose(w, w_true, atol=1e-6) and np.allclose(c, 0.5, atol=1e-6)
    scores = np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.8]])
    assert A.topk_accuracy(scores, np.array([0, 1]), 1) == 0.5 and A.topk_accuracy(scores, np.array([0, 1]), 2) == 0.5
    img = rng.random((2, 16, 16))
    s = A.image_scores(1 - img, img)  # a negative is perfect after the affine fit
    assert np.allclose(s["ssim"], 1.0) and np.all(s["psnr"] >= 99)
    fg = np.zeros((1, 4, 4), bool)
    fg[0, :2] = True
    assert A.dice(fg, fg)[0] == 1.0 and A.dice(~fg, fg)[0] == 0.0 and A.dice(fg & False, fg & False)[0] == 1.0


# ----------------------------------------------------------------------------- membership


def _tiny_mapping_data(rng, n: int, client: str = "h1") -> protocol.LatentBatch:
    z = rng.standard_normal((n, 4, 4, 4)).astype(np.float32)
    y = rng.standard_normal((n, 4, 4, 4)).astype(np.float32)  # targets unrelated to inputs: only memorising fits them
    return protocol.LatentBatch("train", client, {"zt_img_b": z, "zt_msk_b": y})


@pytest.mark.slow
def test_membership_pipeline_detects_a_memorising_model_and_not_independent_data(tmp_path, rng):
    from ppcmi.server.mapping import row_losses, train_mapping

    members = _tiny_mapping_data(rng, 16)
    cfg = MappingTrainConfig(widen=(16, 16, 16), mid=(16, 16), down=(8, 8, 8), pyramid=False, dropout=0.0, val_frac=0.0, epochs=60,
                             patience=60, batch_size=16)
    model, _ = train_mapping([members], cfg, tmp_path / "memorise", seed=0, progress=False)
    non_a, non_b = _tiny_mapping_data(rng, 1000), _tiny_mapping_data(rng, 1000)  # enough for a stable 1 % FPR threshold
    ev = M.evaluate_scores(M.loss_threshold_scores(row_losses(model, members)), M.loss_threshold_scores(row_losses(model, non_a)))
    assert ev["tpr_at_1pct_fpr"]["tpr"] >= 0.10 and ev["auc"] > 0.9
    assert ev["tpr_at_0.1pct_fpr"] is None  # fewer than 2000 non-members
    # two sets the model never saw, scored as if one were members: no signal
    ind = M.evaluate_scores(M.loss_threshold_scores(row_losses(model, non_a)), M.loss_threshold_scores(row_losses(model, non_b)))
    assert 0.43 <= ind["auc"] <= 0.57
    assert ind["tpr_at_1pct_fpr"]["tpr_ci95"][0] <= 0.01 <= ind["tpr_at_1pct_fpr"]["tpr_ci95"][1] + 0.02


def test_tpr_at_fpr_and_clopper_pearson_by_hand():
    t = M.tpr_at_fpr(np.array([5.0, 4.0, 0.5, 0.1]), np.arange(100) / 100.0, 0.01)  # non-members 0.00..0.99
    assert t["achieved_fpr"] == 0.01 and t["tp"] == 2 and t["tpr"] == 0.5  # threshold 0.98: 5 and 4 are above it
    lo, hi = M.clopper_pearson(0, 20)
    assert lo == 0.0 and abs(hi - (1 - 0.025 ** (1 / 20))) < 1e-9
    lo, hi = M.clopper_pearson(10, 20)
    assert 0.27 < lo < 0.28 and 0.72 < hi < 0.73


def test_patient_permutation_separates_patient_shift_from_membership():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    # one patient each side, every row of a patient alike: AUC 1.0, yet either labelling of the two patients gives
    # 1.0 or 0.0, so it is no evidence at all
    one = M.patient_permutation(5 + rng.random(40), ["a"] * 40, rng.random(30), ["b"] * 30, draws=200)
    assert one["observed_auc"] == 1.0 and one["p_two_sided"] == 1.0
    # four member patients above four non-member patients: of the C(8, 4) = 70 labellings two give |AUC - 0.5| = 0.5
    m = np.repeat([5.0, 6.0, 7.0, 8.0], 3) + rng.random(12) * 0.1
    nm = np.repeat([1.0, 2.0, 3.0, 4.0], 3) + rng.random(12) * 0.1
    gm, gn = np.repeat(["p1", "p2", "p3", "p4"], 3), np.repeat(["q1", "q2", "q3", "q4"], 3)
    r = M.patient_permutation(m, gm, nm, gn, draws=4000, seed=1)
    assert r["observed_auc"] == 1.0 and abs(r["p_two_sided"] - 2 / 70) < 0.012
    assert r["member_patients"] == 4 and r["nonmember_patients"] == 4
    assert r == M.patient_permutation(m, gm, nm, gn, draws=4000, seed=1)  # seeded
    # the rank formula is roc_auc_score's, ties included
    s = np.round(rng.random(50), 1)
    g = np.array([f"p{i % 7}" for i in range(50)])
    mem = np.isin(g, ["p0", "p3", "p5"])
    t = M.patient_permutation(s[mem], g[mem], s[~mem], g[~mem], draws=10)
    assert abs(t["observed_auc"] - roc_auc_score(mem, s)) < 1e-12
    with pytest.raises(PpcmiError, match="both sides"):
        M.patient_permutation(m, gm, nm, gm, draws=10)
    with pytest.raises(PpcmiError, match="patient ids"):
        M.patient_permutation(m, gm[:3], nm, gn, draws=10)


def test_lira_offline_scores_prefer_records_the_target_fits_better_than_its_references():
    ref = np.array([[1.0, 1.0, 2.0, 2.0], [1.1, 0.9, 2.1, 1.9]])
    ref_in = np.zeros_like(ref, bool)
    sc = M.lira_offline_scores(np.array([0.1, 1.0, 0.2, 2.0]), ref, ref_in)
    assert sc[0] > sc[1] and sc[2] > sc[3]
    mask = M.reference_assignment(np.array(["a", "a", "b", "c"]), 4, seed=1)
    assert (mask.sum(0) == 2).all() and (mask[:, 0] == mask[:, 1]).all()  # a unit's rows go together
    with pytest.raises(PpcmiError, match="even"):
        M.reference_assignment(np.array(["a"]), 3)


def test_members_and_nonmembers_are_patient_disjoint_by_construction():
    s = M.make_split(["p1", "p1", "p2"], ["p3", "p4"], trained_groups=["p5"])
    assert s.n_members == 3 and s.n_nonmembers == 2
    with pytest.raises(PpcmiError, match="p2"):
        M.make_split(["p1", "p2"], ["p2", "p3"])
    with pytest.raises(PpcmiError, match="p5"):  # a validation-only patient is not a non-member either
        M.make_split(["p1"], ["p5"], trained_groups=["p5"])


def test_a_failed_positive_control_marks_the_attack_void():
    from ppcmi.privacy.verdicts import mia_entry as _mia_entry, verdict as _verdict

    base = {"ssim": {"mean": 0.2}, "psnr": {"mean": 12.0}, "dice": {"mean": 0.5}}
    strong = {"ssim": {"mean": 0.6}, "psnr": {"mean": 20.0}, "dice": {"mean": 0.9}}
    assert _verdict(strong, base, strong)["status"] == "succeeded"
    assert _verdict(base, base, strong)["status"] == "not exceeded"
    assert _verdict(strong, base, base)["status"] == "void"  # the control shows nothing: no verdict either way
    ev = M.evaluate_scores(np.arange(50) + 1000.0, np.arange(200.0))
    weak = M.evaluate_scores(np.arange(50.0), np.arange(200.0))
    assert _mia_entry(ev, ev)["status"] == "succeeded"
    assert _mia_entry(ev, weak)["status"] == "void"


# ----------------------------------------------------------------------------- attacks declare their views

EXPECTED = {  # attack -> (the views its procedure takes, the threat label that follows from them), by hand
    "A1": (("ServerView", "PublicData"), "T2"),
    "A5": (("ServerView", "LeakedPairs", "VictimDecoder"), "T3 + the victim's decoder"),
    "A6": (("ServerView", "PublicData", "LeakedPairs"), "T3"),
    "A7": (("ServerView", "PublicData", "CandidatePool"), "T2 + candidate images that include the victims' own slices"),
    "A8": (("ServerView", "OtherHospital"), "T1 + another hospital's key and decoder (collusion)"),
    "M1": (("TargetModel", "MembershipChallenge"), "T5"),
    "M3": (("TargetModel", "MembershipChallenge"), "T5"),
}


def test_each_attacks_threat_label_follows_from_the_views_it_declares():
    from ppcmi.privacy.suite import SUITE

    assert [a.name for a in SUITE] == list(EXPECTED)  # every attack, each registered once
    assert {a.name: (tuple(v.__name__ for v in a.needs), a.threat.label) for a in SUITE} == EXPECTED


def test_threat_levels_are_derived_from_views_and_the_referees_views_are_no_attackers():
    from ppcmi.privacy import views as V

    assert V.threat_of((V.ServerView,)).levels == ("T0", "T1")  # an eavesdropper without TLS sees the messages too
    assert V.threat_of((V.ServerView, V.PublicData)).levels == ("T2",)
    assert V.threat_of((V.ServerView, V.PublicData, V.LeakedPairs)).label == "T3"
    assert V.threat_of((V.ServerView, V.StolenKey)).label == "T4"
    assert V.threat_of((V.ServerView, V.LeakedPairs, V.OtherHospital)).label == "T3 + another hospital's key and decoder (collusion)"
    for referee_only in (V.GroundTruth, V.MembershipTruth):
        with pytest.raises(PpcmiError, match=referee_only.__name__):
            V.threat_of((V.ServerView, referee_only))
    with pytest.raises(PpcmiError, match="no.*level|none of them"):
        V.threat_of((V.VictimDecoder,))


def test_each_attack_procedure_takes_exactly_its_declared_views_positionally():
    import inspect
    import typing

    from ppcmi.privacy import views as V
    from ppcmi.privacy.suite import SUITE

    for a in SUITE:
        params = list(inspect.signature(a.run).parameters.values())
        hints = typing.get_type_hints(a.run)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert tuple(hints[p.name] for p in positional) == a.needs, a.name
        for p in params[len(positional):]:  # the rest say how hard it tries, never what it holds
            assert p.kind is p.KEYWORD_ONLY and hints.get(p.name) not in (*V.GRANTS, V.GroundTruth, V.MembershipTruth), (a.name, p)


def test_the_audit_builds_only_an_attacks_declared_views_and_passes_them_in_order(tmp_path):
    """A stub run records which views the audit builds; a spy procedure records what it is called with."""
    from dataclasses import replace

    from ppcmi.privacy import audit, referee, views as V
    from ppcmi.privacy.suite import SUITE

    kinds = {"server_view": V.ServerView, "public_data": V.PublicData, "candidate_pool": V.CandidatePool,
             "leaked_pairs": V.LeakedPairs, "victim_decoder": V.VictimDecoder, "stolen_key": V.StolenKey,
             "other_hospital": V.OtherHospital, "target_model": V.TargetModel}

    class StubRun:
        names = ["h1", "h2"]

        def __init__(self):
            self.built = []

        def __getattr__(self, name):
            def build(*args):
                self.built.append((name, args))
                if name == "membership":
                    return object.__new__(V.MembershipChallenge), object.__new__(V.MembershipTruth)
                return object.__new__(kinds[name])
            return build

    settings = referee.AuditSettings(work=tmp_path)
    for attack in SUITE:
        calls = []
        spy = replace(attack, run=lambda *views, **kw: calls.append(tuple(type(v) for v in views)) or len(calls),
                      score=lambda ref, runs: {"scopes": list(runs)})
        run = StubRun()
        res = audit.run_attack(spy, run, None, settings)
        assert calls and all(c == attack.needs for c in calls), (attack.name, calls)
        built = {name for name, _ in run.built}
        assert built == {n for n, k in kinds.items() if k in attack.needs} | ({"membership"} if V.MembershipChallenge in attack.needs else set()), (attack.name, built)
        assert not {"truth", "stolen_key"} & built or V.StolenKey in attack.needs
        assert res["threat"] == EXPECTED[attack.name][1] and res["views"] == list(EXPECTED[attack.name][0])
        expected_scopes = {"A5": ["h1", "h2"], "A6": ["h1", "h2"], "A8": [("h1", "h2"), ("h2", "h1")]}.get(attack.name, [None])
        assert res["scopes"] == expected_scopes, attack.name
    # A5's leaked pairs are drawn by the referee's draw for A5, for the victim of the call
    a5 = next(a for a in SUITE if a.name == "A5")
    run = StubRun()
    audit.build_views(a5, run, "h2", settings)
    assert ("leaked_pairs", ("h2", referee.a5_leaks)) in run.built and ("victim_decoder", ("h2",)) in run.built


def test_threat_levels_select_the_attacks():
    from ppcmi.privacy.audit import select

    assert [a.name for a in select(["T1"], shadow_models=4)] == ["A8"]
    assert [a.name for a in select(["T2", "T3"], shadow_models=4)] == ["A1", "A5", "A6", "A7"]
    assert [a.name for a in select(["T5"], shadow_models=0)] == ["M1"]  # --shadow-models 0 skips M3
    with pytest.raises(PpcmiError, match="no attack in this suite"):
        select(["T4"], shadow_models=4)


def test_a_hospital_carries_no_audit_only_methods():
    from ppcmi.client.site import Hospital

    assert not [m for m in ("true_key", "decode_plain", "decode_keyed", "plain_latents") if hasattr(Hospital, m)]


# ----------------------------------------------------------------------------- a tiny run: audit CLI, rotation


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ppcmi.fileio import atomic_write_json
    from ppcmi.simulate import public_summary, run_simulation

    root = tmp_path_factory.mktemp("privacy")
    data = synth(root / "data", sites=2, patients_per_site=3, slices_per_patient=4, size=32, n_classes=2, seed=3)
    cfg = Config(seed=0, clients=2, data=DataConfig(size=32, group_csv=str(data / "groups.csv"), test_frac=0.3, partition="site"),
                 autoencoder=AutoencoderConfig(width=0.25, epochs=20, patience=20, send_copies=2),
                 mapping=MappingTrainConfig(widen=(8, 16, 16), mid=(16, 16), down=(8, 8, 8), epochs=20, patience=20, lr_schedule="cosine"))
    res = run_simulation(cfg, data, root / "run", progress=False)
    res.pop("_arrays")
    atomic_write_json(root / "run" / "summary.json", public_summary(res))
    return root, res


@pytest.mark.slow
def test_audit_cli_end_to_end_on_a_tiny_run(tiny_run):
    root, _ = tiny_run
    run = root / "run"
    r = runner.invoke(app, ["audit", "--run", str(run), "-q", "--shadow-models", "2", "--shadow-epochs", "2", "--control-epochs", "20"])
    assert r.exit_code == 0, r.output
    a = json.loads((run / "audit" / "audit.json").read_text())
    assert set(a["results"]) == {"A1", "A5", "A6", "A7", "A8", "M1", "M3"}
    for name, res in a["results"].items():
        assert res["status"] in ("succeeded", "not exceeded", "void"), name
    # A5, known-plaintext Procrustes, against each victim's true key. image/s3 (16 channels, 4 x 4 pixels at size 32)
    # gets kmax x 16 pixel equations for its 16 x 16 orthogonal key and comes back exactly; s4 (32 channels, 2 x 2) and
    # b (64, 1 x 1) get fewer equations than channels at every k the fixture's 4 leakable pairs allow: never recovered
    shapes = AEConfig(width=0.25).latent_shapes(32)  # (C, H, W) per scale at the fixture's width and size
    for victim, v in a["results"]["A5"]["per_victim"].items():
        for kind_scale, t in v["key_recovery"].items():
            c, h, w = shapes[kind_scale.split("/")[1]]
            assert (t["channels"], t["pixels_per_image"]) == (c, h * w), (victim, kind_scale)
            if all(r["k"] * h * w < c for r in t["rows"]):  # underdetermined
                assert t["smallest_k"] is None, (victim, kind_scale, t["rows"])
        kmax = v["decode_with_k"]
        c, h, w = shapes["s3"]
        assert kmax * h * w > c, kmax
        s3 = next(r for r in v["key_recovery"]["image/s3"]["rows"] if r["k"] == kmax)
        assert s3["key_rel_error"] < 1e-6 and s3["bias_rel_error"] < 1e-6 and s3["heldout_latent_error"] < 1e-6, (victim, s3)
    # A1, ciphertext-only PCA: the keyed transform is a per-pixel rotation plus bias, so the principal-component maps of
    # keyed latents are those of plain latents up to sign and the attack scores what its control (the same maps from
    # plain latents) scores; it exceeds the margins exactly when the control does, so it is never "not exceeded"
    for victim, v in a["results"]["A1"]["per_victim"].items():
        for metric in ("ssim", "psnr", "dice"):
            assert v["attack"][metric]["mean"] == pytest.approx(v["control"][metric]["mean"], rel=1e-5, abs=1e-6), (victim, metric)
        assert v["gains"] == pytest.approx(v["control_gains"], rel=1e-5, abs=1e-6), victim
        assert v["status"] == ("succeeded" if v["control_passed"] else "void"), (victim, v["status"])
    md = (run / "audit" / "report.md").read_text()
    assert "Conclusion" in md and "resistant" not in md.lower()
    assert (run / "audit" / "roc.png").exists() and (run / "audit" / "a1_maps.png").exists()
    # roles: members are training rows only, non-members come from patients no hospital holds
    roles = a["roles"]
    victim_patients = {p for v in roles["victims"].values() for p in v["patients"]}
    assert not set(roles["membership"]["nonmember_patients"]) & victim_patients
    assert not set(roles["aux"]["patients"]) & victim_patients
    assert roles["membership"]["n_members"] + roles["membership"]["n_validation_rows_excluded"] == sum(
        v["rows_sent"] for v in roles["victims"].values())
    # the keyed transform is a per-pixel rotation: PCA maps of keyed and plain latents agree
    for v in a["results"]["A1"]["per_victim"].values():
        assert min(v["pc_agreement_min_abs_corr"].values()) > 0.999
    # no key material in anything the audit wrote
    keys = [p.read_bytes() for p in (run / "sites").glob("*/klt.key")]
    for p in (run / "audit").rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            for k in keys:
                assert k not in blob and k.hex().encode() not in blob, p
    # an existing audit is never overwritten
    r = runner.invoke(app, ["audit", "--run", str(run), "-q", "--threats", "T1"])
    assert r.exit_code == 2 and "holds an audit already" in r.output


@pytest.mark.slow
def test_rows_per_patient_counts_every_sent_copy(tiny_run):
    from ppcmi.privacy.audit import _rows_per_patient
    from ppcmi.privacy.run import Run

    root, _ = tiny_run
    rd = Run(root / "run", None, None)
    patients = {g for h in rd.names for g in rd.truth(h).groups}
    # 4 slices per synthetic patient, each sent as 2 copies (the original and one augmented)
    assert _rows_per_patient(rd) == {"mean": 8.0, "max": 8, "patients": len(patients)}


def test_the_audit_records_each_attacks_views_and_derived_label(tiny_run, tmp_path):
    from ppcmi.privacy.audit import run_audit

    root, _ = tiny_run
    a = run_audit(root / "run", threats="T1", out=tmp_path / "audit", progress=False)  # T1: only A8, the cheapest
    assert a["attacks_run"] == ["A8"]
    e = a["results"]["A8"]
    assert (e["views"], e["threat"], e["threats"]) == (["ServerView", "OtherHospital"], EXPECTED["A8"][1], ["T1"])
    assert set(e["per_pair"]) == {"hospital1<-hospital2", "hospital2<-hospital1"}
    md = (tmp_path / "audit" / "report.md").read_text()
    assert "| A8 | T1 + another hospital's key and decoder (collusion) | ServerView, OtherHospital |" in md


@pytest.mark.parametrize("args, match", [
    (["--run", "does/not/exist"], "does/not/exist: run folder not found"),
    (["--run", ".", "--threats", "T1,T9"], "unknown threat T9"),
])
def test_audit_bad_input_is_one_line_and_exit_2(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["audit", *args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.output


def test_audit_of_a_folder_that_is_not_a_run(tmp_path):
    r = runner.invoke(app, ["audit", "--run", str(tmp_path)])
    assert r.exit_code == 2 and "config.json: missing" in r.output


@pytest.mark.slow
def test_rotate_key_round_trip(tiny_run, tmp_path):
    from ppcmi.client.keys import load_key
    from ppcmi.simulate import plan
    from ppcmi.config import from_dict

    root, _ = tiny_run
    run = root / "run"
    raw = json.loads((run / "config.json").read_text())
    pl = plan(from_dict({k: v for k, v in raw.items() if k != "data_dir"}), raw["data_dir"])
    site = tmp_path / "site"
    shutil.copytree(run / "sites" / "hospital1", site)
    own = tmp_path / "own"  # hospital1's own training data as a dataset folder
    for sub in ("images", "masks"):
        (own / sub).mkdir(parents=True)
    for c in pl.hospitals["hospital1"]:
        shutil.copy(c.image_path, own / "images")
        shutil.copy(c.mask_path, own / "masks")
    old_key = load_key(site / "klt.key")

    r = runner.invoke(app, ["client", "rotate-key", "--site-dir", str(site), "--data", str(own), "--out", str(tmp_path / "new.train")])
    assert r.exit_code == 0, r.output
    backup = site / "klt.key.1.bak"
    assert load_key(backup) == old_key and (backup.stat().st_mode & 0o777) == 0o600
    assert load_key(site / "klt.key") != old_key
    assert str(old_key.hex()) not in r.output
    previous = run / "wire" / "hospital1.train"  # what the server received in stage 2 (a folder of chunks)
    r = runner.invoke(app, ["server", "refit-adapters", "--model", str(run / "server"), "--message", str(tmp_path / "new.train"),
                            "--previous", str(previous), "--out", str(tmp_path / "server2"), "-q", "--set", "mapping.epochs=3"])
    assert r.exit_code == 0, r.output
    # judged in latent terms (the tiny model's Dice depends on the fresh random key too much to compare):: the new key's pairs map as well as the old key's did, and the old key's pairs no longer map
    from ppcmi.server.mapping import MappingServer, row_losses

    from ppcmi.server.inbox import read_set

    old_msg, new_msg = read_set(previous), read_set(tmp_path / "new.train")
    old_model, new_model = MappingServer(run / "server").model, MappingServer(tmp_path / "server2").model
    loss_before = row_losses(old_model, old_msg).mean()
    assert row_losses(new_model, new_msg).mean() <= 1.2 * loss_before
    assert row_losses(new_model, old_msg).mean() >= 1.5 * loss_before
    # (the old key's latents no longer mapping is checked on latent losses above: the tiny model's Dice is too coarse for it)
    # a second rotation keeps both earlier keys
    r = runner.invoke(app, ["client", "rotate-key", "--site-dir", str(site), "--data", str(own), "--out", str(tmp_path / "newer.train")])
    assert r.exit_code == 0 and (site / "klt.key.2.bak").exists() and load_key(backup) == old_key
    # the model folder being refitted is never overwritten
    r = runner.invoke(app, ["server", "refit-adapters", "--model", str(run / "server"), "--message", str(tmp_path / "new.train"),
                            "--out", str(run / "server")])
    assert r.exit_code == 2 and "must differ" in r.output


# ----------------------------------------------------------------------------- DP-SGD and the noise knob


def test_dp_sgd_trains_and_reports_epsilon(tmp_path, rng):
    from ppcmi.server.mapping import MappingServer, train_mapping

    b1, b2 = _tiny_mapping_data(rng, 24, "h1"), _tiny_mapping_data(rng, 24, "h2")
    cfg = MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=2, norm="group", dp=True, dp_noise=1.0, dp_clip=1.0,
                             adapter_init="identity")
    train_mapping([b1, b2], cfg, tmp_path / "dp", progress=False)
    meta = json.loads((tmp_path / "dp" / "config.json").read_text())
    dp = meta["dp"]
    assert np.isfinite(dp["epsilon"]) and dp["epsilon"] > 0 and dp["delta"] == 1 / meta["n_train_rows"]
    assert len(meta["history"]) == 2 and "epsilon" in meta["history"][-1]
    MappingServer(tmp_path / "dp")  # the DP-trained weights load as an ordinary model
    # more noise, less epsilon
    train_mapping([b1, b2], MappingTrainConfig(**{**cfg.__dict__, "dp_noise": 4.0}), tmp_path / "dp4", progress=False)
    assert json.loads((tmp_path / "dp4" / "config.json").read_text())["dp"]["epsilon"] < dp["epsilon"]


def test_dp_and_noise_settings_are_checked():
    with pytest.raises(ConfigError, match="mapping.norm"):
        MappingTrainConfig(dp=True, adapter_init="identity")  # BatchNorm
    with pytest.raises(ConfigError, match='adapter_init = "identity"'):
        MappingTrainConfig(dp=True, norm="group")  # the default canonical frames read unnoised statistics
    with pytest.raises(ConfigError, match="send_noise"):
        AutoencoderConfig(send_noise=-1.0)
    with pytest.raises(ConfigError, match="mapping.norm"):
        MappingTrainConfig(norm="layer")
