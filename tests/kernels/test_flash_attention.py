"""flash_attention: Triton kernels (interpreter) and reference vs a naive fp32 math oracle.

Pass criterion (FlashAttention's tests): for the output and every gradient,
``err(kernel, oracle32) <= 2 * err(reference_in_dtype, oracle32) + FLOOR[dtype]``.
The oracle below is written from the definitions (explicit index comparisons,
``repeat_interleave`` for GQA, a block-diagonal mask for packed batches) and
shares no code with the implementations.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from _tolerances import FLASH_LSE, FLOOR, max_abs_diff

from tunekit.kernels._dispatch import use_backend
from tunekit.kernels.flash_attention import cu_seqlens_from_position_ids, flash_attention, flash_attention_ref

# ---------------------------------------------------------------- naive oracle


def naive_attention(q, k, v, *, causal, attn_mask=None, key_padding_mask=None, seg_q=None, seg_k=None):
    """fp32 softmax(q kᵀ / sqrt(D) + mask) v on (B, H, Lq, D); returns (out, lse).

    ``seg_q``/``seg_k`` (Lq,), (Lk,): sequence ids of a packed row; keys of another
    sequence are hidden and causality uses positions local to each sequence.
    """
    q, k, v = (t.float() for t in (q, k, v))
    heads, kv_heads, len_q, len_k = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(len_q)[:, None], torch.arange(len_k)[None, :]
    visible = torch.ones(len_q, len_k, dtype=torch.bool)
    if seg_q is not None:
        visible = seg_q[:, None] == seg_k[None, :]
        i = i - _first_index(seg_q)[:, None]  # position inside its own sequence
        j = j - _first_index(seg_k)[None, :]
        extra = (_lengths(seg_k)[seg_q] - _lengths(seg_q)[seg_q])[:, None]
    else:
        extra = len_k - len_q
    if causal:
        visible = visible & (j <= i + extra)
    visible = visible.expand(q.shape[0], heads, len_q, len_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    scores = scores.masked_fill(~visible, float("-inf"))
    seen = visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    return probs @ v, torch.logsumexp(scores, dim=-1)


def _first_index(seg):
    return torch.tensor([int((seg == s).nonzero()[0]) for s in seg.tolist()])


def _lengths(seg):
    return torch.bincount(seg)


# ---------------------------------------------------------------- cases

# (B, H, KV, Lq, Lk, D, causal, masks); lengths are deliberately not multiples of the 16-wide tiles
DENSE = {
    "plain": (1, 2, 2, 16, 16, 32, False, ()),
    "causal_odd": (1, 2, 2, 37, 37, 32, True, ()),
    "single_row_decode": (2, 2, 2, 1, 23, 32, True, ()),
    "gqa4_prefix_keys": (1, 4, 1, 19, 40, 32, True, ()),
    "gqa2_more_queries": (2, 4, 2, 33, 21, 32, True, ()),
    "gqa2_key_padding": (2, 4, 2, 20, 29, 32, True, ("kpm",)),
    "float_mask": (2, 2, 2, 18, 24, 32, False, ("float",)),
    "bool_mask_padding": (2, 2, 1, 17, 17, 32, False, ("bool", "kpm")),
    "head_dim_40": (1, 2, 2, 20, 20, 40, True, ()),
    "head_dim_128": (1, 1, 1, 17, 17, 128, False, ()),
}
# sequence lengths of the packed queries and keys (keys may run ahead: per-sequence prefixes)
PACKED = {
    "packed_uneven": ((5, 17, 1, 30), (5, 17, 1, 30), 4, 2, True),
    "packed_prefix": ((7, 3, 20), (11, 3, 26), 2, 2, True),
    "packed_bidirectional": ((9, 24, 2), (9, 24, 2), 2, 1, False),
}


def _dense_inputs(case, dtype):
    batch, heads, kv_heads, len_q, len_k, dim, causal, masks = case
    q = torch.randn(batch, heads, len_q, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, len_k, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, len_k, dim, dtype=dtype)
    kw = {"causal": causal}
    if "kpm" in masks:
        kpm = torch.ones(batch, len_k, dtype=torch.bool)
        kpm[-1, :5] = False  # left padding on the last row
        kw["key_padding_mask"] = kpm
    if "float" in masks:
        kw["attn_mask"] = torch.randn(1, heads, len_q, len_k)
    if "bool" in masks:
        kw["attn_mask"] = torch.rand(batch, 1, len_q, len_k) > 0.3
    return (q, k, v), kw, {}


def _packed_inputs(case, dtype):
    lens_q, lens_k, heads, kv_heads, causal = case
    q = torch.randn(sum(lens_q), heads, 32, dtype=dtype)
    k = torch.randn(sum(lens_k), kv_heads, 32, dtype=dtype)
    v = torch.randn(sum(lens_k), kv_heads, 32, dtype=dtype)
    cu_q = torch.tensor([0, *lens_q]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lens_k]).cumsum(0).to(torch.int32)
    kw = {"causal": causal, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    segs = {"seg_q": torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q)),
            "seg_k": torch.repeat_interleave(torch.arange(len(lens_k)), torch.tensor(lens_k))}
    return (q, k, v), kw, segs


def _oracle(inputs, kw, segs):
    """Naive fp32 output, lse and grads, in the layout of ``inputs``."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    if "cu_seqlens_q" in kw:  # packed (T, H, D) -> one row (1, H, T, D) with a block-diagonal mask
        out, lse = naive_attention(*(t.transpose(0, 1)[None] for t in leaves), causal=kw["causal"], **segs)
        out, lse = out[0].transpose(0, 1), lse[0]
    else:
        extra = {n: kw[n] for n in ("attn_mask", "key_padding_mask") if n in kw}
        out, lse = naive_attention(*leaves, causal=kw["causal"], **extra)
    return out, lse, leaves


