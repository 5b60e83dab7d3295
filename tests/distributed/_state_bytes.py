"""What each rank really holds after a training step: parameters, gradients and optimizer state, by storage.

A worker of ``test_estimate_state_bytes.py``: builds a tiny Llama of odd sizes (LoRA or every
weight trained), wraps it with a tunekit strategy, runs one forward, backward and optimizer step,
and counts the bytes behind every tensor this rank keeps — each distinct storage once (FSDP2
keeps a padded shard behind each parameter's DTensor, and one flat reduce-scatter buffer behind
a unit's gradients; DeepSpeed keeps flat partitions), so the count is memory actually held.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.distributed import DistributedOptions, make_strategy
from tunekit.distributed.mesh import start_runtime
from tunekit.train import TrainConfig, build_optimizer

# Odd sizes: vocab 101 rows (embeddings, head), an MLP of 75 (gate, up), LoRA rank 3 (every lora_A);
# none of them splits evenly over 2 ranks, so FSDP2 pads each rank's dim-0 shard.
ODD_LLAMA = dict(vocab_size=101, hidden_size=36, intermediate_size=75, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=10, max_position_embeddings=64, tie_word_embeddings=False)
LORA = dict(rank=3, alpha=6, init="random", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def odd_model(method: str) -> nn.Module:
    """The tiny Llama, with LoRA (``method`` "lora") or every weight trainable ("full"); the same on every rank."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ODD_LLAMA))
    if method == "lora":
        inject_adapters(model, LoRAConfig(**LORA))
    return model.train()


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds, by kind (frozen includes buffers, as the estimator counts them)."""
    params = list(model.parameters())
    seen: set[int] = set()
    frozen = _storage_bytes([p for p in params if not p.requires_grad] + list(model.buffers()), seen)
    trainable = _storage_bytes([p for p in params if p.requires_grad], seen)
    gradients = _storage_bytes([p.grad for p in params if p.grad is not None], seen)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"frozen": frozen, "trainable": trainable, "gradients": gradients,
            "optimizer": _storage_bytes(state, seen)}


def one_step(strategy, model: nn.Module) -> dict[str, int]:
    wrapped, optimizer = strategy.prepare(model, lambda m: build_optimizer(m, TrainConfig(lr=1e-3)))
    ids = torch.arange(2 * 11).reshape(2, 11) % ODD_LLAMA["vocab_size"]
    loss = wrapped(input_ids=ids, labels=ids).loss
    strategy.backward(loss, weight=1.0)
    strategy.optimizer_step(None)  # gradients stay (no zero_grad): they are counted too
    return held_bytes(strategy.model, strategy.optimizer)


def measure(cases: list[dict[str, Any]]) -> list[list[dict[str, int]]]:
    """Each case (``method`` + distributed options) in one process group: [case][rank] -> held bytes."""
    import torch.distributed as dist

    mine = []
    for case in cases:
        options = DistributedOptions(**{k: v for k, v in case.items() if k != "method"})
        mine.append(one_step(make_strategy(options, start_runtime(options)), odd_model(case["method"])))
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    dist.destroy_process_group()
    return [[every[rank][i] for rank in range(len(every))] for i in range(len(cases))]
