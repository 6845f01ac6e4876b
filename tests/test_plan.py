"""The federated plan: a hospital's fingerprint (aggregates only, validated), the coordinator's pooling and plan,
the intensity modes the plan chooses, the degenerate inputs it names, and `ppcmi plan` / planned `simulate`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppcmi import protocol
from ppcmi.client import stages
from ppcmi.config import Config, DataConfig, Preprocess, load_config, shared_settings
from ppcmi.data import check_intensity, discover_cases, scale_intensity
from ppcmi.data.discovery import dicom_modality
from ppcmi.data.fingerprint import compute_fingerprint, dataset_modality, normalise_modality
from ppcmi.errors import ConfigError, DataError, PpcmiError, ProtocolError
from ppcmi.labels import LabelMap
from ppcmi.server.plan import apply_plan, describe, hist_percentiles, make_plan, pool



def _write(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")


@pytest.fixture
def tiny(tmp_path) -> Path:
    """Two planes of 8 x 10 with a hand-placed foreground: a 2 x 3 box of class 1 (values 10) in the first,
    a 2 x 2 box of class 1 (values 40) and one pixel of class 2 (value 100) in the second."""
    a = np.full((8, 10), 5)
    ma = np.zeros((8, 10))
    a[2:4, 3:6], ma[2:4, 3:6] = 10, 1
    b = np.full((8, 10), 7)
    mb = np.zeros((8, 10))
    b[4:6, 0:2], mb[4:6, 0:2] = 40, 1
    b[7, 9], mb[7, 9] = 100, 2
    _write(tmp_path / "d", "p1", a, ma)
    _write(tmp_path / "d", "p2", b, mb)
    return tmp_path / "d"


def _fp(root: Path, client: str = "h1", modality: str = "MR", **kw) -> protocol.Fingerprint:
    cases = discover_cases(root)
    return compute_fingerprint(cases, LabelMap((0, 1, 2)), client=client, modality=modality, **kw)


def test_fingerprint_holds_hand_derived_aggregates(tiny):
    fp = _fp(tiny)
    assert (fp.n_cases, fp.n_planes, fp.channels, fp.n_classes) == (2, 2, 1, 3)
    assert fp.rows == (8,) * 5 and fp.cols == (10,) * 5 and fp.n_spacing == 0 and fp.spacing_rows == ()
    fg = np.array([10] * 6 + [40] * 4 + [100])
    assert fp.fg_pixels == 11
    assert fp.fg_mean == pytest.approx(fg.mean()) and fp.fg_std == pytest.approx(fg.std())
    assert sum(c for _, c in fp.hist) == 11
    # class fractions: per plane, then averaged over planes
    assert fp.class_fraction == pytest.approx(((74 / 80 + 75 / 80) / 2, (6 / 80 + 4 / 80) / 2, (1 / 80) / 2))
    assert fp.class_planes == (2, 2, 1) and fp.class_cases == (2, 2, 1) and fp.n_fg_planes == 2
    # foreground boxes: rows 2-4 of 8 and 4-8 of 8; columns 3-6 of 10 and 0-10 of 10
    assert (fp.extent_top[0], fp.extent_top[-1]) == (2 / 8, 4 / 8)
    assert (fp.extent_bottom[0], fp.extent_bottom[-1]) == (4 / 8, 8 / 8)
    assert (fp.extent_left[0], fp.extent_right[-1]) == (0.0, 1.0)
    assert fp.extent_top[2] == pytest.approx(3 / 8)  # the median of two planes
    assert fp.constant_planes == 0


def test_fingerprint_offset_shifts_intensities_only(tiny):
    a, b = _fp(tiny), _fp(tiny, offset=1024.0)
    assert b.fg_mean == pytest.approx(a.fg_mean - 1024) and b.fg_std == pytest.approx(a.fg_std)
    assert b.class_fraction == a.class_fraction and b.extent_top == a.extent_top


def test_fingerprint_bytes_round_trip_and_carry_no_file_names(tiny):
    fp = _fp(tiny, client="hospital1")
    data = protocol.encode_fingerprint(fp)
    assert protocol.decode_fingerprint(data) == fp
    raw = json.loads(data)
    assert set(raw) == {f.name for f in dataclasses.fields(protocol.Fingerprint)}
    text = data.decode()
    assert "p1" not in text and "p2" not in text and "png" not in text and str(tiny) not in text


@pytest.mark.parametrize("change, field", [
    ({"extra": 1}, "unknown field"),
    ({"version": 2}, "fingerprint.version"),
    ({"modality": "SPECT-ish"}, "fingerprint.modality"),
    ({"n_planes": -1}, "fingerprint.n_planes"),
    ({"n_planes": 1.5}, "fingerprint.n_planes"),
    ({"client": "../etc"}, "fingerprint.client"),
    ({"class_fraction": [0.5, 0.5, 0.5]}, "fingerprint.class_fraction"),
    ({"class_planes": [2, 3, 1]}, "fingerprint.class_planes"),
    ({"extent_top": [0.5, 0.4, 0.3, 0.2, 0.1]}, "fingerprint.extent_top"),
    ({"extent_top": [0, 0, 0, 0, 2.0]}, "fingerprint.extent_top"),
    ({"rows": [8, 8]}, "fingerprint.rows"),
    ({"fg_mean": float("nan")}, "fingerprint.fg_mean"),
    ({"hist": [[3, 5]]}, "fingerprint.hist"),
    ({"hist": [[5, 1], [3, 10]]}, "fingerprint.hist"),
])
def test_fingerprint_validator_refuses_by_name(tiny, change, field):
    raw = json.loads(protocol.encode_fingerprint(_fp(tiny)))
    raw.update(change)
    with pytest.raises(ProtocolError, match=field):
        protocol.decode_fingerprint(json.dumps(raw).encode())


def test_fingerprint_decode_refuses_oversized_and_non_json():
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        protocol.decode_fingerprint(b" " * (protocol.FINGERPRINT_MAX_BYTES + 1))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        protocol.decode_fingerprint(b"\xff{")
    with pytest.raises(ProtocolError, match="expected a JSON object"):
        protocol.decode_fingerprint(b"[1, 2]")


def test_histogram_bins_are_fine_where_intensities_live():
    v = np.array([-1024.0, -1.0, 0.0, 0.3, 1.0, 40.0, 1000.0, 3071.0, 65535.0])
    lo, hi = protocol.hist_edges(protocol.hist_index(v))
    assert np.all(lo <= v) and np.all(v < hi)
    assert np.all(hi - lo <= np.sqrt(1 + v * v) / 256 * 1.01)  # 1/256 near 0, 0.4 % of |v| further out (4 HU at 1000 HU)


def _fake(client, *, modality="MR", n=100, mean=0.0, std=1.0, values=None, extent=(0.4, 0.6, 0.4, 0.6), spacing=None,
          class_planes=None, size=256, fraction=(0.9, 0.1)):
    """A hand-made fingerprint: ``values`` are its foreground intensities."""
    values = np.asarray(values if values is not None else [mean], dtype=np.float64)
    idx, counts = np.unique(protocol.hist_index(values), return_counts=True)
    t, b, left, r = extent
    return protocol.Fingerprint(
        client=client, modality=modality, n_cases=n, n_planes=n, channels=1, n_classes=2, rows=(size,) * 5, cols=(size,) * 5,
        n_spacing=n if spacing else 0, spacing_rows=(spacing,) * 5 if spacing else (), spacing_cols=(spacing,) * 5 if spacing else (),
        fg_pixels=int(values.size), fg_mean=float(values.mean()), fg_std=float(values.std()),
        hist=tuple((int(i), int(c)) for i, c in zip(idx, counts)), class_fraction=fraction,
        class_planes=class_planes or (n, n), class_cases=class_planes or (n, n), n_fg_planes=n,
        extent_top=(t,) * 5, extent_bottom=(b,) * 5, extent_left=(left,) * 5, extent_right=(r,) * 5, constant_planes=0)


def test_pooled_statistics_equal_those_of_all_foreground_pixels():
    a, b = [1.0, 3.0], [5.0, 7.0, 9.0]
    pooled, warnings = pool([_fake("h1", values=a), _fake("h2", values=b)])
    allv = np.array(a + b)
    assert pooled.fg_pixels == 5
    assert pooled.fg_mean == pytest.approx(5.0) and pooled.fg_std == pytest.approx(allv.std())  # sqrt(8)
    assert warnings == []


def test_pooled_percentiles_from_histograms_match_the_pooled_values(rng):
    a, b = rng.normal(40, 30, 20000), rng.normal(300, 200, 5000)
    pooled, _ = pool([_fake("h1", modality="CT", values=a), _fake("h2", modality="CT", values=b)])
    v = np.sort(np.concatenate([a, b]))
    for q, got in zip((0.005, 0.995), pooled.percentiles):  # within a bin of the order statistics around q * n
        k = q * v.size
        lo, hi = v[int(k) - 2], v[int(math.ceil(k)) + 1]
        width = np.sqrt(1 + got * got) / protocol.HIST_PER_UNIT
        assert lo - width <= got <= hi + width, (q, got, lo, hi)
    assert hist_percentiles({0: 10}, [0, 50, 100]) == pytest.approx([0.0, 0.5 / 256, 1 / 256], rel=1e-3)  # one bin, linear inside


def test_ct_plan_clips_to_pooled_percentiles_and_zscores_with_pooled_statistics(rng):
    vals = rng.normal(60, 20, 10000)
    plan = make_plan([_fake("h1", modality="CT", values=vals[:6000]), _fake("h2", modality="UNKNOWN", values=vals[6000:])],
                     Config(), budget_min=20)
    s = plan["settings"]
    assert s["data.intensity"] == "ct"
    assert s["data.window"] == pytest.approx(np.percentile(vals, [0.5, 99.5]), abs=1.0)
    assert s["data.stats"] == pytest.approx([vals.mean(), vals.std()], abs=0.01)
    assert "pooled foreground" in plan["reasons"]["data.intensity"]
    assert any("h2: modality unknown; planned as CT" in w for w in plan["warnings"])
    cfg, _ = apply_plan(Config(), plan)
    assert cfg.data.intensity == "ct" and cfg.data.stats == pytest.approx(tuple(s["data.stats"]))


@pytest.mark.parametrize("modality", ["MR", "US", "UNKNOWN", "OTHER"])
def test_other_modalities_get_a_per_image_zscore(modality):
    plan = make_plan([_fake("h1", modality=modality)], Config())
    assert plan["settings"]["data.intensity"] == "zscore" and modality in plan["reasons"]["data.intensity"]


def test_crop_holds_every_foreground_box_with_a_margin_or_is_the_whole_plane():
    narrow = make_plan([_fake("h1", extent=(0.40, 0.55, 0.45, 0.6)), _fake("h2", extent=(0.35, 0.5, 0.42, 0.58))], Config())
    # the farthest edge from the centre is 0.15 (top 0.35); (0.15 + 0.05) * 2 = 0.4 -> a multiple of 1/16: 0.4375
    assert narrow["settings"]["data.crop"] == 0.4375
    wide = make_plan([_fake("h1", extent=(0.1, 0.9, 0.2, 0.8))], Config())
    assert wide["settings"]["data.crop"] == 1.0


def test_size_is_a_multiple_of_32_from_the_native_size_and_the_budget_bounds_the_run():
    small = make_plan([_fake("h1", size=100, extent=(0.0, 1.0, 0.0, 1.0))], Config(), budget_min=60)
    assert small["settings"]["data.size"] == 96  # 100 rounds to 96
    big = make_plan([_fake("h1", n=2000, size=512, extent=(0, 1, 0, 1))], Config(), budget_min=60)
    assert big["settings"]["data.size"] <= 256 and big["settings"]["data.size"] % 32 == 0
    tight = make_plan([_fake("h1", n=2000, size=512, extent=(0, 1, 0, 1))], Config(), budget_min=5)
    assert tight["settings"]["data.size"] <= big["settings"]["data.size"]
    for p in (small, big, tight):
        assert p["expected"]["total_s"] <= p["expected"]["budget_s"] * 1.01 or p["warnings"]
        assert p["settings"]["autoencoder.epochs"] <= 100 and p["settings"]["mapping.epochs"] <= 150
    assert tight["settings"]["autoencoder.epochs"] * 1.0 <= big["settings"]["autoencoder.epochs"] or \
        tight["settings"]["data.size"] < big["settings"]["data.size"]


def test_the_reference_unet_gets_the_time_both_stages_are_expected_to_take():
    from ppcmi.baselines import reference_schedule
    from ppcmi.server.plan import reference_epochs

    one = make_plan([_fake("h1", n=400, size=128, extent=(0, 1, 0, 1))], Config(), budget_min=30)
    e = one["expected"]
    epochs = one["reference"]["unet.epochs"]
    assert one["reference"] == {"unet.epochs": epochs, "unet.patience": epochs}  # every epoch runs
    # its estimate is the two stages' less at most one epoch (the epochs are whole)
    pooled, _ = pool([_fake("h1", n=400, size=128, extent=(0, 1, 0, 1))])
    got, epoch_s = reference_epochs(e["stage1_s"] + e["stage2_s"], one["settings"]["data.size"], pooled, 1,
                                    one["settings"]["mapping.batch_size"])
    assert got == epochs and e["stage1_s"] + e["stage2_s"] - epoch_s - 1 <= e["unet_s"] <= e["stage1_s"] + e["stage2_s"] + 1
    # twice the planes in the same seconds: an epoch costs twice as much, so about half the epochs
    twice, _ = pool([_fake("h1", n=800, size=128, extent=(0, 1, 0, 1))])
    half, epoch2_s = reference_epochs(e["stage1_s"] + e["stage2_s"], one["settings"]["data.size"], twice, 1,
                                      one["settings"]["mapping.batch_size"])
    assert epoch2_s == pytest.approx(2 * epoch_s, rel=0.02) and abs(half - epochs / 2) <= 1
    # applied, the reference's epochs are the U-Net's; a user's unet.epochs wins and is recorded
    cfg, applied = apply_plan(Config(), one)
    assert reference_schedule(cfg) == (epochs, epochs) and applied["overrides"] == {}
    mine, applied = apply_plan(load_config(None, ["unet.epochs=7"]), one, ["unet.epochs"])
    assert reference_schedule(mine) == (7, epochs) and applied["overrides"]["unet.epochs"] == {"plan": epochs, "used": 7}
    # unplanned, the U-Net sees as many augmented pairs as the mapping network
    plain = load_config(None, ["mapping.epochs=30", "mapping.patience=10", "autoencoder.send_copies=4"])
    assert reference_schedule(plain) == (120, 40)


def test_a_plan_for_one_thread_per_training_costs_steps_at_the_one_thread_table():
    from ppcmi.server.plan import COST_TABLE, COST_TABLE_1THREAD, cost_table, step_seconds

    assert cost_table() is COST_TABLE and cost_table(2) is COST_TABLE and cost_table(8) is COST_TABLE
    assert cost_table(1) is COST_TABLE_1THREAD and set(COST_TABLE_1THREAD) == set(COST_TABLE)
    for size, row in COST_TABLE_1THREAD.items():  # the same networks, measured slower on one thread, never faster
        for net, (sec, gflop) in row.items():
            assert gflop == COST_TABLE[size][net][1] and sec > COST_TABLE[size][net][0]
    g = {"image_ae": 16.6, "mask_ae": 16.9, "mapping": 35.5}
    assert step_seconds(128, g, 1)["mapping"] == pytest.approx(COST_TABLE_1THREAD[128]["mapping"][0])
    # slower steps in the same budget, at the smallest size the plan uses (64): fewer epochs of both stages
    fp = [_fake("h1", n=400, size=64, extent=(0, 1, 0, 1))]
    two, one = make_plan(fp, Config(), budget_min=30), make_plan(fp, Config(), budget_min=30, threads=1)
    assert two["expected"]["threads"] == 2 and one["expected"]["threads"] == 1
    assert "1 torch thread per training" in describe(one) and "2 torch threads per training" in describe(two)
    assert one["settings"]["data.size"] == two["settings"]["data.size"] == 64
    assert one["settings"]["autoencoder.epochs"] < two["settings"]["autoencoder.epochs"]
    assert one["settings"]["mapping.epochs"] < two["settings"]["mapping.epochs"]
    # above the floor, the plan may lower the size instead, to keep 20 epochs of each stage; either way it fits the budget
    fp = [_fake("h1", n=400, size=128, extent=(0, 1, 0, 1))]
    two, one = make_plan(fp, Config(), budget_min=30), make_plan(fp, Config(), budget_min=30, threads=1)
    assert one["settings"]["data.size"] < two["settings"]["data.size"] or \
        one["settings"]["autoencoder.epochs"] < two["settings"]["autoencoder.epochs"]
    for p in (one, two):
        assert p["expected"]["total_s"] <= p["expected"]["budget_s"] * 1.01
        assert p["settings"]["autoencoder.epochs"] >= 20 and p["settings"]["mapping.epochs"] >= 20
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="plan threads"):
            make_plan(fp, Config(), budget_min=30, threads=bad)


def test_the_budget_never_shrinks_the_smallest_class_below_16_pixels_a_side():
    # a class of 0.5 % of the field: 16 / sqrt(0.005) = 226 pixels a side, so 256 stays however tight the budget
    tiny_class = [_fake("h1", n=2000, size=256, extent=(0, 1, 0, 1), fraction=(0.995, 0.005))]
    plan = make_plan(tiny_class, Config(), budget_min=5)
    assert plan["settings"]["data.size"] == 256
    assert any("smallest class" in w and "raise --budget" in w for w in plan["warnings"])
    roomy = make_plan([_fake("h1", n=2000, size=256, extent=(0, 1, 0, 1), fraction=(0.7, 0.3))], Config(), budget_min=5)
    assert roomy["settings"]["data.size"] < 256  # a large structure lets the budget lower the resolution


def test_batch_size_shrinks_for_small_hospitals_but_not_below_eight():
    plan = make_plan([_fake("h1", n=20), _fake("h2", n=400)], Config())
    assert plan["settings"]["autoencoder.batch_size"] == 8
    assert make_plan([_fake("h1", n=1000)], Config())["settings"]["autoencoder.batch_size"] == 16
    assert plan["settings"]["autoencoder.send_copies"] == 5  # ceil(2000 / 420 pairs)


def test_explicit_settings_win_and_are_recorded_as_overrides():
    cfg = load_config(None, ["data.size=160", "mapping.epochs=3"])
    plan = make_plan([_fake("h1")], cfg)
    out, plan = apply_plan(cfg, plan, explicit=["data.size", "mapping.epochs"])
    assert out.data.size == 160 and out.mapping.epochs == 3
    assert plan["overrides"]["data.size"] == {"plan": plan["settings"]["data.size"], "used": 160}
    assert out.data.intensity == "zscore"  # everything else from the plan


def test_degenerate_federations_are_named():
    with pytest.raises(PpcmiError, match="different modalities.*h1: CT, h2: MR"):
        pool([_fake("h1", modality="CT"), _fake("h2", modality="MR")])
    with pytest.raises(PpcmiError, match="two fingerprints"):
        pool([_fake("h1"), _fake("h1")])
    plan = make_plan([_fake("h1", spacing=0.7), _fake("h2", spacing=2.5), _fake("h3", class_planes=(100, 0))], Config(),
                     class_names=["background", "lv"])
    assert any(w.startswith("h3: no training plane holds lv") for w in plan["warnings"])
    assert any(w.startswith("h1 and h2: median pixel spacings 0.7 mm and 2.5 mm") for w in plan["warnings"])


def test_hospital_whose_masks_are_all_empty_is_an_error_naming_its_masks(tmp_path):
    for i in range(2):
        _write(tmp_path / "d", f"p{i}", np.arange(80).reshape(8, 10), np.zeros((8, 10)))
    cases = discover_cases(tmp_path / "d")
    with pytest.raises(DataError, match=r"masks: all 2 training masks of h1 are empty .*data\.labels=0,1"):
        stages.fingerprint(cases, Config(), LabelMap((0, 1)), client="h1")


def test_zscore_and_ct_modes_by_hand():
    x = np.array([[[0.0, 2.0]]])  # mean 1, std 1: z = -1, 1 -> (z + 4) / 8
    assert scale_intensity(x, Preprocess(intensity="zscore")) == pytest.approx(np.array([[[0.375, 0.625]]]))
    # ct: clip to (-100, 100), z-score with (0, 50), [-4, 4] onto [0, 1]: -1000 -> -100 -> z -2 -> 0.25; 50 -> z 1 -> 0.625
    ct = Preprocess(intensity="ct", window=(-100, 100), stats=(0, 50))
    assert scale_intensity(np.array([[[-1000.0, 50.0, 3000.0]]]), ct) == pytest.approx(np.array([[[0.25, 0.625, 0.75]]]))
    shifted = Preprocess(intensity="ct", window=(-100, 100), stats=(0, 50), offset=1024)  # HU stored as HU + 1024
    assert scale_intensity(np.array([[[-1000.0 + 1024, 50.0 + 1024]]]), shifted) == pytest.approx(np.array([[[0.25, 0.625]]]))
    assert not scale_intensity(np.full((1, 2, 2), 3.0), Preprocess(intensity="zscore")).any()  # constant -> zeros


def test_old_intensity_modes_are_unchanged():
    x = np.array([[[0.0, 5.0, 10.0]]])
    assert scale_intensity(x, Preprocess()) == pytest.approx(np.array([[[0.0, 0.5, 1.0]]]))
    assert scale_intensity(x, Preprocess(intensity="window", window=(0, 5))) == pytest.approx(np.array([[[0.0, 1.0, 1.0]]]))


def test_settings_of_the_new_modes_are_checked():
    with pytest.raises(DataError, match="data.stats"):
        Preprocess(intensity="ct", window=(0, 1))
    with pytest.raises(DataError, match="data.window"):
        Preprocess(intensity="ct", stats=(0, 1))
    with pytest.raises(DataError, match="data.stats"):
        Preprocess(intensity="ct", window=(0, 1), stats=(0, 0))
    with pytest.raises(DataError, match="data.zrange"):
        Preprocess(intensity="zscore", zrange=0)
    with pytest.raises(DataError, match="data.max_clipped"):
        Preprocess(max_clipped=0)


def test_an_image_made_constant_by_the_normalisation_is_an_error_naming_file_and_setting():
    image = np.linspace(-100, 100, 64).reshape(1, 8, 8) + 1024  # HU + 1024, but data.offset given with the wrong sign
    fg = np.ones((8, 8), bool)
    wrong = Preprocess(intensity="window", window=(-200, 200), offset=-1024)
    with pytest.raises(DataError, match=r"^case7\.png: the image .* becomes constant .*data\.offset=-1024"):
        check_intensity(image, fg, wrong, "case7.png")
    check_intensity(image, fg, Preprocess(intensity="window", window=(-200, 200), offset=1024), "case7.png")
    check_intensity(np.zeros((1, 8, 8)), fg, wrong, "blank.png")  # constant before: not the normalisation's doing


def test_a_foreground_mostly_clipped_is_an_error_naming_the_share():
    image = np.zeros((1, 8, 8))
    image[0, :4] = 500.0  # the foreground, far above the window
    fg = np.zeros((8, 8), bool)
    fg[:4] = True
    prep = Preprocess(intensity="window", window=(-100, 100))
    with pytest.raises(DataError, match=r"x\.png: 100% of the foreground pixels are clipped .*data\.max_clipped=0\.5"):
        check_intensity(image, fg, prep, "x.png")
    check_intensity(image, fg, Preprocess(intensity="window", window=(-100, 100), max_clipped=1.0), "x.png")


def test_modality_names_and_dataset_json(tmp_path):
    assert [normalise_modality(n) for n in ("CT", "MRI", "T2", "FLAIR", "ultrasound", "US", "cine-MR", "histology")] == \
        ["CT", "MR", "MR", "MR", "US", "US", "MR", "OTHER"]
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}}))
    assert dataset_modality(tmp_path, []) == "MR"
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}}))
    assert dataset_modality(tmp_path, []) == "CT"
    assert dataset_modality(tmp_path / "nothing", []) == "UNKNOWN"


def test_modality_of_the_shared_datasets_from_dataset_json_and_dicom_headers():
    from conftest import SHARED_DATA

    msd, ct = SHARED_DATA / "msd_hippocampus", SHARED_DATA / "dicom_ct_lung1" / "CT"
    if not (msd / "dataset.json").is_file() or not ct.is_dir():
        pytest.skip(f"shared datasets msd_hippocampus and dicom_ct_lung1 not available at {SHARED_DATA}")
    assert dataset_modality(msd, []) == "MR"  # MSD's "modality": {"0": "MRI"}
    assert dicom_modality(ct) == ["CT"]  # the series folder's Modality attribute


def test_plan_cli_writes_plan_and_never_overwrites(tmp_path):
    from typer.testing import CliRunner

    from ppcmi.cli import app
    from ppcmi.experiment import synth

    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=64, n_classes=2, seed=1)
    out = tmp_path / "plan.json"
    args = ["plan", "--data", str(data), "--clients", "2", "--modality", "CT", "--budget", "10", "--out", str(out),
            "--set", f"data.group_csv={data / 'groups.csv'}", "--set", "data.partition=site", "--set", "mapping.epochs=7"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    plan = json.loads(out.read_text())
    assert plan["settings"]["data.intensity"] == "ct" and plan["pooled"]["modality"] == "CT"
    assert plan["overrides"]["mapping.epochs"]["used"] == 7
    assert "data.intensity = ct" in r.output and "because CT" in r.output and "expected: stage 1" in r.output
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "already exists" in r.output


def test_planned_simulation_records_plan_fingerprints_and_overrides(tmp_path):
    from ppcmi.experiment import synth
    from ppcmi.simulate import plan_run, run_simulation

    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=1)
    sets = [f"data.group_csv={data / 'groups.csv'}", "data.partition=site", "clients=2", "data.test_frac=0.25",
            "autoencoder.width=0.25", "autoencoder.epochs=1", "mapping.epochs=1", "mapping.widen=8,8,8", "mapping.mid=8,8",
            "mapping.down=8,8,8"]
    cfg = load_config(None, sets)
    run_cfg, planned, wire = plan_run(cfg, data, explicit=[s.split("=")[0] for s in sets], modality="MR")
    assert set(wire) == {"hospital1", "hospital2"}
    assert run_cfg.data.intensity == "zscore" and run_cfg.autoencoder.epochs == 1 and run_cfg.data.size == 32
    assert planned["overrides"]["autoencoder.epochs"]["used"] == 1
    res = run_simulation(run_cfg, data, tmp_path / "run", progress=False, planned=(planned, wire))
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["settings"] == planned["settings"]
    for h, b in wire.items():
        assert (tmp_path / "run" / "wire" / f"{h}.fingerprint.json").read_bytes() == b
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["intensity"] == "zscore"
    assert res["ppcmi"]["n_cases"] > 0


def test_sunnybrook_plan_crops_to_the_heart():
    from conftest import BUNDLED

    cfg = load_config(None, [r"data.group_regex=^(SCD\d+)_", "data.partition=group"])
    from ppcmi.simulate import plan_run

    run_cfg, planned, _ = plan_run(cfg, BUNDLED, modality="MR")
    assert run_cfg.data.intensity == "zscore"
    assert 0.3 <= run_cfg.data.crop <= 0.6  # the left ventricle sits in the middle of every slice
    assert run_cfg.data.size % 32 == 0 and run_cfg.data.size <= 160
    assert planned["expected"]["total_s"] <= planned["expected"]["budget_s"] * 1.01


# ----------------------------------------------------------------------------- the Flower fingerprint round


def test_fingerprint_and_plan_records_round_trip_and_refuse_what_is_not_theirs(tiny):
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict

    from ppcmi.flower import wire

    fp = _fp(tiny, client="hospital1")
    content = wire.fingerprint_record(fp)
    wire.check_reply(content, protocol.FINGERPRINT_STEP)
    got, blob = wire.read_fingerprint(content)
    assert got == fp and blob == protocol.encode_fingerprint(fp)
    extra = wire.fingerprint_record(fp)
    extra["note"] = ConfigRecord({"file": "p1.png"})
    with pytest.raises(ProtocolError, match="not allowed"):
        wire.check_reply(extra, protocol.FINGERPRINT_STEP)
    with pytest.raises(ProtocolError, match="'data.group_regex' is not a shared setting"):
        wire.plan_record({"data.group_regex": "^(x)"})
    with pytest.raises(ProtocolError, match="'data.nothing' is not a shared setting"):
        wire.apply_plan_record(Config(), RecordDict({protocol.PLAN: ConfigRecord({"data.nothing": "1"})}))
    settings = {"data.size": 96, "data.intensity": "ct", "data.window": [-100.5, 200.0], "data.stats": [40.0, 30.0],
                "autoencoder.augment": True, "mapping.lr_schedule": "cosine"}
    cfg = wire.apply_plan_record(Config(), wire.with_plan(RecordDict(), settings))
    assert (cfg.data.size, cfg.data.intensity, cfg.data.window, cfg.data.stats) == (96, "ct", (-100.5, 200.0), (40.0, 30.0))
    assert cfg.autoencoder.augment and cfg.mapping.lr_schedule == "cosine"
    assert wire.apply_plan_record(Config(), RecordDict()) == Config()


def test_flower_settings_carry_the_plan_switch_through_the_run_config():
    pytest.importorskip("flwr")
    from flwr.common.config import flatten_dict

    from ppcmi.flower import wire

    s = wire.FlowerSettings(nodes=2, plan=True, budget=7.5, keep="data.size,mapping.epochs")
    _, back = wire.read_run_config(flatten_dict(wire.run_config(Config(data=DataConfig(labels="0,1")), s)))
    assert back == s


def test_server_app_plans_from_the_nodes_fingerprints_and_sends_the_settings(tmp_path):
    """The ServerApp's fingerprint round with a coordinator whose nodes answer as two ClientApps would
    (Flower's messages need a running SuperLink: test_flower covers the transport)."""
    pytest.importorskip("flwr")
    from ppcmi.client.node import NodeSite, fingerprint
    from ppcmi.experiment import synth
    from ppcmi.flower import wire
    from ppcmi.flower.server_app import Coordinator, plan_round

    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=64, n_classes=2, seed=1)
    cfg = load_config(None, ["data.labels=0,1", "mapping.epochs=9"])
    nodes = {11: NodeSite(tmp_path / "s1", data, "hospital1", modality="MR"), 12: NodeSite(tmp_path / "s2", data, "hospital2")}

    class Nodes(Coordinator):  # each node answers as the ClientApp does: fingerprint(node, cfg) as a record
        def ask(self, ids, message_type, parse, content=None):
            assert message_type == protocol.FINGERPRINT_STEP
            replies = {n: wire.fingerprint_record(fingerprint(nodes[n], cfg)) for n in ids}
            for r in replies.values():
                wire.check_reply(r, message_type)
            return {n: parse(n, r) for n, r in replies.items()}

    out = tmp_path / "server"
    out.mkdir()
    settings = wire.FlowerSettings(nodes=2, plan=True, budget=10, keep="mapping.epochs")
    co = Nodes(None, settings, out)
    planned_cfg, planned = plan_round(co, [11, 12], cfg, settings, out)
    assert co.sites == {11: "hospital1", 12: "hospital2"}
    assert json.loads((out / "plan.json").read_text())["settings"] == planned["settings"]
    assert (out / "wire" / "hospital1.fingerprint.json").exists()
    assert planned["pooled"]["modality"] == "MR"  # hospital2 did not know; warned
    assert any("hospital2: modality unknown" in w for w in planned["warnings"])
    assert planned_cfg.mapping.epochs == 9 and planned["overrides"]["mapping.epochs"]["used"] == 9
    assert planned["expected"]["runner"] == "hospitals train stage 1 in parallel"
    # what a hospital rebuilds from the message equals what the coordinator runs (the U-Net reference's schedule,
    # an experiment setting, stays with the coordinator)
    sent = {k: v for k, v in planned["settings"].items() if k not in planned["overrides"]}
    from flwr.app import RecordDict

    rebuilt = wire.apply_plan_record(cfg, wire.with_plan(RecordDict(), sent))
    assert shared_settings(rebuilt) == shared_settings(planned_cfg) and rebuilt.unet == cfg.unet
    assert planned_cfg.unet.epochs == planned["reference"]["unet.epochs"] and not set(planned["reference"]) & set(sent)


