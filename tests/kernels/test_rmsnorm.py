"""Triton RMSNorm (interpreter) vs the PyTorch reference: output, dx and dw."""

from __future__ import annotations

import pytest
import torch
from _kernel_bound import assert_kernel_bound, grads, leaves
from _tolerances import FP32_EXACT, max_abs_diff

from tunekit.kernels import rmsnorm, rmsnorm_ref, use_backend

VARIANTS = [(0.0, "llama"), (1.0, "gemma")]
# single row; rows not a multiple of the backward's 4 programs with H not a power of two; 3-D input
SHAPES = [(1, 37), (7, 129), (3, 5, 64)]


def _run(fn, x, w, offset, casting):
    y = fn(x, w, 1e-6, offset, casting)
    return [y, *grads(y, [x, w])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset,casting", VARIANTS)
def test_rmsnorm_matches_reference(shape, dtype, offset, casting):
    _check(shape, dtype, offset, casting, "cpu", "interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset,casting", VARIANTS)
def test_rmsnorm_triton_on_gpu(dtype, offset, casting):
    _check((4099, 4096), dtype, offset, casting, "cuda", "triton")


def _check(shape, dtype, offset, casting, device, which):
    x0 = torch.randn(shape, dtype=torch.float64).requires_grad_()
    w0 = (1 + 0.3 * torch.randn(shape[-1], dtype=torch.float64)).requires_grad_()
    oracle = _run(rmsnorm_ref, *leaves([x0, w0], torch.float64), offset, casting)
    x, w = leaves([x0, w0], dtype, device)
    ref = _run(lambda *a: rmsnorm_ref(*a, upcast=False), x, w, offset, casting)
    with use_backend(which):
        out = _run(rmsnorm, x, w, offset, casting)
    for name, k, r, o in zip(("y", "dx", "dw"), out, ref, oracle):
        assert_kernel_bound(name, k, r, o, dtype)


def test_rmsnorm_llama_mixed_dtypes_promote_like_transformers():
    x, w = torch.randn(4, 24, dtype=torch.float16), torch.randn(24)
    with use_backend("interpret"):
        y = rmsnorm(x, w)
    ref = rmsnorm_ref(x, w)
    assert y.dtype == ref.dtype == torch.float32
    assert max_abs_diff(y, ref) <= FP32_EXACT


def test_rmsnorm_cpu_tensors_use_reference_by_default():
    x, w = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(rmsnorm(x, w, 1e-6, 1.0, "gemma"), rmsnorm_ref(x, w, 1e-6, 1.0, "gemma"))


def test_rmsnorm_unknown_casting_is_a_clear_error():
    with pytest.raises(ValueError, match="choose 'llama' or 'gemma'"):
        rmsnorm(torch.randn(2, 4), torch.ones(4), casting="t5")
