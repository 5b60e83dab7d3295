"""The estimator's per-rank model states equal what the gloo ranks really hold, byte for byte.

Two processes train a tiny Llama of odd sizes (nothing splits evenly over 2 ranks) one
step under ddp and fsdp (FSDP2 ZeRO-3, and with CPU offload), with LoRA and with every
weight trained; each rank counts the storage behind its parameters (DTensor local shards
with FSDP2's padding), gradients and optimizer state (``_state_bytes``). The estimate is
``rank_model_states`` of the same model built on the meta device, for each rank.
"""

from __future__ import annotations

import pytest
from _state_bytes import LORA, ODD_LLAMA, measure
from transformers import LlamaConfig

from tunekit.adapters import LoRAConfig
from tunekit.distributed.launch import launch
from tunekit.estimate.memory import rank_model_states
from tunekit.estimate.model import ModelSpec, build_model, inventory

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CASES = [
    {"method": "lora", "strategy": "fsdp"},
    {"method": "full", "strategy": "fsdp"},
    {"method": "lora", "strategy": "fsdp", "cpu_offload": True},
    {"method": "lora", "strategy": "ddp"},
    {"method": "full", "strategy": "ddp"},
]


def _estimate(method: str, strategy: str, rank: int) -> dict[str, int]:
    adapter = LoRAConfig(**LORA) if method == "lora" else None
    inv = inventory(build_model(ModelSpec(LlamaConfig(**ODD_LLAMA), "causal_lm", "fp32", adapter=adapter)))
    dp = 2 if strategy == "fsdp" else 1
    states = rank_model_states(inv, "adamw", dp=dp, dp_rank=rank)
    return {"frozen": states.frozen, "trainable": states.trainable, "gradients": states.gradients,
            "optimizer": states.optimizer}


def test_estimated_per_rank_model_states_equal_the_bytes_each_rank_holds(tmp_path):
    held = launch(measure, CASES, nproc=2, log_dir=tmp_path / "logs", echo=False)
    assert [len(ranks) for ranks in held] == [2] * len(CASES)
    for case, ranks in zip(CASES, held):
        for rank, measured in enumerate(ranks):
            assert _estimate(case["method"], case["strategy"], rank) == measured, (case, rank)
    # Uneven sizes: FSDP2's rank 1 holds as many weight and gradient bytes as rank 0 (padding),
    # but less optimizer state (only its real rows); and about half of what DDP's replica holds.
    fsdp_full, ddp_full = held[1], held[4]
    assert fsdp_full[1]["trainable"] == fsdp_full[0]["trainable"] == fsdp_full[1]["gradients"]
    assert fsdp_full[1]["optimizer"] < fsdp_full[0]["optimizer"]
    assert fsdp_full[0]["trainable"] < 0.6 * ddp_full[0]["trainable"]
