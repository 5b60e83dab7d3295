"""Who this process is in a multi-process job, read from the launcher's environment.

torchrun, ``accelerate launch``, the ``deepspeed`` launcher and ``tunekit.launch`` all
set the same variables (torch.distributed's ``env://`` convention)::

    RANK  WORLD_SIZE  LOCAL_RANK  LOCAL_WORLD_SIZE  MASTER_ADDR  MASTER_PORT

SLURM's ``srun`` sets its own (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
``SLURM_NTASKS_PER_NODE``, ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``); they are used when
the torch variables are absent, with the first host of the node list as the master and a
port derived from the job id (so every task of the job agrees on it without talking).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "none"
    """What set the variables: "torchrun" (any env:// launcher), "slurm", or "none"."""

    @property
    def is_multi_process(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[03-05,07],gpu1`` -> ``node03``.

    Example:
        >>> first_slurm_host("gpu-a[009-012,020],gpu-b1")
        'gpu-a009'
    """
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if first is None or not first.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list; set MASTER_ADDR")
    prefix, ranges = first.group(1), first.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer (set by your launcher)") from None


def _slurm_env(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "SLURM_NTASKS")
    # SLURM_NTASKS_PER_NODE may read "4(x2)" on heterogeneous allocations; the first count is ours.
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]
    local_world = int(per_node) if per_node.isdigit() else world
    job = environ.get("SLURM_JOB_ID", "0")
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else DEFAULT_PORT + int(job) % 10000
    addr = environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    return DistEnv(_int(environ, "SLURM_PROCID"), world, _int(environ, "SLURM_LOCALID"), local_world,
                   addr, port, "slurm")


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's ``DistEnv`` from ``environ`` (default ``os.environ``).

    Raises:
        ValueError: a variable is malformed, or only part of the set is present.

    Example:
        >>> read_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1234"}).rank
        1
        >>> read_env({}).world_size
        1
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in environ]
        if missing:
            raise ValueError(f"the launcher set {'WORLD_SIZE' if missing == ['RANK'] else 'RANK'} but not "
                             f"{missing[0]}; start the job with torchrun, tunekit --nproc or srun")
        world = _int(environ, "WORLD_SIZE")
        local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
        return DistEnv(
            rank=_int(environ, "RANK"), world_size=world,
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            local_world_size=local_world, master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_PORT,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and _int(environ, "SLURM_NTASKS") > 1:
        return _slurm_env(environ)
    return DistEnv()
