#!/bin/sh
# The --lr auto measurement of docs/tuning.md, one process at a time, one thread each (about 60 minutes on one
# core of the project's shared 2-core machine). Finished runs are reused: rerunning continues where it stopped.
set -e
PYTHON=${PYTHON:-.venv/bin/python}
# 1. Six unseen model types x eight rules on digits: --lr auto against the 6-point validation oracle.
PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 \
    --out benchmarks/results/lr_auto/digits
# 2. The issue's table (examples/residual_cnn.py, digits, 20 epochs), rerun with no recipe flags.
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a \
    --model examples/residual_cnn.py:ResidualCNN --data digits --epochs 20 --threads 1 --no-plots \
    --out runs/lr_auto/issue-table > benchmarks/results/lr_auto/issue-table.md
cp runs/lr_auto/issue-table/results.csv benchmarks/results/lr_auto/issue-table.csv
PYTHONPATH=. $PYTHON benchmarks/lr_auto_sgd.py --models ResBNCNN,TinyMixer   # 3. Adam or SGD on unseen models
