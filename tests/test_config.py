import json

import pytest

from conftest import ROOT
from hw7qa.config import Config, load_config, save_config


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
