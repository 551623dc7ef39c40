"""Read run folders and summarise them as the papers do: one row per method, test / train error mean ± std over seeds.

Used by `bpfree compare` (after training) and `bpfree report` (from folders on disk). A run folder is whatever
`bpfree.training.train` writes (config.json, metrics.jsonl, checkpoint.pt), plus `failed.json` when it diverged or
`compare` saw it fail.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfree.core.errors import UsageError
from bpfree.training.checkpoint import CONFIG, FAILED, METRICS, with_defaults
from bpfree.training.runfolder import read_json, read_metrics

# Config fields that do not change what a run computes: runs differing only in these belong to the same row.
# `recipe` only names where the settings came from; the settings themselves are compared.
NOT_SETTINGS = ("seed", "out", "resume", "device", "data_root", "eval_batch_size", "recipe")


@dataclass
class RunResult:
    """One run folder: its resolved config, its per-epoch records and, if it failed, one line saying how."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    failure: str | None = None

    @property
    def finished(self) -> bool:
        return self.failure is None and len(self.records) >= int(self.config.get("epochs", 0))

    @property
    def status(self) -> str:
        if self.failure:
            return self.failure
        if not self.finished:
            return f"unfinished ({len(self.records)}/{self.config.get('epochs')} epochs)"
        return "ok"


def load_run(path: Path) -> RunResult:
    """A run folder as written by the trainer (and `compare`'s failed.json, if any)."""
    config_path = path / CONFIG
    failed_path = path / FAILED
    failed = read_json(failed_path) if failed_path.exists() else None
    if config_path.exists():
        config = read_json(config_path)
    elif failed is not None:
        config = failed.get("config", {})
    else:
        raise UsageError(f"{path} is not a run folder (no {CONFIG})")
    failure = str(failed.get("error", "failed")) if failed is not None else None
    return RunResult(path, with_defaults(config), read_metrics(path / METRICS), failure)


def find_runs(paths: list[Path]) -> list[RunResult]:
    """Every run folder at or below the given paths (a compare folder holds METHOD/seed-S run folders)."""
    runs: list[RunResult] = []
    for top in paths:
        if not top.is_dir():
            raise UsageError(f"{top} is not a folder")
        found = sorted({p.parent for name in (CONFIG, FAILED) for p in top.rglob(name)})
        if not found:
            raise UsageError(f"no run folders (holding {CONFIG}) found in {top}")
        runs += [load_run(p) for p in found]
    return runs


def settings_key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in NOT_SETTINGS}, sort_keys=True)


