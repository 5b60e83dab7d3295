"""Checkpoints of a tensor-parallel model in the canonical layout, so they load on any mesh.

A plain ``Shard`` DTensor is already mesh-independent in DCP (it records global
offsets). Packed outputs (GPT-2's q/k/v in one layer) are not: their DTensors hold a
TP-degree-dependent permutation (``tensor_parallel.packed_permutation``). For those
parameters, and their optimizer states, the checkpoint holds the whole tensor
unpermuted (adapter-sized: gathered once per checkpoint, written once by DCP), and
loading permutes it back and keeps this rank's piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class PackedLayout:
    """``save_dcp`` / ``load_dcp``'s layout hook for a strategy with packed tensor-parallel outputs."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy
        packed = strategy.report.packed if strategy.report is not None else {}
        params = dict(strategy.model.named_parameters())
        keys = {id(v): k for k, v in strategy.model.state_dict(keep_vars=True).items()}
        # parameter name -> (its state-dict / optimizer key, its shape)
        self.entries = {name: (keys[id(params[name])], params[name].shape) for name in packed}

    def _slots(self, state: dict) -> Iterator[tuple[str, dict, str]]:
        """(parameter name, container, key) of every tensor of ``state`` in a packed layout."""
        optim = state["optim"].get("state", {})
        for name, (key, shape) in self.entries.items():
            if key in state["model"]:
                yield name, state["model"], key
            for stat, value in optim.get(key, {}).items():
                if torch.is_tensor(value) and value.shape == shape:
                    yield name, optim[key], stat

    def to_saved(self, state: dict) -> None:
        """Replace each packed tensor by its whole canonical copy (collective)."""
        for name, container, key in list(self._slots(state)):
            container[key] = self.strategy.canonical(name, container[key])

    def to_loaded(self, state: dict) -> Callable[[], None]:
        """Put canonical buffers where DCP will read; the returned function moves them into the live tensors."""
        pending = []
        for name, container, key in list(self._slots(state)):
            live = container[key]
            buffer = torch.empty(live.shape, dtype=live.dtype, device=self.strategy.device)
            container[key] = buffer
            pending.append((name, container, key, live, buffer))

        def finish() -> None:
            for name, container, key, live, buffer in pending:
                dim, perm = self.strategy.report.packed[name]
                held = buffer.index_select(dim, perm.to(buffer.device))
                with torch.no_grad():
                    if isinstance(live, DTensor):
                        local = distribute_tensor(held, live.device_mesh, live.placements, src_data_rank=None)
                        live._local_tensor.copy_(local._local_tensor)
                    else:
                        live.copy_(held)
                container[key] = live

        return finish
