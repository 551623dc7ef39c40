"""`bpfree compare`: several learning rules × seeds with the same model, data, budget and optimizer, then one table.

Settings come from built-in defaults, then a JSON `--config` file, then the command line (each overriding the last).
Exit codes: 0 every run finished; 1 the table was written but a run failed or diverged (its row says how);
2 bad input, found before anything trains.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from bpfree import methods, models
from bpfree.commands.train import add_training_arguments, config_from_args, set_threads
from bpfree.core.errors import UsageError
from bpfree.lab.compare import run_all, run_folder
from bpfree.lab.results import load_run, write_report
from bpfree.training import recipes
from bpfree.training.checks import output_folder
from bpfree.training.config import OPTIMIZERS, SCHEDULES
from bpfree.training.runfolder import RunLock, parse_json
from bpfree.training.stage_processes import train_staged
from bpfree.training.stages import PIPELINE_RULES, check_stages
from bpfree.training.train import TrainConfig

METHOD_OPTIONS_RULE = (
    "Method options (--tangents, ...) go to every compared method that declares them; methods that do not declare "
    "an option train without it, with their own defaults. METHOD=VALUE pairs give per-method values, like --lr: "
    "--tangents fg-a=4,lg-fg-a=16. The recipe settings (--lr, --optimizer, --momentum, --weight-decay, --schedule, "
    "--warmup-epochs, --batch-size) take METHOD=VALUE pairs too; a setting not given comes from each method's recipe "
    "(bpfree/training/recipes.py). An option that none of the compared methods declares is an error. "
    "Rerunning the same command skips finished runs, resumes unfinished ones from their checkpoints and does not "
    "retry diverged ones unless their settings change (they would diverge again); a finished or unfinished run "
    "folder trained with other settings is refused, except "
    "that a larger --epochs extends finished runs when the schedule is constant. "
    "A --config file is a JSON object whose keys are these long option names (methods, seeds, lr, epochs, hidden, "
    "tangents, ...; - or _), lists as arrays, per-method values as objects ({\"bp\": 0.05, \"fg-a\": 0.01}), "
    "plus an optional \"description\" that titles results.md. "
    "Every method's setup (model, estimator, one step on a few examples) is checked before any run trains: one "
    "that cannot work stops the comparison with exit code 2. Exit code 1: the table was written, but at least one "
    "run failed or diverged (its row says how; the others completed); 0: every run finished."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON experiment file (see configs/); command-line options override its values")
    parser.add_argument("--methods", default=None, metavar="A,B,...",
                        help="learning rules to compare, e.g. bp,fg-a (see `bpfree methods`)")
    parser.add_argument("--seeds", default="0", metavar="S,S,...", help="seeds; every method is trained once per seed")
    add_training_arguments(parser, single=False)
    parser.add_argument("--lr", default=None, metavar="LR|METHOD=LR,...",
                        help="learning rate: one float for all methods, or METHOD=LR pairs, e.g. bp=0.05,fg-a=0.01 "
                        "(a bare float before them sets the rest); auto (or METHOD=auto): found on validation data "
                        "per method, as in `train` (default: from each method's recipe, auto where it is not "
                        "validated)")
    parser.add_argument("--out", default=None,
                        help="comparison folder (default runs/compare-MODEL-DATA); runs go to OUT/METHOD/seed-S")
    parser.add_argument("--no-plots", action="store_true", help="only the table and the CSV, no PNGs")
    parser.epilog = METHOD_OPTIONS_RULE
    per_method_recipe_flags(parser)
    # Defaults are applied in `run`, below the config file's values: to know what the command line set, every
    # option parses to None unless given. The help still shows the real defaults.
    actions: dict[str, argparse.Action] = {}
    defaults: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "no_plots"):
            continue
        key = action.option_strings[-1].lstrip("-").replace("-", "_")
        actions[key] = action
        defaults[key] = action.default
        if action.default is not None and action.default is not False and "default" not in (action.help or ""):
            action.help = f"{action.help} (default {action.default})"
        action.default = None
    parser.set_defaults(compare_actions=actions, compare_defaults=defaults)


RECIPE_CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}


def per_method_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """Let the recipe settings take METHOD=VALUE pairs: parse them as text here, typed per method in `plan`."""
    for action in parser._actions:
        if action.dest in recipes.RECIPE_FIELDS:
            kind = type(recipes.BASE[action.dest])
            action.type, action.choices = None, None
            action.metavar = action.metavar or f"{'X' if kind is str else kind.__name__.upper()}|METHOD=X,..."


def typed(where: str, key: str, raw: Any) -> Any:
    """One recipe setting (`key`) as its type and checked (a config file may give numbers as numbers)."""
    kind, choices = type(recipes.BASE[key]), RECIPE_CHOICES.get(key)
    if key == "lr" and isinstance(raw, str) and raw.strip().lower() == "auto":
        return "auto"  # the lr finder chooses per method (bpfree/training/lrfind.py)
    try:
        if isinstance(raw, bool) or (kind is not str and not isinstance(raw, (str, int, float))):
            raise ValueError
        value = kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {'a number' if kind is not str else 'a name'}, got {raw!r}") from None
    if choices is not None and value not in choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def recipe_grid(values: dict[str, Any], names: list[str], grid: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per method, its list of recipe settings {field: value, or None for the method's recipe}: one entry for
    `compare`; for `sweep` (grid=True) the product of the comma-separated values given per field."""
    axes: dict[str, dict[str, list[Any]]] = {m: {} for m in names}
    for key in recipes.RECIPE_FIELDS:
        flag = key.replace("_", "-")
        per = split_per_method(flag, values[key], names) if values.get(key) is not None else {}
        for m in names:
            raw = per.get(m, per.get(None))
            items = [None] if raw is None else raw if isinstance(raw, list) else \
                str(raw).split(",") if isinstance(raw, str) else [raw]
            if len(items) > 1 and not grid:
                raise UsageError(f"--{flag}: one value per method, got {raw!r} (to try several: bpfree sweep)")
            if len(set(map(str, items))) != len(items):
                raise UsageError(f"--{flag} lists a value twice: {raw!r}")
            axes[m][key] = [None if v is None else typed(f"--{flag}", key, v.strip() if isinstance(v, str) else v)
                            for v in items]
    return {m: [dict(zip(axes[m], combo)) for combo in itertools.product(*axes[m].values())] for m in names}


