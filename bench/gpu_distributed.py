"""Peak memory per rank of tunekit's multi-process strategies on the GPUs of this machine.

    python bench/gpu_distributed.py [--strategies fsdp fsdp_offload deepspeed deepspeed_offload ddp]
                                    [--nproc N] [--hidden 2048] [--layers 16] [--seq-len 512] [--batch 4]
                                    [--steps 6] [--json out.json] [--device cuda|cpu]

Each strategy is one job of ``--nproc`` processes (default: every GPU) started with
``tunekit.launch``: a Llama built from a config (bf16 base on GPUs, seeded, never on one
device whole before the strategy places it), LoRA r=16 (fp32) on every linear layer,
activation checkpointing, bf16 autocast, ``--steps`` optimizer steps of tunekit's ``Trainer``
on synthetic rows (global batch ``--batch`` x processes). Per rank it records the peak CUDA
memory allocated (``torch.cuda.max_memory_allocated``), and per job the median step time and
tokens/s. Prints a markdown table. Sized for a few minutes on one 8-GPU node with the
defaults (a ~1.2B-parameter model). ``--device cpu`` runs the same jobs on CPU processes
(gloo; peak resident memory instead) with tiny sizes, which is how the tests smoke it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# `python bench/gpu_distributed.py` puts bench/ on sys.path, where bench/kernels.py would be
# found as transformers' optional `kernels` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp_offload": {"strategy": "fsdp", "cpu_offload": True},
    "deepspeed": {"strategy": "deepspeed"},
    "deepspeed_offload": {"strategy": "deepspeed", "cpu_offload": True},
}
VOCAB, SEED = 32000, 0


class SyntheticRows:
    """A DataBundle-shaped set of random token rows (every position a target)."""

    task = "causal_lm"
    eval = None
    forward_kwargs = {"use_cache": False}

    def __init__(self, rows: int, seq_len: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(SEED)
        self.train = torch.randint(3, vocab, (rows, seq_len), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.train)

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def train_order(self, epoch: int, seed: int, step_rows: int | None = None) -> list[int]:
        return list(range(len(self.train)))


def _model(args: argparse.Namespace, cuda: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunekit.adapters import LoRAConfig, inject_adapters

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)  # on the CPU, as loaded
    inject_adapters(model, LoRAConfig(rank=16, alpha=32, target_modules="all-linear"))  # fp32 adapters
    return model


def measure(name: str, args: argparse.Namespace) -> dict:
    """One rank of one job: train ``args.steps`` steps under strategy ``name``; rank 0 returns the job's figures."""
    import tempfile

    from tunekit.distributed import DistributedOptions, make_strategy
    from tunekit.train import TrainConfig, Trainer

    cuda = args.device == "cuda"
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=1e-4, log_every=1, resume="never",
                      mixed_precision="bf16" if cuda else "no", gradient_checkpointing=True)
    strategy = make_strategy(DistributedOptions.from_configs(DistributedOptions(**STRATEGIES[name]), cfg))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    data = SyntheticRows(args.batch * strategy.dp_size * args.steps, args.seq_len, args.vocab)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(_model(args, cuda), data, cfg, out, strategy=strategy)
        result = trainer.fit()
    strategy.close()
    return {"strategy": name, "processes": strategy.runtime.world_size,
            "peak_mib_per_rank": [round(m) for m in result.peak_memory_mib_per_rank],
            "s_per_step": result.train_seconds / max(1, result.global_step), "tokens_per_s": result.tokens_per_second}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "fsdp_offload", "deepspeed", "deepspeed_offload"],
                        choices=sorted(STRATEGIES))
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: every GPU)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch per process")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", default=None)
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot run here (one line), or None; fills in ``args.nproc``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here: run on a GPU machine, or pass --device cpu (tiny sizes) to smoke the script"
    available = torch.cuda.device_count() if args.device == "cuda" else (os.cpu_count() or 1)
    args.nproc = args.nproc or (available if args.device == "cuda" else 2)
    if args.nproc < 2:
        return f"--nproc {args.nproc}: the strategies shard or replicate over processes; need at least 2 " \
               f"({'GPUs' if args.device == 'cuda' else 'processes'})"
    if args.device == "cuda" and args.nproc > available:
        return f"--nproc {args.nproc} exceeds the {available} GPUs here (one GPU per process)"
    if min(args.hidden, args.layers, args.seq_len, args.batch, args.steps) < 1 or args.hidden % 64:
        return "--hidden (a multiple of 64), --layers, --seq-len, --batch and --steps must be positive"
    return None


def main(argv: list[str] | None = None) -> int:
    import tunekit

    args = _parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"gpu_distributed: {problem}", file=sys.stderr)
        return 2
    rows = [tunekit.launch(measure, name, args, nproc=args.nproc, echo=False) for name in args.strategies]
    unit = "peak CUDA MiB allocated" if args.device == "cuda" else "peak RSS MiB"
    print(f"| strategy | processes | {unit} per rank | s/step | tokens/s |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['strategy']} | {r['processes']} | {', '.join(map(str, r['peak_mib_per_rank']))} | "
              f"{r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
