"""Packing examples into rows, and the order the trainer visits rows in.

Packing (best-fit decreasing): examples are taken longest first, and each goes into
the open row whose free room is the smallest that still fits it (a new row when
none does), so rows come out nearly full::

    row 0: [ex 7 (900) | ex 2 (100) | ex 5 (24)]            <= max_seq_len = 1024
    position_ids: 0 .. 899, 0 .. 99, 0 .. 23

Position ids restart at 0 for every example. With no ``attention_mask`` in the
batch, transformers' ``masking_utils.find_packed_sequence_indices`` reads the
restarts as sequence boundaries and builds a block-diagonal causal mask (sdpa,
eager and flash-attention alike), so no token attends to another example. The
first label of every example is set to -100: after the model's label shift it
would be predicted from the previous example's last token. With those two
pieces the packed loss (a mean over label tokens) equals the unpacked one.

Length grouping is the alternative to packing: ``train_order`` shuffles, cuts the
order into groups of ``group_size`` rows, and sorts each group by length, so
batches sliced from the order hold rows of similar length (the scheme of
transformers' ``LengthGroupedSampler``). Given the rows of an optimizer step, the
group size is rounded to a multiple of it, so no batch straddles two groups (a
batch of a group's eight shortest rows and the next group's two longest would pad
all ten to the longest).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort

from tunekit.data.formats import IGNORE_INDEX
from tunekit.data.rows import TokenizedRows


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens (best-fit decreasing).

    Args:
        lengths: tokens per example; each must be ``<= capacity``.
        capacity: tokens per packed row.

    Returns:
        Lists of example indices, one list per packed row; every index appears once.

    Example:
        >>> pack_groups([6, 4, 3, 3, 2, 2], capacity=10)
        [[0, 1], [2, 3, 4, 5]]
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the packing capacity {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > lengths[i]:
            insort(free, (room - lengths[i], r))
    return rows


def pack_examples(examples: TokenizedRows, capacity: int) -> TokenizedRows:
    """Concatenate causal-LM examples (rows with ``input_ids`` and ``labels``) into packed rows with
    restarting ``position_ids``."""
    packed = TokenizedRows(("input_ids", "labels", "position_ids"))
    for group in pack_groups(examples.lengths(), capacity):
        ids, labels, positions = [], [], []
        for i in group:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            positions += range(len(ex["input_ids"]))
        packed.append(input_ids=ids, labels=labels, position_ids=positions)
    return packed


def aligned_group_size(group_size: int, step_rows: int | None) -> int:
    """``group_size`` rounded to the nearest multiple of ``step_rows`` (at least one step's rows).

    Example:
        >>> aligned_group_size(256, 10), aligned_group_size(256, 8), aligned_group_size(4, 10)
        (260, 256, 10)
    """
    if not step_rows:
        return group_size
    return step_rows * max(1, round(group_size / step_rows))


def train_order(lengths: list[int], epoch: int, seed: int, *, group_size: int | None = None,
                step_rows: int | None = None) -> list[int]:
    """The row indices of one epoch, in visiting order; a pure function of its arguments.

    Args:
        lengths: tokens per row.
        epoch: epoch number (each epoch gets its own shuffle).
        seed: run seed.
        group_size: if set, sort each consecutive group of this many shuffled rows by
            length (longest first) and put the group holding the longest row first, so
            an out-of-memory batch shows up at the first step.
        step_rows: rows per optimizer step (batch size x accumulation x processes); the groups
            are cut to a multiple of it (``aligned_group_size``), so no batch sliced from the
            order holds the shortest rows of one group and the longest of the next.

    Returns:
        A permutation of ``range(len(lengths))``.

    Example:
        >>> order = train_order([5, 1, 9, 2], epoch=0, seed=0, group_size=2)
        >>> sorted(order), order == train_order([5, 1, 9, 2], epoch=0, seed=0, group_size=2)
        ([0, 1, 2, 3], True)
        >>> order[0]  # the longest row leads
        2
    """
    order = list(range(len(lengths)))
    # A str seed is hashed with SHA-512 by `random`: the same order on every run and platform.
    random.Random(f"tunekit-order:{seed}:{epoch}").shuffle(order)
    if group_size is None or not order:
        return order
    size = aligned_group_size(group_size, step_rows)
    groups = [order[s: s + size] for s in range(0, len(order), size)]
    longest = max(range(len(groups)), key=lambda g: max(lengths[i] for i in groups[g]))
    if len(groups[longest]) < size and longest > 0:
        # A short (last) group moved to the front would shift every later batch off the group
        # boundaries: it stays last and trades its longest row for the first group's.
        first, short = groups[0], groups[longest]
        a, b = (max(range(len(g)), key=lambda k, g=g: lengths[g[k]]) for g in (first, short))
        first[a], short[b] = short[b], first[a]
    else:
        groups.insert(0, groups.pop(longest))
    return [i for group in groups for i in sorted(group, key=lambda i: -lengths[i])]
