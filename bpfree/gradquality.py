"""Gradient-quality diagnostics: how close is a method's estimate to the exact gradient of the global loss?

For every method (and, for methods that take them, every tangent count K and aggregation), the estimate the
method writes into `.grad` is compared with the exact gradient from `bp` on the SAME parameters and batch:
cosine similarity and norm ratio |estimate| / |exact| over all trainable parameters, mean +- std over batches
and seeds. Works for any registered estimator; methods without `tangents`/`aggregation` options are evaluated
once. (Methods with their own local objectives are still compared with the global-loss gradient.)
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bpfree import methods
from bpfree.errors import UsageError


def _flat_grads(model: nn.Module) -> torch.Tensor:
    ps = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps])


def _layer_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each weight (>= 2 dims) gradient, flattened: the per-layer view feedback-alignment papers plot."""
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.dim() >= 2
    }


def _compare(est: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    ne, nx = float(est.double().norm()), float(exact.double().norm())
    cos = float(est.double() @ exact.double()) / (ne * nx) if ne > 0 and nx > 0 else 0.0
    return cos, (ne / nx if nx > 0 else math.inf)


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _options(shared: dict[str, Any], k: int | None, agg: str | None) -> dict[str, Any]:
    opts = dict(shared)
    if k is not None:
        opts["tangents"] = k
    if agg is not None:
        opts["aggregation"] = agg
    return opts


def gradient_quality(
    model: nn.Module,
    method_names: Sequence[str],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    tangents: Sequence[int] = (1,),
    aggregations: Sequence[str] = ("mean",),
    seeds: Sequence[int] = (0,),
    method_options: dict[str, Any] | None = None,
    blocks: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (method, K, aggregation): cosine and norm ratio vs the exact gradient, mean and std.

    `method_options` are passed to every method that declares them (e.g. {"tangent_dist": "normal"}); `blocks`
    names the block boundaries of block-wise rules.
    The model's parameters are not changed (estimators only write `.grad`); it is left in train mode.
    A method that cannot handle the model (UsageError when built) gets one row {"method", "unsupported": reason}
    and the others are still evaluated.
    """
    model.train()
    bp = methods.build("bp", model)
    exact, exact_layers = [], []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        bp.step(x, y)
        exact.append(_flat_grads(model).clone())
        exact_layers.append(_layer_grads(model))
    rows = []
    for name in method_names:
        entry = methods.METHODS.get(name)
        ks: list[int | None] = list(tangents) if "tangents" in entry.options else [None]
        aggs: list[str | None] = list(aggregations) if "aggregation" in entry.options else [None]
        shared = {k: v for k, v in (method_options or {}).items() if k in entry.options}
        try:  # can this method handle the model at all?
            methods.build(name, model, seed=seeds[0], blocks=blocks, **_options(shared, ks[0], aggs[0]))
        except UsageError as err:
            rows.append({"method": name, "tangents": None, "aggregation": None, "unsupported": str(err)})
            continue
        for k in ks:
            for agg in aggs:
                opts = _options(shared, k, agg)
                cos, ratio = [], []
                layer_cos: dict[str, list[float]] = {}
                for seed in seeds:
                    est = methods.build(name, model, seed=seed, blocks=blocks, **opts)
                    for (x, y), g, g_layers in zip(batches, exact, exact_layers):
                        model.zero_grad(set_to_none=True)
                        est.step(x, y)
                        c, r = _compare(_flat_grads(model), g)
                        cos.append(c)
                        ratio.append(r)
                        for layer, estimate in _layer_grads(model).items():
                            layer_cos.setdefault(layer, []).append(_compare(estimate, g_layers[layer])[0])
                model.zero_grad(set_to_none=True)
                cm, cs = _stats(cos)
                rm, rs = _stats(ratio)
                rows.append(
                    {
                        "method": name,
                        "tangents": k,
                        "aggregation": agg,
                        "cosine_mean": cm,
                        "cosine_std": cs,
                        "norm_ratio_mean": rm,
                        "norm_ratio_std": rs,
                        "samples": len(cos),
                        "options": opts,
                        "layer_cosine": {layer: _stats(cs_)[0] for layer, cs_ in layer_cos.items()},
                    }
                )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | K | aggregation | cosine to exact gradient | norm ratio ‖estimate‖ / ‖exact‖ | samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = "-" if r["tangents"] is None else str(r["tangents"])
        a = r["aggregation"] or "-"
        if "unsupported" in r:
            lines.append(f"| {r['method']} | - | - | unsupported: {r['unsupported']} | | |")
            continue
        lines.append(
            f"| {r['method']} | {k} | {a} | {r['cosine_mean']:.4f} ± {r['cosine_std']:.4f} "
            f"| {r['norm_ratio_mean']:.4g} ± {r['norm_ratio_std']:.3g} | {r['samples']} |"
        )
    rows = [r for r in rows if "unsupported" not in r]
    layers = list(rows[0]["layer_cosine"]) if rows else []
    if layers:
        lines += ["", "Cosine of each weight's update with its exact gradient (mean over batches and seeds):", "",
                  "| method | K | aggregation | " + " | ".join(layers) + " |",
                  "|---|---|---|" + "---|" * len(layers)]
        for r in rows:
            k = "-" if r["tangents"] is None else str(r["tangents"])
            cells = " | ".join(f"{r['layer_cosine'].get(n, float('nan')):.3f}" for n in layers)
            lines.append(f"| {r['method']} | {k} | {r['aggregation'] or '-'} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Cosine vs K (log x), one line per method and aggregation; methods without K as dashed levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "unsupported" not in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = sorted({r["tangents"] for r in rows if r["tangents"] is not None}) or [1]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = r["method"] if r["aggregation"] is None else f"{r['method']} ({r['aggregation']})"
        groups.setdefault(label, []).append(r)
    for label, rs in groups.items():
        if rs[0]["tangents"] is None:
            ax.axhline(rs[0]["cosine_mean"], linestyle="--", linewidth=1, label=label, color=None)
            continue
        rs = sorted(rs, key=lambda r: r["tangents"])
        xs = [r["tangents"] for r in rs]
        ys = [r["cosine_mean"] for r in rs]
        es = [r["cosine_std"] for r in rs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("tangents K")
    ax.set_ylabel("cosine similarity to the exact gradient")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> list[Path]:
    """grad_quality.json, grad_quality.md and grad_quality.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "grad_quality.json", out / "grad_quality.md", out / "grad_quality.png"]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    title = ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("model", "data", "batch_size"))
    paths[1].write_text(f"# Gradient quality ({title})\n\n" + markdown_table(rows))
    plot(rows, paths[2], title)
    return paths
