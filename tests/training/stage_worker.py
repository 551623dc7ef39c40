"""One stage of a staged test run (tests/training/test_stages.py starts two of these, torchrun-style env).

Trains each configuration given as JSON in argv[1] (with "stages" and optional "split", "mode" and "resume_to") in ONE
process group, so the two-core test machine pays one start-up for all of them. Rank 0's checkpoint holds the whole
model. Then it asks for a split naming no block: each rank writes its one-line error to OUT/rank{r}.error.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bpfree.core.errors import UsageError
from bpfree.training.stages import StagedRun
from bpfree.training.train import TrainConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
for kw in json.loads(sys.argv[1]):
    split, resume_to = kw.pop("split", None), kw.pop("resume_to", None)
    kw.update(stage_split=",".join(split) if split else None, stage_mode=kw.pop("mode", "synchronous"))
    StagedRun(TrainConfig(**kw), show_progress=False).train()
    if resume_to:  # stopped after its epochs, then resumed to `resume_to` epochs
        StagedRun(TrainConfig(**{**kw, "epochs": resume_to, "resume": True}), show_progress=False).train()
first = {k: v for k, v in json.loads(sys.argv[1])[0].items() if k not in ("split", "resume_to", "mode")}
try:
    StagedRun(TrainConfig(**{**first, "out": first["out"] + "-bad", "stages": 2, "stage_split": "no.such.block"}),
              show_progress=False)
except UsageError as e:
    (Path(first["out"]) / f"rank{dist.get_rank()}.error").write_text(str(e))
dist.barrier()
dist.destroy_process_group()
