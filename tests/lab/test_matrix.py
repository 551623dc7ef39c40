"""Every registered method x every kind of model (bpfree.lab.matrix), with the two user-style models of
tests/user_models.py as extra columns: each cell lowers its own objective on one small fixed batch in a few Adam
steps, or is a documented undefined case whose UsageError is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpfree.cli import main
from bpfree.core.errors import UsageError
from bpfree.lab import matrix
from bpfree.methods import METHODS

USER_MODELS = Path(__file__).resolve().parents[1] / "user_models.py"
SPECS = [f"{USER_MODELS}:ResidualCNN", f"{USER_MODELS}:TinyViT"]
COLUMNS = {**matrix.MODELS, **matrix.user_columns(SPECS)}


@pytest.mark.parametrize("method, model", [
    pytest.param(method, model, id=f"{method}-{model}") for method in METHODS.names() for model in COLUMNS
])
def test_cell_learns_or_is_a_documented_undefined_case(method, model):
    try:
        first, last = matrix.losses(method, model, columns=COLUMNS)
    except UsageError as e:
        assert (method, model) in matrix.UNDEFINED, f"undocumented undefined cell: {e}"
        assert "\n" not in str(e)
        return
    assert (method, model) not in matrix.UNDEFINED, "documented as undefined, but it runs"
    assert last < first, (first, last)


def test_at_most_ten_undefined_cells():
    assert len(matrix.UNDEFINED) <= 10


def test_the_matrix_command_takes_user_models_as_columns(capsys, monkeypatch):
    monkeypatch.setattr(matrix, "MODELS", {"mlp": matrix.MODELS["mlp"]})  # one shipped column keeps this quick
    assert main(["methods", "--matrix", "--model", SPECS[0], "--model", SPECS[1]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| method | mlp | ResidualCNN | TinyViT |"
    assert [row.split(" | ")[0] for row in table[2:2 + len(METHODS.names())]] == [f"| {m}" for m in METHODS.names()]


@pytest.mark.parametrize("extra, message", [
    (["--model", "mlp"], "a column is a user's model"),
    (["--model", f"{USER_MODELS}:NoSuchModel"], "has no attribute 'NoSuchModel'"),
    (["--model", SPECS[0], "--model", SPECS[0]], "a column named 'ResidualCNN' is there already"),
    (["--model", SPECS[1], "--input-shape", "3,x,16"], "--input-shape 3,x,16"),
    (["--model", SPECS[0], "--input-shape", "16"], "fails on a batch shaped"),
])
def test_bad_columns_are_one_line(capsys, extra, message):
    assert main(["methods", "--matrix", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_columns_without_the_matrix_are_refused(capsys):
    assert main(["methods", "--model", SPECS[0]]) == 2
    assert "add --matrix" in capsys.readouterr().err
