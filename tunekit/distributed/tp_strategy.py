"""``tp`` and ``fsdp_tp``: tensor parallelism that splits the adapters, alone or under FSDP2.

    tp        mesh (replicas, 1, t): every layer split over the t ranks of a TP group;
              with more processes than t, the groups are data-parallel replicas whose
              gradients are summed once per step (one bucketed all-reduce)
    fsdp_tp   mesh (r, s, t): TP inside a node, FSDP2 ``fully_shard`` over the dp dims on
              top of the TP DTensors (the same units as ``fsdp``); HSDP when r > 1

Both talk to the trainer only through the ``Strategy`` interface. ``optimizer_step``
first reduces the replicated factors' partial gradients (``tp_grads``), so clipping
sees the true global norm and every replica stays bit-identical, then clips and steps
(the optimizer itself only does local math on its shards).

Saves and checkpoints are mesh-independent: the gathered adapter and the DCP state
hold every tensor in its canonical layout (GPT-2's packed q/k/v outputs unpermuted),
so a checkpoint written on 2 x 2 loads on 1 x 2, 2 x 1 or one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tunekit.distributed.fsdp import FSDPStrategy
from tunekit.distributed.strategy import Gathered, OptimizerFactory, StepOutcome, Strategy
from tunekit.distributed.tensor_parallel import TPReport, parallelize
from tunekit.distributed.tp_grads import clip_by_norm, dp_all_reduce, global_grad_norm, reduce_partial_grads


class TensorParallelMixin:
    """What both TP strategies share: the split, the gradient path, canonical state."""

    report: TPReport | None = None
    reduces_over_dp: bool = False
    """Whether ``optimizer_step`` sums gradients over data-parallel replicas itself (FSDP does it for fsdp_tp)."""
    last_step_collectives: int = 0
    """Collectives the last ``optimizer_step`` issued (partial-sum buckets, dp buckets, the norm)."""

    def _parallelize(self, model: nn.Module) -> None:
        if self.options.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision=fp16 is not supported with tensor parallelism; use bf16")
        self.report = parallelize(model, self.runtime.tp_mesh, sequence_parallel=self.options.sequence_parallel)
        model.to(self.device)

    def to_device(self, batch: dict) -> dict:
        if self.options.sequence_parallel:
            from tunekit.distributed.sequence_parallel import pad_sequences

            batch = pad_sequences(batch, self.options.tp_size)
        return super().to_device(batch)

    def reduce_gradients(self) -> int:
        """The explicit reductions before clipping; returns the collectives issued."""
        params = self.trainable_parameters()
        count = reduce_partial_grads(params)
        if self.reduces_over_dp and self.dp_size > 1:
            count += dp_all_reduce(params, self.runtime.dp_group())
        return count

    def optimizer_step(self, max_grad_norm: float | None) -> StepOutcome:
        count = self.reduce_gradients()
        params = self.trainable_parameters()
        total = global_grad_norm(params, self.runtime.mesh)
        if max_grad_norm is not None:
            clip_by_norm(params, max_grad_norm, total)
        self.optimizer.step()
        self.last_step_collectives = count + 1
        return StepOutcome(float(total), True)

    # ------------------------------------------------------------------ state
    def canonical(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (parameter ``name`` or a same-shaped optimizer state) whole, in its canonical layout (collective)."""
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        packed = self.report.packed.get(name) if self.report else None
        if packed is not None:
            dim, perm = packed
            full = full.index_select(dim, torch.argsort(perm).to(full.device))
        return full

    def gather_trainable(self) -> Gathered:
        from tunekit.distributed.comm_count import GatheredBytes

        out = {}
        with GatheredBytes() as counted:
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    out[name] = self.canonical(name, p.detach().to(self.device)).to("cpu")
        return Gathered(out, counted.bytes)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from tunekit.distributed.checkpoint import trainable_model_state

        return {"model": trainable_model_state(self.model, self.wrapped),
                "optim": get_optimizer_state_dict(self.wrapped, self.optimizer)}

    def save_state(self, folder) -> None:
        from tunekit.distributed.checkpoint import save_dcp
        from tunekit.distributed.tp_checkpoint import PackedLayout

        self._before_state()
        state = self._state()
        PackedLayout(self).to_saved(state)
        save_dcp(folder, state)

    def load_state(self, folder) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from tunekit.distributed.checkpoint import check_trainable_fit, load_dcp
        from tunekit.distributed.tp_checkpoint import PackedLayout

        self._before_state()
        check_trainable_fit(folder, self.model, self.trainable_shapes)
        state = self._state()
        finish = PackedLayout(self).to_loaded(state)  # canonical buffers DCP reads into
        load_dcp(folder, state)
        finish()
        set_optimizer_state_dict(self.wrapped, self.optimizer, state["optim"], options=StateDictOptions(strict=False))

    def _before_state(self) -> None:
        """Hook: put the model in the state its state dicts are read in (FSDP: resharded)."""


class TPStrategy(TensorParallelMixin, Strategy):
    """Tensor parallelism over the ``tp`` dim; data-parallel replicas over ``dp_replicate``."""

    name = "tp"
    reduces_over_dp = True

    def _wrap(self, model: nn.Module, build_optimizer: OptimizerFactory):
        self._parallelize(model)
        return model, build_optimizer(model)


class FSDPTPStrategy(TensorParallelMixin, FSDPStrategy):
    """FSDP2 ZeRO-3 over the dp dims on top of tensor parallelism over ``tp`` (the 2-D mesh)."""

    name = "fsdp_tp"
    # Rank 0's full tensors are not what a TP shard holds under every plan (GPT-2's packed q/k/v
    # columns are reordered), so every rank loads the base.
    fills_from_rank0 = False

    def _wrap(self, model: nn.Module, build_optimizer: OptimizerFactory):
        self._parallelize(model)
        return super()._wrap(model, build_optimizer)

    def _before_state(self) -> None:
        self._resharded()

    def gather_trainable(self) -> Gathered:
        self._resharded()
        return TensorParallelMixin.gather_trainable(self)
