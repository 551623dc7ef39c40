"""Wider and narrower copies of the `--lr auto` benchmark's models, for checking fg-a's size-scaled prior on sizes it
was not chosen on (benchmarks/lr_auto.sh, step 6; docs/tuning.md). User models take no --width, hence a class each.

    bpfree sweep --methods fg-a --model examples/fga_sizes.py:ResidualCNN16 --data digits --epochs 20 ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_suite import LayerNormMLP, ResBNCNN, TinyMixer  # noqa: E402
from residual_cnn import ResidualCNN  # noqa: E402


class ResidualCNN8(ResidualCNN):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes, input_shape, width=8)


class ResidualCNN16(ResidualCNN):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes, input_shape, width=16)


class ResidualCNN64(ResidualCNN):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes, input_shape, width=64)


class WideLayerNormMLP(LayerNormMLP):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes, input_shape, width=512)


class WideResBNCNN(ResBNCNN):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes, input_shape, width=32)


class WideTinyMixer(TinyMixer):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes, input_shape, dim=128)
