"""The command line end to end: synth -> keygen -> train -> encode -> server train -> map -> decode -> evaluate,
the secrecy of keys in everything a run writes, and one-line errors on bad input."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ppcmi.cli import app
from ppcmi.client.keys import key_path
from ppcmi.klt import KeyedLatentTransform
from ppcmi.models import AEConfig

runner = CliRunner()
TINY = ["--set", "data.size=32", "--set", "autoencoder.epochs=2", "--set", "autoencoder.width=0.25",
        "--set", "mapping.epochs=2", "--set", "mapping.widen=[8,8,8]", "--set", "mapping.mid=[8,8]",
        "--set", "mapping.down=[8,8,8]", "--set", "data.group_csv=groups.csv"]


def ok(*args: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r.output


def fails(*args: str, match: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, f"{args}: expected exit 2, got {r.exit_code}\n{r.output}"
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), r.output
    assert match in lines[-1], f"{match!r} not in {lines[-1]!r}"
    return lines[-1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Path]:
    """Two hospitals with their own synthetic data, one server, one query round trip.

    The module's tests run inside the run folder; the previous working directory is restored at
    module teardown, so later test modules are not affected."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # data.group_csv=groups.csv is resolved per data folder below
        yield _round_trip(root)


def _round_trip(root: Path) -> Path:
    for i, name in enumerate(("h1", "h2", "test")):
        ok("synth", root / "data" / name, "--sites", 1, "--patients", 2, "--slices", 4, "--size", 32, "--seed", i + 1)
    for name in ("h1", "h2"):
        site = root / "sites" / name
        ok("client", "keygen", "--site-dir", site)
        ok("client", "train", "--site-dir", site, "--data", root / "data" / name, "--name", name, "-q",
           *[a.replace("groups.csv", str(root / "data" / name / "groups.csv")) for a in TINY])
        ok("client", "encode", "--site-dir", site, "--data", root / "data" / name, "--out", root / "wire" / f"{name}.train", "--with-masks")
    ok("server", "train", root / "wire" / "h1.train", root / "wire" / "h2.train", "--out", root / "server", "-q", *TINY[:-2])
    site = root / "sites" / "h1"
    ok("client", "encode", "--site-dir", site, "--data", root / "data" / "test" / "images", "--out", root / "wire" / "q")
    ok("server", "map", "--model", root / "server", "--query", root / "wire" / "q", "--out", root / "wire" / "r")
    ok("client", "decode", "--site-dir", site, "--reply", root / "wire" / "r", "--cases", root / "wire" / "q.cases.json",
       "--out", root / "pred")
    out = ok("evaluate", "--pred", root / "pred", "--data", root / "data" / "test", "--out", root / "eval")
    assert "merged-foreground Dice" in out
    return root


def test_round_trip_writes_every_artefact(run):
    preds = sorted((run / "pred").glob("*.png"))
    assert len(preds) == 8
    for p in preds:
        lab = np.asarray(Image.open(p))
        assert lab.shape == (32, 32) and set(np.unique(lab)) <= {0, 1, 2}
    with open(run / "eval" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case_id"] for r in rows) == [p.stem for p in preds]
    # every reported Dice, recomputed with numpy from the written label maps and the ground-truth masks
    for r in rows:
        pred = np.asarray(Image.open(run / "pred" / f"{r['case_id']}.png"))
        gt = np.asarray(Image.open(run / "data" / "test" / "masks" / f"{r['case_id']}.png"))
        for name, p, g in (("class1", pred == 1, gt == 1), ("class2", pred == 2, gt == 2), ("fg", pred > 0, gt > 0)):
            expect = 1.0 if not (p.any() or g.any()) else 2 * (p & g).sum() / (p.sum() + g.sum())
            assert float(r[f"{name}_dice"]) == pytest.approx(expect, abs=1e-6), (r["case_id"], name)
    summ = json.loads((run / "eval" / "summary.json").read_text())
    assert summ["n_cases"] == 8
    assert summ["fg_dice"]["mean"] == pytest.approx(np.mean([float(r["fg_dice"]) for r in rows]), abs=1e-12)
    for folder in (run / "sites" / "h1" / "image_ae", run / "sites" / "h1" / "mask_ae", run / "server"):
        assert (folder / "config.json").exists()
    assert json.loads((run / "sites" / "h1" / "config.json").read_text())["data"]["size"] == 32
    assert json.loads((run / "server" / "run_config.json").read_text())["mapping"]["epochs"] == 2
    assert oct((key_path(run / "sites" / "h1")).stat().st_mode & 0o777) == "0o600"


def _secret_forms(key: bytes, channels: dict[str, int]) -> list[bytes]:
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)]
    klt = KeyedLatentTransform(key, channels)
    for modality in ("image", "mask"):
        for s in channels:
            q = klt.matrix(modality, s).numpy()
            for dt in (np.float64, np.float32, np.float16):
                forms.append(np.ascontiguousarray(q, dtype=dt)[:2].tobytes())      # the first rows
                forms.append(np.ascontiguousarray(q.T, dtype=dt)[:2].tobytes())    # Q transposed
            forms.append(f"{q[0, 0]:.6f}, {q[0, 1]:.6f}".encode())
    return forms