def group_runs(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped into rows: same settings except the seed. A row is named by its method, plus the settings
    that tell it apart when one method appears with several settings (e.g. `bp (lr=0.1)`)."""
    by_key: dict[str, list[RunResult]] = {}
    for run in runs:
        by_key.setdefault(settings_key(run.config), []).append(run)
    per_method: dict[str, list[str]] = {}
    for key, group in by_key.items():
        per_method.setdefault(group[0].config.get("method", "?"), []).append(key)
    labels: dict[str, list[RunResult]] = {}
    for method, keys in sorted(per_method.items(), key=lambda item: item[0] != "bp"):  # the reference first
        for key in keys:
            label = method
            if len(keys) > 1:
                label = f"{method} ({_differences(json.loads(key), [json.loads(k) for k in keys if k != key])})"
            labels[label] = sorted(by_key[key], key=lambda r: r.config.get("seed", 0))
    return labels


def _differences(mine: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """`lr=0.1, tangents=4`: the settings in which `mine` differs from any of `others` (inside option dicts too)."""
    parts = []
    for f, value in mine.items():
        theirs = [o.get(f) for o in others]
        if isinstance(value, dict) and all(isinstance(t, dict) for t in theirs):
            parts += [f"{k}={_short(v)}" for k, v in value.items() if any(t.get(k) != v for t in theirs)]
        elif any(t != value for t in theirs):
            parts.append(f"{f}={_short(value)}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


@dataclass
class Row:
    """One method's line of the results table. Errors in percent, at each run's last epoch."""

    label: str
    method: str
    seeds: list[int]
    epochs: int
    test: list[float] = field(default_factory=list)  # per successful seed
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)  # per successful seed, for runs with a --val-split
    seconds_per_epoch: float | None = None
    peak_memory_mb: float | None = None
    time_vs_bp: float | None = None
    memory_vs_bp: float | None = None
    status: str = "ok"
    lr: float | None = None
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.test)


def finite_errors(run: RunResult) -> bool:
    """Whether the last epoch's errors are numbers a table can average (a hand-edited NaN is not)."""
    last = run.records[-1] if run.records else {}
    return all(math.isfinite(last.get(k, 0.0)) for k in ("test_error", "train_error", "val_error"))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single seed: there is no spread to report)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(groups: dict[str, list[RunResult]], reference: str = "bp") -> list[Row]:
    """One Row per group; time and memory also as ratios to the `reference` row when it succeeded."""
    rows = []
    for label, runs in groups.items():
        cfg = runs[0].config
        row = Row(label, cfg.get("method", "?"), [r.config.get("seed", 0) for r in runs], int(cfg.get("epochs", 0)),
                  lr=cfg.get("lr"), method_options=cfg.get("method_options") or {})
        good = [r for r in runs if r.finished and finite_errors(r)]
        for r in good:
            row.test.append(r.records[-1]["test_error"])
            row.train.append(r.records[-1]["train_error"])
            if "val_error" in r.records[-1]:
                row.val.append(r.records[-1]["val_error"])
        epochs = [rec for r in good for rec in r.records]
        if epochs:
            row.seconds_per_epoch = statistics.fmean(rec["seconds"] for rec in epochs)
            memory = [rec["peak_memory_mb"] for rec in epochs if "peak_memory_mb" in rec]
            row.peak_memory_mb = max(memory) if memory else None
        bad = [r for r in runs if r not in good]
        if bad:
            statuses = sorted({r.status if not r.finished else "error not finite at the last epoch" for r in bad})
            what = "; ".join(statuses)
            row.status = what if not good else f"{len(bad)}/{len(runs)} seeds failed: {what}"
        rows.append(row)
    ref = next((r for r in rows if r.label == reference and r.ok), None)
    for row in rows:
        if ref is not None and row.ok:
            if row.seconds_per_epoch is not None and ref.seconds_per_epoch:
                row.time_vs_bp = row.seconds_per_epoch / ref.seconds_per_epoch
            if row.peak_memory_mb is not None and ref.peak_memory_mb:
                row.memory_vs_bp = row.peak_memory_mb / ref.peak_memory_mb
    return rows


