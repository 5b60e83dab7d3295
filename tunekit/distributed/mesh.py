"""The process group and the one device mesh every strategy shares.

    world = dp_replicate x dp_shard x tp

    mesh dims   ("dp_replicate", "dp_shard", "tp")
    ddp         (world, 1, 1)          every rank a full replica
    fsdp        (r, world / r, 1)      r = dp_replicate; r > 1 is HSDP
    deepspeed   (1, world, 1)          DeepSpeed builds its own groups over the world
    tp          (world / t, 1, t)      t = tp_size; replicas of the TP group beside it
    fsdp_tp     (r, world / (r t), t)  FSDP2 over the dp dims on top of the TP DTensors

``tp`` is the innermost dim: a TP group is ``t`` consecutive ranks, i.e. inside one
node. Data parallelism runs over the dp dims flattened ("dp"): the data rank and
size come from there (TP ranks of one group read the same rows). NCCL on GPUs (one
device per local rank), gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tunekit.distributed.env import DistEnv, read_env
from tunekit.distributed.options import DistributedOptions

DIMS = ("dp_replicate", "dp_shard", "tp")
DP_DIMS = DIMS[:2]


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh dims; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


def mesh_shape(options: DistributedOptions, world_size: int) -> MeshShape:
    """The mesh for ``options.strategy`` on ``world_size`` processes.

    Raises:
        ValueError: ``dp_replicate`` does not divide the world size, or is set for a non-fsdp strategy.

    Example:
        >>> mesh_shape(DistributedOptions(strategy="fsdp", dp_replicate=2), 4)
        MeshShape(dp_replicate=2, dp_shard=2, tp=1)
    """
    if options.dp_replicate > 1 and options.strategy not in ("fsdp", "fsdp_tp"):
        raise ValueError(f"distributed.dp_replicate={options.dp_replicate} is for strategy fsdp or fsdp_tp (HSDP); "
                         f"strategy {options.strategy!r} needs dp_replicate: 1")
    if options.strategy in ("none", "ddp"):
        return MeshShape(dp_replicate=world_size, dp_shard=1)
    tp = options.tp_size
    if world_size % tp:
        raise ValueError(f"distributed.tp_size={tp} does not divide the {world_size} processes")
    if options.strategy == "tp":
        return MeshShape(dp_replicate=world_size // tp, dp_shard=1, tp=tp)
    if options.strategy == "fsdp_tp":
        if (world_size // tp) % options.dp_replicate:
            raise ValueError(f"distributed.dp_replicate={options.dp_replicate} does not divide the "
                             f"{world_size // tp} data-parallel groups ({world_size} processes / tp_size {tp})")
        return MeshShape(options.dp_replicate, world_size // (tp * options.dp_replicate), tp)
    if world_size % options.dp_replicate:
        raise ValueError(f"distributed.dp_replicate={options.dp_replicate} does not divide the {world_size} processes")
    return MeshShape(dp_replicate=options.dp_replicate, dp_shard=world_size // options.dp_replicate)


@dataclass
class Runtime:
    """This process's device, process group and mesh (``mesh`` is None on one process)."""

    env: DistEnv
    device: torch.device
    shape: MeshShape
    mesh: object | None = None  # torch DeviceMesh (imported lazily)
    dp_mesh: object | None = None  # the dp dims flattened into one
    backend: str | None = None
    owns_group: bool = False
    """This runtime created the process group (and so destroys it); one a caller made is left alone."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def dp_size(self) -> int:
        return self.shape.dp_size

    @property
    def dp_rank(self) -> int:
        """This process's index among the data-parallel ranks (which shard of the data it reads)."""
        if self.mesh is None:
            return 0
        replicate, shard = self.mesh.get_coordinate()[:2]
        return replicate * self.shape.dp_shard + shard

    def dp_group(self):
        """The process group of the data-parallel ranks (metrics and token counts are summed over it)."""
        return None if self.dp_mesh is None else self.dp_mesh.get_group()

    @property
    def tp_mesh(self):
        """The tensor-parallel dim of the mesh (None on one process)."""
        return None if self.mesh is None else self.mesh["tp"]


def default_device(env: DistEnv) -> torch.device:
    """``cuda:<local rank>`` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def start_runtime(options: DistributedOptions, env: DistEnv | None = None) -> Runtime:
    """Join the job ``env`` describes (default: this process's environment) and build the mesh.

    One process needs no process group; several get one (NCCL on GPUs, gloo on CPUs)
    with ``options.timeout_s`` as the collective timeout.
    """
    env = env or read_env()
    device = default_device(env)
    shape = mesh_shape(options, env.world_size)
    if env.world_size == 1:
        return Runtime(env, device, shape)
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        _export_env(env)
        # env:// and not tcp://: under torchrun the workers join the agent's store on MASTER_PORT.
        dist.init_process_group(
            backend, init_method="env://", rank=env.rank, world_size=env.world_size,
            timeout=timedelta(seconds=options.timeout_s), device_id=device if device.type == "cuda" else None,
        )
    mesh = init_device_mesh(device.type, (shape.dp_replicate, shape.dp_shard, shape.tp), mesh_dim_names=DIMS)
    return Runtime(env, device, shape, mesh, mesh[DP_DIMS]._flatten("dp"), backend, owns_group)


def _export_env(env: DistEnv) -> None:
    # SLURM jobs have no torch variables yet; env:// (and DeepSpeed, later) read them.
    for key, value in (("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port), ("RANK", env.rank),
                       ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                       ("LOCAL_WORLD_SIZE", env.local_world_size)):
        os.environ.setdefault(key, str(value))


def stop_runtime(runtime: Runtime) -> None:
    """Leave the process group this runtime created (not a collective: safe after an error on another rank)."""
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        runtime.owns_group = False
