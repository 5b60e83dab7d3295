"""Anchor the kernel references to transformers' own modules, and the LoRA wrapper's kernel dispatch.

The references in ``tunekit.kernels`` are the tests' oracle for the Triton
kernels; here they are checked against what Hugging Face models really run.
"""

from __future__ import annotations

import pytest
import torch
from _tolerances import FP32_EXACT, max_abs_diff
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from tunekit.adapters import inject_adapters
from tunekit.adapters.lora import LoRAConfig
from tunekit.kernels import fused_linear_cross_entropy_ref, glu_ref, rmsnorm_ref, rope_ref, use_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_ref_is_llama_rmsnorm(dtype):
    norm = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 24, dtype=dtype)
    assert torch.equal(rmsnorm_ref(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_ref_is_gemma_rmsnorm(dtype):
    norm = GemmaRMSNorm(24, eps=1e-6).to(dtype)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 24, dtype=dtype)
    assert torch.equal(rmsnorm_ref(x, norm.weight, 1e-6, offset=1.0, casting="gemma"), norm(x))


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_ref_is_apply_rotary_pos_emb(unsqueeze_dim):
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    emb = torch.cat([torch.randn(2, 6, 4)] * 2, dim=-1)
    want = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim)
    got = rope_ref(q, k, emb.cos(), emb.sin(), unsqueeze_dim)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("hf_act,act", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_glu_ref_is_the_hf_mlp_activation(hf_act, act):
    g, u = torch.randn(4, 33, dtype=torch.bfloat16), torch.randn(4, 33, dtype=torch.bfloat16)
    assert torch.equal(glu_ref(g, u, act, upcast=False), ACT2FN[hf_act](g) * u)


def test_fused_ce_ref_is_cross_entropy_loss_on_full_logits():
    h, w, b = torch.randn(11, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True), torch.randn(30)
    labels = torch.randint(0, 30, (11,))
    labels[::3] = -100
    want = nn.CrossEntropyLoss(label_smoothing=0.1)(h @ w.T + b, labels)
    got = fused_linear_cross_entropy_ref(h, w, labels, b, label_smoothing=0.1, chunk_size=4)
    gw = torch.autograd.grad(want, (h, w))
    gg = torch.autograd.grad(got, (h, w))
    assert max_abs_diff(got, want) <= FP32_EXACT
    assert all(max_abs_diff(a, c) <= FP32_EXACT for a, c in zip(gg, gw))


def test_lora_wrapper_dispatches_to_the_fused_kernel():
    model = nn.Sequential(nn.Linear(40, 37))
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["0"], init="random"))
    x = torch.randn(3, 40, requires_grad=True)
    wrt = [x, *(p for p in model.parameters() if p.requires_grad)]
    assert len(wrt) == 3  # x, lora_A, lora_B
    want = model(x)
    gw = torch.autograd.grad(want.sum(), wrt)
    with use_backend("interpret"):
        got = model(x)
        gg = torch.autograd.grad(got.sum(), wrt)
    assert got.grad_fn.name() == "LoRALinearFunctionBackward"
    assert max_abs_diff(got, want) <= FP32_EXACT
    assert all(max_abs_diff(a, c) <= FP32_EXACT for a, c in zip(gg, gw))
