"""``cross_entropy_mean``: the training loss of the target-position head, against ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerances import FP32_EXACT

from tunekit.kernels.cross_entropy import cross_entropy_mean


def _loss_and_grad(fn, logits, targets, upstream):
    leaf = logits.clone().requires_grad_()
    loss = fn(leaf, targets)
    (loss * upstream).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_matches_torch_cross_entropy_forward_and_backward(rows):
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 50, generator=gen) * 4
    targets = torch.randint(0, 50, (rows,), generator=gen)
    mine, mine_grad = _loss_and_grad(cross_entropy_mean, logits, targets, 2.5)
    ref, ref_grad = _loss_and_grad(F.cross_entropy, logits.double(), targets, 2.5)
    torch.testing.assert_close(mine.double(), ref, rtol=FP32_EXACT, atol=FP32_EXACT)
    torch.testing.assert_close(mine_grad.double(), ref_grad, rtol=FP32_EXACT, atol=FP32_EXACT)


def test_a_second_backward_sees_the_same_gradient():
    logits = torch.randn(6, 11, requires_grad=True)
    loss = cross_entropy_mean(logits, torch.arange(6))
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_empty_batch_is_torchs_nan_and_bad_shapes_are_an_error():
    empty = cross_entropy_mean(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(empty) and torch.isnan(F.cross_entropy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\(N, V\) logits and \(N,\) targets"):
        cross_entropy_mean(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))
