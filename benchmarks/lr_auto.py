"""`--lr auto` against an oracle, on six model types the recipe table has never seen (examples/lr_suite.py).

For each rule x model: (a) `bpfree train` with no recipe flags (Adam, cosine, lr found by the probe on the
validation split), and (b) the oracle: the same run at each of the six grid learning rates, the one with the lowest
validation error (last epoch; ties: validation loss) chosen, its test error reported. Same data, split, epochs and
batch size for both. Every run is an ordinary `bpfree train` command run in this process (the exact commands are
in the output); finished runs are reused, so an interrupted benchmark continues where it stopped.

    PYTHONPATH=. python benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 \
        --out benchmarks/results/lr_auto/digits

Writes OUT/results.jsonl (one line per cell, as it finishes) and OUT/table.md. Test errors are read only after
both choices are made.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lr_suite import SUITE  # noqa: E402

from bpfree.cli import main  # noqa: E402
from bpfree.training.lrfind import GRID  # noqa: E402

RULES = ("bp", "fa", "sff-block", "l-bp", "dfa", "fdfa", "lg-fg-a", "fg-a")


def run(argv: list[str], out: Path, epochs: int) -> dict:
    """One `bpfree train` (reused if finished): its last metrics, seconds, config; a divergence as status."""
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    code = 0
    if len(lines) < epochs:
        if out.exists() and not (out / "failed.json").exists():
            shutil.rmtree(out)  # an unfinished run from an interrupted benchmark: start it again
        if not (out / "failed.json").exists():
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv + ["--out", str(out)])
                except Exception as e:  # a crash is a failed cell, not the end of the benchmark
                    print(f"{out}: {type(e).__name__}: {e}", file=sys.stderr)
                    code = -1
            (out / "wall.json").write_text(json.dumps({"wall_seconds": time.perf_counter() - start}))
        lines = metrics.read_text().splitlines() if metrics.exists() else []
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    if len(lines) < epochs:
        return {"status": f"failed (exit {code})" if code else "failed", "val_error": 100.0, "val_loss": math.inf,
                "test_error": math.nan, "seconds": math.nan, "config": config}
    records = [json.loads(line) for line in lines]
    wall = json.loads((out / "wall.json").read_text())["wall_seconds"] if (out / "wall.json").exists() else math.nan
    last = records[-1]
    return {"status": "ok", "val_error": last["val_error"], "val_loss": last["val_loss"],
            "test_error": last["test_error"], "seconds": wall, "config": config}


def model_spec(name: str, model_file: str) -> str:
    """The --model a benchmark model name stands for: FILE:CLASS as given, else a class of `model_file`."""
    return name if ":" in name else f"{model_file}:{name}"


def cell(rule: str, spec: str, args: argparse.Namespace, root: Path) -> dict:
    model = spec.rsplit(":", 1)[-1]  # rows and run folders are named by the class
    base = ["train", "--method", rule, "--model", model_spec(spec, args.model_file), "--data", args.data,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--val-split", str(args.val_split),
            "--threads", "1"] + (["--train-size", str(args.train_size)] if args.train_size else []) + args.extra
    start = time.perf_counter()
    recorded = args.recorded_oracle.get((model, rule))
    if recorded is not None:  # the oracle's numbers from an earlier run of this benchmark (same commands)
        return finish(rule, model, base, args, root, recorded, start)
    grid = [run(base + ["--lr", f"{lr:g}"], root / "grid" / model / rule / f"lr={lr:g}", args.epochs) for lr in GRID]
    best = min(range(len(GRID)), key=lambda i: (grid[i]["val_error"], grid[i]["val_loss"], i))  # validation only
    if args.oracle_only:  # the oracle's runs do not depend on the probe: they can run before it is settled
        return {"rule": rule, "model": model, "oracle_lr": GRID[best], "grid_val": [g["val_error"] for g in grid],
                "grid_val_loss": [g["val_loss"] for g in grid], "seconds": round(time.perf_counter() - start, 1)}
    oracle = {"oracle_lr": GRID[best], "oracle_test": grid[best]["test_error"], "oracle_val": grid[best]["val_error"],
              "grid_val": [g["val_error"] for g in grid], "grid_val_loss": [g["val_loss"] for g in grid],
              "grid_test": [g["test_error"] for g in grid]}  # read after the choice; for offline replays
    return finish(rule, model, base, args, root, oracle, start)


def finish(rule: str, model: str, base: list[str], args: argparse.Namespace, root: Path, oracle: dict,
           start: float) -> dict:
    """The auto run of a cell, beside its oracle."""
    auto = run(base, root / "auto" / model / rule, args.epochs)
    probe = auto["config"].get("lr_probe") or {}
    return {"rule": rule, "model": model, "auto_lr": auto["config"].get("lr", math.nan), "auto_status": auto["status"],
            "auto_test": auto["test_error"], "auto_val": auto["val_error"], **oracle,
            "probe_seconds": probe.get("seconds"), "probe_steps": probe.get("steps"), "lr_probe": probe,
            "train_seconds": auto["seconds"] - (probe.get("seconds") or 0.0),  # the command's wall time, less the probe
            "meets_goal": meets(auto["test_error"], oracle["oracle_test"]),
            "seconds": round(time.perf_counter() - start, 1),
            "command_auto": "bpfree " + " ".join(base), "command_oracle": "bpfree " + " ".join(base) + " --lr LR"}


def meets(auto: float, oracle: float) -> bool:
    """The issue's goal: within max(2 points, 10 %) of the oracle, and not above 50 % where the oracle is below 20 %."""
    if math.isnan(auto):
        return False
    return auto <= oracle + max(2.0, 0.1 * oracle) and not (auto > 50 and oracle < 20)


