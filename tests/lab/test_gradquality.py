"""bpfree grad-quality: the function on a tiny model, and the command end to end on digits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bpfree.cli import main
from bpfree.lab.gradquality import gradient_quality


def test_gradient_quality_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    batches = [(torch.randn(5, 1, 2, 2, dtype=torch.float64), torch.randint(0, 2, (5,))) for _ in range(2)]
    n = sum(p.numel() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    rows = gradient_quality(
        model,
        ["fg-w", "bp"],
        batches,
        tangents=[1, n],
        aggregations=["mean", "orthogonal"],
        seeds=[0, 1],
        method_options={"exact_readout": False},
    )
    assert [(r["method"], r["tangents"], r["aggregation"]) for r in rows] == [
        ("fg-w", 1, "mean"),
        ("fg-w", 1, "orthogonal"),
        ("fg-w", n, "mean"),
        ("fg-w", n, "orthogonal"),
        ("bp", None, None),
    ]  # bp takes no tangents: evaluated once
    by = {(r["method"], r["tangents"], r["aggregation"]): r for r in rows}
    assert by[("bp", None, None)]["cosine_mean"] == pytest.approx(1.0)
    full = by[("fg-w", n, "orthogonal")]  # K = dimension: the projection is the gradient itself
    assert full["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert full["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-9)
    assert all(r["samples"] == 4 for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # parameters untouched


def test_grad_quality_command(tmp_path, capsys) -> None:
    out = tmp_path / "gq"
    rc = main(
        [
            "grad-quality",
            "--data",
            "digits",
            "--hidden",
            "16",
            "--methods",
            "fg-a,bp",
            "--tangents",
            "1,2",
            "--aggregation",
            "mean,orthogonal",
            "--batches",
            "1",
            "--seeds",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads((out / "grad_quality.json").read_text())
    assert len(data["rows"]) == 5 and data["meta"]["data"] == "digits"
    assert (out / "grad_quality.md").read_text().count("| fg-a |") == 2 * 4  # the summary and the per-layer table
    assert (out / "grad_quality.png").stat().st_size > 1000
    assert "| bp |" in capsys.readouterr().out
    assert main(["grad-quality", "--data", "digits", "--methods", "nope", "--out", str(out)]) == 2


def test_per_layer_cosine() -> None:
    """bp agrees with itself on every layer; dfa trains the output layer on its exact gradient, not the hidden one."""
    from bpfree import models

    torch.manual_seed(0)
    model = models.build("mlp", 10, (1, 8, 8), hidden=(16,))
    batches = [(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))]
    rows = {r["method"]: r["layer_cosine"] for r in gradient_quality(model, ["bp", "dfa"], batches)}
    assert list(rows["bp"]) == ["1.weight", "3.weight"]
    assert all(c == pytest.approx(1.0) for c in rows["bp"].values())
    assert rows["dfa"]["3.weight"] == pytest.approx(1.0)
    assert rows["dfa"]["1.weight"] < 0.99


def test_unsupported_method_gets_a_row_and_the_others_run(tmp_path, capsys) -> None:
    """A method that cannot take the model (here: local losses on a model with one hidden block) is reported as
    'unsupported: <reason>' instead of stopping the whole command."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    model.input_shape = (1, 2, 2)
    batches = [(torch.randn(5, 1, 2, 2, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    rows = gradient_quality(model, ["l-bp", "bp", "fg-w"], batches, tangents=[1, 2], aggregations=["mean"])
    assert [(r["method"], r["tangents"]) for r in rows] == [("l-bp", None), ("bp", None), ("fg-w", 1), ("fg-w", 2)]
    assert "two or more blocks" in rows[0]["unsupported"] and "cosine_mean" not in rows[0]
    assert rows[1]["cosine_mean"] == pytest.approx(1.0)

    out = tmp_path / "gq"
    args = ["grad-quality", "--data", "digits", "--hidden", "16", "--methods", "lg-fa,bp,dfa", "--batches", "1",
            "--seeds", "1", "--batch-size", "32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    md = (out / "grad_quality.md").read_text()
    assert "| lg-fa | - | - | unsupported: lg-fa needs a model with two or more blocks" in md
    assert "| dfa | - | - | 0." in md or "| dfa | - | - | -0." in md  # dfa takes the MLP and is evaluated
    rows = json.loads((out / "grad_quality.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lg-fa", "bp", "dfa"] and "unsupported" in rows[0]
    assert (out / "grad_quality.png").stat().st_size > 1000
