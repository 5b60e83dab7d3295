"""Process facts the trainer reports or refuses on: peak memory, an external multi-process launch
that one-process training cannot serve, and how the C allocator keeps CPU memory between steps."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import sys
from collections.abc import Iterator

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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
RETAINED_MMAP_THRESHOLD = 256 * 2**20
"""Blocks up to this size come from the heap (and are reused) rather than their own mmap."""
RETAINED_TRIM_THRESHOLD = 2**30
"""Free memory at the top of the heap is handed back to the OS only past this size, during training."""
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20
"""The thresholds after training: where glibc's own adaptive ones end up (its 64-bit maximum mmap threshold
and twice that), so later work in the process neither keeps a gigabyte free nor faults in every block."""


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def retained_cpu_memory(device: torch.device, enabled: bool = True) -> Iterator[bool]:
    """Within the block, keep the memory a CPU training step frees for the next step (glibc only).

    Each step frees its activations and allocates them again. glibc returns large blocks (each
    its own ``mmap``) and the freed top of the heap to the OS right away, so every step
    page-faults its activations back in, zero-filled by the kernel: ~5% of the CPU time of a
    20M-parameter LoRA step (``bench/README.md``). Raising the mmap and trim thresholds keeps
    that memory in the process; the peak resident set is the same, since the same tensors are
    live at the peak. On leaving, the thresholds drop to ``AFTER_*_THRESHOLD`` (fixed from then on:
    glibc has no way back to its adaptive ones) and ``malloc_trim`` hands the retained free memory back.

    Nothing changes off a CPU, off glibc, when ``enabled`` is false (``train.retain_cpu_memory``),
    or when the environment already tunes malloc (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``).

    Yields:
        Whether the thresholds were raised.
    """
    libc = _glibc() if enabled and device.type == "cpu" else None
    if libc is not None and any(os.environ.get(name) for name in _MALLOC_ENV):
        libc = None
    retained = ((_M_MMAP_THRESHOLD, RETAINED_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD))
    raised = libc is not None and all([libc.mallopt(param, value) == 1 for param, value in retained])
    try:
        yield raised
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
            libc.malloc_trim(0)
