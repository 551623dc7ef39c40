"""One process of a staged test run (tests/training/test_pipeline_bp.py and test_stage_replicas.py start S x R of
these, torchrun-style env): trains each configuration given as JSON in argv[1] ("stages", optional "replicas" and
"resume_to") in ONE process group, bp / fa through their pipeline, the other rules as `StagedRun`."""

import json
import sys

import torch
import torch.distributed as dist

from bpfree.training.pipeline_bp import PipelinedBackpropRun
from bpfree.training.stages import PIPELINE_RULES, StagedRun
from bpfree.training.train import TrainConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
for kw in json.loads(sys.argv[1]):
    replicas, resume_to = kw.pop("replicas", 1), kw.pop("resume_to", None)
    run = PipelinedBackpropRun if kw["method"] in PIPELINE_RULES else StagedRun
    run(TrainConfig(**kw), replicas=replicas, show_progress=False).train()
    if resume_to:  # stopped after its epochs, then resumed to `resume_to` epochs
        run(TrainConfig(**{**kw, "epochs": resume_to, "resume": True}), replicas=replicas, show_progress=False).train()
dist.barrier()
dist.destroy_process_group()
