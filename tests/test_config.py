import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT
from hw7qa.config import AT_LEAST_0, AT_LEAST_1, CHOICES, Config, apply_overrides, load_config, save_config


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.json")))
def test_every_preset_loads_and_says_what_it_is_for(preset):
    raw = json.loads((ROOT / "configs" / preset).read_text(encoding="utf-8"))
    assert raw["_what"]
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.model_name == raw["model_name"]


def test_overrides_are_typed_and_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "bert-base.json", ["lr=1e-4", "epochs=3", "balance_quotes=false",
                                                            "train_windows=center", "output_dir=x"])
    assert (cfg.lr, cfg.epochs, cfg.balance_quotes, cfg.train_windows) == (1e-4, 3, False, "center")
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("override, message", [
    (["epochs=two"], "epochs=.two.: expected int"), (["balance_quotes=maybe"], "expected true/false"),
    (["train_windows=middle"], "choose one of"), (["lr"], "not key=value"),
    (["max_question_tokens=500"], "leaves no room"), (["batch_size=0"], "at least 1"),
    (["final_fit=true", "dev_file="], "dev_file is empty"), (["save_every=-1"], "0 or more"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_defaults_are_the_project_recipe():
    cfg = Config()
    assert (cfg.train_windows, cfg.lr_schedule, cfg.mixed_precision) == ("random", "linear", "auto")
    assert cfg.doc_stride < cfg.max_length - cfg.max_question_tokens     # overlapping windows


# ---------------------------------------------------------------- every field checks itself, on every path

FIELDS = {f.name: f.type for f in dataclasses.fields(Config)}


def refused_everywhere(name, value):
    """``value`` for ``name`` is refused by ``Config(...)``, ``dataclasses.replace`` and the CLI path,
    each time with a ValueError that names the field."""
    for make in (lambda: Config(**{name: value}), lambda: dataclasses.replace(Config(), **{name: value}),
                 lambda: load_config(None, [f"{name}={value}"])):
        with pytest.raises(ValueError, match=name):
            make()


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(AT_LEAST_1 + AT_LEAST_0)), value=st.integers(-10 ** 6, 10 ** 6))
def test_integer_bounds_hold_on_every_path(name, value):
    lowest = 1 if name in AT_LEAST_1 else 0
    if value < lowest:
        refused_everywhere(name, value)
    elif name not in ("max_length", "max_question_tokens") and not (name == "seed" and value >= 2 ** 32):
        cfg = Config(**{name: value})
        assert getattr(cfg, name) == value and load_config(None, [f"{name}={value}"]) == cfg


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(CHOICES)), value=st.text(min_size=1, max_size=12).filter(lambda t: "=" not in t))
def test_unknown_choices_are_refused_with_the_allowed_ones(name, value):
    if value in CHOICES[name]:
        assert getattr(Config(**{name: value}), name) == value
        return
    with pytest.raises(ValueError, match="choose one of " + ", ".join(CHOICES[name][:2])):
        Config(**{name: value})
    with pytest.raises(ValueError, match="choose one of"):
        apply_overrides(Config(), [f"{name}={value}"])


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_refuses_a_value_of_the_wrong_type(name):
    wrong = {"int": ["3", 2.5, True, None], "float": ["0.1", True, None, float("nan"), float("inf")],
             "str": [3, None, True], "bool": ["yes", 1, None]}[FIELDS[name]]
    for value in wrong:
        with pytest.raises(ValueError, match=name):
            Config(**{name: value})
    if FIELDS[name] in ("int", "float", "bool"):
        refused_everywhere(name, "seven")


@pytest.mark.parametrize("override, message", [
    (["lr=0"], "lr must be above 0"), (["lr=-1e-5"], "lr must be above 0"), (["warmup_ratio=1"], r"\[0, 1\)"),
    (["log_every=0"], "log_every must be at least 1"), (["max_skipped_steps=0"], "at least 1"),
    (["model_name="], "model_name is empty"), (["seed=4294967296"], "below 2"), (["max_grad_norm=-1"], "0 or more"),
    (["train_windows=centre"], "choose one of random, center, all"),
])
def test_values_that_cannot_work_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_a_config_is_frozen_and_floats_take_integers():
    cfg = Config(lr=1, max_grad_norm=0)
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and cfg.max_grad_norm == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5
    assert cfg.windows.doc_stride == cfg.doc_stride and cfg.decoding.n_best == cfg.n_best
