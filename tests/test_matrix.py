"""Every registered method x every kind of model (bpfree.lab.matrix): each cell lowers its own objective on one small
fixed batch in a few Adam steps, or is a documented undefined case whose UsageError is one line."""

from __future__ import annotations

import pytest

from bpfree.core.errors import UsageError
from bpfree.lab import matrix
from bpfree.methods import METHODS


@pytest.mark.parametrize("method, model", [
    pytest.param(method, model, id=f"{method}-{model}") for method in METHODS.names() for model in matrix.MODELS
])
def test_cell_learns_or_is_a_documented_undefined_case(method, model):
    try:
        first, last = matrix.losses(method, model)
    except UsageError as e:
        assert (method, model) in matrix.UNDEFINED, f"undocumented undefined cell: {e}"
        assert "\n" not in str(e)
        return
    assert (method, model) not in matrix.UNDEFINED, "documented as undefined, but it runs"
    assert last < first, (first, last)


def test_at_most_ten_undefined_cells():
    assert len(matrix.UNDEFINED) <= 10
