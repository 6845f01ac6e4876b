"""Federated U-Net baselines on real Flower, no mocks: FedAvg and FedProx on a 2-hospital federation on loopback.

One federation (SuperLink with TLS and SuperNode authentication, two SuperNodes on synthetic 32 x 32 data) runs
three apps of 2 rounds x 1 local epoch: FedAvg, FedProx with mu > 0 and FedProx with mu = 0. The tests check
what Flower's strategies are meant to do: the final global weights are the example-weighted average of the
hospitals' last-round weights, both hospitals trained from the very weights the coordinator sent each round,
the bytes counted are the ArrayRecord payload times the rounds, mu = 0 equals FedAvg bit for bit and mu > 0
does not. The fast tests check the hospital's round and the settings without processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ppcmi.client.fedunet import holdout, local_round, proximal_term  # noqa: E402
from ppcmi.config import load_config  # noqa: E402
from ppcmi.errors import ConfigError, PpcmiError  # noqa: E402
from ppcmi.experiment import synth  # noqa: E402
from ppcmi.flower.fedunet import fed_rounds, train_federated_unets  # noqa: E402
from ppcmi.flower.unet_wire import FedUnetSettings, read_unet_run_config, weights_digest  # noqa: E402
from ppcmi.flower.wire import FlowerSettings  # noqa: E402
from ppcmi.models import make_unet  # noqa: E402
from ppcmi.training import seeded_init  # noqa: E402
from conftest import processes_mentioning  # noqa: E402

TINY = ["clients=2", "data.size=32", "data.group_csv=groups.csv", "data.partition=site", "data.test_frac=0.17",
        "mapping.batch_size=2", "autoencoder.augment=true", "mapping.lr_schedule=cosine",
        "mapping.epochs=2", "autoencoder.send_copies=1"]  # 2 epochs (rounds); batches of 2: several Adam steps per round
# (one test patient of six: hospital1 keeps 12 images, hospital2 8, so Flower's average is weighted 10 : 6)
# FedProx runs one round, compared with FedAvg's first (the same learning rate: the cosine starts at lr)
RUNS = {"fedavg": FedUnetSettings("fedavg", rounds=2), "fedprox": FedUnetSettings("fedprox", rounds=1, proximal_mu=0.5),
        "fedprox0": FedUnetSettings("fedprox", rounds=1, proximal_mu=0.0)}


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedunet")
    data = synth(root / "data", sites=2, patients_per_site=3, slices_per_patient=4, size=32, n_classes=2, seed=3)
    cfg = load_config(None, TINY)
    run = root / "run"
    summaries, pl = train_federated_unets(cfg, data, run, RUNS, settings=FlowerSettings(timeout=1800, connect_timeout=600))
    return cfg, run, summaries, pl, processes_mentioning(str(run))


def _weights(summary: dict, name: str = "global") -> dict[str, np.ndarray]:
    d = Path(summary["server_dir"])
    return load_file(str(d / "global.safetensors" if name == "global" else d / "clients" / f"{name}.safetensors"))


@pytest.mark.slow
def test_fedavg_global_is_flowers_weighted_average_of_the_last_round(federated):
    cfg, run, summaries, pl, leftovers = federated
    assert not leftovers, f"processes still running after the federation: {leftovers}"
    s = summaries["fedavg"]
    assert s["strategy"] == "FedAvg" and s["rounds"] == 2 and s["local_epochs"] == 1 and len(s["history"]) == 2
    assert set(s["hospitals"]) == set(pl.hospitals) == {"hospital1", "hospital2"}
    va_tr = {h: holdout(len(pl.hospitals[h]), 0) for h in pl.hospitals}  # (the counts do not depend on the seed)
    for h, v in s["hospitals"].items():
        assert v["num_examples"] + v["val_examples"] == len(pl.hospitals[h]) and v["num_examples"] == len(va_tr[h][1])
    glob = _weights(s)
    clients = {h: _weights(s, h) for h in s["hospitals"]}
    total = sum(v["num_examples"] for v in s["hospitals"].values())
    for k, g in glob.items():
        avg = None
        for h, w in clients.items():  # Flower's rule: sum of w_i * n_i / n, in float32
            part = w[k] * (s["hospitals"][h]["num_examples"] / total)
            avg = part if avg is None else avg + part
        assert g.dtype == np.float32 and np.array_equal(g, avg), k
    a, b = clients.values()
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # the hospitals did train on different data
    assert sorted(v["num_examples"] for v in s["hospitals"].values()) == [6, 10]
    assert any(not np.allclose(glob[k], 0.5 * (a[k] + b[k]), rtol=0, atol=1e-7) for k in glob)  # weighted, not a plain mean
    initial = seeded_init(lambda: make_unet(1, 2), cfg.seed).state_dict()  # as the centralized reference starts
    assert weights_digest(ArrayRecord(initial)) == s["initial_sha256"]
    assert all(not np.array_equal(glob[k], initial[k].numpy()) for k in glob if "weight" in k)


@pytest.mark.slow
def test_both_hospitals_trained_from_the_weights_the_coordinator_sent_each_round(federated):
    _, _, summaries, _, _ = federated
    s = summaries["fedavg"]
    before = [s["initial_sha256"]] + [r["global_sha256"] for r in s["history"]]
    for r, expected in zip(s["history"], before[:-1], strict=True):
        assert r["sent_sha256"] == [expected], r["round"]  # one global model to every hospital
        assert {h["received_sha256"] for h in r["hospitals"].values()} == {expected}, r["round"]
    assert s["history"][-1]["global_sha256"] == s["global_sha256"] == weights_digest(ArrayRecord(
        {k: torch.from_numpy(v) for k, v in _weights(s).items()}))
    assert len({r["global_sha256"] for r in s["history"]}) == 2  # round 2 moved the model again


@pytest.mark.slow
def test_bytes_per_hospital_are_the_arrayrecord_payload_times_the_rounds(federated):
    _, _, summaries, _, _ = federated
    payload = ArrayRecord(make_unet(1, 2).state_dict()).count_bytes()
    assert payload > 6_000_000  # the whole U-Net (1.6 M float32 parameters) each way
    for s in summaries.values():
        assert s["payload_bytes"] == payload
        for h, v in s["hospitals"].items():
            assert v["downloaded_bytes"] == v["uploaded_bytes"] == payload * s["rounds"], h


@pytest.mark.slow
def test_fedprox_mu_zero_equals_fedavg_and_mu_positive_does_not(federated):
    _, _, summaries, _, _ = federated
    assert summaries["fedprox"]["strategy"] == "FedProx" and summaries["fedprox"]["proximal_mu"] == 0.5
    assert summaries["fedavg"]["proximal_mu"] is None
    avg = summaries["fedavg"]["history"][0]  # FedAvg after round 1
    prox0, prox = (_weights(summaries[k]) for k in ("fedprox0", "fedprox"))
    for k in ("fedprox0", "fedprox"):  # the same start, the same hospitals
        assert summaries[k]["history"][0]["sent_sha256"] == avg["sent_sha256"] == [summaries["fedavg"]["initial_sha256"]]
    assert summaries["fedprox0"]["global_sha256"] == avg["global_sha256"]  # mu = 0: FedAvg bit for bit
    assert weights_digest(ArrayRecord({k: torch.from_numpy(v) for k, v in prox0.items()})) == avg["global_sha256"]
    assert summaries["fedprox"]["global_sha256"] != avg["global_sha256"]  # mu > 0 reached the hospitals' loss
    assert sum(not np.array_equal(prox0[k], prox[k]) for k in prox0) > len(prox0) // 2
    for h in ("hospital1", "hospital2"):  # the training loss FedProx reports includes the proximal term
        assert summaries["fedprox"]["history"][0]["hospitals"][h]["train_loss"] != avg["hospitals"][h]["train_loss"]


@pytest.mark.slow
def test_bench_runs_unet_fedavg_and_scores_its_global_model_like_the_centralized_one(tmp_path):
    from ppcmi.baselines import predict_unet
    from ppcmi.bench import results_md, run_method
    from ppcmi.metrics import evaluate_cases
    from ppcmi.simulate import load_test, plan
    from ppcmi.training import load_weights

    data = synth(tmp_path / "data", sites=2, patients_per_site=3, slices_per_patient=4, size=32, n_classes=2, seed=4)
    cfg = load_config(None, [*TINY[:-2], "mapping.epochs=1", "autoencoder.send_copies=1"])  # one round
    r = run_method("unet_fedavg", cfg, data, tmp_path / "bench" / "unet_fedavg", progress=False)
    saved = json.loads((tmp_path / "bench" / "unet_fedavg" / "summary.json").read_text())
    assert saved["federated"] == r["federated"] and saved["method"] == "unet_fedavg"
    f = r["federated"]
    assert f["strategy"] == "FedAvg" and f["rounds"] == 1 and f["local_epochs"] == 1 and set(f["hospitals"]) == {"hospital1", "hospital2"}
    assert all(v["uploaded_bytes"] == v["downloaded_bytes"] == f["payload_bytes"] > 0 for v in f["hospitals"].values())
    pl = plan(load_config(None, TINY[:-2]), data)  # the bench's split: the federated model is scored on the same test cases
    assert r["summary"]["n_cases"] == len(pl.test) and 0 <= r["summary"]["fg_dice"]["mean"] <= 1
    test = load_test(pl)
    model = make_unet(1, 2)
    load_weights(model, Path(f["server_dir"]) / "global.safetensors")
    rows = evaluate_cases(predict_unet(model, test["images"], test["geometries"]), test["native_masks"], test["case_ids"], 2,
                          spacings=test["native_spacings"])
    assert r["summary"]["fg_dice"]["mean"] == pytest.approx(np.mean([row["fg_dice"] for row in rows]), abs=1e-12)
    assert r["timings_s"]["train_s"] > 0 and r["wall_s"] >= r["timings_s"]["flwr_run_s"] >= r["timings_s"]["train_s"]
    md = results_md("synthetic", {"unet_fedavg": r})
    assert "| unet_fedavg | 1 |" in md and "| unet_fedavg | FedAvg | 1 x 1 | hospital1 6.5 / 6.5, hospital2 6.5 / 6.5 |" in md, md


# ----------------------------------------------------------------------------- without processes


def test_bench_refuses_local_epochs_that_do_not_divide_the_budget(tmp_path):
    from typer.testing import CliRunner

    from ppcmi.cli import app

    bundled = Path(__file__).resolve().parents[1] / "data" / "sunnybrook_lv"
    r = CliRunner().invoke(app, ["bench", "--dataset", "sunnybrook_lv", "--data", str(bundled), "--out", str(tmp_path / "b"),
                                 "--methods", "unet_fedavg", "--local-epochs", "7"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        "error: --local-epochs: 7 does not divide the centralized U-Net's 400 epochs, so the rounds could not sum to the same budget")


def _tiny_site(n: int = 8, seed: int = 0):
    g = np.random.default_rng(seed)
    masks = (g.random((n, 32, 32)) > 0.7).astype(np.int64)
    images = (masks[:, None] + 0.3 * g.standard_normal((n, 1, 32, 32))).astype(np.float32)
    return images, masks


def test_proximal_term_is_the_squared_distance_to_the_global_weights():
    model = seeded_init(lambda: make_unet(1, 2), 0)
    anchor = [p.detach().clone() for p in model.parameters()]
    assert proximal_term(model, anchor).item() == 0.0
    with torch.no_grad():
        first = next(model.parameters())
        first.add_(0.5)
    assert proximal_term(model, anchor).item() == pytest.approx(0.25 * first.numel(), rel=1e-5)


def test_local_round_mu_zero_is_plain_training_and_mu_pulls_towards_the_global_weights(tmp_path):
    images, masks = _tiny_site()
    start = seeded_init(lambda: make_unet(1, 2), 0).state_dict()
    kw = dict(round_=1, local_epochs=2, lr=1e-2, batch_size=2, seed=5, augment=False, work_dir=tmp_path)
    plain = local_round(images, masks, 2, start, **kw)
    again = local_round(images, masks, 2, start, mu=0.0, **kw)
    prox = local_round(images, masks, 2, start, mu=50.0, **kw)
    assert all(torch.equal(plain.state[k], again.state[k]) for k in plain.state)  # reproducible under its seeds
    va, tr = holdout(8, 5)
    assert (plain.n_train, plain.n_val) == (len(tr), len(va)) == (6, 2) and np.isfinite(plain.val_loss)

    def dist(st):
        return sum(float(((st[k] - start[k]) ** 2).sum()) for k in start)

    assert 0 < dist(prox.state) < dist(plain.state)
    assert not list(tmp_path.iterdir())  # the round's checkpoints are gone


def test_local_round_refuses_weights_of_another_network(tmp_path):
    images, masks = _tiny_site()
    other = make_unet(3, 2).state_dict()
    with pytest.raises(PpcmiError, match=r"^global weights do not fit this hospital's U-Net \(1 channels, 2 classes\)"):
        local_round(images, masks, 2, other, round_=1, local_epochs=1, lr=1e-3, batch_size=2, seed=0, augment=False,
                    work_dir=tmp_path)


def test_rounds_sum_to_the_centralized_budget_and_settings_are_checked():
    cfg = load_config(None, ["mapping.epochs=6", "autoencoder.send_copies=2"])
    assert fed_rounds(cfg) == 12 and fed_rounds(cfg, 3) == 4
    assert fed_rounds(load_config(None, ["unet.epochs=5"]), 5) == 1
    with pytest.raises(PpcmiError, match=r"^--local-epochs: 5 does not divide the centralized U-Net's 12 epochs"):
        fed_rounds(cfg, 5)
    with pytest.raises(ConfigError, match=r"^fedunet.proximal_mu: 0.1 is FedProx's; FedAvg has no proximal term$"):
        FedUnetSettings("fedavg", proximal_mu=0.1)
    with pytest.raises(ConfigError, match=r"^fedunet.strategy: must be one of fedavg, fedprox, got 'scaffold'$"):
        FedUnetSettings("scaffold")
    with pytest.raises(ConfigError, match=r"^fedunet.rounds: must be an integer from 1 to 100000, got 0$"):
        FedUnetSettings(rounds=0)


def test_the_apps_run_config_round_trips(tmp_path):
    import tomllib

    from flwr.common.config import flatten_dict

    from ppcmi.config import shared_settings
    from ppcmi.flower.unet_wire import write_unet_app

    cfg = load_config(None, TINY)
    fed = FedUnetSettings("fedprox", rounds=7, local_epochs=2, proximal_mu=0.25, in_channels=3)
    write_unet_app(tmp_path / "app", cfg, FlowerSettings(nodes=2), fed)
    meta = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert meta["components"] == {"serverapp": "ppcmi.flower.unet_server_app:app", "clientapp": "ppcmi.flower.unet_client_app:app"}
    got_cfg, settings, got = read_unet_run_config(flatten_dict(meta["config"]))
    assert got == fed and settings.nodes == 2 and shared_settings(got_cfg) == shared_settings(cfg)
    assert "clients" not in json.dumps(meta["config"]) and "partition" not in json.dumps(meta["config"])  # experiment settings stay
    with pytest.raises(ConfigError, match=r"^run config: unknown key 'fedunet.momentum'$"):
        read_unet_run_config({**flatten_dict(meta["config"]), "fedunet.momentum": 0.9})
