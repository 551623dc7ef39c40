"""Activation memory (bpfree.core.memory): flat in depth for the local rules and the recomputing rules, and
recomputation changes nothing but memory."""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
from torch import nn

from bpfree import methods
from bpfree.core.memory import activation_peak

CHANNELS, BATCH = 8, 16


def conv_net(depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(3 if i == 0 else CHANNELS, CHANNELS, 3, padding=1), nn.ReLU())
              for i in range(depth)]  # fmt: skip
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 10))
    net.input_shape = (3, 16, 16)
    return net


def step_peak(method: str, depth: int, **options: object) -> int:
    """Bytes: the peak of the second step (the first made the estimator's state: DFA's B grows with depth as the
    weights do, but it is not activation memory)."""
    est = methods.build(method, conv_net(depth), seed=0, **options)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    est.step(x, y)
    return activation_peak(lambda: est.step(x, y))


FLAT = [("l-bp", {}), ("l-fa", {}), ("lg-bp", {}), ("lg-fa", {}), ("lg-fg-a", {}), ("lg-fg-w", {}),
        ("sff", {}), ("sff-block", {}), ("ff", {}), ("fg-w", {}), ("fg-a", {"recompute": True}),
        ("dfa", {"recompute": True}), ("fdfa", {"recompute": True})]  # fmt: skip


@pytest.mark.parametrize(("method", "options"), FLAT, ids=[m + ("-rc" if o else "") for m, o in FLAT])
def test_activation_memory_is_flat_in_depth(method: str, options: dict) -> None:
    shallow, deep = step_peak(method, 3, **options), step_peak(method, 12, **options)
    assert deep <= 1.3 * shallow, f"{method}: depth 12 holds {deep / shallow:.2f}x depth 3"


def test_backprop_memory_grows_with_depth() -> None:
    """The meter sees what depth costs (else the flatness above would prove nothing): 4x the layers, over 2x the
    peak (the input, the head and the gradients do not grow)."""
    assert step_peak("bp", 12) > 2.0 * step_peak("bp", 3)


def test_the_meter_counts_a_known_allocation() -> None:
    def allocate() -> None:
        t = torch.empty(1 << 20)  # 4 MiB, freed on return
        t.fill_(1.0)

    assert activation_peak(allocate) == 4 << 20


def test_the_meter_counts_each_free_at_its_own_time() -> None:
    """Frees made inside an enclosing operator (an autograd Function's forward, a forward-mode rule) after its
    children's allocations: counted when they happen, not at the operator's start."""

    def step() -> None:
        with torch.profiler.record_function("enclosing"):
            a = torch.ones(1 << 20)  # 4 MiB
            b = a + 1  # 8 MiB live
            del a
            c = b + 1  # 8 MiB live again
            del b, c

    assert abs(activation_peak(step) - (8 << 20)) < 1 << 12  # a few bytes of bookkeeping besides


