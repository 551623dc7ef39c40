"""Two runs of benchmarks/lr_auto.py side by side (e.g. without and with a default's change), validation first.

For every cell in both: the auto run's validation error and the oracle's best validation error, before and after,
and whether auto meets the goal against its own oracle (within max(2 points, 10 %) of the oracle's validation
error). The decision is read from these columns; the test errors follow in a second table, once, after it.

    python benchmarks/lr_auto_compare.py --before benchmarks/results/lr_auto/digits/results.jsonl \\
        --after benchmarks/results/lr_auto/digits-warmup-dfa/results.jsonl --out OUT.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: str) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["rule"]): r for r in map(json.loads, Path(path).read_text().splitlines())}


def meets(auto: float, oracle: float) -> bool:
    return auto <= oracle + max(2.0, 0.1 * oracle) and not (auto > 50 and oracle < 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    before, after = rows(args.before), rows(args.after)
    cells = [k for k in after if k in before]
    lines = ["| model | rule | auto val, before | auto val, after | oracle best val, before | oracle best val, after "
             "| goal (val) before / after |", "|---|---|---:|---:|---:|---:|---|"]
    gain_auto, gain_oracle, met = [], [], [0, 0]
    for k in cells:
        b, a = before[k], after[k]
        ob, oa = min(b["grid_val"]), min(a["grid_val"])
        mb, ma = meets(b["auto_val"], ob), meets(a["auto_val"], oa)
        met[0] += mb
        met[1] += ma
        gain_auto.append(b["auto_val"] - a["auto_val"])
        gain_oracle.append(ob - oa)
        lines.append(f"| {k[0]} | {k[1]} | {b['auto_val']:.1f} ({b['auto_lr']:g}) | {a['auto_val']:.1f} "
                     f"({a['auto_lr']:g}) | {ob:.1f} | {oa:.1f} | {'yes' if mb else 'no'} / {'yes' if ma else 'no'} |")
    n = len(cells)
    lines += ["", f"Cells: {n}. Auto's validation error lower after in {sum(g > 0 for g in gain_auto)}, higher in "
              f"{sum(g < 0 for g in gain_auto)}; mean change {-sum(gain_auto) / max(1, n):+.1f} points. Oracle's best "
              f"lower after in {sum(g > 0 for g in gain_oracle)}, higher in {sum(g < 0 for g in gain_oracle)}; mean "
              f"change {-sum(gain_oracle) / max(1, n):+.1f} points. Goal met on validation: {met[0]} before, "
              f"{met[1]} after.", "", "Test errors (read after the decision):", "",
              "| model | rule | auto test, before | auto test, after | oracle test, before | oracle test, after |",
              "|---|---|---:|---:|---:|---:|"]
    for k in cells:
        b, a = before[k], after[k]
        lines.append(f"| {k[0]} | {k[1]} | {b['auto_test']:.1f} | {a['auto_test']:.1f} | {b['oracle_test']:.1f} | "
                     f"{a['oracle_test']:.1f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
