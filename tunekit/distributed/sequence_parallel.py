"""Sequence parallelism on top of tensor parallelism (Korthikanti et al., 2022, "Reducing Activation
Recomputation in Large Transformer Models", §4.2.2).

Between the TP regions the residual stream is split over the TP ranks along the
sequence instead of being replicated, so norms, dropout and residual adds run on
``T / tp`` positions and their activations take ``1 / tp`` of the memory::

    first block's input      slice: this rank's positions (no communication)
    attention / MLP input    all-gather (Shard(1) -> Replicate); its gradient is reduce-scattered
    rowwise outputs          reduce-scatter instead of all-reduce (the same bytes)
    final norm's output      all-gather, so the (replicated) head sees every position

The norms are frozen and act position by position, so they stay plain modules.
Sequence lengths must divide by ``tp``: ``pad_sequences`` pads a batch (masked,
ignored by the loss) before it reaches the model.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from tunekit.adapters.hf.arch import arch_spec
from tunekit.adapters.hf.tasks import IGNORE_INDEX
from tunekit.distributed.tensor_parallel import to_region
from tunekit.distributed.tp_plan import arch_plan, base_prefix, glob_regex

_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0, "token_type_ids": 0}
"""Batch keys with a sequence dim, and what pads them (masked positions, no loss)."""


def pad_sequences(batch: dict, multiple: int) -> dict:
    """``batch`` with its sequence dim padded at the end to a multiple of ``multiple``.

    Raises:
        ValueError: a sequence-shaped tensor this function does not know how to pad.
    """
    ids = batch.get("input_ids")
    if ids is None or ids.shape[-1] % multiple == 0:
        return batch
    length = ids.shape[-1]
    extra = -length % multiple
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == length:
            if key not in _PAD:
                raise ValueError(f"sequence parallelism cannot pad batch key {key!r}; set "
                                 "distributed.sequence_parallel: false")
            value = F.pad(value, (0, extra), value=_PAD[key])
        out[key] = value
    return out


def _hidden_states_arg(args: tuple, kwargs: dict, convert) -> tuple[tuple, dict]:
    if args:
        return (convert(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": convert(kwargs["hidden_states"])}
    raise ValueError("sequence parallelism: a block's sublayer was called without hidden_states")


def apply_sequence_parallel(model: nn.Module, mesh) -> None:
    """Install the sequence-parallel boundaries on a model ``tensor_parallel.parallelize`` already split.

    Raises:
        ValueError: the architecture has no sequence-parallel plan.
    """
    plan, spec = arch_plan(model), arch_spec(model)
    if not plan.sequence_norms:
        raise ValueError(f"sequence parallelism has no plan for model_type {model.config.model_type!r}; "
                         "set distributed.sequence_parallel: false")
    blocks = [m for path, m in model.named_modules() if re.fullmatch(spec.blocks, path)]
    final = re.compile(re.escape(base_prefix(model)) + glob_regex(plan.sequence_norms[-1]))
    norms = [m for path, m in model.named_modules() if final.fullmatch(path)]
    if not blocks or len(norms) != 1:
        raise ValueError(f"sequence parallelism: found {len(blocks)} blocks and {len(norms)} final norms in "
                         f"{type(model).__name__}; its layout differs from the plan")

    def scatter(_m, args, kwargs):
        return _hidden_states_arg(args, kwargs, lambda x: to_region(x, mesh, Replicate()).redistribute(
            mesh, [Shard(1)]).to_local())

    def gather(_m, args, kwargs):
        # A Replicate DTensor flows on into the colwise layers: their input gradients then
        # meet in one reduce-scatter here instead of one all-reduce each.
        return _hidden_states_arg(args, kwargs, lambda x: to_region(x, mesh, Shard(1)).redistribute(
            mesh, [Replicate()]))

    blocks[0].register_forward_pre_hook(scatter, with_kwargs=True)
    for block in blocks:
        for sublayer in (spec.attention, spec.mlp):
            block.get_submodule(sublayer).register_forward_pre_hook(gather, with_kwargs=True)
    norms[0].register_forward_hook(lambda _m, _a, out: to_region(out, mesh, Shard(1)).redistribute(
        mesh, [Replicate()]).to_local())