def point_label(point: dict[str, Any]) -> str:
    """A sweep's run-folder name for the recipe settings given at one grid point, e.g. `lr=0.01,optimizer=adam`."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()
                    if v is not None) or "recipe"


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A config-file value checked as strictly as the command line would check it."""
    if key in ("methods", "seeds", "classes") and isinstance(value, list):  # comma-separated on the command line
        value = ",".join(map(str, value))
    if key in ("methods", "seeds", "classes") and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if key in recipes.RECIPE_FIELDS:  # one value or per-method values; checked now, split per method later
        if isinstance(value, str) and "=" in value:
            return value
        for v in value.values() if isinstance(value, dict) else [value]:
            for item in v if isinstance(v, list) else [v]:  # a list: a sweep's grid
                typed(f"{where}: {key}", key, item)
        return value
    if action.dest.startswith(("method_opt_", "model_opt_", "shared_opt_")):
        return value  # parsed later (per-method values, typed options)
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    kind = action.type or str
    ok = isinstance(value, str) or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)) \
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UsageError(f"{where}: {key} must be {'a number' if kind is not str else 'a string'}, got {value!r}")
    try:
        value = kind(value)
    except ValueError:
        raise UsageError(f"{where}: {key}: expected {kind.__name__}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def load_config(path: str, actions: dict[str, argparse.Action]) -> tuple[dict[str, Any], str]:
    """The settings of a JSON experiment file (keys are long option names, `-` or `_`), and its description."""
    try:
        raw = parse_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start}): is it a JSON file?") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a JSON object of settings")
    description = raw.pop("description", "")
    values = {}
    for name, value in raw.items():
        key = name.replace("-", "_")
        if key not in actions:
            raise UsageError(f"{path}: unknown setting {name!r}{_closest(key, list(actions))}")
        values[key] = _coerce(actions[key], key, value, path)
    return values, str(description)


def split_per_method(flag: str, value: Any, names: list[str]) -> dict[str | None, Any]:
    """`v`, `A=v,B=w` or `v,A=w` (or a JSON object) -> {None: default, method: value}. Values may hold commas
    themselves (`fg-a=64,64`): a token without `=` continues the previous one."""
    if isinstance(value, dict):
        # A config file's per-method values cover its whole method list; `--methods` may pick a subset of it.
        pairs: dict[str | None, Any] = {k: v for k, v in value.items() if k in names}
    elif isinstance(value, str) and "=" in value:
        pairs, current = {}, None
        for token in value.split(","):
            if "=" in token:
                current, token = (s.strip() for s in token.split("=", 1))
                pairs[current] = token
            else:
                pairs[current] = f"{pairs[current]},{token}" if current in pairs else token
    else:
        return {None: value}
    for name in pairs:
        if name is not None and name not in names:
            raise UsageError(f"--{flag} names {name!r}, which is not among the compared methods "
                             f"({', '.join(names)}){_closest(name, names)}")
    return pairs


