"""Per (method, model family) recipes (`bpfree.training.recipes`): applied by default, overridable, sourced."""

from __future__ import annotations

import json

from bpfree.cli import main
from bpfree.training import recipes
from tests.commands.test_sweep import TINY


def test_no_recipe_flags_get_the_recipe_and_a_flag_overrides_it(tmp_path):
    recipe = recipes.lookup("bp", "mlp")
    assert recipe.validated, "bp on mlp should carry a validated recipe (docs/tuning.md)"
    assert main(["train", "--method", "bp", *TINY, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: config[k] for k in recipes.RECIPE_FIELDS} == recipe.settings
    assert config["recipe"]["entry"] == "bp/mlp" and config["recipe"]["validated"] is True
    assert config["recipe"]["source"] == recipe.source and config["recipe"]["overridden"] == []
    lr = recipe.settings["lr"] * 0.5
    assert main(["train", "--method", "bp", *TINY, "--epochs", "1", "--lr", str(lr), "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["lr"] == lr and config["recipe"]["overridden"] == ["lr"]
    assert {k: config[k] for k in recipes.RECIPE_FIELDS if k != "lr"} == \
        {k: v for k, v in recipe.settings.items() if k != "lr"}


def test_recipe_lookup_falls_back_and_every_entry_says_where_it_comes_from():
    assert recipes.lookup("lg-fg-a", "localmixer-s1-1").key == ("lg-fg-a", "localmixer-s1-1")  # its own entry
    assert recipes.lookup("lg-fg-a", "localmixer-m8-16").key == ("lg-fg-a", "localmixer")  # the family's
    assert recipes.lookup("bp", "mobilenetv3-small").key == ("bp", "*")  # every rule: --lr auto on unseen models
    assert recipes.lookup("no-such-rule", "mlp") is recipes.FALLBACK
    for recipe in recipes.entries().values():
        assert set(recipe.settings) == set(recipes.RECIPE_FIELDS)
        assert recipe.source.startswith("validated: bpfree sweep") == recipe.validated
        assert recipe.validated or recipe.source.startswith(("carried over", "auto: "))


def test_compare_takes_per_method_recipe_settings(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"methods": ["bp", "fg-a"], "optimizer": {"bp": "adam", "fg-a": "sgd"},
                                  "lr": {"bp": 0.002, "fg-a": 0.01}, "epochs": 1}))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), *TINY, "--momentum", "fg-a=0.5", "--out", str(out),
                 "--no-plots"]) == 0
    bp = json.loads((out / "bp" / "seed-0" / "config.json").read_text())
    fga = json.loads((out / "fg-a" / "seed-0" / "config.json").read_text())
    assert (bp["optimizer"], bp["lr"], fga["optimizer"], fga["lr"], fga["momentum"]) == ("adam", 0.002, "sgd", 0.01,
                                                                                          0.5)
    assert bp["momentum"] == recipes.lookup("bp", "mlp").settings["momentum"]  # not given for bp: its recipe's
    assert main(["compare", "--methods", "bp", *TINY, "--lr", "0.1,0.2", "--out", str(out)]) == 2
