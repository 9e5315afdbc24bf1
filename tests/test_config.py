"""Typed YAML configs: presets load, unknown keys fail with a suggestion, overrides coerce."""

import pytest

from brpg.config import (
    Config,
    ConfigError,
    config_from_dict,
    list_presets,
    load_config,
    save_config,
)


def test_every_preset_loads():
    names = list_presets()
    assert "digits_suponly_1_16" in names and "digits_suponly_full" in names
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.name == name, f"preset {name} should set name: {name}"


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes'.*'steps'"):
        config_from_dict({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*'optim'"):
        config_from_dict({"optimizer": {}})


def test_type_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        config_from_dict({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"data\.hflip: expected true/false"):
        config_from_dict({"data": {"hflip": "yes"}})
    with pytest.raises(ConfigError, match=r"data\.scale_range: expected 2 values"):
        config_from_dict({"data": {"scale_range": [0.5]}})


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(
        "digits_suponly_1_16", ["train.steps=7", "optim.lr=0.5", "model.aspp_rates=[1, 2]"]
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.aspp_rates == (1, 2)
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("digits_suponly_1_16", ["train.steps"])


def test_missing_preset_suggests(tmp_path):
    with pytest.raises(ConfigError, match="digits_suponly_1_16"):
        load_config("digits_suponly_1_61")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: digits_suponly_1_16\nname: child\ntrain:\n  steps: 3\n")
    cfg = load_config(child)
    parent = load_config("digits_suponly_1_16")
    assert cfg.train.steps == 3 and cfg.name == "child"
    assert cfg.model == parent.model and cfg.train.batch_size == parent.train.batch_size
