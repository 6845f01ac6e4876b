import json

import pytest

from ppcmi.client.keys import KEY_FILENAME
from ppcmi.bench import run_bench
from ppcmi.experiment import dataset_config
from ppcmi.experiment import synth
from ppcmi.errors import PpcmiError

TINY = ["data.size=32", "data.labels=0,1", "data.class_names=background,lv", "autoencoder.width=0.25", "autoencoder.epochs=1",
        "mapping.widen=8,8,8", "mapping.mid=8,8", "mapping.down=8,8,8", "mapping.epochs=1", "clients=2",
        "data.crop=1.0", "autoencoder.send_copies=1"]


@pytest.mark.slow
def test_bench_runs_methods_with_one_split_and_skips_finished_ones(tmp_path):
    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=4)
    res = run_bench("sunnybrook_lv", data, tmp_path / "b", ["ppcmi_cpu", "no_klt", "unet_centralized", "unet_local"],
                    overrides=TINY + [r"data.group_regex=^(site\d+_p\d+)_"], progress=False)
    assert set(res) == {"ppcmi_cpu", "no_klt", "unet_centralized", "unet_local"}
    n = res["ppcmi_cpu"]["summary"]["n_cases"]
    assert res["unet_centralized"]["summary"]["n_cases"] * 2 == n  # PPCMI: every hospital segments every test case
    assert res["unet_local"]["summary"]["n_cases"] == n  # one local U-Net per hospital
    assert res["no_klt"]["config"]["klt"] is False
    assert not any("volumes" in r for r in res.values())  # 2D planes: no whole-volume scores
    # the ablation reuses ppcmi_cpu's autoencoders (identical weights) under a fresh key
    b = tmp_path / "b"
    assert res["no_klt"]["stage1_from"] == "ppcmi_cpu"
    for f in ("image_ae/model.safetensors", "mask_ae/model.safetensors"):
        assert (b / "ppcmi_cpu/sites/hospital1" / f).read_bytes() == (b / "no_klt/sites/hospital1" / f).read_bytes()
    assert json.loads((b / "no_klt/sites/hospital1/site.json").read_text())["klt"] is False
    assert (b / "ppcmi_cpu/sites/hospital1" / KEY_FILENAME).read_bytes() != (b / "no_klt/sites/hospital1" / KEY_FILENAME).read_bytes()
    # float16 on the wire and bf16 autocast are scored too, on the same cases
    assert set(res["ppcmi_cpu"]["variants"]) == {"float16_wire", "bf16_autocast"}
    assert res["ppcmi_cpu"]["variants"]["float16_wire"]["n_cases"] == n
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| unet_local |" in md and "merged-foreground Dice" in md
    stamp = (tmp_path / "b" / "no_klt" / "summary.json").stat().st_mtime_ns
    run_bench("sunnybrook_lv", data, tmp_path / "b", ["no_klt"], overrides=TINY, progress=False)
    assert (tmp_path / "b" / "no_klt" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "b" / "results.json").read_text())["dataset"] == "sunnybrook_lv"


def test_unknown_dataset_and_method():
    with pytest.raises(PpcmiError, match="unknown dataset"):
        dataset_config("mnist")
    cfg = dataset_config("acdc")
    assert cfg.data.labels == "0,1,2,3" and cfg.data.split_lists["test"] == "test.list"


def test_reserved_class_name_is_refused_early():
    from ppcmi.data import parse_labels
    from ppcmi.errors import DataError

    with pytest.raises(DataError, match="reserved"):
        parse_labels("0,1", "background,fg")


def _privacy_audit_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy_audit.py"
    spec = importlib.util.spec_from_file_location("privacy_audit", path)
    pa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pa)
    return pa


def test_privacy_audit_reuses_only_a_bench_run_with_the_same_settings(tmp_path):
    from ppcmi.config import load_config, to_dict

    pa = _privacy_audit_script()
    cfg = dataset_config("psfhs")
    assert cfg.mapping.adapter_init == "identity"  # ppcmi_cpu keeps the published adapters
    bench = tmp_path / "bench"
    run = bench / "ppcmi_cpu"
    (run / "audit").mkdir(parents=True)
    raw = to_dict(cfg)
    del raw["version"]  # a run saved before configs carried a version
    del raw["autoencoder"]["send_noise"]  # written before the setting existed: its default applies
    del raw["mapping"]["adapter_init"]  # likewise, except that such a run used identity adapters, as the preset does
    (run / "config.json").write_text(json.dumps({**raw, "data_dir": "/elsewhere/psfhs"}))
    (run / "summary.json").write_text("{}")
    (run / "audit" / "audit.json").write_text("{}")
    assert pa.reuse_bench_run(cfg, "baseline", bench, tmp_path / "p" / "baseline")
    assert (tmp_path / "p" / "baseline" / "summary.json").exists()
    assert not (tmp_path / "p" / "baseline" / "audit").exists()  # an audit is the audit harness's own
    assert not pa.reuse_bench_run(cfg, "baseline", bench, tmp_path / "p" / "baseline")  # finished: left alone
    assert not pa.reuse_bench_run(cfg, "dp", bench, tmp_path / "p" / "dp")  # no bench method is a DP run
    other = load_config(None, ["mapping.epochs=3"], base=cfg)
    with pytest.raises(SystemExit, match=r"ppcmi_cpu was run with other settings \(mapping differ\)"):
        pa.reuse_bench_run(other, "baseline", bench, tmp_path / "q" / "baseline")
    assert not (tmp_path / "q").exists()