def _run(fn, inputs, kw, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves, return_lse=True, **kw)
    out.backward(grad_out)
    return [out, *(t.grad for t in leaves)], lse


def _check(impl, make, case, dtype):
    inputs, kw, segs = make(case, dtype)
    out32, lse32, leaves32 = _oracle(inputs, kw, segs)
    grad_out = torch.randn_like(out32)
    out32.backward(grad_out)
    oracle = [out32, *(t.grad for t in leaves32)]
    reference, _ = _run(flash_attention_ref, inputs, kw, grad_out.to(dtype))
    with use_backend(impl):
        got, lse = _run(flash_attention, inputs, kw, grad_out.to(dtype))
    for name, g, r, o in zip(("out", "dq", "dk", "dv"), got, reference, oracle):
        assert g.dtype == dtype and g.shape == o.shape
        bound = 2 * max_abs_diff(r, o) + FLOOR[dtype]
        assert max_abs_diff(g, o) <= bound, f"{name}: err {max_abs_diff(g, o):.2e} > bound {bound:.2e}"
    finite = torch.isfinite(lse32)
    assert torch.equal(torch.isfinite(lse), finite)  # -inf exactly where a row sees no key
    assert max_abs_diff(lse[finite], lse32[finite]) <= FLASH_LSE[dtype]


# ---------------------------------------------------------------- kernel vs oracle


@pytest.mark.parametrize("case", DENSE.values(), ids=DENSE.keys())
def test_kernel_matches_oracle_fp32(case):
    _check("interpret", _dense_inputs, case, torch.float32)


@pytest.mark.parametrize("name", ["causal_odd", "gqa4_prefix_keys", "gqa2_key_padding", "float_mask"])
def test_kernel_matches_oracle_fp16(name):
    _check("interpret", _dense_inputs, DENSE[name], torch.float16)


