"""Training past one process: `torchrun --nproc-per-node N -m pipeline train ...` runs DDP; without torchrun
the same command is one process, through the same code (a world of one; pipeline/head/ranks.py says how N
ranks train exactly as one).

Backend: gloo on the CPU, nccl on CUDA (one GPU per rank, `LOCAL_RANK`). The environment torchrun sets
(WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is what makes a run distributed; across nodes
torchrun's own `--nnodes`/`--rdzv-endpoint` apply unchanged, with the cache on storage every node reads.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from pipeline.errors import UserError
from pipeline.head.ranks import ALONE, Ranks


class DistributedError(UserError):
    """torchrun's environment is incomplete or the process group cannot form; the message says what to do."""


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} in the environment is not a number (torchrun sets it)") from None


@contextlib.contextmanager
def join_ranks(device: str = "auto") -> Iterator[Ranks]:
    """The process group torchrun's environment describes, for the length of a training run; without torchrun
    (no WORLD_SIZE, or 1) a world of one, and nothing is started. `device` is train.device: cuda (or auto with
    CUDA) means nccl and one GPU per local rank, else gloo."""
    world = _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1
    if world <= 1:
        yield ALONE
        return
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the run with torchrun "
                               "(torchrun --nproc-per-node N -m pipeline train ...)")
    ranks = Ranks(_env_int("RANK"), world, _env_int("LOCAL_RANK"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if ranks.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {ranks.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                   "start at most one process per GPU")
        torch.cuda.set_device(ranks.local_rank)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", rank=ranks.rank, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot form the process group of {world} ranks: {str(exc).splitlines()[0]}") from None
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
