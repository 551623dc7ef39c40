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
# 2b. The batch-norm factor (recipes.BATCH_NORM_FACTORS) changes the prior of five rules on the two batch-norm models:
#     those ten cells rerun, their oracle reused, their rows replaced in the table (the table before: *-no-bn-factor).
PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 \
    --models ResBNCNN,DepthwiseCNN --rules bp,sff-block,fdfa,lg-fg-a,fg-a \
    --oracle-from benchmarks/results/lr_auto/digits/results-no-bn-factor.jsonl \
    --out benchmarks/results/lr_auto/digits-bn-factor --merge-into benchmarks/results/lr_auto/digits/results.jsonl
# 2c. Adam with a linear warm-up (2 of 40 epochs) for dfa, fdfa, lg-fg-a, fg-a at the oracle's best rate and the
#     one above. The recorded results stop part-way through DepthwiseCNN (CPU time); this command finishes it.
PYTHONPATH=.:benchmarks $PYTHON benchmarks/lr_auto_warmup.py --oracle benchmarks/results/lr_auto/digits/results.jsonl \
    --models LayerNormMLP,Conv1DNet,TinyMixer,DepthwiseCNN --out benchmarks/results/lr_auto/digits/warmup
# 2d. The same warm-up as a share of the run (--warmup-fraction 0.05: 2 of 40 epochs, fixed beforehand from 2c), dfa
#     and fdfa, auto and oracle both under it; set beside step 1's rows (validation first, then test errors).
for R in dfa fdfa; do
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 --rules $R \
      --extra "--warmup-fraction 0.05" --out benchmarks/results/lr_auto/digits-warmup-$R
  $PYTHON benchmarks/lr_auto_compare.py --before benchmarks/results/lr_auto/digits/results.jsonl \
      --after benchmarks/results/lr_auto/digits-warmup-$R/results.jsonl \
      --out benchmarks/results/lr_auto/digits-warmup-$R/compare.md
done
# 2e. Would a probe that never moves above the prior choose better? Offline, on the recorded probes (not shipped).
PYTHONPATH=. $PYTHON benchmarks/lr_auto_no_upward.py --results benchmarks/results/lr_auto/digits/results.jsonl
PYTHONPATH=. $PYTHON benchmarks/lr_auto_no_upward.py --results benchmarks/results/lr_auto/digits-warmup-fdfa/results.jsonl
# 2f. The same question for fdfa out of sample: its row on models the suite did not contain (wider copies, the
#     residual CNNs, a depth-8 ViT), seeds 0-2 on the models without batch norm (with it the prior is the grid's top,
#     so the rule changes nothing), then the replay (validation errors first; test errors of each rate's grid run).
O=benchmarks/results/lr_auto/digits-fdfa-oos
NOBN=WideLayerNormMLP,WideTinyMixer,examples/vit.py:ViT
PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 --rules fdfa \
    --model-file examples/fga_sizes.py --out $O \
    --models $NOBN,ResidualCNN8,WideResBNCNN,ResidualCNN16,examples/residual_cnn.py:ResidualCNN
for SEED in 1 2; do
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 --rules fdfa \
      --model-file examples/fga_sizes.py --models $NOBN --extra "--seed $SEED" --out $O/fdfa-oos-seed$SEED
done
cat $O/results.jsonl $O/fdfa-oos-seed1/results.jsonl $O/fdfa-oos-seed2/results.jsonl > $O/results-all-seeds.jsonl
PYTHONPATH=. $PYTHON benchmarks/lr_auto_no_upward.py --results $O/results-all-seeds.jsonl > $O/no-upward.md
# 3. MNIST and a CIFAR-10 subset (2,000 training images, 500 validation, 4 epochs): LayerNormMLP only (CPU time).
for D in mnist cifar10; do
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 4 --batch-size 32 --val-split 500 \
      --train-size 2000 --models LayerNormMLP --out benchmarks/results/lr_auto/$D
done
# 3b. Two convolutional/mixer suite models at a smaller budget (1,000 training images, 3 epochs: CPU time).
for D in mnist cifar10; do
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 3 --batch-size 32 --val-split 500 \
      --train-size 1000 --models ResBNCNN,TinyMixer --out benchmarks/results/lr_auto/$D-conv
done
# 3c. The dfa and fdfa cells of steps 3 and 3b again (they ran before dfa's warm-up and fdfa's Rademacher
#     tangents shipped), merged into them.
PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 --rules fdfa \
    --out benchmarks/results/lr_auto/digits-fdfa-rerun --merge-into benchmarks/results/lr_auto/digits/results.jsonl
for D in mnist cifar10; do
  for R in dfa fdfa; do
    PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 4 --batch-size 32 --val-split 500 \
        --train-size 2000 --models LayerNormMLP --rules $R --out benchmarks/results/lr_auto/$D-$R-rerun \
        --merge-into benchmarks/results/lr_auto/$D/results.jsonl
    PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 3 --batch-size 32 --val-split 500 \
        --train-size 1000 --models ResBNCNN,TinyMixer --rules $R --out benchmarks/results/lr_auto/$D-conv-$R-rerun \
        --merge-into benchmarks/results/lr_auto/$D-conv/results.jsonl
  done
