"""Which rows each rank reads: disjoint, deterministic shards of every step's global batch.

The global order is computed once from the seed (``data.train_order``, as on one
process) and cut into optimizer steps of ``batch_size x grad_accum_steps x dp_size``
rows. Micro-batch ``i`` of a step is the ``i``-th run of ``batch_size x dp_size`` rows
of it, and rank ``r`` reads the ``r``-th ``batch_size`` rows of that run::

    step rows  | micro 0: r0 r0 r1 r1 | micro 1: r0 r0 r1 r1 |     (batch_size 2, dp 2, accum 2)

So N ranks with batch B see, step by step, exactly the rows one process sees
with batch N·B; the loss weights (targets / global targets) make the update
the same. Every rank runs the same number of micro-batches, even when the
last step of an epoch is short: a rank with nothing left gets a
*placeholder* micro-batch (a row of the step, loss weight 0), because FSDP and
DeepSpeed gather parameters in every forward, and a rank that skipped one
would leave the others waiting in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MicroBatch:
    """Row indices of one micro-batch on one rank."""

    rows: list[int]
    placeholder: bool = False
    """True: the rows are borrowed only to keep the collectives in step; its loss weight is 0."""


def global_steps(order: Sequence[int], batch_size: int, grad_accum_steps: int, dp_size: int) -> list[list[int]]:
    """``order`` cut into optimizer steps of ``batch_size * grad_accum_steps * dp_size`` rows (the last may be short).

    Example:
        >>> global_steps(range(10), 2, 1, 2)
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    size = batch_size * grad_accum_steps * dp_size
    order = list(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def shard_step(step_rows: Sequence[int], batch_size: int, dp_size: int, dp_rank: int) -> list[MicroBatch]:
    """Rank ``dp_rank``'s micro-batches of one global step (the same count on every rank).

    Example:
        >>> [m.rows for m in shard_step([0, 1, 2, 3, 4, 5, 6, 7], 2, 2, 1)]
        [[2, 3], [6, 7]]
        >>> shard_step([0, 1, 2], 2, 2, 1)
        [MicroBatch(rows=[2], placeholder=False)]
        >>> shard_step([0, 1], 2, 2, 1)
        [MicroBatch(rows=[0], placeholder=True)]
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, {dp_size})")
    if not step_rows:
        raise ValueError("a step needs at least one row")
    run = batch_size * dp_size
    out = []
    for start in range(0, len(step_rows), run):
        mine = list(step_rows[start + dp_rank * batch_size : start + (dp_rank + 1) * batch_size])
        out.append(MicroBatch(mine) if mine else MicroBatch([step_rows[0]], placeholder=True))
    return out


def rank_windows(order: Sequence[int], *, batch_size: int, grad_accum_steps: int, dp_size: int, dp_rank: int,
                 start_step: int = 0) -> list[list[MicroBatch]]:
    """Every optimizer step of one epoch from ``start_step`` on, as this rank's micro-batches.

    This is what the trainer's ``windows(epoch, start)`` becomes with several processes.

    Example:
        >>> w = rank_windows(range(10), batch_size=2, grad_accum_steps=1, dp_size=2, dp_rank=0)
        >>> [[m.rows for m in step] for step in w]
        [[[0, 1]], [[4, 5]], [[8, 9]]]
    """
    steps = global_steps(order, batch_size, grad_accum_steps, dp_size)
    return [shard_step(rows, batch_size, dp_size, dp_rank) for rows in steps[start_step:]]


def steps_per_epoch(num_rows: int, batch_size: int, grad_accum_steps: int, dp_size: int) -> int:
    """Optimizer steps in one pass over ``num_rows`` rows (the same on every rank)."""
    return math.ceil(num_rows / (batch_size * grad_accum_steps * dp_size))


def resume_step(samples_in_epoch: int, global_batch: int) -> int:
    """The step of the epoch a run resumes at, from the global samples it had consumed.

    Raises:
        ValueError: the position does not fall on a step boundary of this global batch
            (batch_size x grad_accum_steps x processes changed since the checkpoint).

    Example:
        >>> resume_step(12, 4)
        3
    """
    if samples_in_epoch % global_batch:
        raise ValueError(
            f"the checkpoint stopped after {samples_in_epoch} samples of the epoch, not a multiple of this run's global "
            f"batch {global_batch} (batch_size x grad_accum_steps x processes): keep the global batch when "
            "changing the number of processes"
        )
    return samples_in_epoch // global_batch


def eval_shards(num_rows: int, batch_size: int, dp_size: int, dp_rank: int) -> list[MicroBatch]:
    """This rank's evaluation batches: rows ``[i*B*N + r*B, ...)``, placeholders to equalise the count.

    Example:
        >>> [(m.rows, m.placeholder) for m in eval_shards(5, 2, 2, 1)]
        [([2, 3], False), ([0], True)]
    """
    if num_rows <= 0:
        raise ValueError("no evaluation rows to shard")
    return shard_step(list(range(num_rows)), batch_size, dp_size, dp_rank)


def finite_loss_batch(batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` with one loss target, for a micro-batch that must run but counts 0.

    A batch whose labels are all masked has a 0/0 mean loss: NaN, and NaN gradients even
    at weight 0. Unmasking one label makes the loss finite; its weight 0 then contributes
    exact zeros. (seq_cls labels are never masked.)
    """
    if task == "seq_cls":
        return batch
    labels = batch["labels"].clone()  # (B, T)
    position = 1 if task == "causal_lm" and labels.shape[-1] > 1 else 0  # transformers shifts causal labels by one
    labels[0, position] = 0  # any class index will do
    return {**batch, "labels": labels}
