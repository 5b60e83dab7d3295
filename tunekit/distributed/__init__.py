"""tunekit.distributed: multi-process training (DDP, FSDP2 ZeRO-3, DeepSpeed ZeRO-3), sharded checkpoints, launching."""

from importlib import import_module

_LAZY = {
    "DistEnv": "tunekit.distributed.env",
    "read_env": "tunekit.distributed.env",
    "DistributedOptions": "tunekit.distributed.options",
    "STRATEGIES": "tunekit.distributed.options",
    "Runtime": "tunekit.distributed.mesh",
    "start_runtime": "tunekit.distributed.mesh",
    "Strategy": "tunekit.distributed.strategy",
    "StepOutcome": "tunekit.distributed.strategy",
    "make_strategy": "tunekit.distributed.registry",
    "MicroBatch": "tunekit.distributed.data",
    "rank_windows": "tunekit.distributed.data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunekit.distributed' has no attribute {name!r}")
