"""`bpfree report RUN_DIR...`: the results table and plots of existing run folders (compare folders or single runs).

Runs with the same settings except the seed form one row; a method appearing with several settings gets one row
per setting, named by what differs (e.g. `bp (lr=0.1)`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bpfree.core.errors import UsageError
from bpfree.lab.results import find_runs, group_runs, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders holding them (such as a `bpfree compare` output folder)")
    parser.add_argument("--out", default=None,
                        help="where to write results.md, results.csv and the plots (default: the RUN_DIR, if one)")
    parser.add_argument("--title", default=None, help="heading of results.md (default: the methods' names)")
    parser.add_argument("--no-plots", action="store_true", help="only the table and the CSV")


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    if args.out is None and len(dirs) > 1:
        raise UsageError("several RUN_DIRs: say where the report goes with --out DIR")
    out = Path(args.out) if args.out else dirs[0]
    groups = group_runs(find_runs(dirs))
    table = write_report(groups, out, title=args.title or " vs ".join(groups), plots=not args.no_plots)
    print(table, end="")
    print(f"(results in {out}/results.md, results.csv" + ("" if args.no_plots else ", test_error.png, final_error.png")
          + ")")
    return 0