def test_plan_options_without_a_plan_are_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ppcmi.cli import app

    r = CliRunner().invoke(app, ["simulate", "--data", str(tmp_path), "--no-plan", "--budget", "5", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--budget/--modality: they steer the plan" in r.output
    r = CliRunner().invoke(app, ["demo", "--modality", "MR", "--out", str(tmp_path / "demo")])  # the bundled demo: no plan
    assert r.exit_code == 2 and "add --plan" in r.output
    r = CliRunner().invoke(app, ["bench", "--dataset", "psfhs", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--budget", "5"])
    assert r.exit_code == 2 and "add --plan" in r.output


def test_psfhs_fingerprint_sees_both_structures_in_every_mask():
    from conftest import shared_dataset

    cases = discover_cases(shared_dataset("psfhs"))[:30]
    fp = compute_fingerprint(cases, LabelMap((0, 1, 2)), client="h1", modality="US")
    assert fp.class_planes == (30, 30, 30) and fp.class_cases == (30, 30, 30)  # SOURCE.md: every mask holds PS and FH
    assert fp.rows == (256,) * 5 and fp.channels == 1
    assert 0.005 < fp.class_fraction[1] < fp.class_fraction[2] < 0.5  # the symphysis is the smaller structure
    assert 0 <= fp.fg_mean <= 255 and sum(c for _, c in fp.hist) == fp.fg_pixels


def test_a_plan_record_rides_beside_a_chunk_request():
    pytest.importorskip("flwr")
    from ppcmi.flower import wire

    req = wire.with_plan(wire.chunk_request(0, "", protocol.CHUNK_BYTES), {"data.size": 64})
    assert wire.read_chunk_request(req) == (0, "", protocol.CHUNK_BYTES)
    assert wire.apply_plan_record(Config(), req).data.size == 64


def test_real_ct_series_plans_a_hounsfield_window_from_its_own_header():
    from conftest import SHARED_DATA

    root = SHARED_DATA / "dicom_ct_lung1"
    if not (root / "CT").is_dir():
        pytest.skip(f"shared dataset dicom_ct_lung1 not available at {root}")
    from ppcmi.data import discover_labels

    cases = discover_cases(root)
    labels = discover_labels(cases)
    fp = stages.fingerprint(cases, Config(), labels, client="h1", data_dir=root)
    assert fp.modality == "CT" and fp.spacing_rows[2] == pytest.approx(0.9765625)
    plan = make_plan([fp], Config(), class_names=list(labels.names))
    lo, hi = plan["settings"]["data.window"]
    assert plan["settings"]["data.intensity"] == "ct" and -1100 < lo < hi < 3100  # HU: RescaleIntercept -1024 applied
    # 512 x 512 at 0.9765625 mm is a 500 mm field: its region (the central crop or the box the plan chose) at that spacing
    # is more pixels than the size (at most 256), so the target spacing is coarsened until the region fits
    s = plan["settings"]
    t, b, left, r = s["data.roi"] or [(1 - s["data.crop"]) / 2, (1 + s["data.crop"]) / 2] * 2
    need = 512 * max(b - t, r - left)
    assert s["data.size"] < need and s["data.spacing"] == pytest.approx([0.9765625 * need / s["data.size"]] * 2, abs=1e-4)
    assert not any("Hounsfield" in w for w in plan["warnings"])


# ----------------------------------------------------------------------------- target spacing and region box


def _spaced(client, rows_mm, cols_mm, *, n=100, size=256, cols=None, low=None, n_spacing=None, **kw):
    """``_fake`` with (row, column) spacings: every quantile at the given value, the 5 % quantile at ``low``."""
    fp = _fake(client, n=n, size=size, **kw)
    lr, lc = low or (rows_mm, cols_mm)
    return dataclasses.replace(fp, n_spacing=n if n_spacing is None else n_spacing, cols=(cols or size,) * 5,
                               spacing_rows=(lr, lr, rows_mm, rows_mm, rows_mm), spacing_cols=(lc, lc, cols_mm, cols_mm, cols_mm))


def test_plan_picks_the_median_spacing_and_sizes_the_network_for_the_field_at_it():
    """h1: 100 planes at 0.7 mm, h2: 300 at 1.0 mm, both 256 x 256 pixels: the planes' median spacing is 1.0 mm and the
    median field 256 mm, 256 pixels at it; a roomy budget keeps 256 and the spacing, a tight one lowers the size
    and coarsens the spacing by 256 / size so that the median field still fits."""
    fps = [_spaced("h1", 0.7, 0.7, extent=(0, 1, 0, 1)), _spaced("h2", 1.0, 1.0, n=300, extent=(0, 1, 0, 1))]
    roomy = make_plan(fps, Config(), budget_min=600)
    assert roomy["settings"]["data.size"] == 256 and roomy["settings"]["data.spacing"] == [1.0, 1.0]
    assert "median spacing 1 x 1 mm" in roomy["reasons"]["data.spacing"] and "fits the network size 256" in roomy["reasons"]["data.spacing"]
    assert "median field is 256 x 256 mm, 256 x 256 pixels" in roomy["reasons"]["data.size"]
    assert roomy["pooled"]["field_mm"] == [256.0, 256.0] and roomy["pooled"]["n_spacing"] == 400
    tight = make_plan(fps, Config(), budget_min=10)
    s = tight["settings"]["data.size"]
    assert s < 256 and tight["settings"]["data.spacing"] == pytest.approx([256 / s, 256 / s], abs=1e-4)
    assert "coarsened" in tight["reasons"]["data.spacing"]
    cfg, _ = apply_plan(Config(), tight)
    assert cfg.data.spacing == pytest.approx((256 / s, 256 / s), abs=1e-4) and cfg.data.size == s
    mine, noted = apply_plan(load_config(None, ["data.size=256"]), tight, explicit=["data.size"])
    assert mine.data.size == 256 and mine.data.spacing == cfg.data.spacing  # the plan's spacing stays, and is said
    assert any(w.startswith("data.size = 256 (set by you) keeps the plan's data.spacing") for w in noted["warnings"])
    assert any(w.startswith("h1 and h2: median pixel spacings 0.4 mm and 1 mm") for w in make_plan(
        [_spaced("h1", 0.4, 0.4), _spaced("h2", 1.0, 1.0)], Config())["warnings"])  # 2.5x apart: still warned


def test_the_size_rule_counts_pixels_at_the_target_spacing_not_native_pixels():
    # 512 x 512 planes at 0.5 mm (256 mm) and 256 x 256 at 1 mm (256 mm), 100 each: median spacing 0.5 (the lower
    # median of two equal weights), median field 256 mm = 512 pixels, capped at 256, so the spacing is coarsened to 1 mm
    fps = [_spaced("h1", 0.5, 0.5, size=512, extent=(0, 1, 0, 1)), _spaced("h2", 1.0, 1.0, size=256, extent=(0, 1, 0, 1))]
    plan = make_plan(fps, Config(), budget_min=6000)
    assert plan["settings"]["data.size"] == 256 and plan["settings"]["data.spacing"] == [1.0, 1.0]
    # a small field at a fine spacing: 100 x 100 mm planes of 400 pixels at 0.25 mm, spacing 0.25 -> 400 pixels -> 256
    # and 100 / 256 mm; the same field stored at 1 mm (100 pixels) plans the same mm per pixel, padded from 100 to 96
    fine = make_plan([_spaced("h1", 0.25, 0.25, size=400, extent=(0, 1, 0, 1))], Config(), budget_min=6000)
    assert fine["settings"]["data.spacing"] == pytest.approx([100 / 256, 100 / 256], abs=1e-4)
    coarse = make_plan([_spaced("h1", 1.0, 1.0, size=100, extent=(0, 1, 0, 1))], Config(), budget_min=6000)
    assert coarse["settings"]["data.size"] == 96 and coarse["settings"]["data.spacing"] == pytest.approx([100 / 96] * 2, abs=1e-4)


def test_an_in_plane_anisotropic_spacing_takes_the_5_percent_quantile_on_its_coarse_axis():
    # rows at 4 mm (5 % quantile 2 mm), columns at 1 mm; 40 rows x 256 columns: 160 x 256 mm, 40 pixels along the rows
    # at 4 mm, fewer than a third of 256: anisotropic, so the rows take 2 mm (not finer than the columns' 1 mm)
    fp = _spaced("h1", 4.0, 1.0, size=40, cols=256, low=(2.0, 1.0), extent=(0, 1, 0, 1))
    plan = make_plan([fp], Config(), budget_min=6000)
    assert plan["settings"]["data.spacing"] == [2.0, 1.0] and "anisotropic" in plan["reasons"]["data.spacing"]
    # 3x coarser but with as many pixels: not anisotropic in nnU-Net's sense, the median stays
    even = _spaced("h1", 3.5, 1.0, size=256, cols=256, low=(2.0, 1.0), extent=(0, 1, 0, 1))
    got = make_plan([even], Config(), budget_min=6000)["settings"]["data.spacing"]
    assert got[0] / got[1] == pytest.approx(3.5, rel=1e-3)


def test_planes_without_spacing_keep_the_fit_by_pixels():
    plan = make_plan([_fake("h1"), _fake("h2")], Config())
    assert plan["settings"]["data.spacing"] is None and "PNG" in plan["reasons"]["data.spacing"]
    few = make_plan([_spaced("h1", 1.0, 1.0, n=100, n_spacing=40), _fake("h2", n=100)], Config())
    assert few["settings"]["data.spacing"] is None and "40 of 200" in few["reasons"]["data.spacing"]
    most = make_plan([_spaced("h1", 1.0, 1.0, n=150), _fake("h2", n=50)], Config())
    assert most["settings"]["data.spacing"] is not None and "50 plane(s) without one are fitted by pixels" in most["reasons"]["data.spacing"]
    assert apply_plan(Config(), plan)[0].data.spacing is None


def test_a_foreground_away_from_the_centre_gets_a_box():
    """Both hospitals' foreground sits in the top right: the union rows 0.05-0.35, columns 0.6-0.95, plus 0.05, snapped
    outward to 1/16, is rows 0-0.4375, columns 0.5-1 (22 % of the field), while a central crop holding it would keep
    everything; at 256 native pixels the box is 112 x 128 pixels, so the size is 128."""
    fps = [_fake("h1", extent=(0.05, 0.35, 0.6, 0.95)), _fake("h2", extent=(0.1, 0.3, 0.65, 0.9))]
    plan = make_plan(fps, Config(), budget_min=60)
    s = plan["settings"]
    assert s["data.roi"] == [0.0, 0.4375, 0.5, 1.0] and s["data.crop"] == 1.0 and s["data.size"] == 128
    assert "away from its centre" in plan["reasons"]["data.roi"]
    cfg, _ = apply_plan(Config(), plan)
    assert cfg.data.roi == (0.0, 0.4375, 0.5, 1.0) and cfg.data.crop == 1.0
    # a central foreground keeps the central crop (the box would keep more than half of its area), and the whole
    # field stays whole
    central = make_plan([_fake("h1", extent=(0.40, 0.55, 0.45, 0.6))], Config())["settings"]
    assert central["data.roi"] is None and central["data.crop"] == 0.3125  # (0.1 + 0.05) * 2 = 0.3 -> 5/16
    whole = make_plan([_fake("h1", extent=(0.1, 0.9, 0.2, 0.8))], Config())["settings"]
    assert whole["data.roi"] is None and whole["data.crop"] == 1.0
    # a user's region wins whole: --set data.crop keeps the plan's box out, and is recorded
    mine = load_config(None, ["data.crop=0.5"])
    out, planned = apply_plan(mine, plan, explicit=["data.crop"])
    assert out.data.crop == 0.5 and out.data.roi is None
    assert planned["overrides"]["data.roi"] == {"plan": [0.0, 0.4375, 0.5, 1.0], "used": None}


def test_a_plan_with_a_box_and_a_spacing_crosses_a_flower_plan_record():
    pytest.importorskip("flwr")
    from flwr.app import RecordDict

    from ppcmi.flower import wire

    plan = make_plan([_spaced("h1", 0.8, 0.8, extent=(0.05, 0.35, 0.6, 0.95))], Config())
    cfg, _ = apply_plan(Config(), plan)
    rebuilt = wire.apply_plan_record(Config(), wire.with_plan(RecordDict(), plan["settings"]))
    assert rebuilt == dataclasses.replace(cfg, unet=Config().unet)  # the U-Net reference's schedule stays behind
    none = make_plan([_fake("h1")], Config())  # data.spacing and data.roi are null
    assert shared_settings(wire.apply_plan_record(Config(), wire.with_plan(RecordDict(), none["settings"]))) == \
        shared_settings(apply_plan(Config(), none)[0])


def test_real_nifti_planes_plan_their_own_spacing_and_restore_exactly():
    """Ten MSD hippocampus volumes (1 mm MR): the plan keeps 1 x 1 mm and pads the about 35 x 51 pixel field to 64, so
    every seventh training mask, forwarded and restored from its one-hot, comes back exactly; at a 0.5 mm target (a 2x
    upscale along both axes, at size 128) too."""
    from conftest import SHARED_DATA

    from ppcmi.data import discover_labels, forward_mask, load_arrays, restore_labels

    root = SHARED_DATA / "msd_hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"shared dataset msd_hippocampus not available at {root}")
    cases = [c for c in discover_cases(root) if c.mask_path is not None]
    cases = [c for c in cases if c.group in sorted({c.group for c in cases})[:10]]
    labels = discover_labels(cases)
    fp = compute_fingerprint(cases, labels, client="h1", modality="MR")
    assert fp.n_spacing == fp.n_planes and fp.spacing_rows[2] == pytest.approx(1.0)
    plan = make_plan([fp], Config(), budget_min=60)
    assert plan["settings"]["data.spacing"] == [1.0, 1.0] and plan["settings"]["data.size"] == 64
    for spacing, size in (("1,1", 64), ("0.5,0.5", 128)):  # (at 0.5 mm the field is about 102 pixels: size 128)
        sets = [f"data.spacing={spacing}", f"data.size={size}"]
        cfg, _ = apply_plan(load_config(None, sets), plan, explicit=["data.spacing", "data.size"])
        arr = load_arrays(cases[::7], cfg.data.preprocess(), labels, native=True)
        for g, m, native in zip(arr["geometries"], arr["masks"], arr["native_masks"]):
            assert g.native_spacing == pytest.approx((1.0, 1.0)) and g.fit == 1.0
            k = labels.n_classes
            back = restore_labels(np.eye(k, dtype=np.float32)[m].transpose(2, 0, 1)[None], [g])[0]
            assert np.array_equal(back, native) and np.array_equal(forward_mask(native, g), m)