class DropoutBNNet(nn.Module):
    """Batch norm and dropout inside blocks: recomputation must replay both."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = (3, 8, 8)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3)),
            nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3)),
        ])
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def vit() -> nn.Module:
    class Vit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_shape = (3, 8, 8)
            self.embed = nn.Conv2d(3, 16, 4, stride=4)
            self.pos = nn.Parameter(torch.randn(1, 4, 16) * 0.1)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.encoder(h).mean(1))

    return Vit()


RECOMPUTING = [
    ("dfa", {}),
    ("fdfa", {}),
    ("fdfa", {"feedback_optimizer": "adam"}),
    ("fdfa", {"feedback_timing": "after"}),
    ("fg-a", {}),
    ("fg-a", {"aggregation": "orthogonal"}),
]


@pytest.mark.parametrize("make", [DropoutBNNet, vit], ids=["bn-dropout", "vit"])
@pytest.mark.parametrize(("method", "options"), RECOMPUTING,
                         ids=["dfa", "fdfa", "fdfa-adam", "fdfa-after", "fg-a", "fg-a-orth"])  # fmt: skip
def test_recomputing_gives_the_same_steps(method: str, options: dict, make) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    base = make()
    runs = []
    for recompute in (False, True):
        model = copy.deepcopy(base)
        est = methods.build(method, model, seed=3, recompute=recompute, **options)
        opt = torch.optim.SGD(est.trainable(), lr=0.1)
        torch.manual_seed(7)  # dropout draws from the global generator
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad(set_to_none=True)
            est.step(x, y)
            opt.step()
        runs.append((model.state_dict(), torch.get_rng_state()))
    (kept, rng_kept), (again, rng_again) = runs
    assert torch.equal(rng_kept, rng_again)
    for name, value in kept.items():
        # A module rerun for its VJP inside the second pass may use the math attention kernel: float-level noise.
        torch.testing.assert_close(again[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_train_reports_the_activation_peak_beside_bp(tmp_path, capsys) -> None:
    import json

    from bpfree.cli import main

    out = tmp_path / "run"
    code = main(["train", "--method", "l-bp", "--model", "mlp", "--hidden", "64,64,64", "--data", "digits",
                 "--epochs", "2", "--train-size", "256", "--out", str(out), "--memory-report"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["bp_peak_memory_mb"] > 0 and summary["peak_memory_mb"] > 0
    assert "bp" in captured.err and "activation peak per step" in captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_mb"] > 0 for r in records)
    assert summary["peak_memory_mb"] == round(max(r["peak_memory_mb"] for r in records), 1)


def test_a_fast_path_refuses_recompute_it_cannot_honour() -> None:
    from bpfree.core.errors import UsageError
    from bpfree.methods import FAST_PATH_REFUSES, METHODS

    model = bpfree_model("localmixer-m1-16")
    with pytest.raises(UsageError, match="--recompute is not supported"):
        methods.build("fg-a", model, seed=0, recompute=True)
    methods.build("fg-a", model, seed=0, recompute=False)  # the default is what the path does
    for (method, _cls), refused in FAST_PATH_REFUSES.items():
        assert set(refused) <= set(METHODS.get(method).options), (method, refused)


def bpfree_model(name: str) -> nn.Module:
    from bpfree import models

    return models.build(name, num_classes=10, input_shape=(1, 28, 28))


def test_cpu_data_parallel_runs_measure_no_step_and_the_report_measures_apart(tmp_path, capfd) -> None:
    """The profiler is not run inside a gloo step; --memory-report then measures the rule in one process."""
    import json

    from bpfree.cli import main

    out = tmp_path / "run"
    code = main(["train", "--method", "l-bp", "--model", "mlp", "--hidden", "512,512", "--data", "digits",
                 "--epochs", "1", "--train-size", "128", "--batch-size", "32", "--lr", "0.01", "--threads", "1",
                 "--nproc", "2", "--out", str(out), "--memory-report"])  # fmt: skip
    assert code == 0
    summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])  # rank 0's line (a launched process)
    assert summary["peak_memory_mb"] > 0 and summary["bp_peak_memory_mb"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all("peak_memory_mb" not in r for r in records)


def test_fdfa_holds_what_dfa_holds_as_depth_grows() -> None:
    """FDFA's one-pass step keeps no tangent per block (u_l is drawn again to learn B_l): its memory grows with depth
    as DFA's does (each block's graph until the error arrives), not by one more block output per block. First
    steps of fresh estimators, so that buffers kept between steps count; B (made then) grows alike for both."""
    def first_step_peak(method: str, depth: int) -> int:
        # Estimators of earlier tests in reference cycles, freed by the collector inside the measured step, would
        # lower its peak.
        gc.collect()
        est = methods.build(method, conv_net(depth), seed=0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        return activation_peak(lambda: est.step(x, y))

    dfa = first_step_peak("dfa", 12) - first_step_peak("dfa", 3)
    fdfa = first_step_peak("fdfa", 12) - first_step_peak("fdfa", 3)
    assert dfa > 0
    assert fdfa <= 1.15 * dfa, f"fdfa grows {fdfa / dfa:.2f}x as fast as dfa with depth"


def test_fg_a_holds_about_what_bp_holds_as_depth_grows() -> None:
    """fg-a's one-pass step keeps each map's input until the directional derivatives are known, but not its
    tangents u (drawn again when its gradient is formed): its memory grows with depth about as bp's does, not by
    two activations a layer."""
    def growth(method: str) -> int:
        gc.collect()
        return step_peak(method, 12) - step_peak(method, 3)

    bp, fg_a = growth("bp"), growth("fg-a")
    assert bp > 0
    assert fg_a <= 1.2 * bp, f"fg-a grows {fg_a / bp:.2f}x as fast as bp with depth"


def test_the_meter_writes_nothing_on_stderr() -> None:
    """torch's profiler library logs each profiled step on stderr unless told not to: a fresh process shows it."""
    import subprocess
    import sys

    code = "import torch; from bpfree.core.memory import activation_peak; activation_peak(lambda: torch.ones(9) + 1)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert run.returncode == 0 and run.stderr == "", run.stderr


