"""Counting the bytes a block of code all-gathers (to prove an adapter save gathers no frozen weight)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class GatheredBytes(TorchDispatchMode):
    """Within the block, ``bytes`` sums what this rank received from all-gathers (functional and c10d).

    Example:
        >>> with GatheredBytes() as counted:
        ...     _ = torch.ones(3) * 2
        >>> counted.bytes
        0
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if "gather" in name and "c10d" in name:
            # functional ops return the gathered tensor; c10d's in-place ones fill their first argument
            received = _tensors(out) if "functional" in name else _tensors(args[0])
            self.bytes += sum(t.numel() * t.element_size() for t in received)
            self.calls += 1
        return out