def _pm(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _megabytes(value: float | None) -> str:
    """Whole MB where that reads well; small models' peaks (under a MB) keep two decimals instead of reading 0."""
    return _num(value, ".0f" if value is None or value >= 100 else ".1f" if value >= 1 else ".2f")


def markdown_table(rows: list[Row]) -> str:
    """The paper's layout: `test / train` error (%), mean ± std over seeds; cost columns with ratios to bp.
    Runs with a validation split get a validation error column before it."""
    with_val = any(r.val for r in rows)
    head = ["method", "seeds", "epochs", *(["val error (%)"] if with_val else []), "test / train error (%)",
            "time / epoch (s)", "× bp", "peak memory (MB)", "× bp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        if r.ok:
            error = f"{_pm(r.test)} / {_pm(r.train)}"
            if r.status != "ok":
                error += f" ({r.status})"
        else:
            error = r.status
        val = [_pm(r.val) if r.val and len(r.val) == len(r.test) else ""] if with_val else []
        cells = [r.label, str(len(r.seeds)), str(r.epochs), *val, error, _num(r.seconds_per_epoch, ".3f"),
                 _num(r.time_vs_bp, ".2f"), _megabytes(r.peak_memory_mb), _num(r.memory_vs_bp, ".2f")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["method", "label", "seeds", "epochs", "val_error_mean", "val_error_std", "test_error_mean",
              "test_error_std", "train_error_mean", "train_error_std",
              "seconds_per_epoch", "time_vs_bp", "peak_memory_mb", "memory_vs_bp", "status", "lr",
              "method_options"]


def csv_text(rows: list[Row]) -> str:
    """Machine-readable results at full precision (empty cells where a value does not exist)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        test = mean_std(r.test) if r.ok else (None, None)
        train = mean_std(r.train) if r.ok else (None, None)
        val = mean_std(r.val) if r.val and len(r.val) == len(r.test) else (None, None)
        values = {"method": r.method, "label": r.label, "seeds": " ".join(map(str, r.seeds)), "epochs": r.epochs,
                  "val_error_mean": val[0], "val_error_std": val[1],
                  "test_error_mean": test[0], "test_error_std": test[1], "train_error_mean": train[0],
                  "train_error_std": train[1], "seconds_per_epoch": r.seconds_per_epoch, "time_vs_bp": r.time_vs_bp,
                  "peak_memory_mb": r.peak_memory_mb, "memory_vs_bp": r.memory_vs_bp, "status": r.status,
                  "lr": r.lr, "method_options": json.dumps(r.method_options, sort_keys=True)}
        writer.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in values.items()})
    return out.getvalue()


def describe_setup(groups: dict[str, list[RunResult]]) -> str:
    """One line naming what all rows share (model, data, budget), for titles."""
    configs = [r.config for runs in groups.values() for r in runs]

    def common(key: str) -> Any:
        values = {json.dumps(c.get(key), sort_keys=True) for c in configs}
        return configs[0].get(key) if len(values) == 1 else None

    model, data, epochs = common("model"), common("data"), common("epochs")
    head = []
    if model:
        hidden = (common("model_options") or {}).get("hidden")
        head.append(f"{model} {_short(hidden)}" if hidden else str(model))
    if data:
        head.append(f"on {data}" + (f" (first {common('train_size')} examples)" if common("train_size") else "")
                    + (f", {common('val_split')} held out for validation" if common("val_split") else ""))
    parts = [" ".join(head)] if head else []
    if epochs:
        parts.append(f"{epochs} epochs")
    if common("optimizer") and common("batch_size"):
        parts.append(f"{common('optimizer')}, batch {common('batch_size')}")
    return ", ".join(parts) or "runs"


def write_report(groups: dict[str, list[RunResult]], out: Path, title: str = "", plots: bool = True) -> str:
    """Write results.md, results.csv and (if `plots`) the two PNGs into `out`; return the markdown table."""
    rows = summarise(groups)
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    setup = describe_setup(groups)
    md = [f"# {title or 'Results'}", "", setup, ""]
    per_row = [f"`{r.label}`: lr {r.lr:g}" + "".join(f", {k}={_short(v)}" for k, v in r.method_options.items())
               for r in rows if r.lr is not None]
    md += [table, "Settings per row: " + "; ".join(per_row) + ".", "",
           "Errors in %, at the last epoch, mean ± sample std over seeds (`test / train`, as in the papers; "
           "`val`: on the held-out training examples, the only error to choose settings by). "
           "Time: training seconds per epoch (evaluation excluded). Peak memory: the activation peak of a training "
           "step (tensor memory the step allocates above what was allocated before it: activations, gradients, "
           "temporaries; measured on each epoch's first step), largest over the epochs.", ""]
    if plots:
        from bpfree.lab import plots as plotting

        plotting.test_error_curves(groups, out / "test_error.png", setup)
        plotting.final_error_bars(rows, out / "final_error.png", setup)
        md += ["![test error vs epoch](test_error.png)", "", "![final errors](final_error.png)", ""]
        if any(r.val for r in rows):
            plotting.test_error_curves(groups, out / "val_error.png", setup, metric="val_error")
            md += ["![validation error vs epoch](val_error.png)", ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.csv").write_text(csv_text(rows))
    return table
