"""One rank of a data-parallel test run (tests/training/test_distributed.py starts two of these, torchrun-style env).

Trains each configuration given as JSON in argv[1] in ONE process group (one start-up for several runs: the test
machine has two cores), and saves this rank's final parameters as OUT/rank{r}.pt for the test to compare. Then it
starts the first run again without --resume: every rank must get rank 0's one-line error (OUT/rank{r}.error), and
checks Group.weighted_mean_ on a big (in-place) and small (packed) tensors with unequal weights (OUT/rank{r}.mean).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bpfree.core.errors import UsageError
from bpfree.core.group import BUCKET, Group
from bpfree.training.train import Run, TrainConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
for kw in json.loads(sys.argv[1]):
    resume_to = kw.pop("resume_to", None)  # stop after the first epoch, then --resume to this many
    run = Run(TrainConfig(**kw), show_progress=False)
    run.train()
    if resume_to:
        run = Run(TrainConfig(**{**kw, "epochs": resume_to, "resume": True}), show_progress=False)
        run.train()
    torch.save(run.model.state_dict(), Path(kw["out"]) / f"rank{dist.get_rank()}.pt")
    # The estimator's learned state besides the parameters (fdfa's feedback, ff's running means).
    learned = [*run.estimator.reduced_state(), *(getattr(run.estimator, "feedback", None) or [])]
    torch.save([t for t in learned if isinstance(t, torch.Tensor)], Path(kw["out"]) / f"rank{dist.get_rank()}.state.pt")
first = json.loads(sys.argv[1])[0]
try:
    Run(TrainConfig(**first), show_progress=False).train()
except UsageError as e:
    (Path(first["out"]) / f"rank{dist.get_rank()}.error").write_text(str(e))
rank = dist.get_rank()
tensors = [torch.full((BUCKET,), rank + 1.0), torch.full((3, 2), 10.0 * (rank + 1)), torch.full((BUCKET // 2,), -1.0)]
Group(rank, 2).weighted_mean_(tensors, weight=3 if rank == 0 else 1)  # (3 * 1 + 1 * 2) / 4 = 1.25 for the first
(Path(first["out"]) / f"rank{rank}.mean").write_text(json.dumps([t.unique().tolist() for t in tensors]))
dist.destroy_process_group()
