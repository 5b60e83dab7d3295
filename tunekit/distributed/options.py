"""``DistributedOptions``: what a strategy needs to know, as plain values.

The config tree's ``distributed:`` and ``train:`` sections map onto it
(``from_configs``); strategies never read config objects themselves, so they are
testable with a few keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed", "tp", "fsdp_tp")
"""Registry names of ``distributed.strategy``."""

TENSOR_PARALLEL = ("tp", "fsdp_tp")
"""Strategies that split layers over a ``tp`` mesh dim (``tp_size`` processes per group)."""

SHARDED = ("fsdp", "deepspeed", *TENSOR_PARALLEL)
"""Strategies that shard parameters over processes (pointless, and refused, on one)."""

DEFAULT_TIMEOUT_S = 300.0
"""Process-group timeout: a hanging rank ends the job after this (torch's own default is 30 min)."""


@dataclass(frozen=True)
class DistributedOptions:
    """How a run is spread over processes.

    Example:
        >>> DistributedOptions(strategy="fsdp", cpu_offload=True).sharded
        True
    """

    strategy: str = "none"
    """none | ddp | fsdp (FSDP2 ZeRO-3) | deepspeed (DeepSpeed ZeRO-3) | tp (tensor parallel) | fsdp_tp (FSDP2 x TP)."""
    cpu_offload: bool = False
    """fsdp / deepspeed: sharded parameters, gradients and optimizer state live in host memory."""
    reshard_after_forward: bool = True
    """fsdp: free gathered layers after forward (ZeRO-3); false keeps them to backward (ZeRO-2-like)."""
    dp_replicate: int = 1
    """fsdp: replicas of the sharded group (HSDP); processes / dp_replicate shard each copy."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Seconds a collective may wait before the job fails (a hanging rank)."""
    deepspeed_config: str | None = None
    """deepspeed: a DeepSpeed JSON file used instead of the generated one."""
    mixed_precision: str = "no"
    """Autocast precision: no | bf16 | fp16."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (applied per layer before sharding)."""
    micro_batch_size: int = 1
    """Rows per micro-batch on one process (DeepSpeed's train_micro_batch_size_per_gpu)."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clip (DeepSpeed clips inside its step, so it needs it up front)."""
    tp_size: int = 1
    """tp / fsdp_tp: processes that split each layer (inside one node); the rest is data parallel."""
    sequence_parallel: bool = False
    """tp / fsdp_tp: norms and dropout run on sequence shards (activations / tp_size between the layers)."""
    fill_from_rank0: bool = True
    """fsdp (not fsdp_tp): only rank 0 loads the base; the others build it on the meta device and get their shards
    from rank 0."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy={self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        if self.timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s={self.timeout_s} must be positive (seconds)")
        if self.dp_replicate < 1:
            raise ValueError(f"distributed.dp_replicate={self.dp_replicate} must be at least 1")
        tensor_parallel = self.strategy in TENSOR_PARALLEL
        if tensor_parallel and self.tp_size < 2:
            raise ValueError(f"distributed.strategy={self.strategy} needs distributed.tp_size >= 2 (got {self.tp_size})")
        if not tensor_parallel and (self.tp_size != 1 or self.sequence_parallel):
            raise ValueError(f"distributed.tp_size / sequence_parallel are for strategy tp or fsdp_tp, not "
                             f"{self.strategy!r}; remove them or switch")

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    @classmethod
    def from_configs(cls, distributed: Any, train: Any | None = None) -> DistributedOptions:
        """Options from a ``distributed:`` section and (optionally) a ``train:`` section (duck-typed)."""
        names = {f.name for f in fields(cls)}
        values = {n: getattr(distributed, n) for n in names if hasattr(distributed, n)}
        if values.get("deepspeed_config") is not None:  # a Path in the config tree
            values["deepspeed_config"] = str(values["deepspeed_config"])
        if train is not None:
            values.update(mixed_precision=train.mixed_precision, gradient_checkpointing=train.gradient_checkpointing,
                          micro_batch_size=train.batch_size, max_grad_norm=train.max_grad_norm)
        return cls(**values)
