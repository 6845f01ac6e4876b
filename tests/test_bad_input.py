"""Bad input at the command line: every failure of user input or local files is one ``error: ...`` line on
stderr with exit status 2, never a traceback, and no file that existed before the command changes.

One tiny trained hospital (and a one-hospital mapping model) is built once per module; each case runs
the real ``ppcmi`` command in-process (``CliRunner``), a few as a real subprocess, against it or
against a damaged copy of its files. Hypothesis draws the bad inputs (``derandomize=True``: the same
examples on every run): settings of every type out of type or range, odd paths, and corrupt,
truncated or incomplete records and weights."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ppcmi.cli import app
from ppcmi.config import load_config
from ppcmi.errors import PpcmiError

runner = CliRunner()
# the same examples on every run; a failure is reported as drawn (shrinking would rerun commands for minutes)
FAST = settings(max_examples=20, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
AE = ["--set", "data.size=32", "--set", "autoencoder.epochs=1", "--set", "autoencoder.width=0.25"]
MAP = ["--set", "data.size=32", "--set", "mapping.epochs=1", "--set", "mapping.widen=8,8,8", "--set", "mapping.mid=8,8",
       "--set", "mapping.down=8,8,8"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object) -> str:
    r = invoke(*args)
    assert r.exit_code == 0, f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r.output


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(root: Path, *args: object, match: str | None = None) -> str:
    """Run ``ppcmi ARGS``: exit 2, stderr one ``error:`` line (containing ``match``), no traceback, and every
    file under ``root`` that existed before is still there, byte for byte."""
    before = digests(root)
    r = invoke(*args)
    after = digests(root)
    shown = f"{[str(a) for a in args]}\nexit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{r.exception!r}"
    assert r.exit_code == 2, shown
    assert "Traceback" not in r.output, shown
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, shown
    assert match is None or match in err, f"{match!r} not in {err!r}"
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"{shown}\nchanged or removed: {changed}"
    return err


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """ROOT/data/h1 (8 slices of 32x32), ROOT/site (trained, 1 epoch), ROOT/wire (train message, a query and
    its reply with their case lists), ROOT/server (a mapping model on h1's message). About 10 s on 2 cores."""
    root = tmp_path_factory.mktemp("bad")
    ok("synth", root / "data" / "h1", "--sites", 1, "--patients", 2, "--slices", 4, "--size", 32, "--seed", 1)
    ok("client", "keygen", "--site-dir", root / "site")
    ok("client", "train", "--site-dir", root / "site", "--data", root / "data" / "h1", "--name", "h1", "-q", *AE,
       "--set", f"data.group_csv={root / 'data' / 'h1' / 'groups.csv'}")
    ok("client", "encode", "--site-dir", root / "site", "--data", root / "data" / "h1", "--with-masks", "--out", root / "wire" / "h1.train")
    ok("server", "train", root / "wire" / "h1.train", "--out", root / "server", "-q", *MAP)
    ok("client", "encode", "--site-dir", root / "site", "--data", root / "data" / "h1" / "images", "--out", root / "wire" / "q")
    ok("server", "map", "--model", root / "server", "--query", root / "wire" / "q", "--out", root / "wire" / "r")
    (root / "afile").write_text("a file where a folder is expected\n")
    return root


_count = itertools.count()


@pytest.fixture
def scratch(site: Path) -> Iterator[Callable[[], Path]]:
    """Fresh, empty folders under the module's root (so that the no-change check sees everything), removed after."""
    made: list[Path] = []

    def new() -> Path:  # one per example: the previous example's folders go first
        while made:
            shutil.rmtree(made.pop(), ignore_errors=True)
        d = site / "scratch" / str(next(_count))
        d.mkdir(parents=True)
        made.append(d)
        return d

    yield new
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- the cases issue 17 listed


def test_each_listed_traceback_is_now_one_error_line(site, scratch):
    d = scratch()
    data, s, w = site / "data" / "h1", site / "site", site / "wire"
    # an output path whose parent is a file
    refused(site, "client", "encode", "--site-dir", s, "--data", data / "images", "--out", site / "afile" / "q", match="afile")
    refused(site, "client", "decode", "--site-dir", s, "--reply", w / "r", "--cases", w / "q.cases.json", "--out",
            site / "afile" / "pred", match="afile is a file")
    refused(site, "client", "keygen", "--site-dir", site / "afile" / "site", match="afile is a file")
    refused(site, "server", "map", "--model", site / "server", "--query", w / "q", "--out", site / "afile" / "r", match="afile")
    refused(site, "server", "train", w / "h1.train", "--out", site / "afile" / "m", *MAP, match="afile is a file")
    refused(site, "certs", "init", "--out", site / "afile" / "tls", match="afile is a file")
    refused(site, "flower", "keygen", "--out", site / "afile" / "auth", match="afile is a file")
    refused(site, "predict", data / "images" / "site1_p01_s00.png", "--site-dir", s, "--model", site / "server", "--out",
            site / "afile" / "p", match="afile is a file")
    # a size too large for memory: bounded, with the reason
    refused(site, "client", "train", "--site-dir", d / "s", "--data", data, "--name", "h1", "--size", 1048576, match="data.size")
    refused(site, "synth", d / "big", "--size", 1048576, match="synth: size")
    refused(site, "synth", d / "many", "--patients", 1000, "--slices", 1000, "--size", 256, match="pixels in all")
    # settings out of range, before any work
    for bad, field in (("autoencoder.batch_size=0", "autoencoder.batch_size"), ("autoencoder.lr=nan", "autoencoder.lr"),
                       ("autoencoder.epochs=0", "autoencoder.epochs"), ("autoencoder.epochs=-3", "autoencoder.epochs")):
        refused(site, "client", "train", "--site-dir", s, "--data", data, "--name", "h1", "--set", bad, match=field)
    refused(site, "server", "train", w / "h1.train", "--out", d / "m", *MAP, "--set", "mapping.dropout=5", match="mapping.dropout")
    assert not (d / "s").exists() and not (d / "m" / "train").exists()  # nothing was started


def _damaged(site: Path, dest: Path, rel: str, edit: Callable[[dict], None]) -> Path:
    """A copy of the site folder, model and wire files under ``dest`` with one JSON record edited."""
    for sub in ("site", "server", "wire"):
        shutil.copytree(site / sub, dest / sub)
    p = dest / rel
    rec = json.loads(p.read_text())
    edit(rec)
    p.write_text(json.dumps(rec))
    return dest


def test_incomplete_records_name_the_file_and_the_field(site, scratch):
    def decode(d: Path, match: str) -> None:
        refused(site, "client", "decode", "--site-dir", d / "site", "--reply", d / "wire" / "r", "--cases",
                d / "wire" / "q.cases.json", "--out", d / "pred", match=match)

    d = _damaged(site, scratch(), "wire/q.cases.json", lambda r: r["cases"][0].pop("original_shape"))
    decode(d, "cases[0].original_shape")
    d = _damaged(site, scratch(), "site/site.json", lambda r: r.pop("n_classes"))
    decode(d, "site.json: field 'n_classes' is missing")
    d = _damaged(site, scratch(), "site/mask_ae/config.json", lambda r: r["autoencoder"].update(width="wide"))
    decode(d, "mask_ae/config.json: autoencoder.width")
    d = _damaged(site, scratch(), "server/config.json", lambda r: r.pop("image_shapes"))
    refused(site, "server", "map", "--model", d / "server", "--query", d / "wire" / "q", "--out", d / "r2",
            match="config.json: field 'image_shapes' is missing")


def test_resume_with_a_truncated_manifest_or_weights_or_other_messages(site, scratch):
    d = scratch()
    shutil.copytree(site / "server", d / "server")
    state = d / "server" / "train" / "state.json"
    state.write_text(state.read_text()[:50])
    refused(site, "server", "train", site / "wire" / "h1.train", "--out", d / "server", "--resume", "-q", *MAP, match="state.json")
    d = scratch()
    shutil.copytree(site / "server", d / "server")
    last = next((d / "server" / "train").glob("last-*.safetensors"))
    last.write_bytes(last.read_bytes()[:100])
    refused(site, "server", "train", site / "wire" / "h1.train", "--out", d / "server", "--resume", "-q", *MAP, match=last.name)
    # other messages than the run began with: h1's pairs encoded again with latent noise (a new set of other rows)
    d = scratch()
    shutil.copytree(site / "server", d / "server")
    ok("client", "encode", "--site-dir", site / "site", "--data", site / "data" / "h1", "--with-masks", "--noise", "0.5",
       "--out", d / "noisy.train")
    refused(site, "server", "train", d / "noisy.train", "--out", d / "server", "--resume", "-q", *MAP, match="other training data")


# ----------------------------------------------------------------------------- generated bad settings

_WORD = st.from_regex(r"[A-Za-z_]{1,8}", fullmatch=True)
_NONE = {"none", "null"}
_BOOL = {"true", "1", "yes", "false", "0", "no"}


def _text(exclude: set[str] = frozenset()) -> st.SearchStrategy[str]:
    return _WORD.filter(lambda w: w.lower() not in _NONE | set(exclude))


def _ints(lo: int, hi: int | None = None) -> st.SearchStrategy[str]:
    """Integers outside lo..hi, or no integer at all (a word, or any float: its repr never parses as an int)."""
    out = st.integers(max_value=lo - 1)
    if hi is not None:
        out = out | st.integers(min_value=hi + 1)
    return st.one_of(out.map(str), _text(), st.floats().map(repr))


def _reals(lo: float, hi: float, lo_open: bool, hi_open: bool) -> st.SearchStrategy[str]:
    """Numbers outside the interval, NaN, infinities, or no number at all."""
    below = st.floats(max_value=lo, allow_nan=False, allow_infinity=False).filter(lambda x: x <= lo if lo_open else x < lo)
    above = st.floats(min_value=hi, allow_nan=False, allow_infinity=False).filter(lambda x: x >= hi if hi_open else x > hi)
    return st.one_of(below.map(repr), above.map(repr), st.sampled_from(["nan", "inf", "-inf", "1e400"]), _text({"nan", "inf"}))


def _tuple(n: int) -> st.SearchStrategy[str]:
    wrong_count = st.lists(st.integers(1, 64), min_size=1, max_size=6).filter(lambda v: len(v) != n)
    bad_member = st.lists(st.integers(1, 64), min_size=n, max_size=n).flatmap(
        lambda v: st.tuples(st.integers(0, n - 1), st.one_of(st.integers(max_value=0), st.integers(min_value=4097)).map(str) | _text())
        .map(lambda ib: [*map(str, v[:ib[0]]), ib[1], *map(str, v[ib[0] + 1:])]))
    return st.one_of(wrong_count.map(lambda v: ",".join(map(str, v))), bad_member.map(",".join))


def _choice(allowed: tuple[str, ...]) -> st.SearchStrategy[str]:
    return _text(set(allowed))


_BADBOOL = _text(_BOOL)
POSITIVE = ("epochs", "batch_size", "patience")
BAD_SETTINGS: dict[str, st.SearchStrategy[str]] = {
    **{f"autoencoder.{k}": _ints(1) for k in POSITIVE},
    **{f"mapping.{k}": _ints(1) for k in POSITIVE},
    "autoencoder.send_copies": _ints(1, 32),
    "seed": _ints(0, 2**32 - 1),
    "data.size": st.one_of(_ints(32, 2048), st.integers(1, 63).map(lambda k: str(32 * k + 7))),
    "autoencoder.lr": _reals(0, 10, True, False), "mapping.lr": _reals(0, 10, True, False),
    "autoencoder.val_frac": _reals(0, 1, False, True), "mapping.val_frac": _reals(0, 1, False, True),
    "mapping.dropout": _reals(0, 1, False, True),
    "data.crop": _reals(0, 1, True, False),
    "autoencoder.width": _reals(0, 8, True, False),
    "autoencoder.send_noise": _reals(0, 1e6, False, False),
    "mapping.dp_noise": _reals(0, 1e6, False, False), "mapping.dp_clip": _reals(0, 1e6, True, False),
    "mapping.dp_epsilon": _reals(0, 1e6, True, False),
    **{k: _BADBOOL for k in ("autoencoder.skips", "autoencoder.augment", "mapping.pyramid", "mapping.dp", "klt")},
    "autoencoder.lr_schedule": _choice(("constant", "cosine")), "mapping.lr_schedule": _choice(("constant", "cosine")),
    "mapping.norm": _choice(("batch", "group")), "mapping.scope": _choice(("shared", "per_hospital")),
    "mapping.adapter_init": _choice(("identity", "pca")), "data.intensity": _choice(("minmax", "percentile", "window")),
    "data.color": _choice(("gray", "rgb")),
    "mapping.widen": _tuple(3), "mapping.mid": _tuple(2), "mapping.down": _tuple(3),
    "data.percentiles": st.one_of(st.tuples(st.floats(0, 100), st.floats(0, 100)).filter(lambda t: t[0] >= t[1])
                                  .map(lambda t: f"{t[0]!r},{t[1]!r}"), st.sampled_from(["-1,50", "50,101", "nan,5", "1", "1,2,3"])),
    "data.window": st.one_of(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)).filter(lambda t: t[0] >= t[1])
                             .map(lambda t: f"{t[0]!r},{t[1]!r}"), st.sampled_from(["-inf,5", "0,nan", "1", "a,b"])),
}
# experiment settings, read only by simulate (and demo, bench, deploy)
BAD_EXPERIMENT = {"data.test_frac": _reals(0, 1, False, True), "data.eval_size": _ints(8, 2048),
                  "data.partition": _choice(("iid", "group", "site"))}


