"""`bpfree sweep`: choose each method's recipe on validation error, then report its test error once.

Every grid point is a `compare` run (same options, same run-folder machinery: rerunning skips finished runs and
resumes unfinished ones), in OUT/METHOD/POINT/seed-S. The choice per method is the grid point with the lowest
validation error at the last epoch (mean over seeds; ties: lower validation loss, then the earlier point). Test
errors are never read for the choice; the chosen recipe's test error is reported once, from its sweep runs or from
a longer final run (--final-epochs). The choice is written as a `compare --config` file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfree import methods
from bpfree.commands import compare
from bpfree.commands.train import set_threads
from bpfree.core.errors import UsageError
from bpfree.lab.compare import run_all
from bpfree.lab.results import RunResult, load_run
from bpfree.training import recipes
from bpfree.training.checks import output_folder
from bpfree.training.runfolder import RunLock
from bpfree.training.train import TrainConfig, load_data

GRID_RULE = (
    "Grid: the recipe settings (--lr, --optimizer, --momentum, --weight-decay, --schedule, --warmup-epochs, "
    "--batch-size) take comma-separated values, for all methods or per method as in compare: "
    "--lr 0.01,0.03,0.1 --optimizer sgd,adam, or --lr bp=0.01,0.1,fg-a=1e-4,3e-4 (a bare list before the pairs "
    "sets the other methods). Each method trains every combination; a setting not given comes from the method's "
    "recipe. The default --val-split is a sixth of the (class-filtered) training set, at most 10000 examples. "
    "Other options as in `bpfree compare` (a --config file may give grids as arrays)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    compare.add_arguments(parser)
    parser.add_argument("--final-epochs", type=int, default=None, metavar="E",
                        help="train each chosen recipe again for E epochs (same seeds, same data and validation "
                        "split) and report its test error (default: report the chosen sweep runs' test error)")
    parser.epilog = GRID_RULE
    parser.set_defaults(sweep_defaults=default_val_split)


def default_val_split(values: dict[str, Any]) -> None:
    """A sixth of the training examples (MNIST: 10000), at most 10000, when --val-split is not given."""
    if values.get("val_split") is not None:
        if int(values["val_split"]) < 1:
            raise UsageError("sweep chooses on validation error: --val-split must be at least 1")
        return
    classes = values.get("classes")
    cfg = TrainConfig(data=values["data"], data_root=values.get("data_root"),
                      classes=tuple(classes) if classes else None)
    values["val_split"] = min(10000, max(1, load_data(cfg).num_train // 6))


@dataclass
class Point:
    """One grid point of one method: its runs (one per seed) and what varies across the method's grid."""

    method: str
    label: str
    runs: list[RunResult]

    @property
    def finished(self) -> list[RunResult]:
        return [r for r in self.runs if r.finished]

    @property
    def ok(self) -> bool:
        return bool(self.runs) and len(self.finished) == len(self.runs)

    def val(self, key: str = "val_error") -> float | None:
        """Mean over seeds of the last epoch's validation metric (None unless every seed finished)."""
        return statistics.fmean(r.records[-1][key] for r in self.runs) if self.ok else None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "; ".join(sorted({r.status for r in self.runs if not r.finished}))


def choose(points: list[Point]) -> Point | None:
    """The point with the lowest validation error (ties: validation loss, then grid order). Reads nothing else."""
    good = [(p.val("val_error"), p.val("val_loss"), i, p) for i, p in enumerate(points) if p.ok]
    return min(good, key=lambda t: t[:3])[3] if good else None


