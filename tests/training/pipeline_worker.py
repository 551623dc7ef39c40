"""One stage of bp's / fa's pipeline in a test (tests/training/test_pipeline_bp.py starts two of these, torchrun-style
env): trains each configuration given as JSON in argv[1] ("stages", optional "resume_to") in ONE process group."""

import json
import sys

import torch
import torch.distributed as dist

from bpfree.training.pipeline_bp import PipelinedBackpropRun
from bpfree.training.train import TrainConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
for kw in json.loads(sys.argv[1]):
    stages, resume_to = kw.pop("stages"), kw.pop("resume_to", None)
    PipelinedBackpropRun(TrainConfig(**kw), stages, show_progress=False).train()
    if resume_to:  # stopped after its epochs, then resumed to `resume_to` epochs
        PipelinedBackpropRun(TrainConfig(**{**kw, "epochs": resume_to, "resume": True}), stages,
                             show_progress=False).train()
dist.barrier()
dist.destroy_process_group()
