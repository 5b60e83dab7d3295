"""Per-rank bytes of parameters, gradients and optimizer state: ddp vs fsdp on 1, 2 and 4 processes.

    python bench/distributed_memory.py [--hidden 256] [--layers 4] [--procs 1 2 4] [--json out.json]

A Llama built from a config (fp32, seeded), in two set-ups: LoRA r=8 on q/k/v/o (a frozen
base, what tunekit trains) and full fine-tuning (everything trainable, where sharding
gradients and AdamW's two moments shows too). Each process count starts its own job with
``tunekit.launch`` (gloo on a CPU, NCCL on GPUs); each rank runs one optimizer step through
the strategy interface, then counts the bytes it holds *locally*: the local shard of every
parameter (DTensor ``to_local``), of every gradient, and of every optimizer state tensor.
One process runs ``strategy: none``. Prints a markdown table (bytes of the most loaded rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# `python bench/distributed_memory.py` puts bench/ on sys.path, where bench/kernels.py would be
# found as transformers' optional `kernels` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402


def _local(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _measure(strategy_name: str, mode: str, hidden: int, layers: int) -> dict[str, int]:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunekit.adapters import LoRAConfig, inject_adapters
    from tunekit.distributed import DistributedOptions, make_strategy

    strategy = make_strategy(DistributedOptions(strategy=strategy_name))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4))
    if mode == "lora":
        inject_adapters(model, LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    wrapped, optimizer = strategy.prepare(model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(strategy.dp_rank))
    with strategy.autocast():
        loss = wrapped(input_ids=strategy.to_device({"x": ids})["x"], labels=strategy.to_device({"x": ids})["x"]).loss
    strategy.backward(loss, 1.0 / strategy.dp_size)
    strategy.optimizer_step(1.0)  # gradients are kept (no zero_grad) to be counted
    params = list(strategy.model.parameters())
    counts = {
        "parameters": sum(_local(p) for p in params),
        "gradients": sum(_local(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local(v) for state in optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v) and v.dim() > 0),
    }
    if dist.is_initialized():
        packed = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.float64, device=strategy.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)  # the most loaded rank
        counts = dict(zip(sorted(counts), (int(v) for v in packed.tolist())))
    strategy.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    import tunekit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    rows = []
    for mode in ("lora", "full"):
        for procs in args.procs:
            for name in (["none"] if procs == 1 else ["ddp", "fsdp"]):
                if procs == 1:
                    counts = _measure(name, mode, args.hidden, args.layers)
                else:
                    counts = tunekit.launch(_measure, name, mode, args.hidden, args.layers, nproc=procs, echo=False)
                rows.append({"mode": mode, "procs": procs, "strategy": name, **counts})
    print("| set-up | processes | strategy | parameters MiB | gradients MiB | optimizer MiB | total MiB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        mib = {k: r[k] / 2**20 for k in ("parameters", "gradients", "optimizer")}
        print(f"| {r['mode']} | {r['procs']} | {r['strategy']} | {mib['parameters']:.2f} | {mib['gradients']:.3f} | "
              f"{mib['optimizer']:.3f} | {sum(mib.values()):.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
