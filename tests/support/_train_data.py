"""Tiny in-memory datasets with the DataBundle interface, for trainer tests.

Rows are dicts of python lists, ``collate`` pads on the right (labels -100
on padding), ``train_order`` is a seeded permutation per epoch. Lengths vary
and some prompt tokens are masked, so token weighting matters.
"""

from __future__ import annotations

import torch

from _tiny import VOCAB


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


class ToyBundle:
    """Shared parts: ``train``/``eval`` rows and a seeded ``train_order``."""

    task = "causal_lm"

    def __init__(self, train: list[dict], eval_rows: list[dict] | None) -> None:
        self.train, self.eval = train, eval_rows
        self.label_names = None

    def train_order(self, epoch: int, seed: int, step_rows: int | None = None) -> list[int]:
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        return torch.randperm(len(self.train), generator=g).tolist()


class ToyLM(ToyBundle):
    """Causal LM rows: counting sequences ``a, a+1, a+2, ...`` (mod VOCAB, learnable), first tokens masked."""

    task = "causal_lm"

    def __init__(self, n: int = 16, n_eval: int = 4, max_len: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(n + n_eval):
            length = int(torch.randint(4, max_len + 1, (1,), generator=g))
            start = int(torch.randint(3, VOCAB, (1,), generator=g))
            ids = [3 + (start + i) % (VOCAB - 3) for i in range(length)]
            prompt = int(torch.randint(0, 3, (1,), generator=g))
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
        super().__init__(rows[:n], rows[n:] or None)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": _pad([r["input_ids"] for r in rows], 0),
            "attention_mask": _pad([r["attention_mask"] for r in rows], 0),
            "labels": _pad([r["labels"] for r in rows], -100),
        }


class ToyCls(ToyBundle):
    """Sequence classification rows: the label is which third of the vocabulary the tokens come from."""

    task = "seq_cls"

    def __init__(self, n: int = 24, n_eval: int = 12, num_labels: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        band = (VOCAB - 3) // num_labels
        rows = []
        for i in range(n + n_eval):
            label = i % num_labels
            length = int(torch.randint(3, 8, (1,), generator=g))
            ids = (3 + label * band + torch.randint(0, band, (length,), generator=g)).tolist()
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
        super().__init__(rows[:n], rows[n:] or None)
        self.label_names = [f"band{i}" for i in range(num_labels)]

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": _pad([r["input_ids"] for r in rows], 0),
            "attention_mask": _pad([r["attention_mask"] for r in rows], 0),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }
