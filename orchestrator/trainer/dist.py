"""Process-group helpers shared by the run, its callbacks and the evaluation loop.

They live here, not in ``run.py``, so every trainer module can use them without importing
the run (which imports those modules): the trainer package has no import cycle. Each helper
is a no-op in a single process without a process group, so the same code runs under
``python -m`` and under ``torchrun``.
"""

from __future__ import annotations

import os
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def broadcast(obj: Any) -> Any:
    """``obj`` from global rank 0 on every rank."""
    if (d := _dist()) is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks, in float64 (token-weighted loss sums
    stay exact enough to compare runs to 1e-5 whatever the world size)."""
    if (d := _dist()) is None:
        return [float(v) for v in values]
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    if d.get_backend() == "nccl":
        t = t.cuda()
    d.all_reduce(t, op=d.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]
