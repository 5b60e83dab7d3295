"""One copy of the base per job under FSDP2: rank 0 loads it, the other ranks build it on the meta device.

Every rank loading the whole base (what ``tunekit finetune`` did, and what transformers'
``from_pretrained`` does on each process) costs one copy per rank in host memory whenever the
weights are converted on load (a bf16 run over an fp32 checkpoint, a random ``from_config``
base). Under ``distributed.strategy: fsdp`` instead (accelerate's ``cpu_ram_efficient_loading``,
torchtune's rank-0 load)::

    rank 0        load the base, inject the adapter       -> real tensors
    other ranks   build the same model on the meta device -> shapes and dtypes only
    all           fully_shard(...)                         (no communication)
    other ranks   to_empty(device)                         -> uninitialised shards
    all           fill_from_rank0: one scatter per parameter (rank 0's tensor is the source,
                  ``distribute_tensor(..., src_data_rank=0)``), one broadcast per buffer

Everything (base, adapters, new heads, buffers such as RoPE's ``inv_freq``) then holds rank 0's
values, so the ranks are identical by construction. ``check_signatures`` first makes sure
the meta model has rank 0's names, shapes and dtypes (``from_pretrained`` may keep modules
in fp32 that ``from_config`` builds in the run's dtype: the meta tensors take rank 0's dtype).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["check_signatures", "fill_from_rank0", "signatures", "source_tensors"]


def signatures(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every parameter and buffer (what a meta replica must reproduce)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}


@torch.no_grad()
def check_signatures(model: nn.Module, reference: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Give ``model``'s meta tensors the dtypes of rank 0's ``reference``; raise on any other difference.

    Raises:
        ValueError: a name or a shape differs (the ranks did not build the same model).
    """
    ours = signatures(model)
    missing, extra = sorted(set(reference) - set(ours)), sorted(set(ours) - set(reference))
    if missing or extra:
        name = (missing or extra)[0]
        raise ValueError(f"the model built on the meta device {'lacks' if missing else 'has an extra'} {name!r} "
                         "compared with rank 0's; set distributed.fill_from_rank0: false (every rank loads the base)")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, (shape, dtype) in reference.items():
        if ours[name][0] != shape:
            raise ValueError(f"{name!r} has shape {list(ours[name][0])} on the meta device but {list(shape)} on rank 0; "
                             "set distributed.fill_from_rank0: false (every rank loads the base)")
        if ours[name][1] != dtype:
            tensors[name].data = tensors[name].data.to(getattr(torch, dtype))


def source_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's parameters and buffers by name, taken before sharding (the full tensors ``fill_from_rank0`` sends)."""
    tensors = [*model.named_parameters(), *model.named_buffers(remove_duplicate=False)]
    return {name: t.detach() for name, t in tensors}


@torch.no_grad()
def fill_from_rank0(model: nn.Module, sources: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Every rank's shards (and buffers) of the sharded ``model`` set from rank 0's full ``sources`` (collective).

    Args:
        model: after ``fully_shard``; on ranks other than 0 after ``to_empty``.
        sources: rank 0's ``source_tensors``; ``None`` on the other ranks.
        device: the communication device (the mesh's: CUDA under NCCL, the CPU under gloo).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            raise ValueError(f"{name!r} was not sharded by FSDP2; set distributed.fill_from_rank0: false")
        full = _full(sources, name, param.shape, param.dtype, device)
        # src_data_rank=0: rank 0's values are scattered; the others' tensor is only a shape.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
        if sources is None:
            param.to_local().copy_(shard.to_local())
    for module_name, module in model.named_modules():
        for key, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            name = f"{module_name}.{key}" if module_name else key
            full = _full(sources, name, buffer.shape, buffer.dtype, device)
            dist.broadcast(full, src=0)
            if sources is None:
                # Where compute needs it (to_empty put it beside offloaded shards on the CPU).
                module._buffers[key] = full


def _full(sources: dict[str, torch.Tensor] | None, name: str, shape: Any, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    if sources is not None:
        return sources[name].to(device).contiguous()
    return torch.empty(shape, dtype=dtype, device=device)  # untouched pages cost no memory on the CPU
