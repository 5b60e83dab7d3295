"""Refusals before any process starts (or any model loads): one line naming the problem and the fix."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from tunekit.distributed.env import read_env
from tunekit.distributed.launch import check_process_count
from tunekit.distributed.mesh import mesh_shape
from tunekit.distributed.options import TENSOR_PARALLEL, DistributedOptions

INSTALL_DEEPSPEED = "pip install 'tunekit[deepspeed]'"


def config_problem(options: DistributedOptions, adapter_method: str, quantization: str | None, *,
                   fused_cross_entropy: bool = False) -> str | None:
    """Why ``adapter_method`` on a ``quantization`` base cannot run under ``options``, or None.

    Needs no process information, so config validation can call it (one line, or None).
    """
    strategy = options.strategy
    if strategy in TENSOR_PARALLEL:
        from tunekit.distributed.tp_plan import method_problem

        problem = method_problem(adapter_method, quantization, options.sequence_parallel)
        if problem:
            return problem
        if options.cpu_offload:
            return (f"distributed.cpu_offload is not supported with strategy {strategy} (tensor-parallel shards stay "
                    "on their device); use strategy fsdp with cpu_offload")
    if fused_cross_entropy and strategy not in ("none", "tp"):  # tp: the head stays whole, no engine wrapper
        return (f"train.fused_cross_entropy=true is not supported with distributed.strategy={strategy}: the fused "
                "head runs the model's body and head outside the engine's forward (no gather, no gradient sync); "
                "set it to false")
    if quantization and strategy == "deepspeed":
        return (f"model.quantization={quantization!r} cannot run under distributed.strategy=deepspeed: ZeRO-3 "
                "partitions the packed bitsandbytes weights without their quantization state; use strategy fsdp "
                "(QLoRA shards there)")
    if quantization and quantization != "4bit" and strategy == "fsdp":
        return (f"model.quantization={quantization!r} does not shard under distributed.strategy=fsdp (only 4-bit "
                "bases do); use 4bit, or strategy ddp")
    if adapter_method == "prompt" and strategy == "deepspeed":
        return ("adapter.method=prompt cannot run under distributed.strategy=deepspeed: the prompt is read from its "
                "embedding outside a forward call, where ZeRO-3 has not gathered it; use strategy fsdp or ddp")
    if options.mixed_precision == "fp16" and options.sharded:
        return (f"train.mixed_precision=fp16 is not supported with distributed.strategy={strategy} (no sharded loss "
                "scaling); use bf16")
    if options.deepspeed_config is not None and strategy != "deepspeed":
        return f"distributed.deepspeed_config is for strategy deepspeed, not {strategy!r}; remove it or switch"
    if options.cpu_offload and not options.sharded:
        return f"distributed.cpu_offload needs a sharded strategy (fsdp or deepspeed), not {strategy!r}"
    if not options.reshard_after_forward and strategy not in ("fsdp", "fsdp_tp"):
        return f"distributed.reshard_after_forward=false is for strategy fsdp or fsdp_tp, not {strategy!r}"
    return None


def tensor_parallel_problem(options: DistributedOptions, model_config: Any, seq_len: int | None = None) -> str | None:
    """Why ``options``' tensor parallelism cannot split this model (a transformers config), or None.

    One line naming the numbers: heads, KV heads or MLP width not divisible by ``tp_size``, no
    plan for the architecture, or (sequence parallelism) ``seq_len`` not a multiple of it.
    Needs only the model's config (``AutoConfig.from_pretrained``), no weights.
    """
    if options.strategy not in TENSOR_PARALLEL:
        return None
    from tunekit.distributed.tp_plan import seq_len_problem, size_problem

    return (size_problem(model_config, options.tp_size)
            or seq_len_problem(seq_len, options.tp_size, options.sequence_parallel, model_config))


def check_before_launch(options: DistributedOptions, *, nproc: int | None = None, nnodes: int = 1,
                        adapter_method: str = "lora", quantization: str | None = None,
                        fused_cross_entropy: bool = False, environ: Mapping[str, str] | None = None,
                        model_config: Any = None, seq_len: int | None = None) -> None:
    """Raise ``ValueError`` if this job cannot work, before anything heavy runs.

    Args:
        options: the run's distributed options.
        nproc: processes per node this command will start (``--nproc``), or None when an
            external launcher already started them (the world size is then read from ``environ``).
        nnodes: nodes (with ``nproc``).
        adapter_method, quantization: ``adapter.method`` and ``model.quantization`` (None, "4bit", "8bit").
        model_config, seq_len: the model's transformers config and ``data.max_seq_len``, for the
            tensor-parallel checks (skipped without a config).

    Example:
        >>> check_before_launch(DistributedOptions(strategy="fsdp"), nproc=1)
        Traceback (most recent call last):
        ...
        ValueError: distributed.strategy=fsdp shards the model over processes but this run has 1; start several (tunekit finetune --nproc N, tunekit.launch(..., nproc=N)) or use strategy none
    """
    env = read_env(environ)
    external = nproc is None
    world = env.world_size if external else nproc * nnodes
    if external and env.is_multi_process and options.strategy == "none":
        raise ValueError(f"this process is rank {env.rank} of {env.world_size} (started by {env.launcher}) but "
                         "distributed.strategy is none: every process would train the same rows on its own; set "
                         "distributed.strategy: ddp or fsdp")
    if not external and world > 1 and options.strategy == "none":
        raise ValueError(f"--nproc {nproc} needs a multi-process strategy: set distributed.strategy: ddp, fsdp or "
                         "deepspeed")
    if options.strategy != "none" and world == 1:
        spreads = "shards the model" if options.sharded else "replicates the model"
        raise ValueError(f"distributed.strategy={options.strategy} {spreads} over processes but this run has 1; "
                         "start several (tunekit finetune --nproc N, tunekit.launch(..., nproc=N)) or use strategy none")
    if not external:
        check_process_count(nproc)
    mesh_shape(options, world)  # dp_replicate and tp_size must divide the world
    per_node = env.local_world_size if external else nproc
    if options.strategy in TENSOR_PARALLEL and per_node % options.tp_size:
        raise ValueError(f"distributed.tp_size={options.tp_size} does not divide the {per_node} processes per node: "
                         "a tensor-parallel group must stay inside one node; pick a divisor")
    problem = tensor_parallel_problem(options, model_config, seq_len) if model_config is not None else None
    if problem:
        raise ValueError(problem)
    if options.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"distributed.strategy=deepspeed needs DeepSpeed, which is not installed: {INSTALL_DEEPSPEED}")
    if options.strategy == "deepspeed" and options.deepspeed_config is not None:
        from tunekit.distributed.deepspeed_zero import deepspeed_config

        deepspeed_config(options, world)  # the user's file: there, JSON, not contradicting what tunekit needs
    problem = config_problem(options, adapter_method, quantization, fused_cross_entropy=fused_cross_entropy)
    if problem:
        raise ValueError(problem)
