"""FlashAttention-2 forward and backward in Triton, with GQA, masks and packed batches.

Math (per query row i, key block by key block, in fp32):

    s_ij = scale · q_i·k_j + bias_ij                   (bias: -inf hides key j)
    m_i  <- max(m_i, max_j s_ij)                        running max
    l_i  <- l_i · e^(m_old - m_i) + Σ_j e^(s_ij - m_i)   running normaliser
    acc  <- acc · e^(m_old - m_i) + Σ_j e^(s_ij - m_i) v_j
    o_i = acc / l_i,   lse_i = m_i + log l_i            (saved for the backward)

Backward (recomputes P from lse instead of storing it):

    δ_i = Σ_d o_id · do_id,   p_ij = e^(s_ij - lse_i),   ds_ij = p_ij (do_i·v_j - δ_i)
    dv_j = Σ_i p_ij do_i,   dk_j = scale Σ_i ds_ij q_i,   dq_i = scale Σ_j ds_ij k_j

One kernel computes dK/dV per key block (looping over the query blocks of every
query head that shares the key/value head, so GQA never materialises repeated
K/V), another computes dQ per query block; neither needs atomics. Exponentials
use exp2 with ``log2(e)`` folded into the scale, as in the tutorial.

Masks, all applied inside the tiles: causal with the diagonal aligned
bottom-right (query i sees key j <= i + Lk - Lq), a (B, Lk) key-padding mask
(1 = real token), an additive float bias broadcast through stride-0 dims, and
packed batches whose sequence offsets come from ``cu_seqlens`` (each program
reads its sequence's start and length, so examples never see each other).
Rows that see no key output 0 with lse = -inf.

Sources: the structure (``_attn_fwd_inner``, separate dK/dV and dQ kernels) follows
the Triton fused-attention tutorial (python/tutorials/06-fused-attention.py,
MIT licence, https://github.com/triton-lang/triton); the algorithm is
FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691).

Dtypes: fp16, bf16 (GPU only: the interpreter's bf16 ``tl.dot`` is wrong) and
fp32 (``input_precision="ieee"``, no TF32). Accumulation in fp32; P and dS are
rounded to the input dtype before their matmuls, as in FlashAttention.
Limits: head dim <= 256 (padded to a power of two >= 16); no dropout; the
additive mask gets no gradient; no sliding window or softcap. One fixed block
config per head-dim range (no autotuning, which fails under the interpreter).
The launchers and the ``autograd.Function`` are in ``launch.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

__all__ = ["FlashConfig", "default_config", "unsupported_reason"]

LOG2E = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tile sizes and launch options shared by the forward and both backward kernels."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, interpret: bool) -> FlashConfig:
    """A fixed config: small tiles for the interpreter, smaller tiles for wide heads on a GPU."""
    if interpret:
        return FlashConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if head_dim <= 64:
        return FlashConfig(64, 64, 4, 3)
    if head_dim <= 128:
        return FlashConfig(64, 32, 4, 2)
    return FlashConfig(32, 32, 4, 1)


def unsupported_reason(q: torch.Tensor, attn_mask: torch.Tensor | None) -> str | None:
    """Why the kernel cannot run these inputs, or None when it can."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported by the kernel (fp16, bf16, fp32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if not q.is_cuda and q.dtype == torch.bfloat16:
        return "bf16 tl.dot is wrong under the Triton interpreter (use fp16/fp32 or a GPU)"
    if attn_mask is not None and attn_mask.requires_grad:
        return "the kernel gives attn_mask no gradient (detach it, or use the reference backend)"
    return None


@triton.jit
def _seq_bounds(cu_ptr, b, seqlen, IS_VARLEN: tl.constexpr):
    """Start offset and length of sequence b (packed) or (0, seqlen) (padded)."""
    start = 0
    length = seqlen
    if IS_VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)  # token offsets of a large packed batch pass 2**31 elements
        length = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    return start, length