def nothing_chosen(method: str, points: list[Point]) -> str:
    """Why `method` has no recipe: what its grid points did, and the best point that trained at least one seed.

    Divergence is an ordinary answer of a learning-rate search (the grid reached too far), not an error of the sweep.
    """
    statuses = sorted({p.status for p in points})
    line = f"{method}: no grid point finished with every seed ({'; '.join(statuses)}), so nothing was chosen"
    partial = [p for p in points if p.finished]
    if partial:
        best = min(partial, key=lambda p: statistics.fmean(r.records[-1]["val_error"] for r in p.finished))
        val = statistics.fmean(r.records[-1]["val_error"] for r in best.finished)
        line += (f"; the best that did train: {best.label} ({len(best.finished)} of {len(best.runs)} seeds, "
                 f"val error {val:.2f} %)")
    else:
        line += "; none trained: try lower learning rates (--lr)"
    return line


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe settings that matter (no momentum for Adam, no zero weight decay or warm-up)."""
    return {k: config[k] for k in recipes.RECIPE_FIELDS
            if not (k == "momentum" and config["optimizer"] != "sgd") and not (k in ("weight_decay", "warmup_epochs")
                                                                             and not config[k])}


def varying(points: list[Point]) -> list[str]:
    """The recipe fields that differ between a method's grid points (the table's columns)."""
    configs = [p.runs[0].config for p in points]
    return [k for k in recipes.RECIPE_FIELDS if len({json.dumps(c.get(k)) for c in configs}) > 1]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid_table(by_method: dict[str, list[Point]], chosen: dict[str, Point | None]) -> str:
    lines = ["| method | grid point | val error (%) | val loss | status | chosen |", "|---|---|---:|---:|---|---|"]
    for method, points in by_method.items():
        cols = varying(points) or ["lr"]
        for p in points:
            setting = ", ".join(f"{k} {_fmt(p.runs[0].config.get(k))}" for k in cols)
            err, loss = p.val("val_error"), p.val("val_loss")
            mark = "**✓**" if p is chosen[method] else ""
            lines.append(f"| {method} | {setting} | {'' if err is None else f'{err:.2f}'} | "
                         f"{'' if loss is None else f'{loss:.4f}'} | {p.status} | {mark} |")
    return "\n".join(lines) + "\n"


def final_table(rows: list[tuple[str, dict[str, Any], list[RunResult]]], epochs_note: str) -> str:
    lines = [f"| method | recipe | epochs | val error (%) | test error (%) {epochs_note} |", "|---|---|---:|---:|---:|"]
    for method, settings, runs in rows:
        recipe = ", ".join(f"{k} {_fmt(v)}" for k, v in settings.items())
        done = [r for r in runs if r.finished]
        if not done:
            lines.append(f"| {method} | {recipe} | | | {'; '.join(sorted({r.status for r in runs}))} |")
            continue
        val = statistics.fmean(r.records[-1]["val_error"] for r in done)
        test = [r.records[-1]["test_error"] for r in done]
        spread = f" ± {statistics.stdev(test):.2f}" if len(test) > 1 else ""
        lines.append(f"| {method} | {recipe} | {len(done[0].records)} | {val:.2f} | "
                     f"{statistics.fmean(test):.2f}{spread} |")
    return "\n".join(lines) + "\n"


def recipe_file(chosen: dict[str, Point], configs: dict[str, TrainConfig], out: Path, epochs: int,
                command: str) -> dict[str, Any]:
    """A `compare --config` file that trains every chosen recipe (all its settings spelled out)."""
    first = next(iter(configs.values()))
    file: dict[str, Any] = {
        "description": f"recipes chosen on validation error by: {command}",
        "methods": list(chosen),
        "model": first.model, "data": first.data, "epochs": epochs,
        "seeds": sorted({r.config["seed"] for p in chosen.values() for r in p.runs}),
        "val_split": first.val_split,
    }
    for key in ("train_size", "classes", "augment"):
        if getattr(first, key):
            file[key] = list(getattr(first, key)) if key == "classes" else getattr(first, key)
    file.update(json.loads(json.dumps(first.model_options)))
    for key in recipes.RECIPE_FIELDS:
        file[key] = {m: p.runs[0].config[key] for m, p in chosen.items()}
    options: dict[str, dict[str, Any]] = {}
    for m, cfg in configs.items():
        declared = methods.METHODS.get(m).options
        for key, value in cfg.method_options.items():
            # Defaults stay out: an option the model shares (--groups) would otherwise override the model's value.
            if key not in declared or value != declared[key].default:
                options.setdefault(key, {})[m] = json.loads(json.dumps(value))
    file.update(options)
    file["out"] = str(out / "compare")
    return file


def run(args: argparse.Namespace) -> int:
    if args.final_epochs is not None and args.final_epochs < 1:
        raise UsageError(f"--final-epochs must be at least 1, got {args.final_epochs}")
    names, configs, out, _ = compare.plan(args, grid=True)
    set_threads(args.compare_threads)
    for cfg in configs:
        cfg.check()  # before the folder is made: bad numbers leave nothing behind
    output_folder(out)
    with RunLock(out, "sweep folder"):  # a second sweep on OUT stops at once instead of interleaving
        return _sweep(args, names, configs, out)


def _sweep(args: argparse.Namespace, names: list[str], configs: list[TrainConfig], out: Path) -> int:
    label = {c.out: Path(c.out).parent.name for c in configs}
    print(f"sweep: {len(configs)} runs ({', '.join(f'{m}: {sum(c.method == m for c in configs)}' for m in names)}),"
          f" validation split {configs[0].val_split} examples -> {out}", file=sys.stderr, flush=True)
    run_all(configs, describe=lambda c: f"{c.method} [{label[c.out]}] seed {c.seed}", show_test=False)

    by_method: dict[str, list[Point]] = {m: [] for m in names}
    for cfg in configs:
        points = by_method[cfg.method]
        if not points or points[-1].label != label[cfg.out]:
            points.append(Point(cfg.method, label[cfg.out], []))
        points[-1].runs.append(load_run(Path(cfg.out)))
    chosen = {m: choose(points) for m, points in by_method.items()}
    table = grid_table(by_method, chosen)

    picked = {m: p for m, p in chosen.items() if p is not None}
    first_of = {p.method: next(c for c in configs if c.out == str(p.runs[0].path)) for p in picked.values()}
    finals: list[tuple[str, dict[str, Any], list[RunResult]]] = []
    if args.final_epochs and picked:
        final_configs = []
        for m, p in picked.items():
            for r in p.runs:
                cfg = next(c for c in configs if c.out == str(r.path))
                final_configs.append(TrainConfig(**{**cfg.__dict__, "epochs": args.final_epochs, "resume": False,
                                                    "out": str(out / m / "final" / p.label / f"seed-{cfg.seed}")}))
        run_all(final_configs, describe=lambda c: f"{c.method} [final, {Path(c.out).parent.name}] seed {c.seed}")
        for m, p in picked.items():
            finals.append((m, settings_of(p.runs[0].config),
                           [load_run(Path(c.out)) for c in final_configs if c.method == m]))
    else:
        finals = [(m, settings_of(p.runs[0].config), p.runs) for m, p in picked.items()]
    epochs = args.final_epochs or configs[0].epochs
    command = "bpfree " + " ".join(getattr(args, "argv", sys.argv[1:]))
    noise = (5 * 95 / configs[0].val_split) ** 0.5
    summary = final_table(finals, f"— reported once, after the choice ({epochs} epochs)")
    out.mkdir(parents=True, exist_ok=True)
    if picked:
        recipe = recipe_file(picked, first_of, out, epochs, command)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    unchosen = [nothing_chosen(m, by_method[m]) for m, p in chosen.items() if p is None]
    md = [f"# Sweep: {', '.join(names)} on {configs[0].model} / {configs[0].data}", "", f"`{command}`", "",
          f"Chosen on validation error ({configs[0].val_split} held-out training examples, last epoch, mean over "
          "seeds); test error was not looked at for the choice. One standard error of a validation error e (%) "
          f"is about sqrt(e (100 - e) / {configs[0].val_split}) points (binomial; {noise:.2f} at e = 5 %): "
          "grid points closer than that are a tie in all but name.", "", table, "Chosen recipes:", "", summary,
          *(f"- {line}" for line in unchosen), *([""] if unchosen else []),
          f"As a `compare` config: `bpfree compare --config {out / 'recipe.json'}`" if picked else
          "No recipe was chosen, so no recipe.json was written.", ""]
    (out / "sweep.md").write_text("\n".join(md))
    print(table)
    print(summary, end="")
    print(f"(results in {out}/sweep.md" + (f"; chosen recipes in {out}/recipe.json)" if picked else ")"))
    if unchosen:
        print(f"bpfree: {' / '.join(unchosen)}", file=sys.stderr)
        return 1
    return 0