def test_published_audits_carry_dataset_images_only_when_their_license_allows(tmp_path):
    pa = _privacy_audit_script()
    for dataset in ("psfhs", "sunnybrook_lv"):
        run = tmp_path / dataset / "baseline"
        for part in ("audit", "audit-t5"):  # an audit run in two parts
            (run / part).mkdir(parents=True)
            for name in ("audit.json", "roc.png", "a1_maps.png"):
                (run / part / name).write_bytes(b"x")
            (run / part / "report.md").write_text("# report\n\n![A1 maps](a1_maps.png)\n")
        pa.publish_audit(run, dataset, tmp_path / "results" / dataset)
    psfhs, sb = tmp_path / "results" / "psfhs", tmp_path / "results" / "sunnybrook_lv"
    assert sorted(p.name for p in psfhs.iterdir()) == ["audit.json", "report.md", "roc.png", "t5"]
    assert sorted(p.name for p in (psfhs / "t5").iterdir()) == ["audit.json", "report.md", "roc.png"]
    assert "baseline/audit-t5/a1_maps.png" in (psfhs / "t5" / "report.md").read_text()
    text = (psfhs / "report.md").read_text()
    assert "![A1 maps]" not in text and "stay in ../shared/data" in text
    assert (sb / "a1_maps.png").exists() and "![A1 maps](a1_maps.png)" in (sb / "report.md").read_text()


def test_privacy_audit_gives_each_dp_setting_its_own_folder():
    from types import SimpleNamespace

    pa = _privacy_audit_script()
    args = SimpleNamespace(noise=0.3, dp_noise=1.0, dp_clip=1.0, dp_batch=None)
    assert [pa.variant_key(v, args) for v in ("baseline", "dp", "noise", "noise_fixed")] == ["baseline", "dp", "noise-0.3", "noise_fixed-0.3"]
    cfg = dataset_config("psfhs")
    assert pa.variant_config(cfg, "dp", args).mapping.batch_size == cfg.mapping.batch_size
    args.dp_batch, args.dp_noise = 128, 0.8
    assert pa.variant_key("dp", args) == "dp-n0.8-c1-b128"
    m = pa.variant_config(cfg, "dp", args).mapping
    assert (m.batch_size, m.dp_noise, m.dp, m.norm) == (128, 0.8, True, "group")


def _volumes(root, n=6):
    """An MSD-style folder of ``n`` small 3D MR volumes (a box that shifts from volume to volume), no test list."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(5)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        m = np.zeros((24, 24, 4), np.uint8)
        m[4 + i % 3:16, 6:18, 1:] = 1
        nib.save(nib.Nifti1Image(m, np.diag([1.0, 1.0, 2.0, 1.0])), str(root / "labelsTr" / f"v{i}.nii.gz"))
        img = (rng.normal(size=m.shape) + 4.0 * m).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 2.0, 1.0])), str(root / "imagesTr" / f"v{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "BOX", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "lv"}, "numTraining": n,
        "training": [{"image": f"./imagesTr/v{i}.nii.gz", "label": f"./labelsTr/v{i}.nii.gz"} for i in range(n)]}))
    return root


@pytest.mark.slow
def test_bench_scores_whole_volumes_of_3d_data(tmp_path):
    data = _volumes(tmp_path / "data")
    res = run_bench("sunnybrook_lv", data, tmp_path / "b", ["ppcmi_cpu", "unet_centralized"],
                    overrides=[*TINY, "data.group_regex=", "data.test_frac=0.34"], progress=False)
    n_test_planes = res["unet_centralized"]["summary"]["n_cases"]
    for m, sites in (("ppcmi_cpu", {"hospital1", "hospital2"}), ("unet_centralized", {"pooled"})):
        v = res[m]["volumes"]
        assert set(v["by_group"]) == sites and v["n_volumes"] == 2 * len(sites)  # 2 of the 6 volumes are held out
        assert all(0.0 <= v[k] <= 1.0 for k in ("lv_dice", "fg_dice")) and v["lv_dice"] == v["fg_dice"]  # one structure
    assert n_test_planes == 8  # the held-out volumes' 4 planes each, scored one by one in the table above
    md = (tmp_path / "b" / "results.md").read_text()
    assert "Whole test volumes" in md and "| unet_centralized | pooled | 2 |" in md and "| ppcmi_cpu | overall | 4 |" in md
