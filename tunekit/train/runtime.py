"""The device side of a run: the ``Accelerator`` and peak-memory measurement."""

from __future__ import annotations

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