@FAST
@given(st.data())
def test_every_setting_is_checked_by_type_and_range(site, scratch, data):
    # every setting, through the parser every command uses (cheap) ...
    for name, bad in {**BAD_SETTINGS, **BAD_EXPERIMENT}.items():
        value = data.draw(bad, label=name)
        with pytest.raises(PpcmiError, match=re.escape(name.split(".")[-1])):
            load_config(None, [f"{name}={value}"])
    # ... and one of them through a command that reads it
    key = data.draw(st.sampled_from(sorted(BAD_SETTINGS)), label="setting")
    value = data.draw(BAD_SETTINGS[key], label="value")
    d = scratch()
    if key.startswith("mapping."):
        args = ["server", "train", site / "wire" / "h1.train", "--out", d / "m", "-q"]
    else:
        args = ["client", "train", "--site-dir", d / "s", "--data", site / "data" / "h1", "--name", "h1", "-q"]
    err = refused(site, *args, "--set", f"{key}={value}")
    assert key.split(".")[-1] in err, err
    assert not any(d.iterdir()), "a refused setting must stop the command before it writes anything"


@settings(FAST, max_examples=6)
@given(st.data())
def test_experiment_settings_and_counts_are_checked(site, scratch, data):
    d = scratch()
    if data.draw(st.booleans(), label="a count"):
        n = data.draw(st.integers(max_value=0), label="clients")
        err = refused(site, "simulate", "--data", site / "data" / "h1", "--out", d / "run", "-q", "--clients", n)
        assert "clients" in err
    else:
        key = data.draw(st.sampled_from(sorted(BAD_EXPERIMENT)), label="setting")
        value = data.draw(BAD_EXPERIMENT[key], label="value")
        err = refused(site, "simulate", "--data", site / "data" / "h1", "--out", d / "run", "-q", "--set", f"{key}={value}")
        assert key.split(".")[-1] in err, err
    assert not (d / "run").exists()


