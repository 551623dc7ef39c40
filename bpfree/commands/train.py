"""`bpfree train`: one method, one model, one data set. The options here are shared with `bpfree compare`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any

import torch

from bpfree import methods, models
from bpfree.core.errors import UsageError
from bpfree.core.registry import Option, Registry
from bpfree.training import distributed, recipes, stages
from bpfree.training.checks import check_nproc, check_threads
from bpfree.training.train import TrainConfig, train

DEFAULTS = TrainConfig()
FROM_RECIPE = "default: from the method's recipe for the model, see bpfree/training/recipes.py"


def add_entry_options(parser: argparse.ArgumentParser, registry: Registry, title: str) -> None:
    """One flag per option declared by any registered entry (default None = the entry's own default)."""
    owners: dict[str, list[str]] = {}
    for name in registry.names():
        for key in registry.get(name).options:
            owners.setdefault(key, []).append(name)
    group = parser.add_argument_group(title)
    existing = {s: a for a in parser._actions for s in a.option_strings}
    for key, names in sorted(owners.items()):
        flag = "--" + key.replace("_", "-")
        if flag in existing:  # declared by both registries (--groups: localmixer's and the loss grid's): one value
            action = existing[flag]  # sets it for whichever of the chosen method and model takes it
            action.dest = f"shared_opt_{key}"
            action.help = f"{action.help}; also the {registry.kind}s': {', '.join(names)}"
            continue
        # Entries may declare one name with different types (resnet18's int width, mobilenetv3's float width).
        kinds = dict.fromkeys(registry.get(n).options[key].kind for n in names)
        metavar = "|".join("A,B,..." if k is tuple else k.__name__.upper() for k in kinds)
        meanings: dict[str, list[str]] = {}  # one line per distinct meaning, naming the entries that share it
        for n in names:
            o = registry.get(n).options[key]
            choices = f" {{{','.join(map(str, o.choices))}}}" if o.choices else ""
            bounds = f"{'each ' if o.kind is tuple else ''}{o.bounds()}; " if o.bounds() else ""
            meanings.setdefault(f"{o.help}{choices} ({bounds}default {o.default}", []).append(n)
        help_text = "; ".join(f"{text}; {registry.kind}s: {', '.join(owners)})" for text, owners in meanings.items())
        group.add_argument(
            flag, dest=f"{registry.kind}_opt_{key}", default=None, metavar=metavar,
            help=help_text,
        )


def given_options(args: argparse.Namespace, kind: str, declared: Any) -> dict[str, Any]:
    """The options given on the command line for a `kind` ("method" / "model") entry: its own flags, plus the
    flags shared by both registries (`add_entry_options`) that the entry declares."""
    given: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith(f"{kind}_opt_"):
            given[key[len(kind) + 5:]] = value
        elif key.startswith("shared_opt_") and key[len("shared_opt_"):] in declared:
            given[key[len("shared_opt_"):]] = value
    return given


def entry_options(args: argparse.Namespace, registry: Registry, name: str) -> dict[str, Any]:
    return registry.resolve_options(name, given_options(args, registry.kind, registry.get(name).options))


def add_training_arguments(parser: argparse.ArgumentParser, single: bool = True, staged: bool = True) -> None:
    """One flag per run setting declared in `TrainConfig` (bpfree/training/config.py), then the method and model
    options of the registries. `single=False` (compare, sweep): no --method / --lr, which they take per method;
    `staged=False` (lr-find): no settings of --stages runs."""
    for f in fields(TrainConfig):
        meta = f.metadata
        if not meta.get("flag") or (not single and f.name in ("method", "lr")) or f.name in PROCESS_SETTINGS \
                or (meta.get("staged") and not staged):
            continue
        add_setting(parser, f.name, meta["option"], meta["unset"], meta["recipe"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice). 1 is fastest for small models and on "
                        "a busy machine: threads waiting for each other cost more than they share")
    add_entry_options(parser, methods.METHODS, "method")
    add_entry_options(parser, models.MODELS, "model")
    document_blocks_flag(parser)


# Settings only `train` takes (compare and sweep choose them per run; a split and a mode fit one rule).
PROCESS_SETTINGS = ("seed", "out", "resume", "dist_timeout", "stage_split", "stage_mode")


def add_setting(parser: argparse.ArgumentParser, name: str, declared: Option, unset: bool, recipe: bool) -> None:
    """The flag of one declared setting: its type and choices for argparse (and config files), its help with the
    bounds and the default; the bounds themselves are checked by TrainConfig.check."""
    flag = "--" + name.replace("_", "-")
    default = FROM_RECIPE if recipe else f"default {declared.default}" \
        if declared.default not in (None, False) and "default" not in declared.help else ""
    notes = "; ".join(n for n in (declared.bounds(), default) if n)
    help_text = f"{declared.help} ({notes})" if notes else declared.help
    if declared.kind is bool:
        parser.add_argument(flag, action="store_true", help=help_text)
        return
    kind = lr_value if name == "lr" else tuple_of_ints if declared.kind is tuple else declared.kind
    parser.add_argument(flag, type=kind, choices=declared.choices, default=None if unset else declared.default,
                        metavar="LR|auto" if name == "lr" else "A,B,..." if declared.kind is tuple else None,
                        help=help_text)


def tuple_of_ints(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def lr_value(text: str) -> float | str:
    """--lr: a number, or `auto` (the lr finder chooses before training)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


BLOCKS_HELP = ("; any other model: the submodules (dotted names, e.g. layer1,layer2) whose outputs are the block "
               "boundaries of block-wise rules (default: found from the model)")


def document_blocks_flag(parser: argparse.ArgumentParser) -> None:
    """`--blocks` is LocalMixer's block count and, for every other model, the names of the block boundaries."""
    for action in parser._actions:
        if "--blocks" in action.option_strings:
            action.help = (action.help or "") + BLOCKS_HELP
            action.metavar = "INT|A,B,..."


def model_options(args: argparse.Namespace, name: str) -> tuple[dict[str, Any], tuple[str, ...] | None]:
    """The model options given, resolved for `name` (a user's model takes none), and the block names given
    with --blocks to a model that has no `blocks` option of its own."""
    registered = models.user_model(name) is None
    given = given_options(args, "model", models.MODELS.get(name).options if registered else {})
    blocks = None
    own = registered and "blocks" in models.MODELS.get(name).options
    if given.get("blocks") is not None and not own:
        blocks = tuple(n.strip() for n in str(given.pop("blocks")).split(",") if n.strip())
        if not blocks:
            raise UsageError("--blocks: expected submodule names separated by commas")
    return models.resolve_options(name, given), blocks


def run_name(args: argparse.Namespace) -> str:
    """METHOD-MODEL-DATA for default run folders, safe as one path component."""
    return f"{args.method}-{models.short_name(args.model)}-{args.data}".replace(":", "_").replace("/", "_")


def config_from_args(args: argparse.Namespace, **override: Any) -> TrainConfig:
    """A TrainConfig from parsed arguments; `override` wins (compare sets method, lr, seed and out per run).

    Recipe settings (recipes.RECIPE_FIELDS) that are None in both were not given: they come from the recipe for
    the method and model, and config.json's `recipe` says which entry that was.
    """
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update({k: v for k, v in override.items() if v is not None or k not in recipes.RECIPE_FIELDS})
    if values.get("val_split") is None:
        values["val_split"] = 0
    values.setdefault("method", DEFAULTS.method)
    values.setdefault("model", DEFAULTS.model)
    given_lr = values.get("lr")
    if given_lr == "auto":
        values["lr"] = None  # the recipe's rate is the finder's prior
    chosen, values["recipe"] = recipes.apply(values["method"], values["model"],
                                             {k: values.get(k) for k in recipes.RECIPE_FIELDS})
    values.update(chosen)
    # --lr auto, and the default wherever the recipe is not validated for this method and model.
    values["lr_auto"] = given_lr == "auto" or (given_lr is None and not values["recipe"]["validated"])
    cfg = TrainConfig(**values)
    models.check(cfg.model)
    methods.METHODS.get(cfg.method)
    cfg.model_options, cfg.blocks = model_options(args, cfg.model)
    cfg.method_options = entry_options(args, methods.METHODS, cfg.method)
    return cfg


def recipe_summary(cfg: TrainConfig, args: argparse.Namespace) -> str:
    """`bp/mlp (validated): optimizer adam, lr 0.003, ...`: the recipe entry and the settings taken from it."""
    entry = cfg.recipe or {}
    taken = [k for k in recipes.RECIPE_FIELDS if getattr(args, k, None) is None
             and not (k == "momentum" and cfg.optimizer != "sgd")]
    shown = ", ".join(f"{k} {getattr(cfg, k):g}" if isinstance(getattr(cfg, k), float) else f"{k} {getattr(cfg, k)}"
                      for k in taken)
    status = "validated" if entry.get("validated") else "not validated"
    auto = ""
    if cfg.lr_auto:
        probed = bool((cfg.lr_probe or {}).get("grid"))
        auto = f"; lr {cfg.lr:g} " + ("found by the lr finder" if probed else "the rule's prior (too short to probe)")
    return f"{entry.get('entry')} ({status}): {shown or 'none taken'}{auto}"


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    torch.set_num_threads(check_threads(threads))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    for name in PROCESS_SETTINGS:
        meta = next(f.metadata for f in fields(TrainConfig) if f.name == name)
        add_setting(parser, name, meta["option"], meta["unset"], meta["recipe"])
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (the same as `torchrun --standalone "
                             "--nproc-per-node N -m bpfree train ...`); each takes 1/N of every batch (with "
                             "--stages S: N replicas of each stage, S x N processes)")
    parser.add_argument("--memory-report", action="store_true",
                        help="after training, measure bp's activation peak on the same model and batch and print it "
                             "beside the rule's (peak_memory_mb)")


def run(args: argparse.Namespace) -> int:
    check_nproc(args.nproc, args.device)
    distributed.check_timeout(args.dist_timeout)
    split = stages.parse_split(args.stage_split)
    stages.check_stages(args.method, args.stages, args.nproc, split, args.stage_mode,
                        entry_options(args, methods.METHODS, args.method), args.microbatches, args.pipeline_schedule)
    if args.stages > 1 and not distributed.launched_by_torchrun():  # every process sees --nproc: its replicas
        try:
            check_nproc(args.stages * args.nproc, args.device)
        except UsageError as e:
            raise UsageError(f"--stages {args.stages} x --nproc {args.nproc} processes: {e}") from None
        return distributed.launch(args.stages * args.nproc, getattr(args, "argv", sys.argv[1:]), title="staged run")
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return distributed.launch(args.nproc, distributed.strip_nproc(getattr(args, "argv", sys.argv[1:])))
    set_threads(args.threads)
    out = args.out or f"runs/{run_name(args)}"
    cfg = config_from_args(args, out=out)
    if args.stages > 1:
        records = stages.train(cfg, log_epochs=True, replicas=args.nproc)
    else:
        records = train(cfg, log_epochs=True)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports for the data-parallel run
        return 0
    if not records:
        raise UsageError("no epochs were run")
    last = records[-1]
    best = min(r["test_error"] for r in records)
    print(json.dumps({"method": cfg.method, "model": cfg.model, "data": cfg.data, "epochs": last["epoch"],
                      **({"val_error": round(last["val_error"], 3)} if "val_error" in last else {}),
                      "test_error": round(last["test_error"], 3), "best_test_error": round(best, 3),
                      "train_error": round(last["train_error"], 3),
                      "seconds_per_epoch": round(sum(r["seconds"] for r in records) / len(records), 2),
                      "out": cfg.out, "recipe": recipe_summary(cfg, args),
                      **(memory_report(cfg, records) if args.memory_report else {})}))
    return 0


def memory_report(cfg: TrainConfig, records: list[dict[str, Any]]) -> dict[str, float]:
    """The rule's activation peak per step beside bp's on a fresh copy of the model and the first batch (MiB)."""
    from bpfree.core.memory import measured_step
    from bpfree.training.train import load_data

    data = load_data(cfg)
    x, y = next(iter(data.train_batches(cfg.batch_size, torch.Generator().manual_seed(0))))
    x, y = x.to(cfg.device), y.to(cfg.device)

    def fresh_peak(method: str, **options: Any) -> float:
        torch.manual_seed(cfg.seed)
        model = models.build(cfg.model, num_classes=data.num_classes, input_shape=data.input_shape,
                             **cfg.model_options).to(cfg.device)  # fmt: skip
        return measured_step(methods.build(method, model, seed=cfg.seed, blocks=cfg.blocks, **options), x, y)[1]

    bp_mb = fresh_peak("bp")
    measured = [r["peak_memory_mb"] for r in records if "peak_memory_mb" in r]
    # CPU data-parallel runs measure no step during training: the rule is measured here, in one process.
    rule_mb = max(measured) if measured else fresh_peak(cfg.method, **cfg.method_options)
    print(f"activation peak per step: {cfg.method} {rule_mb:.1f} MiB, bp {bp_mb:.1f} MiB on the same model and "
          f"batch ({rule_mb / bp_mb:.2f}x bp)", file=sys.stderr)
    return {"peak_memory_mb": round(rule_mb, 1), "bp_peak_memory_mb": round(bp_mb, 1),
            "memory_vs_bp": round(rule_mb / bp_mb, 3)}
