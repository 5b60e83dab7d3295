"""The kernel pass criterion (FlashAttention's derived bound), with an fp64 oracle.

    err(kernel, oracle) <= 2 * err(reference_in_dtype, oracle) + FLOOR[dtype]

The oracle is the reference on fp64 copies, so the bound also means something
for fp32 kernels (an fp32 oracle would make err(reference_fp32, oracle) zero).
Tolerance values live in ``_tolerances.py``.
"""

from __future__ import annotations

import torch
from _tolerances import FLOOR, max_abs_diff


def assert_kernel_bound(name: str, kernel: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor,
                        dtype: torch.dtype) -> None:
    """Check one output or gradient; ``name`` says which in the failure message."""
    assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(oracle.shape)}"
    assert kernel.dtype == ref.dtype, f"{name}: dtype {kernel.dtype} != reference {ref.dtype}"
    kernel, ref, oracle = kernel.cpu(), ref.cpu(), oracle.cpu()
    err, base = max_abs_diff(kernel, oracle), max_abs_diff(ref, oracle)
    bound = 2 * base + FLOOR[dtype]
    assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (reference err {base:.3g})"


def grads(out: torch.Tensor | tuple, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor | None]:
    """Gradients of ``sum(out * g)`` (random g per output) w.r.t. ``inputs``; None where unused."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    want = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(outs, want, gouts, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in inputs]


def leaves(tensors: list[torch.Tensor | None], dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor | None]:
    """Detached copies in ``dtype`` on ``device`` that keep each tensor's requires_grad."""
    return [t.detach().to(device, dtype).requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