# ----------------------------------------------------------------------------- odd paths

_NAME = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}", fullmatch=True)


def _odd_paths(site: Path, d: Path, name: str, blocker: Path, junk: Path, junk_png: Path) -> dict[str, list]:
    """Commands given a file where a folder belongs (or the reverse), missing, junk or existing paths."""
    s, w, img = site / "site", site / "wire", site / "data" / "h1" / "images"
    missing = d / "missing" / name
    return {
        "keygen under a file": ["client", "keygen", "--site-dir", blocker / name],
        "keygen at an existing key": ["client", "keygen", "--site-dir", s],
        "encode under a file": ["client", "encode", "--site-dir", s, "--data", img, "--out", blocker / name],
        "encode over a file": ["client", "encode", "--site-dir", s, "--data", img, "--out", blocker],
        "encode missing data": ["client", "encode", "--site-dir", s, "--data", missing, "--out", d / "q"],
        "encode from a file as site": ["client", "encode", "--site-dir", blocker, "--data", img, "--out", d / "q"],
        "encode from junk data": ["client", "encode", "--site-dir", s, "--data", junk, "--out", d / "q"],
        "decode junk reply": ["client", "decode", "--site-dir", s, "--reply", junk, "--cases", w / "q.cases.json", "--out", d / "p"],
        "decode a folder": ["client", "decode", "--site-dir", s, "--reply", d, "--cases", w / "q.cases.json", "--out", d / "p"],
        "decode missing reply": ["client", "decode", "--site-dir", s, "--reply", missing, "--out", d / "p"],
        "decode junk cases": ["client", "decode", "--site-dir", s, "--reply", w / "r", "--cases", junk, "--out", d / "p"],
        "decode into a file": ["client", "decode", "--site-dir", s, "--reply", w / "r", "--cases", w / "q.cases.json", "--out", blocker / name],
        "map junk query": ["server", "map", "--model", site / "server", "--query", junk, "--out", d / "r"],
        "map a folder": ["server", "map", "--model", site / "server", "--query", d, "--out", d / "r"],
        "map with a file as model": ["server", "map", "--model", blocker, "--query", w / "q", "--out", d / "r"],
        "map over a file": ["server", "map", "--model", site / "server", "--query", w / "q", "--out", blocker],
        "train on junk": ["server", "train", junk, "--out", d / "m", *MAP],
        "train on a missing message": ["server", "train", missing, "--out", d / "m", *MAP],
        "config junk": ["client", "train", "--site-dir", d / "s", "--data", site / "data" / "h1", "--name", "h1", "-q", "--config", junk],
        "config a folder": ["client", "train", "--site-dir", d / "s", "--data", site / "data" / "h1", "--name", "h1", "-q", "--config", d],
        "config missing": ["client", "train", "--site-dir", d / "s", "--data", site / "data" / "h1", "--name", "h1", "-q", "--config", missing],
        "certs under a file": ["certs", "init", "--out", blocker / name],
        "client certificate from a file as CA folder": ["certs", "issue-client", "h1", "--ca-dir", blocker],
        "predict into a file": ["predict", img / "site1_p01_s00.png", "--site-dir", s, "--model", site / "server", "--out", blocker / name],
        "predict a missing image": ["predict", missing, "--site-dir", s, "--model", site / "server", "--out", d / "p"],
        "predict junk": ["predict", junk, "--site-dir", s, "--model", site / "server", "--out", d / "p"],
        "rotate-key into a file": ["client", "rotate-key", "--site-dir", s, "--data", site / "data" / "h1", "--out", blocker / name],
        "rotate-key from missing data": ["client", "rotate-key", "--site-dir", s, "--data", missing, "--out", d / "k"],
        "refit into a file": ["server", "refit-adapters", "--model", site / "server", "--message", w / "h1.train", "--out", blocker / name],
        "refit from junk": ["server", "refit-adapters", "--model", site / "server", "--message", junk, "--out", d / "m"],
        "predict a damaged PNG": ["predict", junk_png, "--site-dir", s, "--model", site / "server", "--out", d / "p"],
        "encode a damaged PNG": ["client", "encode", "--site-dir", s, "--data", junk_png, "--out", d / "q"],
    }


