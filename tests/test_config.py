import pytest

from dataclasses import replace

from ppcmi.config import CONFIG_VERSION, Config, from_dict, load_config, to_dict
from ppcmi.errors import ConfigError, DataError


def test_defaults_and_round_trip():
    c = load_config()
    assert c == Config()
    assert from_dict(to_dict(c)) == c


def test_saved_configs_keep_the_settings_they_ran_with():
    """A run saved before versions (version 1) had no mapping.adapter_init and ran with identity adapters, and
    carried data.val_frac, which nothing read; a fresh config gets the canonical frames and its version."""
    raw = to_dict(Config())
    assert raw["version"] == CONFIG_VERSION and raw["mapping"]["adapter_init"] == "pca"
    old = {k: v for k, v in raw.items() if k != "version"}
    old["mapping"] = {k: v for k, v in raw["mapping"].items() if k != "adapter_init"}
    old["data"] = {**raw["data"], "val_frac": 0.3}
    assert from_dict(old).mapping.adapter_init == "identity"
    assert from_dict(old) == Config(mapping=replace(Config().mapping, adapter_init="identity"))
    assert "adapter_init" not in old["mapping"] and old["data"]["val_frac"] == 0.3  # the caller's dict is left alone
    assert load_config().mapping.adapter_init == "pca"
    with pytest.raises(ConfigError, match="version"):
        from_dict({**raw, "version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="val_frac"):  # version 2 has no data.val_frac
        from_dict({**raw, "data": {**raw["data"], "val_frac": 0.3}})


def test_runs_before_version_3_squashed_and_eval_size_is_retired(caplog):
    """Configs of versions 1 and 2 squashed every plane to size x size and may carry data.eval_size (a scoring
    size); they read back as data.resize = "squash" without it, while a fresh config pads and naming
    data.eval_size anywhere is refused with the reason."""
    raw = to_dict(Config())
    assert CONFIG_VERSION >= 3 and raw["data"]["resize"] == "pad" and "eval_size" not in raw["data"]
    old = {**raw, "version": 2, "data": {k: v for k, v in raw["data"].items() if k != "resize"}}
    assert from_dict(old).data.resize == "squash" and from_dict(old) == Config(data=replace(Config().data, resize="squash"))
    assert from_dict({**old, "data": {**old["data"], "eval_size": None}}).data.resize == "squash"
    with caplog.at_level("WARNING", logger="ppcmi.config"):
        assert from_dict({**old, "data": {**old["data"], "eval_size": 256}}) == from_dict(old)
    assert "data.eval_size of a version 2 configuration ignored" in caplog.text and "native resolution" in caplog.text
    assert from_dict({**old, "data": {**old["data"], "resize": "pad"}}).data.resize == "pad"  # recorded: kept
    for bad in (lambda: load_config(None, ["data.eval_size=256"]),
                lambda: from_dict({**raw, "data": {**raw["data"], "eval_size": 256}})):
        with pytest.raises(ConfigError, match="data.eval_size is retired in config version 3: test cases are scored at their native"):
            bad()
    with pytest.raises(DataError, match="data.resize: must be pad or squash, got 'stretch'"):
        load_config(None, ["data.resize=stretch"])


def test_a_version_3_config_has_no_target_spacing_and_keeps_its_central_crop():
    """Version 3 had neither data.spacing nor data.roi: its planes were fitted by pixels and kept the central
    data.crop; it reads back so, and a value a later default might give is not put in its place."""
    raw = to_dict(Config())
    assert CONFIG_VERSION == 5 and raw["data"]["spacing"] is None and raw["data"]["roi"] is None
    v3 = {**raw, "version": 3, "data": {k: v for k, v in raw["data"].items() if k not in ("spacing", "roi")}}
    v3["data"]["crop"] = 0.375
    cfg = from_dict(v3)
    assert cfg.data.spacing is None and cfg.data.roi is None and cfg.data.crop == 0.375 and cfg.data.resize == "pad"
    assert "spacing" not in v3["data"]  # the caller's dict is left alone
    with pytest.raises(ConfigError, match="unknown key"):  # a version-3 file cannot have known a later key it lacks
        from_dict({**v3, "data": {**v3["data"], "bogus": 1}})


def test_a_version_4_config_shared_its_federated_cores_normalisation_layers():
    """Before version 5 a federated core averaged its normalisation layers with the rest; such a run reads back as
    "shared", while a new configuration keeps them at each hospital (FedBN) unless told otherwise."""
    raw = to_dict(Config())
    assert raw["mapping"]["federated_norm"] == "local"
    v4 = {**raw, "version": 4, "mapping": {k: v for k, v in raw["mapping"].items() if k != "federated_norm"}}
    assert from_dict(v4).mapping.federated_norm == "shared"
    assert from_dict({**v4, "mapping": {**v4["mapping"], "federated_norm": "local"}}).mapping.federated_norm == "local"
    with pytest.raises(ConfigError, match="mapping.federated_norm: must be one of local, shared, got 'global'"):
        load_config(None, ["mapping.federated_norm=global"])


def test_target_spacing_and_roi_are_checked_in_one_line():
    c = load_config(None, ["data.spacing=0.5,1.0", "data.roi=0.1,0.6,0.5,1.0"])
    assert c.data.spacing == (0.5, 1.0) and c.data.roi == (0.1, 0.6, 0.5, 1.0)
    assert from_dict(to_dict(c)) == c and load_config(None, ["data.spacing=None"]).data.spacing is None
    for ov, msg in [("data.spacing=0,1", r"data.spacing: must be a finite number in \(0, inf\) \(mm per pixel"),
                    ("data.spacing=1,nan", r"data.spacing: must be a finite number"),
                    ("data.roi=0.6,0.1,0,1", r"data.roi: need 0 <= top < bottom <= 1"),
                    ("data.roi=0,1,0,1.5", r"data.roi: must be a finite number in \[0, 1\]"),
                    ("data.crop=0.5", r"data.roi and data.crop: both set .*set one")]:
        with pytest.raises(DataError, match=msg):
            load_config(None, ["data.roi=0,0.5,0,0.5", ov] if "crop" in ov else [ov])
    with pytest.raises(DataError, match="data.spacing: a target spacing needs data.resize = pad, got 'squash'"):
        load_config(None, ["data.spacing=1,1", "data.resize=squash"])


def test_a_toml_naming_a_retired_setting_says_why(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[data]\neval_size = 256\n")
    with pytest.raises(ConfigError, match=r"run.toml:data: data.eval_size is retired in config version 3"):
        load_config(p)


def test_every_setting_has_one_reader_and_hospital_settings_never_cross():
    from ppcmi.config import EXPERIMENT, HOSPITAL, reader, setting_names, shared_settings

    names = setting_names()
    assert set(HOSPITAL) <= set(names) and set(EXPERIMENT) <= set(names) and not set(HOSPITAL) & set(EXPERIMENT)
    assert reader("data.group_csv") == "hospital" and reader("clients") == "experiment" and reader("mapping.lr") == "shared"
    shared = shared_settings(Config())
    flat = {f"{s}.{k}" if isinstance(v, dict) else s for s, v in shared.items() for k in (v if isinstance(v, dict) else [s])}
    assert flat == {n for n in names if reader(n) == "shared"}
    assert "send_noise" not in shared["autoencoder"] and "group_regex" not in shared["data"] and "clients" not in shared


def test_toml_and_typed_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('seed = 3\n[data]\nsize = 128\nwindow = [-1000, 1000]\n[autoencoder]\nskips = false\n')
    c = load_config(p, ["autoencoder.epochs=7", "mapping.widen=8,16,32", "data.labels=0,1,2", "klt=false"])
    assert c.seed == 3 and c.data.size == 128 and c.data.window == (-1000.0, 1000.0)
    assert c.autoencoder.skips is False and c.autoencoder.epochs == 7
    assert c.mapping.widen == (8, 16, 32) and c.data.labels == "0,1,2" and c.klt is False


@pytest.mark.parametrize("text, msg", [
    ("[data]\nsize = 128\nbogus = 1\n", "bogus"),
    ("[nosuch]\nx = 1\n", "nosuch"),
    ("[autoencoder]\nepochs = 'many'\n", "autoencoder.epochs"),
    ("[data]\nsize = [", "invalid TOML"),
])
def test_bad_files_are_rejected(tmp_path, text, msg):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_config(p)


@pytest.mark.parametrize("ov, msg", [("autoencoder.epochs=1.5", "integer"), ("data.nope=1", "nope"), ("noequals", "section.key=value"),
                                     ("autoencoder.skips=maybe", "true or false"), ("mapping.widen=1,2", "3 comma")])
def test_bad_overrides(ov, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [ov])


def test_rois_are_a_shared_setting_of_comma_separated_names():
    from ppcmi.config import reader, shared_settings

    assert reader("data.rois") == "shared" and Config().data.roi_names() is None
    c = load_config(None, ["data.rois=GTV-1, Lung (L),Spinal-Cord"])
    assert c.data.roi_names() == ("GTV-1", "Lung (L)", "Spinal-Cord")  # in class order, as given
    assert shared_settings(c)["data"]["rois"] == "GTV-1, Lung (L),Spinal-Cord"
    assert from_dict(to_dict(c)) == c
    for bad, msg in (("Body,,Cord", "none empty"), ("Body,Cord, Body", "each ROI may be named once")):
        with pytest.raises(ConfigError, match=f"^data.rois: .*{msg}"):
            load_config(None, [f"data.rois={bad}"])