@triton.jit
def _masked_scores(q, k, rows, cols, len_q, len_k, qk_scale, bias_base, stride_bias_m, stride_bias_n,
                   kpm_base, stride_kpm_n,
                   CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores in log2 units; -inf where key ``cols`` is hidden from query ``rows``."""
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    valid = (rows[:, None] < len_q) & (cols[None, :] < len_k)
    if CAUSAL:  # bottom-right diagonal: extra keys (prefix, cache) precede the queries
        valid = valid & (cols[None, :] <= rows[:, None] + (len_k - len_q))
    if HAS_KPM:
        keep = tl.load(kpm_base + cols * stride_kpm_n, mask=cols < len_k, other=0)
        valid = valid & (keep != 0)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_base + rows[:, None] * stride_bias_m + cols[None, :] * stride_bias_n,
                       mask=valid, other=0.0)
        qk += bias.to(tl.float32) * LOG2E
    return tl.where(valid, qk, float("-inf"))


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_k_t, rows, offs_n, offs_d, len_q, len_k, hi,
                    qk_scale, bias_base, stride_bias_m, stride_bias_n, kpm_base, stride_kpm_n,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr):
    """Online softmax over key blocks [0, hi): updates (acc, l_i, m_i) of one query block."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < len_k)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_k_t + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _masked_scores(q, k, rows, cols, len_q, len_k, qk_scale, bias_base, stride_bias_m, stride_bias_n,
                            kpm_base, stride_kpm_n, CAUSAL, HAS_BIAS, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_k_t + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bias_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t,
    stride_lse_b, stride_lse_h, stride_lse_t,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, stride_kpm_b, stride_kpm_n,
    seqlen_q, seqlen_k, heads, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (cdiv(max Lq, BLOCK_M), N·H): one query block of one (sequence, head)."""
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // heads).to(tl.int64)  # int64 offsets: B·H·T·D may exceed 2**31
    h = tl.program_id(1) % heads
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (rows < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_off = b * stride_q_b + h * stride_q_h + (q_start + rows)[:, None] * stride_q_t + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    k_off = b * stride_k_b + (h // group) * stride_k_h + k_start * stride_k_t
    hi = len_k
    if CAUSAL:  # the last row of this block sees keys up to its row + (Lk - Lq)
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M + len_k - len_q)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptr + k_off, v_ptr + k_off, stride_k_t, rows, offs_n, offs_d, len_q, len_k, hi,
        sm_scale * LOG2E, bias_ptr + b * stride_bias_b + h * stride_bias_h, stride_bias_m, stride_bias_n,
        kpm_ptr + b * stride_kpm_b, stride_kpm_n, HEAD_DIM, BLOCK_N, CAUSAL, HAS_BIAS, HAS_KPM)
    empty = l_i == 0.0  # the row sees no key: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(o_ptr + q_off, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=io_mask)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    lse_off = b * stride_lse_b + h * stride_lse_h + (q_start + rows) * stride_lse_t
    tl.store(lse_ptr + lse_off, lse, mask=rows < len_q)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, off, row_ok):
    """lse in log2 units (+inf for empty rows, so their P is 0) and δ for a block of query rows."""
    lse = tl.load(lse_ptr + off, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + off, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, bias_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t,
    stride_lse_b, stride_lse_h, stride_lse_t,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, stride_kpm_b, stride_kpm_n,
    seqlen_q, seqlen_k, kv_heads, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (cdiv(max Lk, BLOCK_N), N·KV): dK, dV of one key block, summed over the group's query heads."""
    pid_n = tl.program_id(0)
    b = (tl.program_id(1) // kv_heads).to(tl.int64)  # int64 offsets: B·H·T·D may exceed 2**31
    kvh = tl.program_id(1) % kv_heads
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (cols < len_k)[:, None] & d_ok[None, :]
    kv_off = b * stride_k_b + kvh * stride_k_h + (k_start + cols)[:, None] * stride_k_t + offs_d[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before (first key - (Lk - Lq)) cannot see this block
        lo = (tl.maximum(pid_n * BLOCK_N - (len_k - len_q), 0) // BLOCK_M) * BLOCK_M
    for g in range(group):
        h = kvh * group + g
        q_base = q_ptr + b * stride_q_b + h * stride_q_h + q_start * stride_q_t
        do_base = do_ptr + b * stride_q_b + h * stride_q_h + q_start * stride_q_t
        lse_base = b * stride_lse_b + h * stride_lse_h + q_start * stride_lse_t
        for start_m in range(lo, len_q, BLOCK_M):
            rows = start_m + offs_m
            io_mask = (rows < len_q)[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_q_t + offs_d[None, :], mask=io_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_q_t + offs_d[None, :], mask=io_mask, other=0.0)
            lse2, delta = _load_row_stats(lse_ptr, delta_ptr, lse_base + rows * stride_lse_t, rows < len_q)
            qk = _masked_scores(q, k, rows, cols, len_q, len_k, sm_scale * LOG2E,
                                bias_ptr + b * stride_bias_b + h * stride_bias_h, stride_bias_m, stride_bias_n,
                                kpm_ptr + b * stride_kpm_b, stride_kpm_n, CAUSAL, HAS_BIAS, HAS_KPM)
            p = tl.math.exp2(qk - lse2[:, None])  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    tl.store(dk_ptr + kv_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bias_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t,
    stride_lse_b, stride_lse_h, stride_lse_t,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, stride_kpm_b, stride_kpm_n,
    seqlen_q, seqlen_k, heads, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (cdiv(max Lq, BLOCK_M), N·H): dQ of one query block."""
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // heads).to(tl.int64)  # int64 offsets: B·H·T·D may exceed 2**31
    h = tl.program_id(1) % heads
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = (rows < len_q)[:, None] & d_ok[None, :]
    q_off = b * stride_q_b + h * stride_q_h + (q_start + rows)[:, None] * stride_q_t + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=io_mask, other=0.0)
    lse_off = b * stride_lse_b + h * stride_lse_h + (q_start + rows) * stride_lse_t
    lse2, delta = _load_row_stats(lse_ptr, delta_ptr, lse_off, rows < len_q)
    k_base = b * stride_k_b + (h // group) * stride_k_h + k_start * stride_k_t
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M + len_k - len_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < len_k)[:, None] & d_ok[None, :]
        kv_off = k_base + cols[:, None] * stride_k_t + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        qk = _masked_scores(q, k, rows, cols, len_q, len_k, sm_scale * LOG2E,
                            bias_ptr + b * stride_bias_b + h * stride_bias_h, stride_bias_m, stride_bias_n,
                            kpm_ptr + b * stride_kpm_b, stride_kpm_n, CAUSAL, HAS_BIAS, HAS_KPM)
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    tl.store(dq_ptr + q_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=io_mask)
