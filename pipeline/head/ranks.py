"""Training on N ranks exactly as on one: which clips each rank takes, and how the ranks agree.

`fit()` (pipeline/head/fit.py) trains through a `Ranks`; one process is a world of one (`ALONE`) and the code
path is the same. pipeline/engines/torchrun.py forms the process group torchrun describes and hands its
`Ranks` in. What every rank must agree on, and how (else the ranks deadlock or drift apart):
* **The global batch.** Each epoch's order is the seeded permutation every rank computes alike; it is cut
  into global batches of `train.batch_size` clips, and rank r takes positions r, r + N, ... of each
  (`Ranks.share`). So every rank runs the same number of steps (a rank whose share of the last batch is
  empty still takes part: it runs one clip at loss weight 0), and the N ranks together see exactly the
  batches one process sees. Not torch's DistributedSampler: it pads the epoch with repeated clips and
  batches each rank's list on its own, so N ranks would train on other batches than one process.
* **The gradient.** DDP averages the ranks' gradients; each rank scales its mean loss by
  N * (its clips / the global batch's), so the average is the global batch's mean, as in one process, also
  for a last batch that does not divide evenly.
* **Dropout.** Masks are drawn per clip from a generator seeded by (seed, epoch, the clip's position)
  (pipeline/head/dropout.py, `ClipDropout`), so a clip gets the same mask whichever rank holds it.
* **Decisions.** The training loss and accuracies are summed over ranks (`Ranks.sum`); validation runs on
  each rank's share and the outputs are gathered to every rank (`Ranks.gather`), so the validation loss,
  early stopping and the non-finite-loss stop are computed from the same numbers everywhere.
* **Writing.** Rank 0 alone writes the checkpoint, the resume state, metrics and plots, prints and draws
  the progress bar (`Ranks.main`).
torch is imported inside the methods, so importing this module stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: rank `rank` of `world` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files, prints and draws the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's part of a global batch (or any list everyone holds alike): positions rank, rank + N, ..."""
        return rows[self.rank::self.world]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks, in float64 (the same result on every rank)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def place(self, device):
        """The rank's own GPU when several ranks train on CUDA (`device` as pick_device gave it), else `device`."""
        if self.distributed and getattr(device, "type", "") == "cuda":
            import torch

            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model):
        """`model` under DistributedDataParallel (one process: the model itself)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def _device(self):
        import torch.distributed as dist

        return f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"


ALONE = Ranks()
