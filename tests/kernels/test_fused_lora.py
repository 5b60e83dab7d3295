"""Triton fused LoRA linear (interpreter) vs the PyTorch reference: y, dx, dW, db, dA, dB."""

from __future__ import annotations

import pytest
import torch
from _kernel_bound import assert_kernel_bound, grads, leaves

from tunekit.kernels import lora_linear, lora_linear_ref, use_backend

IN, OUT = 40, 37  # neither a multiple of the 32-wide interpreter tiles
# (lead shape, rank, bias, weight trainable): one row; 33 rows over two row tiles; rank 16 fills BLOCK_R
CASES = [((1,), 5, True, False), ((3, 11), 5, False, False), ((2, 9), 16, True, True)]


def _inputs(lead, rank, bias, train_w):
    x = torch.randn(*lead, IN, dtype=torch.float64, requires_grad=True)
    w = (0.2 * torch.randn(OUT, IN, dtype=torch.float64)).requires_grad_(train_w)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True) if bias else None
    a = (0.2 * torch.randn(rank, IN, dtype=torch.float64)).requires_grad_()
    bb = torch.randn(OUT, rank, dtype=torch.float64, requires_grad=True)
    return [x, w, b, a, bb]


def _run(fn, tensors):
    y = fn(*tensors, 0.7)
    present = [t for t in tensors if t is not None]
    return [y, *grads(y, present)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_lora_linear_matches_reference(case, dtype):
    _check(case, dtype, "cpu", "interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_linear_triton_on_gpu(dtype):
    _check(((4, 333), 16, True, True), dtype, "cuda", "triton")


def _check(case, dtype, device, which):
    tensors = _inputs(*case)
    oracle = _run(lora_linear_ref, tensors)
    low = leaves(tensors, dtype, device)
    ref = _run(lora_linear_ref, low)
    with use_backend(which):
        out = _run(lora_linear, low)
    names = [n for n, t in zip(("x", "w", "b", "a", "bb"), tensors) if t is not None]
    for name, k, r, o in zip(["y", *(f"d{n}" for n in names)], out, ref, oracle):
        if o is None:
            assert k is None and r is None, f"{name}: frozen weight got a gradient"
            continue
        assert_kernel_bound(name, k, r, o, dtype)


def test_lora_linear_refuses_bf16_in_the_interpreter():
    t = [torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16), None,
         torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 2, dtype=torch.bfloat16)]
    with use_backend("interpret"), pytest.raises(ValueError, match="bf16"):
        lora_linear(*t, 1.0)


def test_lora_linear_cpu_default_is_reference():
    t = [torch.randn(3, 8), torch.randn(4, 8), torch.randn(4), torch.randn(2, 8), torch.randn(4, 2)]
    assert torch.equal(lora_linear(*t, 0.5), lora_linear_ref(*t, 0.5))
