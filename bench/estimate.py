"""Estimated vs measured training peak: ``tunekit.estimate`` against a real tunekit step on this machine.

    .venv/bin/python bench/estimate.py [--hidden 640] [--layers 10] [--heads 10] [--kv-heads 5]
                                       [--intermediate 1728] [--vocab 32000] [--batch 2] [--seq-lens 128 512]
                                       [--methods lora dora qlora prefix bottleneck] [--json out.json]

For every method x gradient checkpointing (off, on) x sequence length: a Llama built from a config
(random weights, ~85M parameters with the defaults) is trained one step by ``tunekit.train.Trainer``
(LoRA / DoRA r=8 on q,v; QLoRA r=8 on every linear layer of an NF4 double-quantized base, bf16 autocast;
prefix tuning with 20 virtual tokens; Houlsby bottleneck adapters; AdamW), and the second step's peak
is measured: on a GPU ``torch.cuda.max_memory_allocated``, on a CPU the tensors alive before the step
plus the profiler's allocation events during it (``tunekit.estimate.measure``; not RSS). The estimate
is the single-GPU row of ``tunekit estimate`` for the same model and settings, computed before the real
model exists. Batches are padded on their last row, as real batches are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# `python bench/estimate.py` puts bench/ on sys.path, where bench/kernels.py would be
# found as a top-level `kernels` package by transformers' find_spec("kernels") probe.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig  # noqa: E402
from tunekit.estimate import ModelSpec, RunSettings, StepShape  # noqa: E402
from tunekit.estimate.measure import check_estimate  # noqa: E402
from tunekit.models.config import QuantizationConfig  # noqa: E402

METHODS = {
    "lora": lambda: (LoRAConfig(rank=8, alpha=16, dropout=0.05), None),
    "dora": lambda: (LoRAConfig(rank=8, alpha=16, use_dora=True), None),
    "qlora": lambda: (LoRAConfig(rank=8, alpha=16, target_modules="all-linear"), QuantizationConfig()),
    "prefix": lambda: (PrefixConfig(num_virtual_tokens=20), None),
    "bottleneck": lambda: (BottleneckConfig(), None),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--kv-heads", type=int, default=5)
    p.add_argument("--intermediate", type=int, default=1728)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--json", help="also write the rows as JSON to this file")
    return p.parse_args(argv)


def run_case(config: LlamaConfig, method: str, checkpointing: bool, seq_len: int, batch: int) -> dict:
    adapter, quantization = METHODS[method]()
    dtype, precision = ("bf16", "bf16") if quantization else ("fp32", "no")
    spec = ModelSpec(config, "causal_lm", dtype, quantization, adapter, attn="sdpa")
    shape = StepShape(batch=batch, seq_len=seq_len, mixed_precision=precision, grad_checkpointing=checkpointing)
    t0 = time.perf_counter()
    estimated, measured = check_estimate(spec, RunSettings(shape), "cuda" if torch.cuda.is_available() else "cpu")
    return {"method": method, "checkpointing": checkpointing, "seq_len": seq_len, "estimated": estimated,
            "measured": measured.peak, "resident": measured.resident, "how": measured.how,
            "error": estimated / measured.peak - 1, "seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    lines = ["| method | checkpointing | T | estimated MiB | measured MiB | error |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['seq_len']} | "
                     f"{r['estimated'] / 2**20:,.1f} | {r['measured'] / 2**20:,.1f} | {r['error']:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq_lens) + 64)
    rows = []
    for method in args.methods:
        for checkpointing in (False, True):
            for seq_len in args.seq_lens:
                rows.append(run_case(config, method, checkpointing, seq_len, args.batch))
                print(f"{method} checkpointing={checkpointing} T={seq_len}: {rows[-1]['error']:+.2%} "
                      f"({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
    print(table(rows))
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nworst |error| {worst:.1%} over {len(rows)} runs ({rows[0]['how']})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
