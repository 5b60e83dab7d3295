"""``fsdp``: ZeRO-3 with torch's FSDP2 (``fully_shard``), optionally offloading shards to host memory.

Units, sharded bottom-up (torchtune's ``shard_model``, torchtitan's ``apply_fsdp``)::

    every decoder layer  (the model's ``_no_split_modules``; its adapters are inside it)
    input embeddings     (unless tied to the head)
    final norm + head    (one unit: they run back to back)
    the root             (whatever is left: prefix encoders, small heads)

Parameters, gradients and optimizer state are sharded over ``dp_shard`` (and
replicated over ``dp_replicate``: HSDP); frozen weights, 4-bit ones included,
are sharded too and carry no gradient or optimizer state. There is no
``MixedPrecisionPolicy``: its ``param_dtype`` would cast fp32 adapters beside a
bf16 base; autocast handles compute precision instead.

Gradients are reduced as plain sums (``set_gradient_divide_factor(1.0)`` plus
``set_force_sum_reduction_for_comms(True)``: gloo has no PREMUL_SUM, and the same
path then runs on NCCL); the loss weight already divides by the global number
of targets.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tunekit.distributed.strategy import Gathered, OptimizerFactory, Strategy


def _final_norm(model: nn.Module, claimed: set[int]) -> list[nn.Module]:
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower() and id(m) not in claimed]
    return norms[-1:]


def shard_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The modules (or groups of modules) that become FSDP units, innermost first; the root comes after.

    Raises:
        ValueError: the model names no decoder-layer class (``_no_split_modules``) or has none.
    """
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ValueError(f"{type(model).__name__} lists no decoder-layer class (_no_split_modules={sorted(layer_names)}) "
                         "that distributed.strategy=fsdp could shard by; use strategy ddp")
    claimed = {id(m) for layer in layers for m in layer.modules()}
    units: list[nn.Module | list[nn.Module]] = list(layers)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Tied weights: one tensor cannot live in two units, so both stay with the root.
    tied = head is not None and embeddings is not None and getattr(head, "weight", None) is embeddings.weight
    if embeddings is not None and not tied and id(embeddings) not in claimed:
        units.append(embeddings)
        claimed |= {id(m) for m in embeddings.modules()}
    if head is not None and not tied and id(head) not in claimed:
        group = [*_final_norm(model, claimed), head]
        units.append(group if len(group) > 1 else head)
    return units


class FSDPStrategy(Strategy):
    """FSDP2 ZeRO-3 over the ``dp_shard`` dim (HSDP when ``dp_replicate`` > 1)."""

    name = "fsdp"
    fills_from_rank0 = True

    def _fsdp_kwargs(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy

        mesh = self.runtime.mesh
        kwargs = {
            "mesh": mesh["dp_shard"] if self.runtime.shape.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"],
            "reshard_after_forward": self.options.reshard_after_forward,
        }
        if self.options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        return kwargs

    def _wrap(self, model: nn.Module, build_optimizer: OptimizerFactory):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from tunekit.distributed.rank0_fill import fill_from_rank0, source_tensors

        rank0 = self.runtime.rank == 0
        sources = source_tensors(model) if self.base_on_rank0_only and rank0 else None
        kwargs = self._fsdp_kwargs()
        for unit in shard_units(model):
            fully_shard(unit, **kwargs)
        # The root's leftovers are needed again at once by backward: keep them gathered.
        fully_shard(model, **{**kwargs, "reshard_after_forward": False})
        if self.base_on_rank0_only:
            if not rank0:  # meta shards become real (uninitialised) ones where FSDP2 keeps them
                model.to_empty(device="cpu" if self.options.cpu_offload else self.device)
            fill_from_rank0(model, sources, self.device)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model, build_optimizer(model)

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager:
        # FSDP2 reads the flag in post-backward; setting it before the forward covers both.
        self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def _resharded(self) -> None:
        """Put every unit back in its sharded state (no communication).

        The root unit keeps its parameters gathered after a forward (``reshard_after_forward=False``),
        and an evaluation has no backward to reshard them: its trainable tensors (a new head) would
        then be plain full tensors where the state functions expect DTensor shards.
        """
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def snapshot_trainable(self) -> dict:
        self._resharded()
        return super().snapshot_trainable()

    def restore_trainable(self, snapshot: dict) -> None:
        self._resharded()
        super().restore_trainable(snapshot)

    def save_state(self, folder) -> None:
        self._resharded()
        super().save_state(folder)

    def load_state(self, folder) -> None:
        self._resharded()
        super().load_state(folder)

    def gather_trainable(self) -> Gathered:
        from tunekit.distributed.comm_count import GatheredBytes

        self._resharded()
        out = {}
        with GatheredBytes() as counted:
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    # An offloaded shard lives on the CPU: NCCL gathers from the device.
                    out[name] = p.detach().to(self.device).full_tensor().to("cpu")
        return Gathered(out, counted.bytes)
