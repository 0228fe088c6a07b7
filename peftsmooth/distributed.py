"""torchrun process groups and rank sharding, one place for training and certification.

Started by `torchrun`, every process joins one group: NCCL when the process's device is a CUDA GPU
(each rank on cuda:LOCAL_RANK) unless PEFTSMOOTH_DIST_BACKEND=gloo, gloo otherwise. Started plainly,
the world is one rank and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if started under torchrun (idempotent); else a 1-rank world."""
    if world_size_from_env() <= 1:
        return DistInfo(0, 1, device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        nccl = device.type == "cuda" and os.environ.get("PEFTSMOOTH_DIST_BACKEND") != "gloo"
        dist.init_process_group(backend="nccl" if nccl else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. the run directory)."""
    if info.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64 on the rank's device)."""
    if info.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def rank_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Every `world_size`-th item starting at `rank`: the shard of one process (or one `certify.shard`)."""
    return list(items[rank::world_size])


def shutdown(info: DistInfo) -> None:
    """Leave the process group at the end of a torchrun command (a no-op in a 1-rank world)."""
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