ODD = sorted(_odd_paths(Path("r"), Path("d"), "n", Path("b"), Path("j"), Path("p")))


@pytest.mark.parametrize("case", ODD)
@settings(FAST, max_examples=2)
@given(data=st.data())
def test_odd_paths_are_one_error_line(site, scratch, case, data):
    d = scratch()
    name = data.draw(_NAME, label="name")
    blocker = data.draw(st.sampled_from([site / "afile", site / "wire" / "q", site / "site" / "site.json"]), label="a file")
    junk = d / f"{name}.junk"
    junk.write_bytes(data.draw(st.binary(max_size=64), label="junk bytes"))
    junk_png = d / f"{name}.png"
    junk_png.write_bytes(junk.read_bytes())
    refused(site, *_odd_paths(site, d, name, blocker, junk, junk_png)[case])


def test_usage_errors_are_one_error_line_too(site):
    for args in (["client", "train", "--size", "abc"], ["client", "train", "--site-dir", "x"], ["--bogus"],
                 ["client", "bogus"], ["client", "train", "-s", "x", "-d", "y", "-n", "z", "--seed", "-1"]):
        refused(site, *args, match="--help')")


def test_a_real_process_exits_2_with_one_line(site, scratch):
    """The same path outside CliRunner: the installed entry point's exit status and stderr."""
    d = scratch()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    before = digests(site)
    for args in (["client", "keygen", "--site-dir", str(site / "afile" / "x")],  # a traceback issue 17 listed
                 ["client", "train", "--site-dir", str(d / "s"), "--size", "abc"]):  # click's own exit path
        p = subprocess.run([sys.executable, "-m", "ppcmi.cli", *args], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "Traceback" not in p.stderr + p.stdout
    assert digests(site) == before


# ----------------------------------------------------------------------------- damaged records and weights

_POOL = [None, True, 0, -1, 1.5, "x", "", [], [1], {}, {"a": 1}]
_NO = lambda v: False  # noqa: E731  (no value of the pool is valid there)
_STR = lambda v: isinstance(v, str)  # noqa: E731  (a string may be another valid value: never drawn for a string field)
_DICT = lambda v: isinstance(v, dict)  # noqa: E731
# per record: the fields it reads, whether it must hold them, and which values of _POOL would still be valid there
# (a topology field left out takes its default, and then the weights beside it are what refuses: not drawn here)
RECORDS: dict[str, dict[tuple, tuple[bool, Callable[[object], bool]]]] = {
    "site/site.json": {("site",): (True, _STR), ("n_classes",): (True, _NO), ("labels",): (True, _DICT), ("data",): (True, _DICT),
                       ("labels", "values"): (True, _NO), ("labels", "names"): (True, lambda v: v == []),
                       ("data", "size"): (False, _NO), ("in_channels",): (False, _NO)},
    "site/image_ae/config.json": {("autoencoder",): (True, _DICT), ("autoencoder", "width"): (False, lambda v: v == 1.5)},
    "site/mask_ae/config.json": {("autoencoder",): (True, _DICT), ("autoencoder", "in_channels"): (True, _NO)},
    "wire/q.cases.json": {("kind",): (True, _NO), ("site",): (True, _STR), ("query",): (True, _STR), ("key",): (True, _STR),
                          ("cases",): (True, _NO), ("cases", 0): (True, _NO), ("cases", 0, "original_shape"): (True, _NO),
                          ("cases", 0, "source"): (True, _STR), ("cases", 0, "format"): (True, _NO),
                          ("cases", 0, "stem"): (True, _STR)},
    "server/config.json": {("mapping",): (True, _DICT), ("clients",): (True, _NO), ("image_shapes",): (True, _NO),
                           ("mask_shapes",): (True, _NO), ("mapping", "widen"): (False, _NO),
                           ("mapping", "dropout"): (False, lambda v: v == 0)},
    "server/train/state.json": {("epoch",): (True, _NO), ("history",): (True, _NO), ("best_epoch",): (True, lambda v: v == 0),
                                ("files",): (True, _NO)},
    "site/image_ae/train/state.json": {("epoch",): (True, _NO), ("history",): (True, _NO), ("files",): (True, _NO)},
}
WEIGHTS = ["site/image_ae/model.safetensors", "site/mask_ae/model.safetensors", "server/mapping.safetensors",
           "server/train/last-1.safetensors", "site/image_ae/train/last-1.safetensors"]


def _reader(site: Path, d: Path, rel: str) -> list[object]:
    """The command that reads ``rel`` in the copy ``d``."""
    if rel.startswith("server/train/"):
        return ["server", "train", d / "wire" / "h1.train", "--out", d / "server", "--resume", "-q", *MAP]
    if rel.startswith("site/image_ae/train/"):
        return ["client", "train", "--site-dir", d / "site", "--data", site / "data" / "h1", "--name", "h1", "--resume", "-q", *AE,
                "--set", f"data.group_csv={site / 'data' / 'h1' / 'groups.csv'}"]
    if rel.startswith("server/"):
        return ["server", "map", "--model", d / "server", "--query", d / "wire" / "q", "--out", d / "r2"]
    return ["client", "decode", "--site-dir", d / "site", "--reply", d / "wire" / "r", "--cases", d / "wire" / "q.cases.json",
            "--out", d / "pred"]


def _copy(site: Path, d: Path, rel: str) -> Path:
    """A fresh copy of the run's site, server and wire folders in ``d``; returns the path of ``rel`` in it."""
    for sub in ("site", "server", "wire"):
        shutil.copytree(site / sub, d / sub)
    return d / rel


@pytest.mark.parametrize("rel", sorted(RECORDS))
@settings(FAST, max_examples=3)
@given(data=st.data())
def test_truncated_or_junk_records_are_one_error_line(site, scratch, rel, data):
    d = scratch()
    p = _copy(site, d, rel)
    text = p.read_text()
    if data.draw(st.booleans(), label="truncate"):
        p.write_text(text[:data.draw(st.integers(0, len(text.rstrip()) - 1), label="keep")])
    else:
        p.write_bytes(data.draw(st.binary(max_size=40).filter(lambda b: b.strip() != text.encode().strip()), label="bytes"))
    refused(site, *_reader(site, d, rel), match=Path(rel).name)


_DROP = "(field removed)"
FIELDS = [(rel, f) for rel in sorted(RECORDS) for f in RECORDS[rel]]


@pytest.mark.parametrize("rel,field", FIELDS, ids=[f"{r}:{'.'.join(map(str, f))}" for r, f in FIELDS])
@settings(FAST, max_examples=2)
@given(data=st.data())
def test_a_record_missing_a_field_or_holding_a_wrong_value(site, scratch, rel, field, data):
    required, valid = RECORDS[rel][field]
    value = data.draw(st.sampled_from(([_DROP] if required else []) + [v for v in _POOL if not valid(v)]), label="value")
    d = scratch()
    p = _copy(site, d, rel)
    rec = json.loads(p.read_text())
    node = rec
    for k in field[:-1]:
        node = node[k]
    if value == _DROP:
        del node[field[-1]]
    else:
        node[field[-1]] = value
    p.write_text(json.dumps(rec))
    refused(site, *_reader(site, d, rel), match=Path(rel).name)


@pytest.mark.parametrize("rel", WEIGHTS)
@settings(FAST, max_examples=4)
@given(data=st.data())
def test_damaged_weights_are_one_error_line(site, scratch, rel, data):
    d = scratch()
    p = _copy(site, d, rel)
    blob = p.read_bytes()
    if data.draw(st.booleans(), label="truncate") or "/train/" not in rel:
        p.write_bytes(blob[:data.draw(st.integers(0, len(blob) - 1), label="keep")])
    else:  # a file the training manifest names, with one byte changed: its SHA-256 no longer matches
        i = data.draw(st.integers(0, len(blob) - 1), label="byte")
        p.write_bytes(blob[:i] + bytes([blob[i] ^ 0x5A]) + blob[i + 1:])
    err = refused(site, *_reader(site, d, rel))
    assert Path(rel).name in err, err


_LABELS = st.one_of(
    st.lists(st.integers(-2**70, 2**70), min_size=2, max_size=4).filter(lambda v: any(abs(x) >= 2**31 for x in v)),  # too large
    st.lists(st.integers(0, 9), min_size=2, max_size=4).filter(lambda v: len(set(v)) < len(v)),  # repeated
    st.integers(0, 9).map(lambda v: [v]),  # background only
).map(lambda v: ",".join(map(str, v))) | _text()


@settings(FAST, max_examples=10)
@given(labels=_LABELS)
def test_label_options_are_checked(site, scratch, labels):
    d = scratch()
    refused(site, "client", "train", "--site-dir", site / "site", "--data", site / "data" / "h1", "--name", "h1", "-q",
            "--labels", labels, *AE, match="labels")
    assert not any(d.iterdir())
