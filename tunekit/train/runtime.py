"""The device side of a run: the ``Accelerator``, peak-memory measurement, and refusing an
external multi-process launch that one-process training cannot serve."""

from __future__ import annotations

import os
import resource
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized


def make_accelerator(mixed_precision: str) -> Accelerator:
    """An ``Accelerator`` for one process with ``mixed_precision`` ("no" | "bf16" | "fp16").

    Raises:
        ValueError: fp16 without a CUDA GPU (accelerate would silently run fp32 on a CPU).
    """
    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("train.mixed_precision='fp16' needs a CUDA GPU (on a CPU it would silently run fp32); "
                         "use 'bf16' or 'no'")
    # AcceleratorState is a process-wide singleton that refuses a second precision; a new Trainer
    # in the same process (a sweep, a notebook, tests) legitimately wants its own, so start over.
    # _reset_state is what accelerate's own test utilities call; the process group is kept.
    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()
    # step_scheduler_with_optimizer=False: the trainer steps the schedule once per optimizer step
    # (accelerate would step it once per process).
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda, step_scheduler_with_optimizer=False)


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
            "rows unsynchronised and write the same output.dir; run it without the launcher (multi-process "
            "strategies are not available yet)")
