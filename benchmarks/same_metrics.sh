#!/bin/bash
# Seeded runs of 11 rules on the code at REV and on the working tree: every metric but the seconds must match.
# A refactor that claims to change no numbers is checked with this. Usage: bash benchmarks/same_metrics.sh REV
# (about 5 minutes on one core; digits ships with scikit-learn, so no data set is needed).
set -u
REV=${1:?usage: benchmarks/same_metrics.sh REV}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$HERE/.venv/bin/python}
OLD=$(mktemp -d); OUT=$(mktemp -d)
git -C "$HERE" worktree add -q --detach "$OLD" "$REV"
trap 'git -C "$HERE" worktree remove --force "$OLD"' EXIT
for m in bp fa dfa fdfa fg-w fg-a l-bp lg-fg-a lg-fg-w sff-block ff; do
  model=(--model examples/residual_cnn.py:ResidualCNN)
  case $m in ff|fg-w) model=(--model mlp --hidden 32,32) ;; esac
  for tree in old new; do
    dir=$HERE; [ $tree = old ] && dir=$OLD
    (cd "$dir" && PYTHONPATH=$dir "$PY" -m bpfree train --data digits --epochs 2 --threads 1 --train-size 400 \
       --method $m "${model[@]}" --lr 0.01 --optimizer adam --out "$OUT/$tree-$m" > /dev/null 2> "$OUT/$tree-$m.err")
  done
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out, bad = pathlib.Path(sys.argv[1]), 0
for old in sorted(p for p in out.glob("old-*") if p.is_dir()):
    new = out / old.name.replace("old-", "new-", 1)
    runs = [[json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (old, new)]
    diffs = [(r["epoch"], k, r[k], s.get(k)) for r, s in zip(*runs) for k in r
             if k not in ("seconds", "peak_memory_mb") and r[k] != s.get(k)]
    print(f"{old.name[4:]:10s}", "same" if not diffs and len(runs[0]) == len(runs[1]) else f"differ: {diffs[:2]}")
    bad += bool(diffs)
print("runs that differ:", bad)
PY
