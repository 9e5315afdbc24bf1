"""Typed YAML configs: presets load, unknown keys fail with a suggestion, overrides coerce."""

import dataclasses
import typing
import warnings

import pytest
import yaml

from brpg import config as C
from brpg.cli import main as cli_main
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


@pytest.mark.parametrize(
    "override,message",
    [  # the key, the value and the allowed range are in the message
        ("train.steps=-5", "train.steps=-5 must be >= 1"),
        ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
        ("proto.tau=0", "proto.tau=0.0 must be > 0"),
        ("proto.high_threshold=1.5", r"proto.high_threshold=1.5 must be in \[0, 1\]"),
        ("proto.ema_momentum=1", r"proto.ema_momentum=1.0 must be in \[0, 1\)"),
        ("semi.ema_decay=-0.1", r"semi.ema_decay=-0.1 must be in \[0, 1\)"),
        ("semi.drop_percent=120", r"semi.drop_percent=120.0 must be in \[0, 100\]"),
        ("data.crop_size=0", "data.crop_size=0 must be >= 1"),
        ("proto.queue_len=0", "proto.queue_len=0 must be >= 1"),
        ("loss.ohem_thresh=2", r"loss.ohem_thresh=2.0 must be in \[0, 1\]"),
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("eval.stride=0", "eval.stride=0 must be >= 1"),
        ("data.std=[0.2, 0, 0.2]", r"data.std=\[0.2, 0.0, 0.2\]: every value must be > 0"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas=\[0.9, 1.0\]: every value must be in \[0, 1\)"),
        ("data.scale_range=[2.0, 0.5]", "the minimum comes first"),
        ("model.output_stride=32", "model.output_stride=32 is not one of: 8, 16"),
    ],
)
def test_out_of_range_values_are_errors_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits_suponly_1_16", [override])
    with pytest.raises(ConfigError, match=r"proto.csp_min=0.5 must be <= proto.csp_max=0.4"):
        load_config("digits_suponly_1_16", ["proto.csp_min=0.5", "proto.csp_max=0.4"])


def test_range_boundaries_are_accepted():
    sets = ["proto.tau=0.000001", "semi.drop_percent=100", "proto.ema_momentum=0",
            "proto.high_threshold=1", "train.eval_every=0", "loss.ohem_min_kept=0",
            "semi.cutmix_p=1", "train.steps=1"]  # fmt: skip
    cfg = load_config("digits_suponly_1_16", sets)
    assert (cfg.proto.tau, cfg.semi.drop_percent, cfg.train.steps) == (0.000001, 100.0, 1)


def test_every_numeric_field_has_a_range():
    """A new int/float field must get a range in ``_RANGES`` (or a reason in ``_UNRANGED``)."""

    def numeric(tp) -> bool:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if typing.get_origin(tp) is tuple:
            return all(numeric(a) for a in args)
        return tp in (int, float)

    fields = set()
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        fields |= {f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                   if numeric(hints[f.name])}  # fmt: skip
    assert fields, "no numeric fields found"
    missing = sorted(fields - C._RANGES.keys() - C._UNRANGED.keys())
    assert missing == [], f"numeric config fields without a range: {missing}"
    assert not (C._RANGES.keys() - fields), "a range names a field that does not exist"


def test_cli_reports_a_range_error_without_a_traceback(tmp_path, capsys):
    args = ["train", "--config", "digits_suponly_1_16", "--out", str(tmp_path / "run")]
    assert cli_main([*args, "--set", "train.steps=-5"]) == 2
    assert "train.steps=-5 must be >= 1" in capsys.readouterr().err


# -- train.method (before issue 14) -> train.framework + train.brpg ---------------------------
@pytest.mark.parametrize(
    ("old", "framework", "brpg"),
    [
        (["train.method=suponly"], "suponly", False),
        (["train.method=meanteacher"], "meanteacher", False),
        (["train.method=semi"], "meanteacher", False),
        (["train.method=brpg"], "meanteacher", True),
        (
            ["train.method=semi", "semi.framework=unimatch", "semi.eval_model=student"],
            "unimatch",
            False,
        ),
        (
            ["train.method=brpg", "semi.framework=unimatch", "semi.eval_model=student"],
            "unimatch",
            True,
        ),
    ],
)
def test_old_method_key_is_translated_with_a_warning_naming_the_new_keys(old, framework, brpg):
    with pytest.warns(C.ConfigWarning, match="train.framework=.*train.brpg=.*write these"):
        cfg = C.load_config("digits_suponly_1_16", [*old, "model.rep_head=true"])
    assert (cfg.train.framework, cfg.train.brpg) == (framework, brpg)


def test_old_keys_in_a_yaml_file_load_with_the_warning(tmp_path):
    """A run directory's config.yaml (or a preset) written before issue 14 still loads."""
    old = C.load_config("digits_unimatch_brpg_1_16").to_dict()
    del old["train"]["framework"], old["train"]["brpg"], old["train"]["tensorboard"]
    old["train"]["method"], old["semi"]["framework"] = "brpg", "unimatch"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.warns(C.ConfigWarning, match="train.method=brpg, semi.framework=unimatch"):
        cfg = C.load_config(path)
    assert cfg == C.load_config("digits_unimatch_brpg_1_16")


def test_bad_old_method_values_name_the_new_keys():
    with pytest.raises(C.ConfigError, match="train.framework .*train.brpg"):
        C.load_config("digits_suponly_1_16", ["train.method=fixmatch"])
    with pytest.raises(C.ConfigError, match="train.framework=unimatch"):
        C.load_config(
            "digits_suponly_1_16", ["train.method=meanteacher", "semi.framework=unimatch"]
        )


def test_presets_use_the_new_keys_only():
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.ConfigWarning)
        for name in C.list_presets():
            C.load_config(name)
