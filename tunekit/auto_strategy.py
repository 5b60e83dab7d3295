"""``distributed.strategy: auto`` where a run starts: one decision that every rank shares.

    one process (finetune, --nproc 1)   decide here (this machine's devices)
    launcher (--nproc N, --print-config) decide for the N x nodes processes about to start:
                                        refuse before any starts when nothing fits (the ranks decide again)
    a rank of a multi-process job       join the process group (no mesh shaped by a strategy yet),
                                        gather every rank's device memory, rank 0 decides on the
                                        smallest, broadcasts the choice (or the error every rank then
                                        raises), then the strategy's own mesh is built

A resumed run keeps the strategy its checkpoint recorded when this job can
run it. The choice is logged in one line by rank 0, written as a comment at
the top of ``resolved_config.yaml``, and the resolved ``distributed`` section
(not ``auto``) is what the config, and so every checkpoint, holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunekit.config import ConfigError, FinetuneConfig

__all__ = ["Resolved", "decide", "job_size", "resolve_auto", "start_strategy"]


@dataclass(frozen=True)
class Resolved:
    """A config with ``auto`` replaced by a strategy, and the line saying why (None: it was not ``auto``)."""

    cfg: FinetuneConfig
    line: str | None = None


def _saved_distributed(cfg: FinetuneConfig) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint, its ``distributed`` section) of the checkpoint this run resumes, or None."""
    from tunekit.train.checkpoint import CONFIG, resolve_resume

    folder = resolve_resume(cfg.train.resume, cfg.output.dir)
    if folder is None:
        return None
    try:
        saved = json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("distributed")
    except (OSError, ValueError, AttributeError):  # a damaged checkpoint: the trainer refuses it in one line
        return None
    return (folder, saved) if isinstance(saved, dict) else None


def decide(cfg: FinetuneConfig, devices: Any):
    """The ``AutoChoice`` for ``cfg`` on ``devices`` (a resumed run's saved strategy first).

    Raises:
        ConfigError: nothing this job can run fits (one line: the need and what to change).
    """
    from tunekit.estimate.auto import choose_strategy, reuse_saved_strategy

    try:
        saved = _saved_distributed(cfg)
        reused = saved and reuse_saved_strategy(cfg, devices, saved[1], saved[0])
        return reused or choose_strategy(cfg, devices)
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError([" ".join(str(err).split())]) from None


def _apply(cfg: FinetuneConfig, fields: dict[str, Any]) -> FinetuneConfig:
    return cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update=fields)})


def job_size(nproc: int | None = None, nnodes: int = 1) -> dict[str, int]:
    """``processes`` and ``per_node`` of the job ``--nproc``/``--nnodes`` start, or (None) this process is in."""
    if nproc:
        return {"processes": nproc * nnodes, "per_node": nproc}
    from tunekit.distributed.env import read_env

    env = read_env()
    return {"processes": env.world_size, "per_node": env.local_world_size}


def resolve_auto(cfg: FinetuneConfig, *, processes: int = 1, per_node: int | None = None) -> Resolved:
    """``cfg`` with ``auto`` resolved for a job of ``processes`` ranks on this machine's kind of devices.

    Raises:
        ConfigError: nothing fits (see ``decide``).
    """
    if cfg.distributed.strategy != "auto":
        return Resolved(cfg)
    from tunekit.estimate.planner import Devices

    choice = decide(cfg, Devices.detect(processes=processes, per_node=per_node or processes))
    return Resolved(_apply(cfg, choice.distributed), choice.line)


def _agreed_choice(cfg: FinetuneConfig, probe: Any) -> tuple[bool, Any]:
    """(ok, AutoChoice or error lines): rank 0's decision on the smallest devices of every rank, on every rank."""
    import torch.distributed as dist

    from tunekit.estimate.planner import Devices

    env = probe.env
    local = Devices.detect(processes=env.world_size, per_node=env.local_world_size)
    sizes: list[Any] = [None] * env.world_size
    dist.all_gather_object(sizes, (local.memory, local.host_memory))
    outcome: list[Any] = [None]
    if probe.is_main:
        hosts = [h for _, h in sizes if h is not None]
        devices = replace(local, memory=min(m for m, _ in sizes), host_memory=min(hosts) if hosts else None)
        try:
            outcome[0] = (True, decide(cfg, devices))
        except ConfigError as err:
            outcome[0] = (False, err.lines)
    dist.broadcast_object_list(outcome, src=0)
    return outcome[0]


def start_strategy(cfg: FinetuneConfig):
    """(resolved config, the joined strategy, auto's line or None) for this process of the job.

    Every rank calls it; under ``auto`` with several processes the decision is rank 0's,
    broadcast before any mesh exists, so every rank builds the same strategy.

    Raises:
        ConfigError: the config cannot run here (the same on every rank).
    """
    from tunekit.api import check_runnable
    from tunekit.distributed import make_strategy
    from tunekit.distributed.env import read_env

    if cfg.distributed.strategy != "auto":
        return cfg, make_strategy(check_runnable(cfg)), None
    try:
        env = read_env()
    except ValueError as err:  # a launcher's half-set environment: refused like a config
        raise ConfigError([str(err)]) from None
    if env.world_size == 1:
        resolved = resolve_auto(cfg)
        return resolved.cfg, make_strategy(check_runnable(resolved.cfg)), resolved.line
    from tunekit.distributed.mesh import mesh_shape, start_runtime, stop_runtime
    from tunekit.distributed.options import DistributedOptions

    probe = start_runtime(DistributedOptions(strategy="ddp", timeout_s=cfg.distributed.timeout_s), env)
    runtime = probe
    try:
        ok, choice = _agreed_choice(cfg, probe)
        if not ok:
            raise ConfigError(choice)
        cfg = _apply(cfg, choice.distributed)
        options = check_runnable(cfg)
        if mesh_shape(options, env.world_size) != probe.shape:  # the process group stays; a mesh of this shape
            runtime = start_runtime(options, env)
            runtime.owns_group, probe.owns_group = probe.owns_group, False
        return cfg, make_strategy(options, runtime), choice.line
    except BaseException:
        for joined in (runtime, probe):  # not a collective: every rank raises the same error here
            stop_runtime(joined)
        raise
