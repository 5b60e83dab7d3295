"""The final adapter of a sharded run: gathered, checked, written once in the single-process format.

    every rank:  gathered = strategy.gather_trainable()       only trainable tensors travel
                 check_adapter_tensors(gathered, shapes)       the same verdict on every rank
    rank 0:      the gathered tensors take the place of the shards for a moment,
                 save_adapters(model, tmp) writes what one process would, tmp -> out
    every rank:  barrier

The export itself is tunekit.adapters' own (``save_adapters``), so the folder is
the single-process one (PEFT's format where the method has one). While it runs,
forward hooks are lifted: a method whose export calls a submodule (prefix tuning
folds its encoder) must not wake the engine's gather hooks on rank 0 alone.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunekit.distributed.strategy import Strategy, no_forward_hooks
from tunekit.distributed.validate import check_adapter_tensors


@dataclass(frozen=True)
class AdapterSave:
    """Where the adapter went and what gathering it cost this rank."""

    path: Path
    gathered_bytes: int
    """Bytes this rank received from all-gathers while collecting the adapter."""
    adapter_bytes: int
    """Bytes of the trainable tensors at their global shapes."""


@contextlib.contextmanager
def plain_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` with each named trainable parameter replaced by a plain one holding ``tensors[name]``."""
    swapped = []
    for name, value in tensors.items():
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path)
        swapped.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=True)
    try:
        with no_forward_hooks(list(model.modules())):
            yield model
    finally:
        for owner, leaf, original in reversed(swapped):
            owner._parameters[leaf] = original


def save_gathered_adapter(strategy: Strategy, out_dir: str | Path) -> AdapterSave:
    """Gather the trainable tensors from all ranks, check them, and write the adapter from rank 0 (collective).

    Raises:
        ValueError: a tensor is missing, not at its global shape, or not finite (on every rank; nothing written).
    """
    from tunekit.adapters import save_adapters

    out = Path(out_dir)
    result = strategy.gather_trainable()
    gathered = result.tensors
    check_adapter_tensors(gathered, strategy.trainable_shapes)
    if strategy.is_main:
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        with plain_trainable(strategy.model, gathered) as model:
            save_adapters(model, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    strategy.barrier()
    adapter_bytes = sum(t.numel() * t.element_size() for t in gathered.values())
    return AdapterSave(out, result.bytes_received, adapter_bytes)
