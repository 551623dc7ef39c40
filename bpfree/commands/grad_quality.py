"""`bpfree grad-quality`: cosine and norm ratio of each method's gradient estimate to the exact gradient."""

from __future__ import annotations

import argparse

import torch

from bpfree import data as datasets
from bpfree import methods, models
from bpfree.commands.train import add_entry_options, document_blocks_flag, model_options, set_threads
from bpfree.core.errors import UsageError
from bpfree.lab.gradquality import gradient_quality, markdown_table, write_report
from bpfree.training.checks import check_device, check_seed, output_folder
from bpfree.training.config import DATA_HELP


def _list(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected a comma-separated list of {kind.__name__}, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: empty list")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp",
                        help="model (see `bpfree models`), or your own: path/to/file.py:Name or package.module:name")
    parser.add_argument("--data", default="digits", help=DATA_HELP)
    parser.add_argument("--data-root", default=None, help="folder holding the data sets")
    parser.add_argument("--methods", default="fg-w,fg-a", help="comma-separated methods (any registered)")
    parser.add_argument("--tangents", default="1,4,16,64", help="tangent counts K (methods that take them)")
    parser.add_argument("--aggregation", default="mean,orthogonal", help="aggregations (methods that take them)")
    parser.add_argument("--batches", type=int, default=4, help="training batches to evaluate on")
    parser.add_argument("--seeds", type=int, default=2, help="estimator seeds per batch")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per batch")
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for every method declaring KEY, e.g. tangent_dist=normal (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the model's initialisation and the batches")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", default="runs/grad-quality", help="folder for the JSON, markdown and PNG")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_entry_options(parser, models.MODELS, "model")
    document_blocks_flag(parser)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    names = _list(args.methods, str, "--methods")
    for n in names:
        methods.METHODS.get(n)
    ks = _list(args.tangents, int, "--tangents")
    if min(ks) < 1:
        raise UsageError("--tangents: every K must be at least 1")
    aggs = _list(args.aggregation, str, "--aggregation")
    if args.batches < 1 or args.seeds < 1 or args.batch_size < 1:
        raise UsageError("--batches, --seeds and --batch-size must be at least 1")
    opts = {}
    for item in args.method_option:
        if "=" not in item:
            raise UsageError(f"--method-option: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        owners = [n for n in names if key in methods.METHODS.get(n).options]
        if not owners:
            raise UsageError(f"--method-option: no selected method takes {key!r}")
        opts[key] = methods.METHODS.get(owners[0]).options[key].parse(key, value)
    for n in names:  # check every combination's options before spending time
        entry = methods.METHODS.get(n)
        trial = {k: v for k, v in opts.items() if k in entry.options}
        if "aggregation" in entry.options:
            for a in aggs:
                methods.METHODS.resolve_options(n, {**trial, "aggregation": a})
    check_seed(args.seed)
    device = check_device(args.device)
    model_opts, blocks = model_options(args, args.model)
    torch.manual_seed(args.seed)
    ds = datasets.load(args.data, args.data_root)
    model = models.build(args.model, ds.num_classes, ds.input_shape, **model_opts).to(device)
    out = output_folder(args.out)  # before the work: a file in the way would only show when the results are written
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for x, y in ds.train_batches(args.batch_size, gen):
        batches.append((x.to(device), y.to(device)))
        if len(batches) == args.batches:
            break
    rows = gradient_quality(model, names, batches, ks, aggs, range(args.seeds), opts, blocks=blocks)
    meta = {
        "model": args.model,
        "model_options": {k: list(v) if isinstance(v, tuple) else v for k, v in model_opts.items()},
        "data": args.data,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "seeds": args.seeds,
        "method_options": opts,
        "parameters": models.count_parameters(model),
        "note": "model at initialisation; exact gradient from bp on the same parameters and batch",
    }
    print(markdown_table(rows), end="")
    for p in write_report(rows, out, meta):
        print(f"wrote {p}")
    return 0
