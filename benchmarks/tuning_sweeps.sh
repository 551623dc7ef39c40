#!/bin/sh
# The validation sweeps behind the "validated" entries of bpfree/recipes.py (docs/tuning.md). One process, one
# thread, short budgets: the first 10000 training examples after holding out 5000 for validation, 3 epochs.
# Rerunning skips finished runs. Usage: PYTHONPATH=. BPFREE_DATA=... sh benchmarks/tuning_sweeps.sh
set -e
PY=${PYTHON:-python}
COMMON="--data mnist --train-size 10000 --val-split 5000 --epochs 3 --schedule cosine --threads 1 --no-plots"
$PY -m bpfree sweep --methods bp,fg-a,fg-w --model mlp $COMMON \
    --optimizer bp=sgd,fg-a=adam,fg-w=adam --lr bp=0.01,0.03,0.1,0.3,fg-a=3e-5,1e-4,3e-4,1e-3,fg-w=3e-5,1e-4,3e-4,1e-3 \
    --out runs/sweep-mlp-mnist
$PY -m bpfree sweep --methods bp,lg-fg-a --model localmixer-m1-16 $COMMON \
    --optimizer sgd --lr bp=0.01,0.03,0.1,0.3,lg-fg-a=0.003,0.01,0.03,0.1 \
    --out runs/sweep-localmixer-m1-16-mnist
