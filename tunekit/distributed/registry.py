"""Strategies by registry name (``distributed.strategy``)."""

from __future__ import annotations

from tunekit.distributed.mesh import Runtime, start_runtime
from tunekit.distributed.options import DistributedOptions
from tunekit.distributed.strategy import Strategy


def _strategy_class(name: str) -> type[Strategy]:
    # Imported on choice: deepspeed is optional and heavy.
    if name == "none":
        return Strategy
    if name == "ddp":
        from tunekit.distributed.ddp import DDPStrategy

        return DDPStrategy
    if name == "fsdp":
        from tunekit.distributed.fsdp import FSDPStrategy

        return FSDPStrategy
    if name in ("tp", "fsdp_tp"):
        from tunekit.distributed.tp_strategy import FSDPTPStrategy, TPStrategy

        return TPStrategy if name == "tp" else FSDPTPStrategy
    from tunekit.distributed.deepspeed_zero import DeepSpeedStrategy

    return DeepSpeedStrategy


def make_strategy(options: DistributedOptions, runtime: Runtime | None = None) -> Strategy:
    """The strategy ``options.strategy`` names, joined to the job (``runtime`` default: from the environment)."""
    runtime = runtime or start_runtime(options)
    if options.strategy == "none" and runtime.world_size > 1:
        raise ValueError(f"this process is rank {runtime.rank} of {runtime.world_size} but distributed.strategy is "
                         "none: every process would train the same rows on its own; set distributed.strategy: ddp "
                         "or fsdp")
    return _strategy_class(options.strategy)(options, runtime)