class AttentionNet(nn.Module):
    """A small ViT without dropout (the lean attention path's case): 64 tokens of width 32, 4 heads, so that one
    layer's attention matrices [B, 4, 64, 64] hold 8x an activation [B, 64, 32]; a positional embedding between
    the patches and the first layer."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_shape = (3, 32, 32)
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 64, 32) * 0.02)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x).flatten(2).transpose(1, 2) + self.pos).mean(1))


def attention_net_memory(method: str, depth: int, lean: bool = True, frozen_pos: bool = False) -> int:
    """Bytes that grow with the batch (peak at 8 examples less the peak at 4, first steps of fresh estimators); with
    `lean` False the forward-mode passes run PyTorch's math attention kernel, as before the lean path."""
    import contextlib

    import bpfree.core.forward_mode as forward_mode
    import bpfree.methods.block_local as block_local

    def peak(batch: int) -> int:
        gc.collect()
        model = AttentionNet(depth)
        model.pos.requires_grad_(not frozen_pos)
        est = methods.build(method, model, seed=0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        saved = forward_mode.lean_attention, block_local.lean_attention
        if not lean:
            forward_mode.lean_attention = block_local.lean_attention = contextlib.nullcontext
        try:
            return activation_peak(lambda: est.step(x, y))
        finally:
            forward_mode.lean_attention, block_local.lean_attention = saved

    return peak(8) - peak(4)


@pytest.mark.parametrize("method", ["lg-fg-a", "lg-fg-w", "fg-w"])
def test_forward_mode_rules_hold_no_attention_matrices_on_a_vit(method: str) -> None:
    """The lean attention path keeps neither the math kernel's attention matrices in the reverse graph (lg-fg-a)
    nor its dual softmax temporaries (lg-fg-w, fg-w): at most 0.75x the memory with the math kernel."""
    lean, math = attention_net_memory(method, 4), attention_net_memory(method, 4, lean=False)
    assert lean <= 0.75 * math, f"{method}: {lean / math:.2f}x the math kernel's"


def test_lg_fg_a_memory_on_a_vit_is_flat_in_depth() -> None:
    shallow, deep = attention_net_memory("lg-fg-a", 2), attention_net_memory("lg-fg-a", 8)
    assert deep <= 1.3 * shallow, f"depth 8 holds {deep / shallow:.2f}x depth 2"


def test_lg_fg_w_holds_nothing_for_a_parameter_between_blocks() -> None:
    """The positional embedding gets no signal from lg-fg-w: its pass records no reverse graph for it (through the
    first block) and holds what it holds with the embedding frozen."""
    trained, frozen = attention_net_memory("lg-fg-w", 2), attention_net_memory("lg-fg-w", 2, frozen_pos=True)
    assert trained <= 1.1 * frozen, f"{trained / frozen:.2f}x"


def test_keeping_the_heap_defers_to_the_users_malloc_settings(monkeypatch) -> None:
    import sys

    from bpfree.core.memory import keep_cpu_heap

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_cpu_heap() is False  # the user's own setting stands
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert keep_cpu_heap() is sys.platform.startswith("linux")  # glibc takes both settings
