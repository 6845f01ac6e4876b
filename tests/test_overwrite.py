"""No command replaces a user's file unless ``--overwrite`` says so, and then atomically; a refusal writes nothing.

Issue 17, points 6 and 7: ``evaluate --out EXISTING``, ``synth DIR`` over a user's README.md and groups.csv, a
failed ``client train --resume`` rewriting site.json, and ``client decode`` / ``predict`` leaving earlier label
maps behind when they refuse a later one. One tiny hospital and server are trained once per module through the CLI.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ppcmi.cli import app

runner = CliRunner()
TINY = ["--set", "data.size=32", "--set", "autoencoder.epochs=1", "--set", "autoencoder.width=0.25"]
MAP_TINY = ["--set", "mapping.epochs=1", "--set", "mapping.widen=[8,8,8]", "--set", "mapping.mid=[8,8]",
            "--set", "mapping.down=[8,8,8]"]


def ok(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r.output


def fails(*args, match: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and lines and lines[-1].startswith("error: "), f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert match in lines[-1], f"{match!r} not in {lines[-1]!r}"
    return lines[-1]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file (hidden ones too) under ``root`` with its bytes and modification time in ns."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def train_args(site: Path, data: Path) -> list:
    return ["client", "train", "--site-dir", site, "--data", data, "--name", "h1", "-q", *TINY,
            "--set", f"data.group_csv={data / 'groups.csv'}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Path]:
    """One hospital (h1) with a trained site, a server model on its pairs, one query, its reply and its label maps."""
    root = tmp_path_factory.mktemp("overwrite")
    ok("synth", root / "data", "--sites", 1, "--patients", 2, "--slices", 3, "--size", 32, "--classes", 2, "--seed", 1)
    ok("synth", root / "test", "--sites", 1, "--patients", 1, "--slices", 3, "--size", 32, "--classes", 2, "--seed", 2)
    site = root / "site"
    ok("client", "keygen", "--site-dir", site)
    ok(*train_args(site, root / "data"))
    ok("client", "encode", "--site-dir", site, "--data", root / "data", "--with-masks", "--out", root / "h1.train")
    ok("server", "train", root / "h1.train", "--out", root / "server", "-q", "--set", "data.size=32", *MAP_TINY)
    ok("client", "encode", "--site-dir", site, "--data", root / "test" / "images", "--out", root / "q")
    ok("server", "map", "--model", root / "server", "--query", root / "q", "--out", root / "r")
    ok("client", "decode", "--site-dir", site, "--reply", root / "r", "--out", root / "pred")
    yield root


def decode_args(run: Path, out: Path, *extra) -> list:
    return ["client", "decode", "--site-dir", run / "site", "--reply", run / "r", "--cases", run / "q.cases.json", "--out", out, *extra]


# ----------------------------------------------------------------------------- 6: evaluate

def test_evaluate_refuses_an_existing_evaluation_and_overwrite_replaces_both(run, tmp_path):
    out = tmp_path / "eval"
    ok("evaluate", "--pred", run / "pred", "--data", run / "test", "--out", out)
    first = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text("my notes\n")
    (out / "per_case.csv").write_text("mine\n")
    before = snapshot(out)
    fails("evaluate", "--pred", run / "pred", "--data", run / "test", "--out", out, match="per_case.csv: already exists")
    assert snapshot(out) == before
    # one of the two is enough to refuse, and the other is then not written either
    (out / "per_case.csv").unlink()
    fails("evaluate", "--pred", run / "pred", "--data", run / "test", "--out", out, match="summary.json: already exists")
    assert not (out / "per_case.csv").exists() and (out / "summary.json").read_text() == "my notes\n"
    assert "--overwrite" in fails("evaluate", "--pred", run / "pred", "--data", run / "test", "--out", out, match="summary.json")
    ok("evaluate", "--pred", run / "pred", "--data", run / "test", "--out", out, "--overwrite")
    assert json.loads((out / "summary.json").read_text()) == first
    assert (out / "per_case.csv").read_text().startswith("case_id")
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv", "summary.json"]  # no temporary file left


# ----------------------------------------------------------------------------- 6: synth

def test_synth_never_touches_a_users_readme_or_groups_csv(tmp_path):
    d = tmp_path / "mine"
    for name in ("README.md", "groups.csv"):
        d.mkdir(exist_ok=True)
        (d / name).write_text(f"a user's {name}\n")
        before = snapshot(d)
        fails("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32, match=f"{name}: already exists")
        assert snapshot(d) == before, "a refused synth wrote something"
        (d / name).unlink()
    ok("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32)  # an empty folder is fine


def test_synth_overwrite_replaces_its_own_output_and_refuses_foreign_files(tmp_path):
    d = tmp_path / "s"
    ok("synth", d, "--sites", 2, "--patients", 1, "--slices", 2, "--size", 32, "--seed", 1)
    assert len(list((d / "images").iterdir())) == 4
    fails("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32, match="already exists")
    ok("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32, "--seed", 2, "--overwrite")
    names = sorted(p.name for p in (d / "images").iterdir())
    assert names == ["site1_p01_s00.png", "site1_p01_s01.png"], names  # the second site's cases went with the rerun
    assert sorted(p.name for p in (d / "masks").iterdir()) == names
    assert "seed 2" in (d / "README.md").read_text() and (d / "groups.csv").read_text().count("\n") == 3
    assert not [p for p in d.rglob(".*")], "a temporary file was left"
    # a file synth did not write would end up mixed into the set: refused even with --overwrite, nothing touched
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "images" / "patient7.png")
    before = snapshot(d)
    fails("synth", d, "--sites", 1, "--patients", 1, "--slices", 2, "--size", 32, "--overwrite", match="patient7.png: not a file")
    assert snapshot(d) == before


# ----------------------------------------------------------------------------- 6: client train

def _site_copy(run: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(run / "site", site)
    return site


def test_a_failed_resume_leaves_site_json_as_it_was(run, tmp_path):
    site = _site_copy(run, tmp_path)
    state = site / "image_ae" / "train" / "state.json"
    state.write_bytes(state.read_bytes()[:40])  # a truncated manifest: the resume fails
    before = snapshot(site)
    r = runner.invoke(app, [str(a) for a in train_args(site, run / "data") + ["--resume"]])
    assert r.exit_code == 2 and "state.json" in r.output, r.output
    assert snapshot(site) == before  # site.json (bytes and time) and everything else untouched


def test_a_resume_with_other_settings_is_refused_by_field_before_training(run, tmp_path):
    site = _site_copy(run, tmp_path)
    before = snapshot(site)
    fails(*train_args(site, run / "data"), "--resume", "--size", 64, match="data.size differs from the interrupted run's")
    fails(*train_args(site, run / "data"), "--resume", "--set", "autoencoder.width=0.5", match="autoencoder.width differs")
    assert snapshot(site) == before


def test_a_resume_reads_an_older_site_record_as_it_ran(run, tmp_path):
    """A site record of config version 2 has no data.resize: its planes were squashed, so a resume under the
    default (pad) is refused by that field, and one that asks for squash is not."""
    site = _site_copy(run, tmp_path)
    rec = json.loads((site / "site.json").read_text())
    rec["version"] = 2
    del rec["data"]["resize"]
    (site / "site.json").write_text(json.dumps(rec))
    fails(*train_args(site, run / "data"), "--resume", match="data.resize differs from the interrupted run's")
    ok(*train_args(site, run / "data"), "--resume", "--set", "data.resize=squash")


def test_train_refuses_a_trained_site_and_overwrite_retrains_it_keeping_the_key(run, tmp_path):
    site = _site_copy(run, tmp_path)
    before = snapshot(site)
    assert "--overwrite" in fails(*train_args(site, run / "data"), match="already trained")
    fails(*train_args(site, run / "data"), "--resume", "--overwrite", match="choose one")
    assert snapshot(site) == before
    ok(*train_args(site, run / "data"), "--overwrite", "--seed", 99)
    after = snapshot(site)
    assert after["klt.key"][0] == before["klt.key"][0] and (site / "klt.key").stat().st_nlink == 1
    assert after["image_ae/model.safetensors"][0] != before["image_ae/model.safetensors"][0]  # another split: other weights
    assert not [p for p in site.iterdir() if p.name.startswith(".")], "the staging folder or a replaced one was left"
    # the retrained site decodes its own queries
    ok("client", "encode", "--site-dir", site, "--data", run / "test" / "images", "--out", tmp_path / "q2")
    assert json.loads((tmp_path / "q2.cases.json").read_text())["site"] == "h1"


def test_an_overwrite_that_fails_midway_leaves_the_old_site(run, tmp_path, monkeypatch):
    from ppcmi.client import site as site_mod
    from ppcmi.errors import PpcmiError

    site = _site_copy(run, tmp_path)
    before = snapshot(site)
    real_fit, calls = site_mod.fit, []

    def fit_then_fail(*args, **kwargs):  # the image autoencoder trains, the mask autoencoder fails
        calls.append(kwargs.get("desc"))
        if len(calls) == 2:
            raise PpcmiError("mask AE: loss became nan at epoch 1")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(site_mod, "fit", fit_then_fail)
    fails(*train_args(site, run / "data"), "--overwrite", "--seed", 7, match="loss became nan")
    assert len(calls) == 2 and snapshot(site) == before


# ----------------------------------------------------------------------------- 7: label maps all or none

def test_decode_refusing_a_later_label_map_leaves_no_earlier_one_behind(run, tmp_path):
    expected = sorted(p.name for p in (run / "pred").iterdir())
    assert len(expected) == 3
    out = tmp_path / "pred"
    out.mkdir()
    (out / expected[-1]).write_bytes(b"a user's file")  # the last label map to be written already exists
    fails(*decode_args(run, out), match=f"{expected[-1]}: already exists")
    assert sorted(p.name for p in out.iterdir()) == [expected[-1]] and (out / expected[-1]).read_bytes() == b"a user's file"
    ok(*decode_args(run, out, "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == expected
    for name in expected:
        assert (out / name).read_bytes() == (run / "pred" / name).read_bytes()


def test_predict_checks_every_output_before_sending_and_overwrite_replaces(run, tmp_path):
    images = sorted((run / "test" / "images").iterdir())
    out = tmp_path / "pred"
    out.mkdir()
    (out / images[1].name).write_bytes(b"mine")
    fails("predict", *images, "--site-dir", run / "site", "--model", run / "server", "--out", out, match=f"{images[1].name}: already exists")
    assert sorted(p.name for p in out.iterdir()) == [images[1].name]
    ok("predict", *images, "--site-dir", run / "site", "--model", run / "server", "--out", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in images)
    assert Image.open(out / images[1].name).size == (32, 32)


def test_two_inputs_with_one_file_name_are_refused_before_anything_is_written(run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    src = sorted((run / "test" / "images").iterdir())
    shutil.copy(src[0], a / "x.png")
    shutil.copy(src[1], b / "x.png")
    fails("predict", a / "x.png", b / "x.png", "--site-dir", run / "site", "--model", run / "server", "--out", tmp_path / "out",
          "--overwrite", match="would both be written here")
    assert not (tmp_path / "out").exists()


def test_keygen_never_replaces_a_key(run, tmp_path):
    site = _site_copy(run, tmp_path)
    key = (site / "klt.key").read_bytes()
    fails("client", "keygen", "--site-dir", site, match="already exists")
    assert (site / "klt.key").read_bytes() == key
    assert "rotate-key" in ok("client", "keygen", "--help")


def test_rotate_key_checks_its_outputs_and_puts_the_old_key_back_when_encoding_fails(run, tmp_path):
    """A refused or failed rotation leaves the site's key as it was: no key changed without the message that follows it."""
    site = tmp_path / "site"
    shutil.copytree(run / "site", site)
    key = (site / "klt.key").read_bytes()
    (tmp_path / "new.cases.json").write_text("{}")
    fails("client", "rotate-key", "--site-dir", site, "--data", run / "data", "--out", tmp_path / "new", match="new.cases.json")
    fails("client", "rotate-key", "--site-dir", site, "--data", tmp_path / "nowhere", "--out", tmp_path / "other", match="nowhere")
    assert (site / "klt.key").read_bytes() == key
    assert not list(site.glob("klt.key.*.bak")) and not (tmp_path / "other").exists()