def test_key_bytes_and_q_absent_from_every_written_file(run):
    files = [p for p in run.rglob("*") if p.is_file() and p.name != "klt.key"]
    assert len(files) > 20
    blobs = {p: p.read_bytes() for p in files}
    for name in ("h1", "h2"):
        site = run / "sites" / name
        key = key_path(site).read_bytes()
        meta = json.loads((site / "image_ae" / "config.json").read_text())["autoencoder"]
        for kind, cin in (("image", 1), ("mask", 3)):
            channels = AEConfig(**{**meta, "in_channels": cin}).latent_channels()
            for form in _secret_forms(key, channels):
                leaks = [str(p.relative_to(run)) for p, b in blobs.items() if form in b]
                assert not leaks, f"secret material of {name} found in {leaks}"


# ----------------------------------------------------------------------------- bad input


def test_missing_mask_names_the_file(run, tmp_path):
    d = tmp_path / "d"
    ok("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32)
    victim = sorted((d / "masks").iterdir())[0]
    victim.unlink()
    ok("client", "keygen", "--site-dir", tmp_path / "s")
    fails("client", "train", "--site-dir", tmp_path / "s", "--data", d, "--name", "x", "-q", *TINY[:-2], match=victim.stem)


def test_image_and_mask_of_different_sizes(tmp_path):
    d = tmp_path / "d"
    ok("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32)
    m = sorted((d / "masks").iterdir())[0]
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(m)
    ok("client", "keygen", "--site-dir", tmp_path / "s")
    line = fails("client", "train", "--site-dir", tmp_path / "s", "--data", d, "--name", "x", "-q", *TINY[:-2], match=m.name)
    assert "20x20" in line or "(20, 20)" in line


def test_truncated_image(tmp_path):
    d = tmp_path / "d"
    ok("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32)
    im = sorted((d / "images").iterdir())[1]
    im.write_bytes(im.read_bytes()[:40])
    ok("client", "keygen", "--site-dir", tmp_path / "s")
    fails("client", "train", "--site-dir", tmp_path / "s", "--data", d, "--name", "x", "-q", *TINY[:-2], match=im.name)


def test_empty_folder(tmp_path):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    ok("client", "keygen", "--site-dir", tmp_path / "s")
    fails("client", "train", "--site-dir", tmp_path / "s", "--data", tmp_path / "d", "--name", "x", "-q", match=str(tmp_path / "d"))


def test_unknown_label_value(tmp_path):
    d = tmp_path / "d"
    ok("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32, "--classes", 2)
    m = sorted((d / "masks").iterdir())[0]
    lab = np.asarray(Image.open(m)).copy()
    lab[0, 0] = 7
    Image.fromarray(lab).save(m)
    ok("client", "keygen", "--site-dir", tmp_path / "s")
    fails("client", "train", "--site-dir", tmp_path / "s", "--data", d, "--name", "x", "-q", "--set", "data.labels=0,1",
          *TINY[:-2], match=m.name)


def test_bad_key_files(run, tmp_path):
    site = tmp_path / "s"
    ok("client", "keygen", "--site-dir", site)
    before = key_path(site).read_bytes()
    fails("client", "keygen", "--site-dir", site, match="refusing to overwrite")
    assert key_path(site).read_bytes() == before
    # a readable key, then a short key, at a trained site: refused before anything is written
    trained = tmp_path / "trained"
    import shutil

    shutil.copytree(run / "sites" / "h1", trained)
    q = tmp_path / "q.msg"
    key_path(trained).chmod(0o644)
    fails("client", "encode", "--site-dir", trained, "--data", run / "data" / "test" / "images", "--out", q, match="chmod 600")
    key_path(trained).chmod(0o600)
    key_path(trained).write_bytes(b"short")
    fails("client", "encode", "--site-dir", trained, "--data", run / "data" / "test" / "images", "--out", q, match="5 bytes")
    assert not q.exists()


def test_bad_latent_batches_and_nothing_overwritten(run, tmp_path):
    from ppcmi import protocol

    good = protocol.decode((run / "wire" / "q").read_bytes())
    model = run / "server"

    def send(msg_bytes: bytes, match: str) -> None:
        q = tmp_path / "bad.msg"
        q.write_bytes(msg_bytes)
        fails("server", "map", "--model", model, "--query", q, "--out", tmp_path / "reply", match=match)
        assert not (tmp_path / "reply").exists()

    def raw(arrays: dict, version: str = "1") -> bytes:  # wire bytes built by hand, bypassing validation
        from safetensors.numpy import save

        return save(arrays, metadata={"ppcmi.version": version, "kind": "query", "client": good.client})

    arrays = dict(good.arrays)
    send(raw(dict(arrays, zt_img_extra=arrays["zt_img_b"])), "zt_img_extra")
    nan = {k: v.copy() for k, v in arrays.items()}
    nan["zt_img_s4"][0, 0, 0, 0] = np.nan
    send(raw(nan), "zt_img_s4")
    send(raw(dict(arrays, zt_img_s3=np.ascontiguousarray(arrays["zt_img_s3"][:, :, :-1]))), "zt_img_s3")
    send(raw(dict(arrays, zt_img_b=arrays["zt_img_b"].astype(np.int32))), "zt_img_b")
    send(raw(arrays, version="99"), "version")
    send((run / "wire" / "q").read_bytes()[:100], "bad.msg")
    # an existing reply is never overwritten
    existing = tmp_path / "reply"
    existing.write_bytes(b"precious")
    fails("server", "map", "--model", model, "--query", run / "wire" / "q", "--out", existing, match="exists")
    assert existing.read_bytes() == b"precious"


def test_outputs_are_not_overwritten(run):
    before = snapshot(run / "pred")
    site = run / "sites" / "h1"
    fails("client", "decode", "--site-dir", site, "--reply", run / "wire" / "r", "--cases", run / "wire" / "q.cases.json",
          "--out", run / "pred", match="exists")
    fails("client", "encode", "--site-dir", site, "--data", run / "data" / "test" / "images", "--out", run / "wire" / "q", match="exists")
    fails("client", "train", "--site-dir", site, "--data", run / "data" / "h1", "--name", "h1", "-q",
          *[a.replace("groups.csv", str(run / "data" / "h1" / "groups.csv")) for a in TINY], match="already trained")
    assert snapshot(run / "pred") == before


def test_every_command_has_help():
    for cmd in (["synth"], ["client", "keygen"], ["client", "train"], ["client", "encode"], ["client", "decode"],
                ["server", "train"], ["server", "map"], ["predict"], ["evaluate"], ["simulate"], ["demo"], ["bench"]):
        out = ok(*cmd, "--help")
        assert "Usage" in out and len(out.splitlines()) > 4


def test_data_options_become_typed_config():
    from ppcmi.cli import _data_sets
    from ppcmi.config import load_config

    cfg = load_config(None, _data_sets("0,1,2", "bg,a,b", 96, "-1000,1000", 1024.0))
    d = cfg.data
    assert (d.labels, d.class_names, d.size, d.window, d.offset, d.intensity) == ("0,1,2", "bg,a,b", 96, (-1000.0, 1000.0), 1024.0, "window")
    p = d.preprocess()
    assert p.window == (-1000.0, 1000.0) and p.offset == 1024.0


def test_predict_writes_nifti_for_a_volume_and_png_for_slices(run, tmp_path):
    import nibabel as nib

    pngs = sorted((run / "data" / "test" / "images").glob("*.png"))[:3]
    planes = [np.asarray(Image.open(p)).astype(np.float32) for p in pngs]
    vol = np.stack([pl.T for pl in planes], axis=2)  # plane z of the volume is image z (readers transpose i, j)
    affine = np.diag([0.8, 0.9, 5.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "vol.nii.gz")
    site, model = run / "sites" / "h1", run / "server"
    ok("predict", tmp_path / "vol.nii.gz", "--site-dir", site, "--model", model, "--out", tmp_path / "nii")
    ok("predict", *pngs, "--site-dir", site, "--model", model, "--out", tmp_path / "png")
    out = nib.load(tmp_path / "nii" / "vol.nii.gz")
    assert out.shape == (32, 32, 3) and np.allclose(out.affine, affine)
    lab = np.asarray(out.dataobj)
    for z, p in enumerate(pngs):
        assert np.array_equal(lab[:, :, z].T, np.asarray(Image.open(tmp_path / "png" / p.name))), p.name
    fails("predict", tmp_path / "vol.nii.gz", "--site-dir", site, "--model", model, "--out", tmp_path / "nii", match="exists")


def test_non_square_images_come_back_on_their_own_grid_by_either_path(run, tmp_path):
    """Planes of other shapes than the network's 32x32 (wider, taller, larger) are padded on the way in and their
    label maps come back at their own size; predict and client encode/map/decode restore them identically."""
    src = sorted((run / "data" / "test" / "images").glob("*.png"))[:3]
    folder = tmp_path / "odd"
    folder.mkdir()
    shapes = {"wide": (20, 32), "tall": (32, 24), "large": (48, 48)}
    for (name, (h, w)), p in zip(shapes.items(), src):
        Image.fromarray(np.asarray(Image.open(p).resize((w, h), Image.BILINEAR))).save(folder / f"{name}.png")
    site, model = run / "sites" / "h1", run / "server"
    ok("predict", folder, "--site-dir", site, "--model", model, "--out", tmp_path / "a")
    ok("client", "encode", "--site-dir", site, "--data", folder, "--out", tmp_path / "q")
    ok("server", "map", "--model", model, "--query", tmp_path / "q", "--out", tmp_path / "r")
    ok("client", "decode", "--site-dir", site, "--reply", tmp_path / "r", "--out", tmp_path / "b")
    for name, shape in shapes.items():
        a, b = (np.asarray(Image.open(tmp_path / d / f"{name}.png")) for d in ("a", "b"))
        assert a.shape == shape and np.array_equal(a, b) and set(np.unique(a)) <= {0, 1, 2}, name


def test_planes_with_a_spacing_come_back_on_their_own_grid_under_a_target_spacing(run, tmp_path):
    """A site whose settings carry data.spacing = 2 x 2 mm (its record edited; the networks are the same) segments MHA
    planes at 1 mm: each is resampled to 2 mm (20 x 32 -> 10 x 16, 48 x 48 -> 24 x 24, padded to 32), the case list
    records its spacing, and predict and client encode/map/decode write identical label maps on the native grid."""
    import shutil

    import SimpleITK as sitk

    site = tmp_path / "h1"
    shutil.copytree(run / "sites" / "h1", site)
    record = json.loads((site / "site.json").read_text())
    record["data"]["spacing"] = [2.0, 2.0]
    (site / "site.json").write_text(json.dumps(record))
    src = sorted((run / "data" / "test" / "images").glob("*.png"))[:2]
    folder = tmp_path / "mha"
    folder.mkdir()
    shapes = {"wide": (20, 32), "large": (48, 48)}
    for (name, (h, w)), p in zip(shapes.items(), src):
        im = sitk.GetImageFromArray(np.asarray(Image.open(p).convert("L").resize((w, h), Image.BILINEAR), dtype=np.float32))
        im.SetSpacing((1.0, 1.0))
        sitk.WriteImage(im, str(folder / f"{name}.mha"))
    model = run / "server"
    ok("predict", folder, "--site-dir", site, "--model", model, "--out", tmp_path / "a")
    ok("client", "encode", "--site-dir", site, "--data", folder, "--out", tmp_path / "q")
    cases = json.loads((tmp_path / "q.cases.json").read_text())["cases"]
    assert [c["spacing"] for c in cases] == [[1.0, 1.0], [1.0, 1.0]]
    from ppcmi.client.inference import _geometries
    from ppcmi.client.site import Hospital

    geoms = _geometries(cases, Hospital(site).data_cfg.preprocess())
    assert [(g.scaled, g.target_spacing) for g in geoms] == [((24, 24), (2.0, 2.0)), ((10, 16), (2.0, 2.0))]  # large, wide
    ok("server", "map", "--model", model, "--query", tmp_path / "q", "--out", tmp_path / "r")
    ok("client", "decode", "--site-dir", site, "--reply", tmp_path / "r", "--out", tmp_path / "b")
    for name, shape in shapes.items():
        a, b = (sitk.ReadImage(str(tmp_path / d / f"{name}.mha")) for d in ("a", "b"))
        assert sitk.GetArrayFromImage(a).shape[-2:] == shape and a.GetSpacing()[:2] == (1.0, 1.0), name
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name


def test_a_case_list_spacing_is_checked_by_field(tmp_path):
    from ppcmi.client.inference import _case_list
    from ppcmi.errors import PpcmiError

    case = {"source": "a.mha", "stem": "a", "format": "mha", "slice_index": None, "original_shape": [4, 5]}
    rec = {"kind": "query", "site": "h1", "query": "q", "key": "k"}
    p = tmp_path / "q.cases.json"
    for spacing in ([1.0, 0.5], None, "absent"):
        p.write_text(json.dumps({**rec, "cases": [case if spacing == "absent" else {**case, "spacing": spacing}]}))
        assert _case_list(p)["cases"][0].get("spacing") == (None if spacing == "absent" else spacing)
    for bad in ([0.0, 1.0], [1.0], "1,1", [True, 1.0]):
        p.write_text(json.dumps({**rec, "cases": [{**case, "spacing": bad}]}))
        with pytest.raises(PpcmiError, match=r"q\.cases\.json: field 'cases\[0\]\.spacing' must be \[row_mm, col_mm\]"):
            _case_list(p)


def test_segment_is_the_network_grid_argmax_when_the_geometry_is_the_identity(run):
    """The synthetic test planes are 32x32, the network size: restoring changes nothing, so the native label maps
    equal the argmax on the network grid; and batching the restore changes nothing either."""
    from ppcmi import protocol
    from ppcmi.client.site import Hospital
    from ppcmi.data import plane_geometry
    from ppcmi.errors import PpcmiError

    h = Hospital(run / "sites" / "h1")
    reply = protocol.decode((run / "wire" / "r").read_bytes())
    cases = json.loads((run / "wire" / "q.cases.json").read_text())["cases"]
    geoms = [plane_geometry(c["original_shape"], h.data_cfg.preprocess()) for c in cases]
    assert all(g.scaled == (32, 32) and not any(g.pad) for g in geoms)
    whole, batched = h.segment(reply, geoms), h.segment(reply, geoms, batch=3)
    assert len(whole) == reply.n == 8
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(whole, batched, h.unprotect(reply)))
    with pytest.raises(PpcmiError, match="8 rows for 7 planes"):
        h.segment(reply, geoms[:7])


def test_server_train_honours_per_hospital_scope(run, tmp_path):
    """mapping.scope=per_hospital trains one network per hospital, each on its own pairs only (it used to be
    ignored: one shared network, silently)."""
    out = tmp_path / "per"
    printed = ok("server", "train", run / "wire" / "h1.train", run / "wire" / "h2.train", "--out", out, "-q", *TINY[:-2],
                 "--set", "mapping.scope=per_hospital")
    assert not (out / "mapping.safetensors").exists()
    for name in ("h1", "h2"):
        saved = json.loads((out / name / "config.json").read_text())
        assert saved["clients"] == [name] and saved["train"]["scope"] == "per_hospital"
        assert f"mapping network for {name}" in printed and str(out / name) in printed
    ok("server", "map", "--model", out / "h1", "--query", run / "wire" / "q", "--out", tmp_path / "r")


def test_a_setting_the_command_does_not_read_is_refused(run, tmp_path):
    """--set of a hospital's or an experiment's setting where nothing reads it is an error, not silently ignored."""
    fails("server", "train", run / "wire" / "h1.train", "--out", tmp_path / "s", "--set", "autoencoder.send_noise=0.3",
          match="autoencoder.send_noise: a hospital setting")
    fails("server", "train", run / "wire" / "h1.train", "--out", tmp_path / "s", "--set", "data.group_regex=^(p)_",
          match="data.group_regex")
    fails("client", "train", "--site-dir", run / "sites" / "h1", "--data", run / "data" / "h1", "--name", "h1",
          "--set", "data.partition=iid", match="data.partition: an experiment setting")
    assert not (tmp_path / "s").exists()


def test_encode_with_masks_sends_the_sites_copies(run, tmp_path):
    """client encode --with-masks sends what simulate sends for the same settings: each pair plus
    autoencoder.send_copies - 1 augmented copies (it used to ignore send_copies)."""
    from ppcmi import protocol

    site = tmp_path / "site"
    ok("client", "keygen", "--site-dir", site)
    ok("client", "train", "--site-dir", site, "--data", run / "data" / "h1", "--name", "h1", "-q",
       *[a.replace("groups.csv", str(run / "data" / "h1" / "groups.csv")) for a in TINY], "--set", "autoencoder.send_copies=3")
    ok("client", "encode", "--site-dir", site, "--data", run / "data" / "h1", "--out", tmp_path / "t", "--with-masks")
    n = len(list((run / "data" / "h1" / "images").iterdir()))
    chunks = [protocol.decode(p.read_bytes()) for p in sorted((tmp_path / "t").iterdir())]  # a folder of chunks
    assert sum(c.n for c in chunks) == 3 * n and {c.count for c in chunks} == {len(chunks)}


def test_a_reply_lands_only_on_its_own_patients(run, tmp_path):
    """A reply is bound to its query (a random id it echoes) and the query's case list to the key it was encoded
    under: a reply decoded with another query's case list, or after the key changed, is refused by name."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(run / "sites" / "h1", site)
    w = tmp_path / "w"
    w.mkdir()
    ok("client", "encode", "--site-dir", site, "--data", run / "data" / "test" / "images", "--out", w / "q")
    ok("server", "map", "--model", run / "server", "--query", w / "q", "--out", w / "r")
    first = json.loads((w / "q.cases.json").read_text())
    assert set(first) == {"kind", "site", "query", "key", "cases"} and len(first["query"]) == 32
    assert first["key"] not in (key_path(site).read_bytes().hex(), base64.b64encode(key_path(site).read_bytes()).decode())
    # the first query moved away; other images encoded under the same name: its case list is another query's
    (w / "q").rename(tmp_path / "q.first")
    fails("client", "encode", "--site-dir", site, "--data", run / "data" / "h2" / "images", "--out", w / "q", match="q.cases.json")
    assert json.loads((w / "q.cases.json").read_text()) == first and not (w / "q").exists()  # nothing half-written
    (w / "q.cases.json").rename(tmp_path / "q.first.cases.json")
    ok("client", "encode", "--site-dir", site, "--data", run / "data" / "h2" / "images", "--out", w / "q")
    fails("client", "decode", "--site-dir", site, "--reply", w / "r", "--cases", w / "q.cases.json", "--out", tmp_path / "p1",
          match=f"answers query {first['query']}")
    assert not (tmp_path / "p1").exists()
    # its own case list, found beside the reply by the query id, decodes it
    (tmp_path / "q.first.cases.json").rename(w / "q.first.cases.json")
    ok("client", "decode", "--site-dir", site, "--reply", w / "r", "--out", tmp_path / "p2")
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == sorted(p.name for p in (run / "pred").iterdir())
    # after a key rotation the old reply cannot be decoded with the new key
    ok("client", "rotate-key", "--site-dir", site, "--data", run / "data" / "h1", "--out", tmp_path / "rot.train")
    fails("client", "decode", "--site-dir", site, "--reply", w / "r", "--cases", w / "q.first.cases.json", "--out",
          tmp_path / "p3", match="another key")
    assert not (tmp_path / "p3").exists()


def test_case_names_cannot_leave_the_output_folder(run, tmp_path):
    rec = json.loads((run / "wire" / "q.cases.json").read_text())
    rec["cases"][0]["stem"] = "../escaped"
    (tmp_path / "bad.cases.json").write_text(json.dumps(rec))
    fails("client", "decode", "--site-dir", run / "sites" / "h1", "--reply", run / "wire" / "r", "--cases", tmp_path / "bad.cases.json",
          "--out", tmp_path / "out", match="'../escaped' is not a plain file name")
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "out").exists()


def test_a_named_roi_missing_from_an_rtstruct_is_one_line_naming_file_and_roi(tmp_path):
    from test_formats import _ct_series, _rt_image, _rtstruct

    image = _rt_image()
    for p in ("p1", "p2"):
        _ct_series(tmp_path / "export" / p / "CT", image)
    _rtstruct(tmp_path / "export" / "p1" / "RTSTRUCT" / "rs.dcm", tmp_path / "export" / "p1" / "CT", image)
    _rtstruct(tmp_path / "export" / "p2" / "RTSTRUCT" / "rs.dcm", tmp_path / "export" / "p2" / "CT", image,
              {"Body": (4, 27, 3, 25, range(1, 5))})
    rt = tmp_path / "export" / "p2" / "RTSTRUCT" / "rs.dcm"
    ok("client", "keygen", "--site-dir", tmp_path / "site")  # client train checks the key before it reads the data
    for cmd in (["client", "train", "--site-dir", tmp_path / "site", "--name", "h1"], ["simulate", "--out", tmp_path / "run"]):
        r = runner.invoke(app, [str(a) for a in cmd] + ["--data", str(tmp_path / "export"), "--set", "data.rois=Body,Tumour"])
        assert r.exit_code == 2 and r.output.strip().splitlines() == \
            [f"error: {rt}: no ROI named 'Tumour' (the RTSTRUCT holds 'Body'); choose the classes with data.rois"], r.output
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["klt.key"]  # nothing trained


def test_evaluate_scores_rtstruct_ground_truth_with_the_rois_in_class_order(tmp_path):
    from test_formats import _ct_series, _rt_image, _rtstruct

    from ppcmi.data import discover_cases, discover_labels, read_case_mask
    from ppcmi.data.writers import write_prediction

    image = _rt_image()
    export = tmp_path / "export"
    _ct_series(export / "p1" / "CT", image)
    _rtstruct(export / "p1" / "RTSTRUCT" / "rs.dcm", export / "p1" / "CT", image)
    cases = discover_cases(export, rois=["Tumour", "Body"])  # the classes a run with data.rois=Tumour,Body trained
    write_prediction(export / "p1" / "CT", [read_case_mask(c)[0] for c in cases], tmp_path / "pred", "p1",
                     labels=discover_labels(cases))
    ok("evaluate", "--pred", tmp_path / "pred", "--data", export, "--out", tmp_path / "ev", "--rois", "Tumour,Body")
    summ = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summ["Tumour_dice"]["mean"] == 1.0 and summ["Body_dice"]["mean"] == 1.0
    ok("evaluate", "--pred", tmp_path / "pred", "--data", export, "--out", tmp_path / "ev2")  # every ROI, sorted: other classes
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["Body_dice"]["mean"] < 0.5