done
# 4. The issue's table (examples/residual_cnn.py, digits, 20 epochs), rerun with no recipe flags.
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a \
    --model examples/residual_cnn.py:ResidualCNN --data digits --epochs 20 --threads 1 --no-plots \
    --out runs/lr_auto/issue-table > benchmarks/results/lr_auto/issue-table.md
cp runs/lr_auto/issue-table/results.csv benchmarks/results/lr_auto/issue-table.csv
# 4b. The same for the five rules whose prior the batch-norm factor changes on this model (the others are unchanged).
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,sff-block,fdfa,lg-fg-a,fg-a \
    --model examples/residual_cnn.py:ResidualCNN --data digits --epochs 20 --threads 1 --no-plots \
    --out runs/lr_auto/issue-table-bn-factor > benchmarks/results/lr_auto/issue-table-bn-factor.md
# 4c. Its oracle: the same command at each grid rate on the probe's own validation split (239 images), chosen on
#     validation error; the chosen rates retrained on every training image (compare --lr METHOD=RATE), beside the
#     no-flag rows rerun on this code. (The run folders are kept under runs/; the tables are copied. The table's
#     no-flag dfa ran before dfa's warm-up shipped; rerun now, this step's dfa warms up and equals 4d's.)
M="--model examples/residual_cnn.py:ResidualCNN --data digits --epochs 20 --threads 1 --no-plots"
R=benchmarks/results/lr_auto/issue-oracle
mkdir -p $R
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a $M \
    --out runs/lr_auto/issue-table-now > $R/no-flags.md
PYTHONPATH=. $PYTHON -m bpfree sweep --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a $M --val-split 239 \
    --lr 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 --warmup-fraction 0 --out runs/lr_auto/issue-oracle
cp runs/lr_auto/issue-oracle/sweep.md $R/sweep.md
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a $M --warmup-fraction 0 \
    --lr bp=0.003,fa=0.01,sff-block=0.01,l-bp=0.01,dfa=0.003,fdfa=0.003,lg-fg-a=0.01,fg-a=0.0003 \
    --out runs/lr_auto/issue-oracle-final > $R/oracle-retrained.md
# 4d. dfa with its shipped warm-up (recipes.WARMUP_FRACTIONS): no flags, and its oracle under the same schedule.
PYTHONPATH=. $PYTHON -m bpfree compare --methods dfa $M --out runs/lr_auto/issue-table-dfa-warmup > $R/no-flags-dfa-warmup.md
PYTHONPATH=. $PYTHON -m bpfree sweep --methods dfa $M --val-split 239 --warmup-fraction 0.05 \
    --lr 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 --out runs/lr_auto/issue-oracle-dfa-warmup
cp runs/lr_auto/issue-oracle-dfa-warmup/sweep.md $R/sweep-dfa-warmup.md
PYTHONPATH=. $PYTHON -m bpfree compare --methods dfa $M --lr 0.003 --out runs/lr_auto/issue-oracle-dfa-warmup-final \
    > $R/oracle-retrained-dfa-warmup.md
PYTHONPATH=. $PYTHON benchmarks/lr_auto_sgd.py --models ResBNCNN,TinyMixer   # 5. Adam or SGD on unseen models
# 6. fg-a's size-scaled prior (recipes.SIZE_SCALED_PRIORS). (a) How noisy the issue model's landscape is: its fg-a
#    grid at seeds 0, 1, 2 on the probe's 239 validation images. (b) Size measures and the signal-to-noise reading
#    per model, the rules compared in and out of sample (validation errors only). (c) Wider and narrower copies
#    (examples/fga_sizes.py), some at the other budget, each scored at the rate the rule gives. (d) The suite's fg-a
#    row rerun (oracle reused: fg-a's optimizer and schedule did not change) and the issue table's fg-a cell.
PYTHONPATH=. $PYTHON -m bpfree sweep --methods fg-a $M --val-split 239 --lr 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 \
    --warmup-fraction 0 --seeds 0,1,2 --out runs/lr_auto/fg-a-seeds
