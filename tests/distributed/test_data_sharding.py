"""Rank shards of each step's global batch: disjoint, complete, the same micro-batch count on every rank."""

from __future__ import annotations

import pytest
import torch

from tunekit.distributed.data import (
    MicroBatch,
    eval_shards,
    finite_loss_batch,
    global_steps,
    rank_windows,
    resume_step,
    shard_step,
    steps_per_epoch,
)


def _one_process_windows(order, batch_size, accum):
    # What the single-process trainer does today (Trainer.windows), written out independently.
    micro = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [micro[i : i + accum] for i in range(0, len(micro), accum)]


@pytest.mark.parametrize(("rows", "batch", "accum", "ranks"), [(23, 2, 2, 2), (16, 2, 2, 2), (7, 3, 1, 4), (30, 1, 3, 3)])
def test_ranks_together_read_exactly_what_one_process_reads(rows, batch, accum, ranks):
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(rows)).tolist()
    windows = [rank_windows(order, batch_size=batch, grad_accum_steps=accum, dp_size=ranks, dp_rank=r) for r in range(ranks)]
    reference = _one_process_windows(order, batch * ranks, accum)  # one process, batch N*B
    assert all(len(w) == len(reference) == steps_per_epoch(rows, batch, accum, ranks) for w in windows)
    for step, expected in enumerate(reference):
        per_rank = [w[step] for w in windows]
        assert len({len(micros) for micros in per_rank}) == 1, "every rank runs the same number of micro-batches"
        real = [row for micros in per_rank for m in micros if not m.placeholder for row in m.rows]
        assert sorted(real) == sorted(row for micro in expected for row in micro)  # disjoint and complete
        assert len(real) == len(set(real))
        for i, micro in enumerate(expected):  # micro-batch i of one process = micro-batch i of all ranks
            assert sorted(r for rank in per_rank if not rank[i].placeholder for r in rank[i].rows) == sorted(micro)


def test_a_rank_with_nothing_left_gets_a_placeholder_row_of_the_step():
    assert shard_step([5, 6, 7], 2, 4, 3) == [MicroBatch([5], placeholder=True)]
    assert shard_step([5, 6, 7], 2, 4, 1) == [MicroBatch([7])]
    with pytest.raises(ValueError, match="dp_rank=2"):
        shard_step([1], 1, 2, 2)


def test_global_steps_and_resume_position():
    assert global_steps(range(7), 1, 2, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert resume_step(24, 12) == 2
    with pytest.raises(ValueError, match="global batch 8"):
        resume_step(12, 8)


def test_eval_shards_cover_every_row_once():
    shards = [eval_shards(11, 2, 3, r) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    real = sorted(row for s in shards for m in s if not m.placeholder for row in m.rows)
    assert real == list(range(11))


def test_finite_loss_batch_makes_an_all_masked_batch_finite_without_touching_the_input():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    logits = torch.randn(2, 3, 11, requires_grad=True)

    def lm_loss(labels):  # transformers' causal LM loss: predict token t+1 from position t
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))

    assert torch.isnan(lm_loss(batch["labels"]))
    fixed = finite_loss_batch(batch, "causal_lm")
    loss = lm_loss(fixed["labels"])
    (loss * 0.0).backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() == 0  # weight 0: exact zeros
    assert (batch["labels"] == -100).all() and fixed["input_ids"] is ids
    cls = {"input_ids": ids, "labels": torch.tensor([1, 2])}
    assert finite_loss_batch(cls, "seq_cls") is cls
