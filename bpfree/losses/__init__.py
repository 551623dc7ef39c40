"""Local losses (Ren et al. 2022): the fused patch-wise + group-wise loss grid and the local objectives."""

from bpfree.losses.contrastive import augment, nt_xent
from bpfree.losses.grid import LossGrid, local_loss_grid

__all__ = ["LossGrid", "augment", "local_loss_grid", "nt_xent"]