S=runs/lr_auto/fg-a-sizes
G="--methods fg-a --data digits --threads 1 --no-plots"
for X in ResidualCNN8 ResidualCNN16 ResidualCNN64 WideResBNCNN WideTinyMixer; do  # the issue's budget
  [ $X = ${X#Wide} ] && OUT=$X || OUT=$X-b128
  PYTHONPATH=. $PYTHON -m bpfree sweep $G --model examples/fga_sizes.py:$X --epochs 20 --val-split 239 \
      --lr 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 --warmup-fraction 0 --out $S/$OUT
done
for X in WideLayerNormMLP WideResBNCNN WideTinyMixer; do  # the suite's budget
  PYTHONPATH=. $PYTHON -m bpfree sweep $G --model examples/fga_sizes.py:$X --epochs 40 --batch-size 32 \
      --val-split 300 --lr 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 --out $S/$X
done
PYTHONPATH=. $PYTHON -m bpfree sweep $G --model examples/residual_cnn.py:ResidualCNN --epochs 40 --batch-size 32 \
    --val-split 239 --lr 3e-4,1e-3,3e-3,1e-2,3e-2 --warmup-fraction 0 --out $S/ResidualCNN-b32
# The library's mlp on MNIST (its validated sweep's budget) at four of fg-a's rates: the rule's counterexample.
PYTHONPATH=. $PYTHON -m bpfree sweep --methods fg-a --model mlp --data mnist --train-size 10000 --val-split 5000 \
    --epochs 3 --schedule cosine --optimizer adam --lr 1e-4,3e-4,3e-3,1e-2 --threads 1 --no-plots \
    --out runs/lr_auto/fg-a-mlp-mnist
# The copies with no rate given (--lr auto), as a user runs them; the old prior's runs: the same loop on main at
# 5129046 (the old prior, and fg-a's batch-norm change), run from outside this tree, into $S-auto-old.
A=$S-auto
for X in ResidualCNN8 ResidualCNN16 ResidualCNN64 WideResBNCNN WideTinyMixer; do
  [ $X = ${X#Wide} ] && OUT=$X || OUT=$X-b128
  PYTHONPATH=. $PYTHON -m bpfree train --method fg-a --model examples/fga_sizes.py:$X --data digits --epochs 20 \
      --val-split 239 --threads 1 --out $A/$OUT
done
for X in WideLayerNormMLP WideResBNCNN WideTinyMixer; do
  PYTHONPATH=. $PYTHON -m bpfree train --method fg-a --model examples/fga_sizes.py:$X --data digits --epochs 40 \
      --batch-size 32 --val-split 300 --threads 1 --out $A/$X
done
PYTHONPATH=. $PYTHON -m bpfree train --method fg-a --model examples/residual_cnn.py:ResidualCNN --data digits \
    --epochs 40 --batch-size 32 --val-split 239 --threads 1 --out $A/ResidualCNN-b32
[ -f benchmarks/results/lr_auto/digits/results-fg-a-bn-factor.jsonl ] || \
    cp benchmarks/results/lr_auto/digits/results.jsonl benchmarks/results/lr_auto/digits/results-fg-a-bn-factor.jsonl
PYTHONPATH=. $PYTHON benchmarks/lr_auto_fga.py --out benchmarks/results/lr_auto/fg-a --sweep runs/lr_auto/fg-a-seeds \
    --suite benchmarks/results/lr_auto/digits/results-fg-a-bn-factor.jsonl \
    --oos $S/ResidualCNN8,$S/ResidualCNN16,$S/ResidualCNN64,$S/WideLayerNormMLP,$S/WideResBNCNN,$S/WideTinyMixer,$S/ResidualCNN-b32,$S/WideResBNCNN-b128,$S/WideTinyMixer-b128 \
    --auto size-scaled=$A,old=$S-auto-old \
    --other benchmarks/results/lr_auto/mnist/results.jsonl,benchmarks/results/lr_auto/cifar10/results.jsonl,benchmarks/results/lr_auto/mnist-conv/results.jsonl,benchmarks/results/lr_auto/cifar10-conv/results.jsonl
PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data digits --epochs 40 --batch-size 32 --val-split 300 --rules fg-a \
    --oracle-from benchmarks/results/lr_auto/digits/results-fg-a-bn-factor.jsonl \
    --out benchmarks/results/lr_auto/digits-fg-a-size --merge-into benchmarks/results/lr_auto/digits/results.jsonl
PYTHONPATH=. $PYTHON -m bpfree compare --methods fg-a $M --out runs/lr_auto/issue-table-fg-a-size > $R/no-flags-fg-a-size.md
# 3d. (After step 6.) The fg-a cells of steps 3 and 3b with its size-scaled prior, the oracle reused, merged.
for D in mnist cifar10; do
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 4 --batch-size 32 --val-split 500 \
      --train-size 2000 --models LayerNormMLP --rules fg-a --oracle-from benchmarks/results/lr_auto/$D/results.jsonl \
      --out benchmarks/results/lr_auto/$D-fg-a-rerun --merge-into benchmarks/results/lr_auto/$D/results.jsonl
  PYTHONPATH=. $PYTHON benchmarks/lr_auto.py --data $D --epochs 3 --batch-size 32 --val-split 500 \
      --train-size 1000 --models ResBNCNN,TinyMixer --rules fg-a \
      --oracle-from benchmarks/results/lr_auto/$D-conv/results.jsonl \
      --out benchmarks/results/lr_auto/$D-conv-fg-a-rerun --merge-into benchmarks/results/lr_auto/$D-conv/results.jsonl
done
# 7. The issue's table with no flags on the final code: all eight rules in one compare.
PYTHONPATH=. $PYTHON -m bpfree compare --methods bp,fa,sff-block,l-bp,dfa,fdfa,lg-fg-a,fg-a $M \
    --out runs/lr_auto/issue-table-final > $R/no-flags-final.md
