"""Typed YAML configs: presets load, unknown keys fail with a suggestion, overrides coerce.

Machine: exact. Configs, their messages and their hash.
"""

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
    # the suggestion itself, not only the list of presets that also names it
    with pytest.raises(ConfigError, match=r"Did you mean 'digits_suponly_1_16'\?"):
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


# -- coercion of every annotated type (mutation triage, issue 18) -----------------------------
def test_yaml_numbers_are_coerced_to_the_annotated_type():
    # YAML writes 2.0 for a float that a script computed; as an int field it is the integer 2
    cfg = config_from_dict(
        {"train": {"steps": 2.0}, "optim": {"lr": 1}, "model": {"aspp_rates": [6.0, 12]}}
    )
    assert cfg.train.steps == 2 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.model.aspp_rates == (6, 12) and all(type(r) is int for r in cfg.model.aspp_rates)


@pytest.mark.parametrize(
    ("data", "message"),
    [  # each message names the full key path, what was expected and the value it got
        ({"train": {"steps": 2.5}}, r"^train\.steps: expected an integer, got 2\.5$"),
        ({"train": {"steps": True}}, r"^train\.steps: expected an integer, got True$"),
        ({"optim": {"lr": "fast"}}, r"^optim\.lr: expected a number, got 'fast'$"),
        ({"optim": {"lr": True}}, r"^optim\.lr: expected a number, got True$"),
        ({"data": {"name": 5}}, r"^data\.name: expected a string, got 5$"),
        ({"data": {"scale_range": 0.5}}, r"^data\.scale_range: expected a list, got 0\.5$"),
        ({"data": {"scale_range": [0.5, "x"]}}, r"^data\.scale_range: expected a number"),
        ({"model": {"aspp_rates": [6, "x"]}}, r"^model\.aspp_rates: expected an integer"),
        ({"data": {"digits_knobs": 5}}, r"^data\.digits_knobs: expected a mapping, got 5$"),
        ({"model": {"pretrained": 5}}, r"^model\.pretrained: expected a string, got 5$"),
        ({"model": 5}, r"^model: expected a mapping, got 5$"),
        (
            {"train": {"framework": "fixmatch"}},
            r"^train\.framework='fixmatch' is not one of: suponly, meanteacher, unimatch$",
        ),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_and_the_expected_type(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_yaml_off_means_off_for_a_choice_that_has_it():
    """`--set train.amp=off` is what a user types; YAML reads the unquoted word as False."""
    assert load_config("digits_brpg_1_8", ["train.amp=off"]).train.amp == "off"
    assert load_config("digits_brpg_1_8", ["train.amp=no"]).train.amp == "off"
    assert load_config("digits_brpg_1_8", ['train.amp="off"']).train.amp == "off"
    assert config_from_dict({"train": {"amp": False}}).train.amp == "off"
    # `on` has no meaning here: the error lists the choices and says why it saw True
    with pytest.raises(ConfigError, match=r"^train\.amp=True is not one of: auto, off, bf16, fp16 "
                       r"\(YAML reads an unquoted on/off, yes/no, true/false as a boolean\)$"):  # fmt: skip
        load_config("digits_brpg_1_8", ["train.amp=on"])
    # a choice without `off` does not turn False into a word
    with pytest.raises(ConfigError, match=r"^train\.framework=False is not one of"):
        config_from_dict({"train": {"framework": False}})
    with pytest.raises(
        ConfigError, match=r"^train\.amp='fp8' is not one of: auto, off, bf16, fp16$"
    ):
        config_from_dict({"train": {"amp": "fp8"}})


def test_optional_path_keeps_a_string_and_accepts_null():
    assert config_from_dict({"model": {"pretrained": "r50.pth"}}).model.pretrained == "r50.pth"
    assert config_from_dict({"model": {"pretrained": None}}).model.pretrained is None


def test_an_empty_yaml_section_means_the_defaults(tmp_path):
    # "train:" with every line commented out is None in YAML, not an error
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\nsemi:\n")
    cfg = load_config(path)
    assert cfg.train == C.TrainConfig() and cfg.semi == C.SemiConfig()


def test_a_yaml_file_whose_top_level_is_not_a_mapping_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- train\n- steps\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: the top level must be a mapping"):
        load_config(path)


def test_a_far_fetched_key_still_gets_the_closest_suggestion():
    # 'epochs' is below difflib's default similarity cutoff; the suggestion must still come
    with pytest.raises(ConfigError, match=r"'train\.epochs'\. Did you mean 'steps'\?$"):
        config_from_dict({"train": {"epochs": 3}})


# -- presets and base: chains ------------------------------------------------------------------
@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    d = tmp_path / "presets"
    d.mkdir()
    monkeypatch.setattr(C, "PRESET_DIR", d)
    monkeypatch.chdir(tmp_path)  # no file in the working directory shadows a preset name
    return d


def test_a_missing_preset_suggests_the_closest_and_lists_the_presets(preset_dir):
    for name in ("alpha", "beta", "_shared"):  # _shared is a base, not a preset
        (preset_dir / f"{name}.yaml").write_text(f"name: {name}\n")
    assert load_config("beta").name == "beta"
    with pytest.raises(
        ConfigError,
        match=r"^no preset or file named 'alpah'\. Did you mean 'alpha'\? Presets: alpha, beta$",
    ):
        load_config("alpah")


def test_a_missing_preset_without_any_preset_is_a_config_error(preset_dir):
    with pytest.raises(ConfigError, match=r"^no preset or file named 'alpha'\. Presets: $"):
        load_config("alpha")


def test_a_circular_base_chain_is_an_error_not_a_recursion(preset_dir):
    (preset_dir / "a.yaml").write_text("base: b\n")
    (preset_dir / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match=r"circular 'base:' chain through .*a\.yaml"):
        load_config("a")


# -- overrides ---------------------------------------------------------------------------------
def test_an_override_value_may_contain_an_equals_sign():
    assert load_config("digits_suponly_1_16", ["name=lr=0.1"]).name == "lr=0.1"


def test_an_override_reaches_into_a_nested_mapping():
    cfg = load_config("digits_suponly_1_16", ["data.digits_knobs.noise_std=0.1"])
    assert cfg.data.digits_knobs == {"noise_std": 0.1}


def test_an_override_through_a_value_names_the_key_that_is_not_a_section():
    with pytest.raises(ConfigError, match=r"^override 'train\.steps\.x=1': 'steps' is not a"):
        load_config("digits_suponly_1_16", ["train.steps.x=1"])


def test_saved_config_keeps_the_field_order(tmp_path):
    # config.yaml of a run is read by people: name first, then the sections as documented
    path = tmp_path / "c.yaml"
    save_config(Config(), path)
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == [f.name for f in dataclasses.fields(Config)]
    assert list(saved["train"]) == [f.name for f in dataclasses.fields(C.TrainConfig)]


# -- hash ---------------------------------------------------------------------------------------
def test_hash_is_short_hex_sensitive_and_independent_of_mapping_order():
    h = Config().hash()
    assert len(h) == 12 and int(h, 16) >= 0
    assert config_from_dict({"train": {"steps": 999}}).hash() != h
    a = config_from_dict({"data": {"digits_knobs": {"noise_std": 0.1, "occlusion": 0.3}}})
    b = config_from_dict({"data": {"digits_knobs": {"occlusion": 0.3, "noise_std": 0.1}}})
    assert a == b and a.hash() == b.hash()  # equal configs, one provenance hash


# -- Range.__str__ and range messages -----------------------------------------------------------
def test_range_str_of_every_shape():
    assert str(C.Range()) == ""
    assert str(C.Range(0, lo_open=True)) == "> 0"
    assert str(C.Range(0, 1, lo_open=True)) == "in (0, 1]"
    assert str(C.Range(hi=5, lo_open=True, hi_open=True)) == "in (-inf, 5)"


def test_a_range_message_ends_with_its_hint_or_with_the_range():
    with pytest.raises(ConfigError, match=r"^train\.batch_size=0 must be >= 1$"):
        load_config("digits_suponly_1_16", ["train.batch_size=0"])
    with pytest.raises(
        ConfigError, match=r"^train\.steps=0 must be >= 1 \(optimiser steps of the run\)$"
    ):
        load_config("digits_suponly_1_16", ["train.steps=0"])


def test_equal_bounds_are_allowed():
    # a fixed scale (no random rescaling) and a fixed class-specific threshold are valid
    cfg = load_config(
        "digits_suponly_1_16",
        ["data.scale_range=[1.0, 1.0]", "proto.csp_min=0.7", "proto.csp_max=0.7"],
    )
    assert cfg.data.scale_range == (1.0, 1.0) and cfg.proto.csp_min == cfg.proto.csp_max == 0.7


# -- validate(): the combinations of frameworks and options ------------------------------------
UNIMATCH = ["train.framework=unimatch"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["train.brpg=true"],
            r"^train\.brpg=true needs a semi-supervised framework: set"
            r" train\.framework=meanteacher or train\.framework=unimatch$",
        ),
        (
            UNIMATCH,
            r"^train\.framework=unimatch with semi\.unimatch_teacher=self has no EMA teacher to"
            r" evaluate: set semi\.eval_model=student \(or semi\.unimatch_teacher=ema\)$",
        ),
        (
            [*UNIMATCH, "semi.unimatch_teacher=ema"],
            r"^semi\.unimatch_teacher=ema needs semi\.ema_buffers=true",
        ),
        (
            [
                "train.framework=meanteacher",
                "train.brpg=true",
                "semi.sup_only_steps=5",
                "proto.sample_start_step=3",
            ],
            r"^proto\.sample_start_step=3 comes before the end of the warm-up"
            r" \(semi\.sup_only_steps=5\).*; set proto\.sample_start_step >= semi\.sup_only_steps$",
        ),
        (
            [
                "train.framework=meanteacher",
                "train.brpg=true",
                "proto.back_queue=true",
                "proto.memory=random",
            ],
            r"^proto\.back_queue needs proto\.memory=cpg",
        ),
    ],
)
def test_inconsistent_options_name_the_keys_and_the_fix(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits_suponly_1_16", sets)


@pytest.mark.parametrize(
    "sets",
    [
        [*UNIMATCH, "semi.eval_model=student"],
        # the EMA teacher exists, so it may be the evaluated model
        [*UNIMATCH, "semi.unimatch_teacher=ema", "semi.ema_buffers=true"],
        [
            "train.framework=meanteacher",
            "train.brpg=true",
            "semi.sup_only_steps=5",
            "proto.sample_start_step=5",
            "proto.back_queue=true",
        ],
    ],
)
def test_consistent_options_load(sets):
    load_config("digits_suponly_1_16", sets)


# -- legacy keys: semi.framework alone, warning text and location ------------------------------
@pytest.mark.parametrize(
    ("data", "framework", "brpg"),
    [
        # a hand-written old file: semi.framework without train.method (a supervised run)
        ({"semi": {"framework": "meanteacher"}}, "suponly", False),
        # the new train.framework beside the old semi.framework: a semi run of that framework
        (
            {
                "train": {"framework": "unimatch"},
                "semi": {"framework": "unimatch", "eval_model": "student"},
            },
            "unimatch",
            False,
        ),
        # an old mean-teacher run's config.yaml dumps both keys with the same value
        (
            {"train": {"method": "meanteacher"}, "semi": {"framework": "meanteacher"}},
            "meanteacher",
            False,
        ),
        # train.method=semi without semi.framework keeps a new train.framework
        (
            {
                "train": {"method": "semi", "framework": "unimatch"},
                "semi": {"eval_model": "student"},
            },
            "unimatch",
            False,
        ),
    ],
)
def test_old_keys_are_translated(data, framework, brpg):
    with pytest.warns(C.ConfigWarning):
        cfg = config_from_dict(data)
    assert (cfg.train.framework, cfg.train.brpg) == (framework, brpg)


def test_old_method_warning_names_only_the_keys_that_were_written():
    with pytest.warns(C.ConfigWarning) as record:
        config_from_dict({"train": {"method": "brpg"}})
    assert str(record[0].message) == (
        "train.method=brpg are old config keys, read as train.framework=meanteacher,"
        " train.brpg=true: write these instead"
    )


# mutmut routes every call through a trampoline (extra stack frames), so there the stacklevel
# cannot point at this file; the check runs in the ordinary suite
@pytest.mark.skipif(
    any("__mutmut_" in name for name in dir(C)), reason="mutmut trampolines add stack frames"
)
def test_old_key_warning_points_at_the_callers_line():
    with pytest.warns(C.ConfigWarning) as record:
        config_from_dict({"train": {"method": "brpg"}})
    assert record[0].filename == __file__


def test_bad_old_method_values_name_the_fix():
    with pytest.raises(
        ConfigError,
        match=r"; use train\.framework \(suponly \| meanteacher \| unimatch\) and train\.brpg"
        r" \(true \| false\)$",
    ):
        config_from_dict({"train": {"method": "fixmatch"}})
    # a contradiction of the two old keys, not a later validate() error
    with pytest.raises(
        ConfigError, match=r"^train\.method=meanteacher with semi\.framework='unimatch': write"
    ):
        config_from_dict(
            {
                "train": {"method": "meanteacher"},
                "semi": {"framework": "unimatch", "eval_model": "student"},
            }
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": 5}, "train: expected a mapping, got 5"),
        ({"semi": ["method"]}, r"semi: expected a mapping, got \['method'\]"),
        ([1, 2], r"config: expected a mapping of sections, got \[1, 2\]"),
        (None, "config: expected a mapping of sections, got None"),
    ],
)
def test_a_section_that_is_not_a_mapping_is_a_config_error(data, message):
    """Not a TypeError from the legacy-key translation (found while triaging mutants)."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
