"""Triton SwiGLU / GeGLU (interpreter) vs the PyTorch reference: output, d_gate, d_up."""

from __future__ import annotations

import pytest
import torch
from _kernel_bound import assert_kernel_bound, grads, leaves

from tunekit.kernels import geglu, glu, glu_ref, swiglu, use_backend

# one element; odd 3-D; more elements than one 1024 block with a ragged tail
SHAPES = [(1, 1), (3, 7, 33), (2, 1500)]


def _run(fn, gate, up, act):
    y = fn(gate, up, act)
    return [y, *grads(y, [gate, up])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_matches_reference(shape, act, dtype):
    _check(shape, act, dtype, "cpu", "interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_triton_on_gpu(act, dtype):
    _check((4097, 11008), act, dtype, "cuda", "triton")


def _check(shape, act, dtype, device, which):
    g0 = (2 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    u0 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    oracle = _run(glu_ref, *leaves([g0, u0], torch.float64), act)
    g, u = leaves([g0, u0], dtype, device)
    ref = _run(lambda *a: glu_ref(*a, upcast=False), g, u, act)
    with use_backend(which):
        out = _run(glu, g, u, act)
    for name, k, r, o in zip(("y", "d_gate", "d_up"), out, ref, oracle):
        assert_kernel_bound(name, k, r, o, dtype)


def test_named_ops_pick_their_activation():
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(swiglu(g, u), glu_ref(g, u, "silu"))
    assert torch.equal(geglu(g, u), glu_ref(g, u, "gelu_tanh"))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="choose 'silu' or 'gelu_tanh'"):
        glu(torch.randn(2), torch.randn(2), "relu")
