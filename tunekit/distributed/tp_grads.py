"""Gradients of a tensor-parallel model: the explicit partial-sum reduction, the global norm, clipping.

    backward   replicated factors (lora_A beside a colwise base, lora_B beside a rowwise
               one, prefixes) get ``Partial`` gradients: each TP rank holds a share
    step       reduce_partial_grads: ONE all-reduce over the tp group for all of them
               (a flat bucket per dtype), each then ``Replicate`` and bit-identical
               dp_all_reduce (tp strategy with data replicas): one over the dp group
               global_grad_norm: one scalar all-reduce over the world
               clip, optimizer step: local only

Under fsdp_tp, FSDP2 turns each ``Partial`` gradient into its TP placement while it
reduce-scatters (one all-reduce per such factor, in its post-backward); nothing is
left for ``reduce_partial_grads`` then, and it issues no collective.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def _is_partial(grad) -> bool:
    return isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements)


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad._local_tensor if isinstance(grad, DTensor) else grad


def _all_reduce_bucketed(tensors: list[torch.Tensor], group) -> int:
    """Sum ``tensors`` over ``group`` in place, one flat bucket per dtype; returns the collectives issued."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return len(by_dtype)


@torch.no_grad()
def reduce_partial_grads(params: list[nn.Parameter]) -> int:
    """Sum every ``Partial`` gradient over its mesh (bucketed) and mark it ``Replicate``; returns the collectives."""
    partial = [p for p in params if _is_partial(p.grad)]
    if not partial:
        return 0
    meshes = {id(p.grad.device_mesh): p.grad.device_mesh for p in partial}
    if len(meshes) != 1 or next(iter(meshes.values())).ndim != 1:
        raise ValueError("partial gradients on several meshes or a multi-dim mesh: tunekit reduces them over the "
                         "1-D tp mesh only")
    mesh = next(iter(meshes.values()))
    count = _all_reduce_bucketed([p.grad._local_tensor for p in partial], mesh.get_group())
    for p in partial:
        grad = p.grad
        placements = [Replicate() if pl.is_partial() else pl for pl in grad.placements]
        p.grad = DTensor.from_local(grad._local_tensor, mesh, placements, run_check=False,
                                    shape=grad.shape, stride=grad.stride())
    return count


@torch.no_grad()
def dp_all_reduce(params: list[nn.Parameter], group) -> int:
    """Sum the gradients over the data-parallel replicas (tp strategy with world > tp_size), bucketed."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    return _all_reduce_bucketed(grads, group) if grads else 0


def _counted_here(grad, root_mesh) -> bool:
    """Whether this rank's piece of ``grad`` is counted in the global norm (each element exactly once).

    A piece replicated over a mesh dim (a ``Replicate`` placement, or a dim the gradient's
    mesh does not span) is counted on that dim's coordinate 0 only.
    """
    if root_mesh is None:
        return True
    coordinate = dict(zip(root_mesh.mesh_dim_names, root_mesh.get_coordinate()))
    spanned = {}
    if isinstance(grad, DTensor):
        names = grad.device_mesh.mesh_dim_names
        if names is None:
            raise ValueError("a gradient's device mesh has no dim names; tunekit cannot tell its replication")
        spanned = dict(zip(names, grad.placements))
    for dim, index in coordinate.items():
        placement = spanned.get(dim)
        replicated = placement is None or isinstance(placement, Replicate)
        if replicated and index != 0:
            return False
    return True


@torch.no_grad()
def global_grad_norm(params: list[nn.Parameter], root_mesh) -> torch.Tensor:
    """The 2-norm of all gradients over every shard of every rank (fp32 scalar; one all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if any(_is_partial(g) for g in grads):
        raise ValueError("global_grad_norm: partial gradients left; reduce_partial_grads() first")
    device = _local(grads[0]).device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        if _counted_here(grad, root_mesh):
            squares += _local(grad).double().pow(2).sum()
    if root_mesh is not None:
        dist.all_reduce(squares)
    return squares.sqrt().float()


@torch.no_grad()
def clip_by_norm(params: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients as ``torch.nn.utils.clip_grads_with_norm_`` does (local: every rank the same factor)."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            _local(p.grad).mul_(coef.to(_local(p.grad).device, _local(p.grad).dtype))
