"""Small helpers shared by the Triton launchers (never imports triton itself).

``calculate_settings`` follows Liger-Kernel's helper of the same name
(https://github.com/linkedin/Liger-Kernel/blob/v0.5.10/src/liger_kernel/ops/utils.py,
BSD-2-Clause): one program covers a whole row, so the block is the row length
rounded up to a power of two, with more warps for longer rows.
"""

from __future__ import annotations

import torch

# Rows longer than this do not fit one program's registers/shared memory on current GPUs.
MAX_FUSED_SIZE = 65536


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def calculate_settings(n: int) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for a kernel that holds one row of ``n`` elements.

    Raises:
        ValueError: ``n`` exceeds ``MAX_FUSED_SIZE``.
    """
    block = next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row length {n} exceeds the fused-kernel limit {MAX_FUSED_SIZE}; use the reference backend")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def ensure_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def num_programs(device: torch.device, rows: int, interpret: bool) -> int:
    """Programs for a persistent row loop: one per SM on a GPU, a handful in the interpreter.

    Queried per call (never at import), so CPU-only processes never touch CUDA.
    """
    if interpret or device.type != "cuda":
        return max(1, min(rows, 4))
    return max(1, min(rows, torch.cuda.get_device_properties(device).multi_processor_count))


def check_dot_dtype(backend: str, *tensors: torch.Tensor, op: str) -> None:
    """Refuse bf16 ``tl.dot`` under the interpreter, which silently returns garbage there.

    Raises:
        ValueError: a bf16 tensor with the ``interpret`` backend.
    """
    if backend == "interpret" and any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        raise ValueError(
            f"{op}: bf16 tl.dot gives wrong results under the Triton interpreter; "
            "use fp32/fp16 there or the 'reference' backend"
        )
