"""Benchmark tunekit's kernels against transformers' eager PyTorch code and torch.compile.

    python bench/kernels.py [--seq-lens 512 2048] [--no-compile] [--threads N] [--reps-seconds 0.3]

For each op and sequence length T it times forward + backward (median over
repetitions) and the peak memory allocated during one forward + backward:

- eager:   the code transformers runs (LlamaRMSNorm, apply_rotary_pos_emb,
           ACT2FN["silu"](gate) * up, full logits + F.cross_entropy, LoRA as
           base + separate low-rank branch, eager attention: repeat_kv + masked softmax);
- sdpa:    for attention, ``F.scaled_dot_product_attention`` (transformers' default);
- flash-attn: for attention, ``flash_attn_func`` where flash-attn is installed (GPU);
- tunekit: the public ``tunekit.kernels`` op (Triton on a GPU, the PyTorch
           reference on a CPU: on a CPU this row measures the reference path);
- compile: ``torch.compile`` of the eager function.

Peak memory on a GPU is ``torch.cuda.max_memory_allocated``; on a CPU it is
the peak of live tensor storage bytes created during the step (tracked with a
``TorchDispatchMode``), not counting the inputs. torch.compile rows have no CPU
memory figure (the tracker cannot see inside compiled kernels).
Prints a markdown table. Runs in under ~3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import weakref

# `python bench/kernels.py` puts bench/ on sys.path, where this very file would be
# found as a top-level `kernels` package by transformers' find_spec("kernels") probe
# (see DESIGN.md); drop it before transformers is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb  # noqa: E402

from tunekit.kernels import (  # noqa: E402
    flash_attention,
    fused_linear_cross_entropy,
    lora_linear,
    rmsnorm,
    rope,
    swiglu,
)

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, RANK = 512, 1376, 8, 2, 64, 8192, 16


def eager_attention(q, k, v):
    """transformers' eager path: repeat the KV heads, causal-masked softmax(QKᵀ/√d) V."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    T = q.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def attention_impls() -> dict:
    impls = {
        "eager": lambda q, k, v: eager_attention(q, k, v).sum(),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum(),
        "tunekit": lambda q, k, v: flash_attention(q, k, v, causal=True).sum(),
    }
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        from flash_attn import flash_attn_func  # (B, T, H, D) layout

        impls["flash-attn"] = lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).sum()
    return impls


class PeakStorage(TorchDispatchMode):
    """Peak bytes of tensor storages created (and still alive) while active (CPU figure)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self.seen:
                self.seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def _leaf(shape, dtype, device, grad=True, scale=1.0):
    return (scale * torch.randn(shape, device=device, dtype=torch.float32)).to(dtype).requires_grad_(grad)


def make_cases(T: int, dtype, device):
    """op -> (inputs, {impl: fn(*inputs) -> scalar to backprop})."""
    x = _leaf((T, HIDDEN), dtype, device)
    norm = LlamaRMSNorm(HIDDEN).to(device, dtype)
    q, k = _leaf((1, HEADS, T, HEAD_DIM), dtype, device), _leaf((1, HEADS, T, HEAD_DIM), dtype, device)
    freqs = torch.arange(T, device=device)[:, None] * torch.rand(HEAD_DIM // 2, device=device)
    emb = torch.cat([freqs, freqs], -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gate, up = _leaf((T, INTER), dtype, device), _leaf((T, INTER), dtype, device)
    head = _leaf((VOCAB, HIDDEN), dtype, device, grad=False, scale=0.05)
    labels = torch.randint(0, VOCAB, (T,), device=device)
    w = _leaf((HIDDEN, HIDDEN), dtype, device, grad=False, scale=0.05)
    a, b = _leaf((RANK, HIDDEN), dtype, device, scale=0.05), _leaf((HIDDEN, RANK), dtype, device, scale=0.05)
    kv = [_leaf((1, KV_HEADS, T, HEAD_DIM), dtype, device) for _ in range(2)]
    return {
        "attention": ((q, *kv), attention_impls()),
        "rmsnorm": ((x, norm.weight), {
            "eager": lambda x, wt: norm(x).sum(), "tunekit": lambda x, wt: rmsnorm(x, wt).sum()}),
        "rope": ((q, k, cos, sin), {
            "eager": lambda *t: sum(o.sum() for o in apply_rotary_pos_emb(*t)),
            "tunekit": lambda *t: sum(o.sum() for o in rope(*t))}),
        "swiglu": ((gate, up), {
            "eager": lambda g, u: (ACT2FN["silu"](g) * u).sum(), "tunekit": lambda g, u: swiglu(g, u).sum()}),
        "linear_ce": ((x, head, labels), {
            "eager": lambda h, wt, y: F.cross_entropy((h @ wt.T).float(), y),
            "tunekit": lambda h, wt, y: fused_linear_cross_entropy(h, wt, y)}),
        "lora_linear": ((x, w, a, b), {
            "eager": lambda x, wt, a, b: (F.linear(x, wt) + F.linear(F.linear(x, a), b) * 2.0).sum(),
            "tunekit": lambda x, wt, a, b: lora_linear(x, wt, None, a, b, 2.0).sum()}),
    }


def _step(fn, inputs):
    fn(*inputs).backward()
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, inputs, device, budget_s: float) -> float:
    _step(fn, inputs)  # warm-up (and compilation)
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        _sync(device)
        t0 = time.perf_counter()
        _step(fn, inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def peak_mib(fn, inputs, device, compiled: bool) -> float | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _step(fn, inputs)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if compiled:
        return None
    with PeakStorage() as tracker:
        _step(fn, inputs)
    return tracker.peak / 2**20


def run(seq_lens, compile_too: bool, budget_s: float) -> list[tuple]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for T in seq_lens:
        for op, (inputs, impls) in make_cases(T, dtype, device).items():
            if compile_too:
                impls = {**impls, "compile": torch.compile(impls["eager"])}
            for name, fn in impls.items():
                try:
                    ms = time_ms(fn, inputs, device, budget_s)
                    mem = peak_mib(fn, inputs, device, compiled=name == "compile")
                except Exception as e:  # a failed compile must not hide the other rows
                    rows.append((op, T, name, None, None, f"failed: {type(e).__name__}"))
                    continue
                rows.append((op, T, name, ms, mem, ""))
    return rows


def print_table(rows) -> None:
    print("| op | T | impl | fwd+bwd ms | tokens/s | peak MiB | note |")
    print("|---|---:|---|---:|---:|---:|---|")
    for op, T, name, ms, mem, note in rows:
        ms_s = f"{ms:.2f}" if ms is not None else "-"
        tps = f"{T / ms * 1000:,.0f}" if ms else "-"
        mem_s = f"{mem:.1f}" if mem is not None else "-"
        print(f"| {op} | {T} | {name} | {ms_s} | {tps} | {mem_s} | {note} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--reps-seconds", type=float, default=0.3, help="timing budget per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {'bf16' if gpu else 'fp32'}; "
          f"H={HIDDEN} I={INTER} heads={HEADS}x{HEAD_DIM} (KV {KV_HEADS}) V={VOCAB} r={RANK}")
    if not gpu:
        print("No GPU: tunekit rows run the PyTorch reference path; Triton kernel figures need a CUDA GPU.")
    print(f"flash-attn: {'compared on GPU' if importlib.util.find_spec('flash_attn') else 'not installed'}; "
          f"Liger-Kernel: {'installed, not compared' if importlib.util.find_spec('liger_kernel') else 'not installed'}.")
    print()
    print_table(run(args.seq_lens, not args.no_compile, args.reps_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
