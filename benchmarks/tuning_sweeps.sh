#!/bin/sh
# The validation sweeps behind the "validated" entries of bpfree/training/recipes.py (docs/tuning.md). One process, one
# thread, short budgets: MNIST, 5000 training examples held out for validation, the first 10000 of the rest for
# training, 3 epochs, cosine schedule. Rerunning skips finished runs, so a widened grid trains only its new points
# (fg-a on mlp and l-fa / lg-fa on the LocalMixer were widened where their first choice sat at the grid's edge).
# Usage: PYTHONPATH=. BPFREE_DATA=... PYTHON=.venv/bin/python sh benchmarks/tuning_sweeps.sh
set -e
PY=${PYTHON:-python}
COMMON="--data mnist --train-size 10000 --val-split 5000 --epochs 3 --schedule cosine --threads 1 --no-plots"
LRS="1e-4,3e-4,1e-3,3e-3,0.01,0.03,0.1,0.3"
$PY -m bpfree sweep --methods bp,fg-a,fg-w --model mlp $COMMON \
    --optimizer bp=sgd,adam,fg-a=adam,fg-w=adam \
    --lr bp=1e-3,3e-3,0.01,0.03,0.1,0.3,fg-a=3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,fg-w=3e-5,1e-4,3e-4,1e-3,3e-3,1e-2 \
    --out runs/sweep-mlp-mnist
$PY -m bpfree sweep --methods bp,lg-fg-a --model localmixer-m1-16 $COMMON \
    --optimizer sgd,adam --lr $LRS --out runs/sweep-localmixer-m1-16-mnist
$PY -m bpfree sweep --methods l-bp,lg-bp,fg-w,fg-a,lg-fg-w,fa,l-fa,lg-fa,dfa --model localmixer-m1-16 $COMMON \
    --optimizer sgd --lr $LRS,l-fa=$LRS,1,lg-fa=$LRS,1 --out runs/sweep-localmixer-m1-16-mnist-rest
$PY -m bpfree sweep --methods bp,fg-a,lg-fg-a --model localmixer-s1-1 $COMMON \
    --optimizer sgd --lr $LRS --out runs/sweep-localmixer-s1-1-mnist
# The LocalMixer re-sweep on the code whose heads and LG target follow the authors' (docs/tuning.md).
for M in m1-16 s1-1; do
  $PY -m bpfree sweep --methods bp,l-bp,lg-bp,fg-w,fg-a,lg-fg-w,lg-fg-a,fa,l-fa,lg-fa,dfa --model localmixer-$M \
      $COMMON --optimizer sgd --lr 3e-3,0.01,0.03,0.1,0.3 --out runs/resweep-localmixer-$M-mnist
done
# mlp: the feedback-alignment rules.
$PY -m bpfree sweep --methods fa,dfa,fdfa --model mlp $COMMON --optimizer adam --lr 1e-4,3e-4,1e-3,3e-3,1e-2 \
    --out runs/sweep-mlp-fa
# mlp: the local and Forward-Forward rules (1e-2 added for the methods whose choice sat at 3e-3).
$PY -m bpfree sweep --methods l-bp,l-fa,lg-fg-a,lg-fg-w,sff,sff-block,ff --model mlp $COMMON --optimizer adam \
    --lr l-bp=1e-4,3e-4,1e-3,3e-3,1e-2,l-fa=1e-4,3e-4,1e-3,3e-3,1e-2,lg-fg-w=1e-4,3e-4,1e-3,3e-3,1e-2,ff=1e-4,3e-4,1e-3,3e-3,1e-2,lg-fg-a=1e-4,3e-4,1e-3,3e-3,sff=1e-4,3e-4,1e-3,3e-3,sff-block=1e-4,3e-4,1e-3,3e-3 \
    --out runs/sweep-mlp-local
