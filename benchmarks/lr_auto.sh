#!/bin/sh
# The --lr auto measurements of docs/tuning.md, one process at a time, one thread each (about two hours on one
# core of the project's shared 2-core machine). Finished runs are reused: rerunning continues where it stopped.
set -e
PYTHON=${PYTHON:-.venv/bin/python}
# 1. Six unseen model types x eight rules on digits: --lr auto against the 6-point validation oracle. (The table in
#    docs/tuning.md took the oracle's numbers from the earlier run, adding
#    --oracle-from benchmarks/results/lr_auto/digits/results-6-point-probe.jsonl: the oracle does not depend on the
#    probe, and the cells rerun gave identical numbers.)
PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 \
    --out benchmarks/results/lr_auto/digits
# 2. How the probe spends its budget and the per-rule priors, chosen offline on the oracle's validation errors.
PYTHONPATH=. $PYTHON benchmarks/lr_auto_design.py --oracle benchmarks/results/lr_auto/digits/results.jsonl \
    --out benchmarks/results/lr_auto/digits/design
# 3. MNIST and a CIFAR-10 subset (2,000 training images, 500 validation, 4 epochs): LayerNormMLP only (CPU time).
for D in mnist cifar10; do
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 4 --batch-size 32 --val-split 500 \
      --train-size 2000 --models LayerNormMLP --out benchmarks/results/lr_auto/$D
done
# 4. The issue's table (examples/residual_cnn.py, digits, 20 epochs), rerun with no recipe flags.
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a \
    --model examples/residual_cnn.py:ResidualCNN --data digits --epochs 20 --threads 1 --no-plots \
    --out runs/lr_auto/issue-table > benchmarks/results/lr_auto/issue-table.md
cp runs/lr_auto/issue-table/results.csv benchmarks/results/lr_auto/issue-table.csv
PYTHONPATH=. $PYTHON benchmarks/lr_auto_sgd.py --models ResBNCNN,TinyMixer   # 5. Adam or SGD on unseen models
