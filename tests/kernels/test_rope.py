"""Triton RoPE (interpreter) vs the PyTorch reference: q_embed, k_embed, dq, dk."""

from __future__ import annotations

import pytest
import torch
from _kernel_bound import assert_kernel_bound, grads, leaves

from tunekit.kernels import rope, rope_ref, use_backend

# (B, Hq, Hk, T, D): a single token; GQA with head_dim/2 = 3 (not a power of two); 1 kv head
CASES = [(1, 1, 1, 1, 4), (2, 4, 2, 5, 6), (2, 3, 1, 7, 16)]


def _cos_sin(batch, seq, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = torch.randint(0, 64, (batch, seq)).double()
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)  # (B, T, D), HF's layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _run(fn, q, k, cos, sin, dim):
    out = fn(q, k, cos, sin, dim)
    return [*out, *grads(out, [q, k])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_rope_matches_reference(case, unsqueeze_dim, dtype):
    _check(case, unsqueeze_dim, dtype, "cpu", "interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_triton_on_gpu(unsqueeze_dim, dtype):
    _check((2, 32, 8, 1000, 128), unsqueeze_dim, dtype, "cuda", "triton")


def _check(case, unsqueeze_dim, dtype, device, which):
    B, Hq, Hk, T, D = case
    shape = (lambda h: (B, h, T, D)) if unsqueeze_dim == 1 else (lambda h: (B, T, h, D))
    q0 = torch.randn(shape(Hq), dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(shape(Hk), dtype=torch.float64, requires_grad=True)
    cos, sin = _cos_sin(B, T, D, torch.float64)
    oracle = _run(rope_ref, *leaves([q0, k0], torch.float64), cos, sin, unsqueeze_dim)
    q, k = leaves([q0, k0], dtype, device)
    cos, sin = cos.to(device, dtype), sin.to(device, dtype)
    ref = _run(rope_ref, q, k, cos, sin, unsqueeze_dim)
    with use_backend(which):
        out = _run(rope, q, k, cos, sin, unsqueeze_dim)
    for name, kern, r, o in zip(("q", "k", "dq", "dk"), out, ref, oracle):
        assert_kernel_bound(name, kern, r, o, dtype)


def test_rope_broadcasts_cos_over_batch_and_leaves_inputs_untouched():
    q, k = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    q_copy, k_copy = q.clone(), k.clone()
    cos, sin = _cos_sin(1, 5, 8, torch.float32)
    with use_backend("interpret"):
        out = rope(q, k, cos, sin)
    ref = rope_ref(q, k, cos, sin)
    assert torch.equal(q, q_copy) and torch.equal(k, k_copy)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, ref))


def test_rope_bad_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def test_rope_backward_handles_cos_sin_halves_that_differ():
    # HF duplicates the frequencies (c1 = c2, s1 = s2); the kernel must not rely on it.
    q0 = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(2, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    oracle = _run(rope_ref, *leaves([q0, k0], torch.float64), cos, sin, 1)
    q, k = leaves([q0, k0], torch.float32)
    ref = _run(rope_ref, q, k, cos.float(), sin.float(), 1)
    with use_backend("interpret"):
        out = _run(rope, q, k, cos.float(), sin.float(), 1)
    for name, kern, r, o in zip(("q", "k", "dq", "dk"), out, ref, oracle):
        assert_kernel_bound(name, kern, r, o, torch.float32)
