"""`--stages S --nproc R`: R data-parallel replicas of each stage, S x R processes. Rank g is replica g % R of stage
g // R. Replica r of stage s sends its boundary to replica r of stage s+1; each replica trains on its share of every
batch (as a data-parallel rank does), and after each step the replicas of a stage average the gradients of the
parameters the stage owns (weighted by their examples, so the update is the whole batch's, as in one process) and
their batch-norm statistics. With R = 1 this is the plain staged run: no process group is made, no message sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from bpfree.core.group import Group, Shard, shard

# Rules whose step needs nothing of the other ranks (the estimator's default gradient average is their whole
# data-parallel policy): the local rules without seed-shared tangents, and bp / fa (each replica its own pipeline).
REPLICATED_RULES = ("l-bp", "l-fa", "lg-bp", "lg-fa", "lg-fg-a", "sff", "sff-block", "bp", "fa", "dfa", "fdfa",
                    "fg-a", "fg-w")
# Rules whose stages share the last stage's per-step signal (output error e, output tangent ẏ, directional
# derivatives d): within a replica's pipeline (`StageReplicas.pipe`, rooted at `peer(last)`), and synchronously only
# (a pipelined stage's late update would need its own average). Where the rule combines data-parallel ranks inside
# its step (fdfa's mean(ẏ uᵀ) for B, fg-w's K numbers d), the stage's replicas are its group (`ReplicaGroup`).
SIGNAL_RULES = ("dfa", "fdfa", "fg-a", "fg-w")


class StageReplicas:
    """This rank's place among the S x R processes, and the stage's replica group."""

    def __init__(self, group: Group, stages: int, replicas: int):
        self.group, self.stages, self.replicas = group, stages, replicas
        self.stage, self.replica = divmod(group.rank, replicas)
        self.pg: Any = None  # the stage's replicas (None: one replica)
        self.pipe: Any = None  # this replica's copy of every stage (None: the whole world, one replica)
        if replicas > 1:  # every rank makes every group, in the same order (torch.distributed's rule)
            for s in range(stages):
                pg = dist.new_group([s * replicas + r for r in range(replicas)])
                if s == self.stage:
                    self.pg = pg
            for r in range(replicas):
                pg = dist.new_group([s * replicas + r for s in range(stages)])
                if r == self.replica:
                    self.pipe = pg

    def peer(self, stage: int) -> int:
        """The rank of this replica's copy of `stage`."""
        return stage * self.replicas + self.replica

    @property
    def shard_args(self) -> dict[str, int]:
        """The data loader's arguments for this replica's share of each batch."""
        return {"rank": self.replica, "world_size": self.replicas} if self.replicas > 1 else {}

    def rows(self, batch_rows: int) -> Shard | None:
        """This replica's rows of a batch (None on one replica)."""
        return shard(batch_rows, self.replica, self.replicas) if self.replicas > 1 else None

    def average_(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        """In place, over the stage's replicas: each tensor becomes sum_r w_r t_r / sum_r w_r."""
        if self.replicas == 1 or not tensors:
            return
        packed = torch.cat([t.detach().reshape(-1).double() * weight for t in tensors]
                           + [torch.tensor([float(weight)], dtype=torch.float64, device=tensors[0].device)])
        self.group.guarded("all_reduce", dist.all_reduce, packed, group=self.pg)
        packed = packed[:-1] / packed[-1]
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(packed[offset:offset + n].view_as(t).to(t.dtype))
            offset += n

    def total(self, count: int) -> int:
        """`count` summed over the stage's replicas (each has its own rows)."""
        if self.replicas == 1:
            return count
        t = torch.tensor([count], dtype=torch.int64)
        self.group.guarded("all_reduce", dist.all_reduce, t, group=self.pg)
        return int(t.item())

    def per_stage(self, everyone: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's epoch summary (`StagedRun._combine`) merged per stage: tallies summed over the replicas, the
        wall time the slowest replica's, idle seconds their mean, bytes sent summed."""
        if self.replicas == 1:
            return everyone
        merged = []
        for s in range(self.stages):
            mine = everyone[s * self.replicas:(s + 1) * self.replicas]
            tally = {k: sum(m["tally"][k] for m in mine) for k in ("loss", "wrong", "seen")}
            extras: dict[str, float] = {}
            for m in mine:
                for k, v in m["tally"]["extras"].items():
                    extras[k] = extras.get(k, 0.0) + v
            merged.append({**mine[0], "tally": {**tally, "extras": extras}, "wall": max(m["wall"] for m in mine),
                           "idle": sum(m["idle"] for m in mine) / len(mine), "sent": sum(m["sent"] for m in mine)})
        return merged


class ReplicaGroup:
    """An estimator's data-parallel group made of the stage's replicas: what the rule combines inside its step
    (fdfa's batch mean of ẏ uᵀ, fg-w's directional derivatives) is the whole batch's, as one process makes it."""

    def __init__(self, copies: StageReplicas):
        self._copies = copies

    @property
    def active(self) -> bool:
        return self._copies.replicas > 1

    def weighted_mean_(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        self._copies.average_(tensors, weight)