@pytest.mark.parametrize("case", PACKED.values(), ids=PACKED.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_matches_oracle_packed(case, dtype):
    _check("interpret", _packed_inputs, case, dtype)


@pytest.mark.slow
def test_kernel_matches_oracle_long_wide():
    _check("interpret", _dense_inputs, (1, 2, 1, 70, 90, 256, True, ("kpm",)), torch.float32)


# ---------------------------------------------------------------- reference vs oracle (fast)


@pytest.mark.parametrize("case", DENSE.values(), ids=DENSE.keys())
def test_reference_matches_oracle(case):
    _check("reference", _dense_inputs, case, torch.float32)


@pytest.mark.parametrize("case", PACKED.values(), ids=PACKED.keys())
def test_reference_matches_oracle_packed(case):
    _check("reference", _packed_inputs, case, torch.float32)


# ---------------------------------------------------------------- packing helper


def test_cu_seqlens_from_position_ids_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    cu, longest = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 9, 15, 18] and longest == 6


def test_cu_seqlens_from_position_ids_unpacked_rows():
    cu, longest = cu_seqlens_from_position_ids(torch.arange(7).expand(3, 7))
    assert cu.tolist() == [0, 7, 14, 21] and longest == 7


# ---------------------------------------------------------------- errors, fallback, dispatch


@pytest.mark.parametrize("kwargs, match", [
    ({"k": torch.randn(1, 3, 8, 32)}, "multiple of key/value heads"),
    ({"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, r"key_padding_mask must be \(B, Lk\)"),
    ({"attn_mask": torch.zeros(2, 2, 8, 8)}, "does not broadcast"),
    ({"cu_seqlens_q": torch.tensor([0, 8])}, "pass both cu_seqlens_q and cu_seqlens_k"),
    ({"q": torch.randn(8, 4, 32)}, r"padded layout needs q \(B, H, Lq, D\)"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    args = {"q": torch.randn(1, 4, 8, 32), "k": torch.randn(1, 2, 8, 32), "v": None}
    args.update(kwargs)
    args["v"] = args["v"] if args["v"] is not None else torch.randn_like(args["k"])
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    for fn in (flash_attention_ref, flash_attention):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, causal=True, **args)


def test_packed_offsets_must_cover_all_tokens():
    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="must rise from 0 to the token count 10"):
        flash_attention_ref(q, q, q, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_launcher_rejects_bf16_in_interpreter():
    from tunekit.kernels.flash_attention.launch import flash_attention_triton

    q = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 tl.dot is wrong under the Triton interpreter"):
        flash_attention_triton(q, q, q, causal=True)


def test_unsupported_head_dim_falls_back_to_reference_with_warning():
    q = torch.randn(1, 1, 3, 320)
    with use_backend("interpret"), pytest.warns(UserWarning, match="head dim 320 > 256"):
        out = flash_attention(q, q, q, causal=False)
    assert torch.equal(out, flash_attention_ref(q, q, q, causal=False))


def test_cpu_tensors_run_the_reference_by_default():
    q, k, v = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 12, 32), torch.randn(2, 2, 12, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = flash_attention(q, k, v, causal=True)
    assert torch.equal(out, flash_attention_ref(q, k, v, causal=True))


def test_import_and_cpu_call_do_not_import_triton():
    code = ("import sys, torch; from tunekit.kernels import flash_attention; "
            "q = torch.randn(1, 2, 4, 16); flash_attention(q, q, q, causal=True); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_oracle_gpu(dtype, causal):
    torch.set_default_device("cuda")
    try:
        inputs, kw, segs = _dense_inputs((2, 8, 2, 1000, 1100, 128, causal, ("kpm",)), dtype)
        inputs32 = [t.float() for t in inputs]
        ref32, _ = _run(flash_attention_ref, inputs32, kw, torch.ones_like(inputs32[0]))
        reference, _ = _run(flash_attention_ref, inputs, kw, torch.ones_like(inputs[0]))
        with use_backend("triton"):
            got, _ = _run(flash_attention, inputs, kw, torch.ones_like(inputs[0]))
        for g, r, o in zip(got, reference, ref32):
            assert max_abs_diff(g, o) <= 2 * max_abs_diff(r, o) + FLOOR[dtype]
    finally:
        torch.set_default_device("cpu")
