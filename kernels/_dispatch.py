"""Backend choice for kernel calls, resolved per call (never at import).

- ``"triton"``: compiled Triton kernels; only for CUDA tensors with triton importable.
- ``"interpret"``: the same Triton kernels run by Triton's CPU interpreter
  (needs ``TRITON_INTERPRET=1`` set before triton is imported). Tests only:
  it is orders of magnitude slower than the reference.
- ``"reference"``: the pure-PyTorch implementation (the CPU path).

``use_backend(name)`` forces one for a block (tests, debugging); otherwise
CUDA tensors get Triton and everything else the reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch

Backend = Literal["triton", "interpret", "reference"]
BACKENDS: tuple[str, ...] = ("triton", "interpret", "reference")

_forced: ContextVar[str | None] = ContextVar("tunekit_kernel_backend", default=None)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Force a backend inside the block.

    Raises:
        ValueError: unknown name, or ``"interpret"`` without ``TRITON_INTERPRET=1``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'interpret' needs TRITON_INTERPRET=1 set before triton is imported")
    if name in ("triton", "interpret") and not triton_available():
        raise ValueError(f"backend {name!r} needs triton installed (pip install 'tunekit[kernels]')")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backend(*tensors: torch.Tensor) -> Backend:
    """The backend for a call on ``tensors``: the forced one, else by device."""
    forced = _forced.get()
    if forced is not None:
        return forced  # type: ignore[return-value]
    if tensors and all(t.is_cuda for t in tensors if t is not None) and triton_available():
        return "triton"
    return "reference"
