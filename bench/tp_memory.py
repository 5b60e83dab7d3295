"""Per-rank bytes of parameters, gradients and optimizer state under tensor parallelism: tp 2, tp 4 and the
2 x 2 mesh (fsdp_tp) against one process and fsdp, with the estimator's figure for each rank beside it.

    python bench/tp_memory.py [--hidden 256] [--layers 4] [--json out.json]

The Llama of ``bench/distributed_memory.py`` (fp32, seeded; 8 heads, 4 KV heads, MLP 4 x hidden,
vocabulary 4096) with LoRA r=8 on every projection (q/k/v/o/gate/up/down). Each set-up starts its
own job with ``tunekit.launch`` (gloo on a CPU, NCCL on GPUs); each rank runs one optimizer step
through the strategy interface and counts what it holds *locally* (DTensor ``to_local`` of every
parameter, gradient and optimizer state). The embeddings and the output head stay whole under
tensor parallelism (see README), so they bound how far the parameter bytes fall. The estimate
column is ``tunekit.estimate``'s ``rank_model_states`` for the same rank (it must match exactly).
Prints a markdown table (the most loaded rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# `python bench/tp_memory.py` puts bench/ on sys.path, where bench/kernels.py would be found as
# transformers' optional `kernels` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

SETUPS = [("none", 1, 1), ("fsdp", 2, 1), ("tp", 2, 2), ("tp", 4, 4), ("fsdp_tp", 4, 2)]
"""(strategy, processes, tp_size)."""
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _local(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunekit.adapters import LoRAConfig, inject_adapters

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4))
    inject_adapters(model, LoRAConfig(rank=8, alpha=16, target_modules=PROJECTIONS))
    return model.train()


def _estimate(strategy, hidden: int, layers: int) -> int:
    """The estimator's parameter + gradient + AdamW bytes of this rank (from the whole model, on paper)."""
    from tunekit.estimate.memory import rank_model_states
    from tunekit.estimate.model import inventory, tp_placements

    model, runtime = _model(hidden, layers), strategy.runtime
    where = dict(zip(runtime.mesh.mesh_dim_names, runtime.mesh.get_coordinate())) if runtime.mesh is not None else {}
    tp, dp = runtime.shape.tp, runtime.shape.dp_shard
    states = rank_model_states(inventory(model), "adamw", dp=dp, dp_rank=where.get("dp_shard", 0), tp=tp,
                               tp_rank=where.get("tp", 0), placements=tp_placements(model))
    return states.total - inventory(model).buffer_bytes


def _measure(strategy_name: str, tp_size: int, hidden: int, layers: int) -> dict[str, int]:
    import torch.distributed as dist

    from tunekit.distributed import DistributedOptions, make_strategy

    strategy = make_strategy(DistributedOptions(strategy=strategy_name, tp_size=tp_size))
    wrapped, optimizer = strategy.prepare(_model(hidden, layers), lambda m: torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad]))
    ids = strategy.to_device({"x": torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(
        strategy.dp_rank))})["x"]
    strategy.backward(wrapped(input_ids=ids, labels=ids).loss, 1.0 / strategy.dp_size)
    strategy.optimizer_step(1.0)  # gradients are kept (no zero_grad) to be counted
    params = list(strategy.model.parameters())
    counts = {
        "frozen": sum(_local(p) for p in params if not p.requires_grad),
        "trainable": sum(_local(p) for p in params if p.requires_grad),
        "gradients": sum(_local(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local(v) for state in optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v)),
    }
    counts["estimate"] = _estimate(strategy, hidden, layers)
    counts["matches"] = int(counts["estimate"] == sum(v for k, v in counts.items() if k != "estimate"))
    if dist.is_initialized():
        keys = sorted(counts)
        packed = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=strategy.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)  # the most loaded rank ("matches": on every rank, via MIN below)
        matches = torch.tensor(float(counts["matches"]), dtype=torch.float64, device=strategy.device)
        dist.all_reduce(matches, op=dist.ReduceOp.MIN)
        counts = {**dict(zip(keys, (int(v) for v in packed.tolist()))), "matches": int(matches)}
    strategy.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    import tunekit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, procs, tp in SETUPS:
        if procs == 1:
            counts = _measure(name, tp, args.hidden, args.layers)
        else:
            counts = tunekit.launch(_measure, name, tp, args.hidden, args.layers, nproc=procs, echo=False)
        rows.append({"strategy": name, "procs": procs, "tp_size": tp, **counts})
    print("| strategy | processes | mesh (dp x tp) | frozen MiB | trainable MiB | gradients MiB | optimizer MiB "
          "| total MiB | estimate = measured |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        mib = {k: r[k] / 2**20 for k in ("frozen", "trainable", "gradients", "optimizer")}
        mesh = f"{r['procs'] // r['tp_size']} x {r['tp_size']}"
        print(f"| {r['strategy']} | {r['procs']} | {mesh} | {mib['frozen']:.2f} | {mib['trainable']:.3f} | "
              f"{mib['gradients']:.3f} | {mib['optimizer']:.3f} | {sum(mib.values()):.2f} | "
              f"{'yes' if r['matches'] else 'NO'} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
