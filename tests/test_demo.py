"""The demo's outputs on a tiny synthetic dataset (the numbers are meaningless at this budget; the
artefacts, their schema and the summary's agreement with its per-case values are what is checked).
The bundled-data demo itself is `make demo`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ppcmi.config import AutoencoderConfig, Config, DataConfig, MappingTrainConfig
from ppcmi.experiment import synth
from ppcmi.demo import run_demo
from ppcmi.errors import PpcmiError


@pytest.mark.slow
def test_demo_writes_summary_report_csv_and_plots(tmp_path):
    data = synth(tmp_path / "data", sites=3, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=2)
    cfg = Config(seed=0, clients=3,
                 data=DataConfig(size=32, group_csv=str(data / "groups.csv"), test_frac=0.2, partition="site"),
                 autoencoder=AutoencoderConfig(width=0.25, epochs=2, augment=True, send_copies=2),
                 mapping=MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=2))
    out = tmp_path / "run"
    s = run_demo(data, out, cfg, progress=False, latency_reps=3)
    on_disk = json.loads((out / "summary.json").read_text())
    for m in ("ppcmi", "unet_centralized"):
        for k in ("dice", "hd95_px", "asd_px"):
            assert k in on_disk["methods"][m]
    assert set(on_disk["latency_ms"]) >= {"encode", "map", "decode"}
    assert on_disk["payload_bytes_per_direction"] == s["payload"]["values_per_image"] * 4
    assert on_disk["timings_s"]["unet_s"] > 0
    # the U-Net saw as many (augmented) pairs as the mapping network: epochs x copies
    assert len(json.loads((out / "unet" / "state.json").read_text())["history"]) == 4
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"ppcmi", "unet_centralized"}
    # the summary's Dice is the mean of the per-case values written beside it: overall, per hospital, and their gap
    def fg(**match: str) -> list[float]:
        return [float(r["fg_dice"]) for r in rows if all(r[k] == v for k, v in match.items())]

    ppcmi, unet = fg(method="ppcmi"), fg(method="unet_centralized")
    assert len(ppcmi) == 3 * on_disk["n_test"] and len(unet) == on_disk["n_test"]  # every hospital segments every test case
    assert on_disk["methods"]["ppcmi"]["dice"] == pytest.approx(np.mean(ppcmi), abs=1e-12)
    assert on_disk["methods"]["unet_centralized"]["dice"] == pytest.approx(np.mean(unet), abs=1e-12)
    by_hospital = on_disk["methods"]["ppcmi"]["by_hospital"]
    assert set(by_hospital) == {"hospital1", "hospital2", "hospital3"}
    for h, v in by_hospital.items():
        assert v["dice"] == pytest.approx(np.mean(fg(method="ppcmi", site=h)), abs=1e-12), h
    assert on_disk["dice_gap_points"] == pytest.approx(100 * (np.mean(unet) - np.mean(ppcmi)), abs=1e-9)
    report = (out / "report.md").read_text()
    assert "| PPCMI-SF | overall |" in report and "centralized U-Net" in report
    for png in ("loss_curves.png", "overlays.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PpcmiError, match="finished run"):
        run_demo(data, out, cfg, progress=False)


def test_volume_table_shows_each_structure_per_hospital_and_overall():
    from ppcmi.demo import volume_table

    s = {"n_volumes": 3, "x_dice": 0.5, "fg_dice": 0.75, "by_group": {"h1": {"n_volumes": 3, "x_dice": 0.5, "fg_dice": 0.75}}}
    lines = volume_table({"PPCMI-SF": s, "U-Net": {"n_volumes": 3, "x_dice": 1.0, "fg_dice": 1.0}}, ["bg", "x"]).splitlines()
    assert lines[0] == "| method | hospital | volumes | x Dice % | merged Dice % |"
    assert lines[2:] == ["| PPCMI-SF | h1 | 3 | 50.00 | 75.00 |", "| PPCMI-SF | overall | 3 | 50.00 | 75.00 |",
                         "| U-Net | overall | 3 | 100.00 | 100.00 |"]