def table(rows: list[dict]) -> str:
    lines = ["| model | rule | auto lr | auto test error (%) | oracle lr | oracle test error (%) | goal met | "
             "probe / rest of the run (s) |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        frac = (f"{r['probe_seconds']:.1f} / {r['train_seconds']:.1f}"
                if r["probe_seconds"] is not None and not math.isnan(r["train_seconds"]) else "")
        auto = f"{r['auto_test']:.2f}" if r["auto_status"] == "ok" else r["auto_status"]
        lines.append(f"| {r['model']} | {r['rule']} | {r['auto_lr']:g} | {auto} | {r['oracle_lr']:g} | "
                     f"{r['oracle_test']:.2f} | {'yes' if r['meets_goal'] else '**no**'} | {frac} |")
    met = sum(r["meets_goal"] for r in rows)
    lines.append(f"\n{met} of {len(rows)} cells meet the goal.")
    return "\n".join(lines) + "\n"


def matrix(rows: list[dict]) -> str:
    """Rule x model: `auto / oracle` test error (%), a cell missing the goal in bold."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    at = {(r["rule"], r["model"]): r for r in rows}
    lines = ["| rule | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for rule in rules:
        cells = []
        for model in models:
            r = at.get((rule, model))
            text = "" if r is None else f"{r['auto_test']:.1f} / {r['oracle_test']:.1f}"
            cells.append(text if r is None or r["meets_goal"] else f"**{text}**")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-split", type=int, default=300)
    p.add_argument("--train-size", type=int, default=0, help="the first N training examples after the split (0: all)")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--models", default=",".join(SUITE),
                   help="class names in --model-file, or FILE:CLASS (rows are named by the class)")
    p.add_argument("--model-file", default="examples/lr_suite.py",
                   help="the file whose classes --models names (models the suite did not contain: "
                        "examples/fga_sizes.py)")
    p.add_argument("--out", default="benchmarks/results/lr_auto/digits")
    p.add_argument("--extra", default="", metavar="FLAGS",
                   help="more flags for every run, auto and oracle alike, e.g. '--warmup-fraction 0.05'")
    p.add_argument("--oracle-only", action="store_true", help="train the oracle's grid only (OUT/oracle.jsonl)")
    p.add_argument("--merge-into", default=None, metavar="JSONL",
                   help="afterwards, replace these cells' rows in an earlier results.jsonl (same command) and rewrite "
                        "the table.md beside it: a rerun of the cells a change touched")
    p.add_argument("--oracle-from", default=None, metavar="JSONL",
                   help="take each cell's oracle (grid validation errors, choice, its test error) from an earlier "
                        "results.jsonl of the same command instead of training it again")
    return p.parse_args()


def main_() -> None:
    args = parse()
    args.recorded_oracle = {}
    args.extra = shlex.split(args.extra)
    if args.oracle_from:
        keys = ("oracle_lr", "oracle_test", "oracle_val", "grid_val")
        for line in Path(args.oracle_from).read_text().splitlines():
            row = json.loads(line)
            args.recorded_oracle[(row["model"], row["rule"])] = {**{k: row[k] for k in keys},
                                                                 "oracle_from": args.oracle_from}
    out = Path(args.out)
    root = Path("runs") / "lr_auto" / out.name  # the run folders (large); OUT keeps the summary
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / ("oracle.jsonl" if args.oracle_only else "results.jsonl"), "w") as log:
        for model in args.models.split(","):
            for rule in args.rules.split(","):
                row = cell(rule, model, args, root)
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if args.oracle_only:
                    print(f"{model} {rule}: oracle {row['oracle_lr']:g} ({row['seconds']} s)", flush=True)
                    continue
                print(f"{model} {rule}: auto {row['auto_lr']:g} -> {row['auto_test']:.2f} %, oracle "
                      f"{row['oracle_lr']:g} -> {row['oracle_test']:.2f} % ({row['seconds']} s)", flush=True)
                (out / "table.md").write_text(matrix(rows) + "\n" + table(rows))
    if args.merge_into and not args.oracle_only:
        merge(rows, Path(args.merge_into))


def merge(rows: list[dict], into: Path) -> None:
    """Replace the rows of `into` that `rows` reran (same model and rule), in place, and its table.md."""
    new = {(r["model"], r["rule"]): r for r in rows}
    merged = [new.get((r["model"], r["rule"]), r) for r in map(json.loads, into.read_text().splitlines())]
    into.write_text("".join(json.dumps(r) + "\n" for r in merged))
    (into.parent / "table.md").write_text(matrix(merged) + "\n" + table(merged))


if __name__ == "__main__":
    main_()