def parse_list(flag: str, value: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise UsageError(f"--{flag} is empty")
    if len(set(items)) != len(items):
        raise UsageError(f"--{flag} lists a value twice: {value}")
    return items


def plan(args: argparse.Namespace, grid: bool = False) -> tuple[list[str], list[TrainConfig], Path, str]:
    """The methods, one TrainConfig per method × seed, the comparison folder and the file's description.

    grid=True (`bpfree sweep`): one TrainConfig per method × grid point × seed, in OUT/METHOD/POINT/seed-S.
    """
    actions: dict[str, argparse.Action] = args.compare_actions
    values: dict[str, Any] = dict(args.compare_defaults)
    description = ""
    if args.config:
        from_file, description = load_config(args.config, actions)
        values.update(from_file)
    values.update({k: getattr(args, a.dest) for k, a in actions.items() if getattr(args, a.dest) is not None})
    if not values.get("methods"):
        raise UsageError("give the methods to compare: --methods bp,fg-a (or a --config file naming them)")
    names = parse_list("methods", values["methods"])
    for name in names:
        methods.METHODS.get(name)
    try:
        seeds = [int(s) for s in parse_list("seeds", values["seeds"])]
    except ValueError:
        raise UsageError(f"--seeds must be integers, got {values['seeds']!r}") from None
    if grid and hasattr(args, "sweep_defaults"):
        args.sweep_defaults(values)
    per_method = recipe_grid(values, names, grid)
    # Method options, and the options both a method and the model may take (--groups): per method or for all.
    method_opts = {k: split_per_method(k.replace("_", "-"), v, names) for k, v in values.items()
                   if actions[k].dest.startswith(("method_opt_", "shared_opt_")) and v is not None}
    for key, per in method_opts.items():
        if actions[key].dest.startswith("shared_opt_") or not per:
            continue  # the model may take it in every method's run; or a config file gave it only to other methods
        takers = [m for m in names if key in methods.METHODS.get(m).options]
        flag = "--" + key.replace("_", "-")
        if not takers:
            raise UsageError(f"none of the compared methods ({', '.join(names)}) takes {flag}")
        for m in per:
            if m is not None and m not in takers:
                raise UsageError(f"method {m!r} does not take {flag} (methods that do: {', '.join(takers)})")
    safe_data = str(values["data"]).replace(":", "_").replace("/", "_")
    kind = "sweep" if grid else "compare"
    out = Path(values.get("out") or f"runs/{kind}-{models.short_name(str(values['model']))}-{safe_data}")
    configs = []
    for method in names:
        ns = argparse.Namespace(**{a.dest: values.get(k) for k, a in actions.items()
                                   if not a.dest.startswith("method_opt_") and a.dest not in recipes.RECIPE_FIELDS})
        for key, per in method_opts.items():
            value = per.get(method, per.get(None))
            if actions[key].dest.startswith("shared_opt_"):
                setattr(ns, actions[key].dest, value)
            else:
                setattr(ns, f"method_opt_{key}", value if key in methods.METHODS.get(method).options else None)
        for point in per_method[method]:
            for seed in seeds:
                folder = out / method / point_label(point) / f"seed-{seed}" if grid else run_folder(out, method, seed)
                configs.append(config_from_args(ns, method=method, seed=seed, resume=False, out=str(folder), **point))
    args.compare_threads = values.get("threads")
    choose_stages(configs, grid)
    return names, configs, out, description


def choose_stages(configs: list[TrainConfig], grid: bool) -> None:
    """--stages S: a method that cannot be staged trains in one process (its config says --stages 1; one line
    says why). --microbatches and --pipeline-schedule apply to bp and fa only."""
    first = configs[0] if configs else None
    stages = first.stages if first else 1
    given = (first.microbatches, first.pipeline_schedule) if first else (None, None)
    if stages != 1 and grid:
        raise UsageError("--stages: sweep trains each grid point in one process; use compare or train")
    # the stage count, and the pipeline flags with it (given once for the whole comparison)
    check_stages("bp", stages, 1, None, microbatches=given[0], pipeline_schedule=given[1])
    said = set()
    for cfg in configs:
        if cfg.method not in PIPELINE_RULES:
            cfg.microbatches = cfg.pipeline_schedule = None
        if stages == 1:
            continue
        try:
            check_stages(cfg.method, stages, 1, None, options=cfg.method_options,
                         microbatches=cfg.microbatches, pipeline_schedule=cfg.pipeline_schedule)
        except UsageError as e:
            if cfg.method not in said:
                said.add(cfg.method)
                print(f"bpfree: {cfg.method} trains in one process: {e}", file=sys.stderr)
            cfg.stages = 1


def run(args: argparse.Namespace) -> int:
    names, configs, out, description = plan(args)
    set_threads(args.compare_threads)
    for cfg in configs:
        cfg.check()  # before the folder is made: bad numbers leave nothing behind
    output_folder(out)
    with RunLock(out, "comparison folder"):  # a second compare on OUT stops at once instead of interleaving
        threads = args.compare_threads
        run_all(configs, staged=lambda cfg: train_staged(cfg, threads) if cfg.stages > 1 else None)
        groups = {m: [load_run(Path(c.out)) for c in configs if c.method == m] for m in names}
        table = write_report(groups, out, title=description or " vs ".join(names), plots=not args.no_plots)
    print(table, end="")
    print(f"(results in {out}/results.md, results.csv" + ("" if args.no_plots else ", test_error.png, final_error.png")
          + ")")
    failed = [f"{r.config.get('method')} seed {r.config.get('seed')}" for runs in groups.values() for r in runs
              if not r.finished]
    if failed:
        print(f"bpfree: {len(failed)} of {len(configs)} runs did not finish ({', '.join(failed)}); "
              "see their rows", file=sys.stderr)
        return 1
    return 0
