"""Process facts the trainer reports or refuses on: peak memory, and an external multi-process launch
that one-process training cannot serve."""

from __future__ import annotations

import os
import resource
import sys

import torch


def peak_memory_mib() -> float:
    """Peak CUDA memory allocated when on a GPU, else the process's peak resident set size, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def external_launch_problem() -> str | None:
    """Why this process must not train alone: a launcher (torchrun, accelerate launch) started
    several (``WORLD_SIZE`` > 1 or a non-zero ``LOCAL_RANK``); None when it is the only one.

    With ``distributed.strategy: none`` every such process would train on the same rows without
    synchronising and write the same output folder.
    """
    world, local_rank = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_RANK", "")
    several = (world.isdigit() and int(world) > 1) or (local_rank.isdigit() and int(local_rank) > 0)
    if not several:
        return None
    return (f"distributed.strategy: none trains in one process, but a launcher (torchrun, accelerate launch) started "
            f"several (WORLD_SIZE={world or 'unset'}, LOCAL_RANK={local_rank or 'unset'}): each would train the same "
            "rows unsynchronised and write the same output.dir; set distributed.strategy: ddp, fsdp or deepspeed")
