"""One rank of a data-parallel test run (tests/test_distributed.py starts two of these, torchrun-style env).

Trains each configuration given as JSON in argv[1] in ONE process group (one start-up for several runs: the test
machine has two cores), and saves this rank's final parameters as OUT/rank{r}.pt for the test to compare. Then it
starts the first run again without --resume: every rank must get rank 0's one-line error (OUT/rank{r}.error).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bpfree.errors import UsageError
from bpfree.train import Run, TrainConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
for kw in json.loads(sys.argv[1]):
    run = Run(TrainConfig(**kw), show_progress=False)
    run.train()
    torch.save(run.model.state_dict(), Path(kw["out"]) / f"rank{dist.get_rank()}.pt")
first = json.loads(sys.argv[1])[0]
try:
    Run(TrainConfig(**first), show_progress=False).train()
except UsageError as e:
    (Path(first["out"]) / f"rank{dist.get_rank()}.error").write_text(str(e))
dist.destroy_process_group()
