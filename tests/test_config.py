import pytest

from ppcmi.config import Config, load_config, to_dict, from_dict
from ppcmi.errors import ConfigError


def test_defaults_and_round_trip():
    c = load_config()
    assert c == Config()
    assert from_dict(to_dict(c)) == c


def test_saved_configs_keep_the_settings_they_ran_with():
    """A run saved before mapping.adapter_init existed ran with identity adapters; a fresh config gets the
    canonical frames."""
    raw = to_dict(Config())
    assert raw["mapping"]["adapter_init"] == "pca"
    del raw["mapping"]["adapter_init"]
    assert from_dict(raw).mapping.adapter_init == "identity"
    assert "adapter_init" not in raw["mapping"]  # the caller's dict is left alone
    assert load_config().mapping.adapter_init == "pca"


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
