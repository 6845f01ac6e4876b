"""The whole pipeline in one process on synthetic multi-site data: three hospitals with their own
keys and autoencoders, a key-less server, inference through protocol bytes and evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppcmi.config import AutoencoderConfig, Config, DataConfig, MappingTrainConfig
from ppcmi.experiment import synth
from ppcmi.simulate import run_simulation


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = synth(root / "data", sites=3, patients_per_site=4, slices_per_patient=6, size=64, n_classes=3, seed=5)
    cfg = Config(
        seed=0, clients=3,
        data=DataConfig(size=64, group_csv=str(data / "groups.csv"), test_frac=0.2, partition="site"),
        autoencoder=AutoencoderConfig(width=0.5, epochs=40, patience=40, augment=True, send_copies=4),
        mapping=MappingTrainConfig(widen=(16, 32, 32), mid=(32, 64), down=(32, 16, 8), epochs=40, patience=40,
                                   lr_schedule="cosine"),  # hospitals of 18, 24 and 18 slices, 12 test slices
    )
    res = run_simulation(cfg, data, root / "run", progress=False)
    return root / "run", res


@pytest.mark.slow
def test_end_to_end_dice_at_least_0_8(result):
    run, res = result
    s = res["ppcmi"]
    assert s["fg_dice"]["mean"] >= 0.8, {g: v["fg_dice"]["mean"] for g, v in s["by_group"].items()}
    for g, v in s["by_group"].items():  # every hospital, through its own key and decoders
        assert v["fg_dice"]["mean"] >= 0.7, (g, v["fg_dice"]["mean"])
    preds = res["_arrays"]["preds"]
    assert set(preds) == {"hospital1", "hospital2", "hospital3"}
    assert all(set(np.unique(p)) <= {0, 1, 2} for p in preds.values())


@pytest.mark.slow
def test_run_folder_layout_and_saved_config(result):
    run, res = result
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["mapping"]["epochs"] == 40 and cfg["data"]["size"] == 64
    for h in ("hospital1", "hospital2", "hospital3"):
        site = run / "sites" / h
        for kind in ("image_ae", "mask_ae"):
            assert (site / kind / "model.safetensors").exists() and (site / kind / "config.json").exists()
        assert (run / "wire" / f"{h}.train" / "chunk-00000.ppcmi").exists()
    assert (run / "server" / "mapping.safetensors").exists()
    srv = json.loads((run / "server" / "config.json").read_text())
    assert srv["clients"] == ["hospital1", "hospital2", "hospital3"]
    assert (run / "eval" / "per_case.csv").read_text().count("\n") == 1 + 3 * res["n_test"]


def test_per_hospital_mapping_scope_trains_one_network_per_hospital(tmp_path):
    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=1)
    cfg = Config(seed=0, clients=2,
                 data=DataConfig(size=32, group_csv=str(data / "groups.csv"), test_frac=0.25, partition="site"),
                 autoencoder=AutoencoderConfig(width=0.25, epochs=1),
                 mapping=MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=1, scope="per_hospital"))
    res = run_simulation(cfg, data, tmp_path / "run", progress=False)
    for h in ("hospital1", "hospital2"):
        srv = json.loads((tmp_path / "run" / "server" / h / "config.json").read_text())
        assert srv["clients"] == [h]  # trained on that hospital's pairs only
    assert set(res["stage2"]["per_hospital"]) == {"hospital1", "hospital2"}
    assert not (tmp_path / "run" / "server" / "mapping.safetensors").exists()


def test_simulate_scores_native_planes_of_another_shape(tmp_path):
    """Planes of 48x40 at network size 32: every hospital's predictions come back as 48x40 label maps and the
    per-case Dice in the run folder is that of those maps against the masks as stored."""
    import csv

    from PIL import Image

    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=48, n_classes=2, seed=1)
    for p in sorted((data / "images").glob("*.png")) + sorted((data / "masks").glob("*.png")):
        Image.fromarray(np.asarray(Image.open(p))[:, 4:44]).save(p)  # 48 rows, 40 columns
    cfg = Config(seed=0, clients=2,
                 data=DataConfig(size=32, group_csv=str(data / "groups.csv"), test_frac=0.25, partition="site"),
                 autoencoder=AutoencoderConfig(width=0.25, epochs=1),
                 mapping=MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=1))
    res = run_simulation(cfg, data, tmp_path / "run", progress=False)
    test = res["_arrays"]["test"]
    assert test["geometries"][0].scaled == (32, 27) and test["geometries"][0].pad == (0, 0, 2, 3)  # 40 * 32 / 48 = 26.7
    with open(tmp_path / "run" / "eval" / "per_case.csv") as f:
        rows = {(r["site"], r["case_id"]): float(r["fg_dice"]) for r in csv.DictReader(f)}
    for site, preds in res["_arrays"]["preds"].items():
        assert len(preds) == len(test["case_ids"]) and all(p.shape == (48, 40) for p in preds)
        for cid, p in zip(test["case_ids"], preds):
            gt = np.asarray(Image.open(data / "masks" / f"{cid}.png")) > 0
            fg = p > 0
            expect = 1.0 if not (fg.any() or gt.any()) else 2 * (fg & gt).sum() / (fg.sum() + gt.sum())
            assert rows[(site, cid)] == pytest.approx(expect, abs=1e-6), (site, cid)
