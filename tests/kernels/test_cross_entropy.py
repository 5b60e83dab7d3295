"""Fused linear + cross-entropy: Triton rows (interpreter) and the chunked reference vs full logits.

The oracle is ``F.cross_entropy`` on the full fp64 logits (label smoothing, ignore_index)
plus the z-loss written out; every gradient (hidden, head weight, bias, LoRA A/B) is checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernel_bound import assert_kernel_bound, grads, leaves
from _tolerances import FP32_EXACT, max_abs_diff

from tunekit.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref, use_backend
from tunekit.kernels.cross_entropy.chunked import CEOptions
from tunekit.kernels.cross_entropy.reference import apply_linear_cross_entropy, ce_rows_ref

N, H, V, R = 13, 16, 37, 4
NAMES = ("loss", "d_hidden", "d_weight", "d_bias", "d_lora_a", "d_lora_b")
# (rows, bias, lora, label_smoothing, z_loss, reduction, chunk, block): chunks of 5 over 13 rows and
# vocab blocks of 16 over 37 columns cross both boundaries; a single row; plain head with ignore rows
CASES = [
    (N, True, True, 0.1, 1e-2, "mean", 5, 16),
    (N, False, False, 0.0, 0.0, "mean", 4, 32),
    (N, True, False, 0.0, 0.0, "sum", 13, 64),
    (1, False, True, 0.2, 0.0, "mean", 1, 16),
]


def oracle_loss(h, w, labels, b, a, bb, s, smoothing, z, reduction):
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    if a is not None:
        logits = logits + s * (h @ a.T) @ bb.T
    return _loss_from_logits(logits, labels, smoothing, z, reduction)


def _loss_from_logits(logits, labels, smoothing, z, reduction):
    loss = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction=reduction)
    valid = labels != -100
    zl = (torch.logsumexp(logits, -1)[valid] ** 2).sum()
    return loss + z * (zl / valid.sum() if reduction == "mean" else zl)


def _inputs(rows, bias, lora):
    h = torch.randn(rows, H, dtype=torch.float64, requires_grad=True)
    w = (0.3 * torch.randn(V, H, dtype=torch.float64)).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    a = (0.3 * torch.randn(R, H, dtype=torch.float64)).requires_grad_() if lora else None
    bb = (0.3 * torch.randn(V, R, dtype=torch.float64)).requires_grad_() if lora else None
    labels = torch.randint(0, V, (rows,))
    labels[1::4] = -100  # ignored rows, in several chunks
    return [h, w, b, a, bb], labels


def _run(fn, tensors, labels, **kw):
    h, w, b, a, bb = tensors
    loss = fn(h, w, labels, b, a, bb, 0.5, **kw)
    return [loss, *grads(loss, [t for t in tensors if t is not None])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_fused_linear_ce_matches_full_logits(case, dtype):
    _check(case, dtype, "cpu", "interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_fused_linear_ce_triton_on_gpu(case, dtype):
    _check(case, dtype, "cuda", "triton")


def _case_with_oracle(case):
    """(tensors, labels, loss options, names, fp64 oracle [loss, *grads]) for one CASES row."""
    rows, bias, lora, smoothing, z, reduction, _, _ = case
    tensors, labels = _inputs(rows, bias, lora)
    opts = dict(label_smoothing=smoothing, z_loss=z, reduction=reduction)
    h, w, b, a, bb = tensors
    full = oracle_loss(h, w, labels, b, a, bb, 0.5, smoothing, z, reduction)
    oracle = [full, *grads(full, [t for t in tensors if t is not None])]
    names = [n for n, t in zip(NAMES, [full, *tensors]) if t is not None]
    return tensors, labels, opts, names, oracle


def _check(case, dtype, device, which):
    chunk, block = case[-2:]
    tensors, labels, opts, names, oracle = _case_with_oracle(case)
    low, labels = leaves(tensors, dtype, device), labels.to(device)
    ref = _run(fused_linear_cross_entropy_ref, low, labels, chunk_size=chunk, **opts)
    with use_backend(which):
        out = _run(fused_linear_cross_entropy, low, labels, chunk_size=chunk, block=block, **opts)
    for name, k, r, o in zip(names, out, ref, oracle):
        assert_kernel_bound(name, k, r, o, dtype)


@pytest.mark.parametrize("case", CASES[:2])
def test_chunked_reference_equals_full_logits_fp64(case):
    rows, bias, lora, smoothing, z, reduction, chunk, _ = case
    tensors, labels = _inputs(rows, bias, lora)
    h, w, b, a, bb = tensors
    full = oracle_loss(h, w, labels, b, a, bb, 0.5, smoothing, z, reduction)
    want = [full, *grads(full, [t for t in tensors if t is not None])]
    got = _run(fused_linear_cross_entropy_ref, tensors, labels, chunk_size=chunk,
               label_smoothing=smoothing, z_loss=z, reduction=reduction)
    assert all(max_abs_diff(g, x) <= FP32_EXACT for g, x in zip(got, want))


def test_frozen_head_gets_no_gradient_and_all_ignored_gives_nan_like_torch():
    h = torch.randn(4, H, requires_grad=True)
    w = torch.randn(V, H)
    labels = torch.full((4,), -100)
    loss = fused_linear_cross_entropy(h, w, labels)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ w.T, labels))
    loss.backward()
    assert w.grad is None and torch.equal(h.grad, torch.zeros_like(h))


def test_chunked_reference_never_materialises_full_logits():
    rows, vocab, chunk = 32, 256, 8
    h = torch.randn(rows, H, requires_grad=True)
    w = torch.randn(vocab, H, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    seen, saved = [], []

    def recording_rows(logits, lab, opts, grad_scale):
        seen.append(tuple(logits.shape))
        return ce_rows_ref(logits, lab, opts, grad_scale)

    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = apply_linear_cross_entropy(recording_rows, h, w, labels, None, None, None, 1.0, CEOptions(), chunk)
    loss.backward()
    assert seen == [(chunk, vocab)] * (rows // chunk)
    assert max(saved) == vocab * H  # the finished weight gradient; nothing of rows * vocab
    assert torch.allclose(loss, F.cross_entropy(h @ w.T, labels))


def test_mismatched_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="labels has 3 rows but hidden has 4"):
        fused_linear_cross_entropy(torch.randn(4, H), torch.randn(V, H), torch.zeros(3, dtype=torch.long))


def test_no_grad_computes_no_gradients():
    h, w = torch.randn(6, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (6,))
    seen = []

    def recording_rows(logits, lab, opts, grad_scale):
        seen.append(grad_scale)
        return ce_rows_ref(logits, lab, opts, grad_scale)

    with torch.no_grad():
        loss = apply_linear_cross_entropy(recording_rows, h, w, labels, None, None, None, 1.0, CEOptions(), 4)
    assert seen == [None, None] and not loss.requires_grad
    assert max_abs_diff(loss, F.cross_entropy(h @ w.T, labels)) <= FP32_EXACT


def _unfused_linear_ce(h, w, labels, b, a, bb, s, label_smoothing, z_loss, reduction):
    """What a model's head + loss computes: F.linear layers (autocast casts them), then fp32 CE."""
    logits = F.linear(h, w, b)
    if a is not None:
        logits = logits + s * F.linear(F.linear(h, a), bb)
    return _loss_from_logits(logits.float(), labels, label_smoothing, z_loss, reduction)


@pytest.mark.parametrize("which", ["reference", "interpret"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_fused_linear_ce_under_bf16_autocast(case, which):
    """fp32 head and LoRA under ``torch.autocast(bf16)``: runs (no addmm_ dtype clash) and stays
    within the bound of the unfused bf16-autocast head, for the loss and every fp32 gradient."""
    chunk, block = case[-2:]
    tensors, labels, opts, names, oracle = _case_with_oracle(case)
    low = leaves(tensors, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = _run(_unfused_linear_ce, low, labels, **opts)
        with use_backend(which):
            out = _run(fused_linear_cross_entropy, low, labels, chunk_size=chunk, block=block, **opts)
    for name, k, r, o in zip(names, out, unfused, oracle):
        assert_kernel_bound(name, k, r, o, torch.bfloat16)
