"""The two figures of a comparison: test error vs epoch (mean over seeds with a min–max band) and final errors.

matplotlib's Agg backend: files only, no display needed (servers, CI).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from bpfree.results import Row, RunResult

PERCENT = FuncFormatter(lambda v, _: f"{v:g} %")


def finite_prefix(values: list[float]) -> list[float]:
    """The values up to the first NaN or inf (a curve ends where its run's numbers stop being numbers)."""
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return values[:i]
    return values


def test_error_curves(
    groups: dict[str, list[RunResult]], path: Path, setup: str = "", metric: str = "test_error"
) -> None:
    """Test (or `metric="val_error"`: validation) error (%) per epoch for every row: the mean over the seeds that
    reached that epoch, band min–max."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lowest, highest, most_seeds = np.inf, 0.0, 1
    for label, runs in groups.items():
        curves = [finite_prefix([r[metric] for r in run.records if metric in r]) for run in runs if run.records]
        curves = [c for c in curves if c]
        failed = [run.failure for run in runs if run.failure]
        if failed:  # say in the legend how a method failed (all seeds the same way) or how often
            every = len(failed) == len(runs) and len(set(failed)) == 1
            label += f" ({failed[0]})" if every else f" ({len(failed)}/{len(runs)} seeds failed)"
        if not curves:
            ax.plot([], [], linestyle="none", marker="x", color="firebrick", label=label)
            continue
        most_seeds = max(most_seeds, len(curves))
        length = max(map(len, curves))
        epochs = np.arange(1, length + 1)
        values = [np.array([c[e] for c in curves if len(c) > e]) for e in range(length)]
        mean = np.array([v.mean() for v in values])
        (line,) = ax.plot(epochs, mean, marker="o" if length < 30 else None, markersize=3, label=label)
        if len(curves) > 1:
            ax.fill_between(epochs, [v.min() for v in values], [v.max() for v in values],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        lowest, highest = min(lowest, min(v.min() for v in values)), max(highest, max(v.max() for v in values))
    # Errors span from ~90 % (chance) to a few %: a log axis keeps the interesting end readable.
    if np.isfinite(lowest) and lowest > 0 and highest / lowest > 10:
        ax.set_yscale("log")
        nice = [m * 10.0**e for e in range(-2, 3) for m in (1, 2, 3, 5)]
        ax.yaxis.set_major_locator(FixedLocator([v for v in nice if lowest / 1.3 <= v <= highest * 1.3]))
    ax.yaxis.set_major_formatter(PERCENT)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    name = "validation error" if metric == "val_error" else "test error"
    ax.set_ylabel(f"{name} (%)")
    band = f"mean over up to {most_seeds} seeds, band min–max" if most_seeds > 1 else "one seed"
    title = name[0].upper() + name[1:] + " vs epoch"
    ax.set_title(f"{title} — {setup}\n({band})" if setup else f"{title} ({band})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if groups:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def final_error_bars(rows: list[Row], path: Path, setup: str = "") -> None:
    """Final test and train error per method (bars: mean, whiskers: sample std); failed methods say so."""
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(rows) + 2), 4.5), dpi=120)
    x = np.arange(len(rows))
    width = 0.38
    top = max([max(r.test + r.train) for r in rows if r.ok] or [1.0])
    for i, row in enumerate(rows):
        if not row.ok:
            ax.text(i, top * 0.05, row.status, rotation=90, ha="center", va="bottom", fontsize=8, color="firebrick")
            continue
        for offset, values, name, alpha in ((-width / 2, row.test, "test", 0.95), (width / 2, row.train, "train", 0.5)):
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.bar(i + offset, mean, width, yerr=std if std else None, capsize=3, alpha=alpha,
                   color="C0" if name == "test" else "C1", label=name if i == next(j for j, r in enumerate(rows)
                                                                                   if r.ok) else None)
            ax.text(i + offset, mean + std + top * 0.01, f"{mean:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r.label for r in rows], rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4
                  else "center")
    ax.set_xlim(-0.8, len(rows) - 0.2)
    ax.set_ylim(0, top * 1.2)
    ax.yaxis.set_major_formatter(PERCENT)
    ax.set_ylabel("error at last epoch (%)")
    seeds = max((len(r.seeds) for r in rows), default=1)
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    ax.set_title(f"Final error — {setup}\n({spread})" if setup else f"Final error ({spread})", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if any(r.ok for r in rows):
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
