"""Rows -> a padded batch of tensors.

Rows are padded on the right to the longest row of the batch: ``input_ids`` with
the tokenizer's pad id, ``labels`` with -100 (so padding never enters the loss).

Packed rows (they carry ``position_ids``) get no ``attention_mask``: transformers
then derives a block-diagonal causal mask from the position-id restarts (see
``tunekit.data.packing``). The padded tail gets positions ``0, 1, ...`` of its own,
so it forms one more sequence that no real token attends to. The model must run
with ``use_cache=False`` (``DataBundle.forward_kwargs``): with a cache object,
transformers 5 skips the packed-sequence detection and the examples attend to
each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunekit.data.formats import IGNORE_INDEX


def _pad(seqs: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """(B, T) long tensor of ``seqs`` right-padded with ``value`` to ``length`` (default: the longest)."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass(frozen=True)
class Collator:
    """Callable ``collate(rows) -> dict[str, Tensor]`` for one task (picklable, for DataLoader workers).

    Args:
        pad_id: id used to pad ``input_ids``.
        task: ``causal_lm``, ``seq_cls`` or ``seq2seq``.
    """

    pad_id: int
    task: str

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Batch rows.

        Returns:
            ``input_ids`` (B, T); ``labels`` (B, T), or (B,) for ``seq_cls``, or (B, T_target) for
            ``seq2seq``; ``attention_mask`` (B, T) for unpacked rows; ``position_ids`` (B, T) for
            packed rows.
        """
        if not rows:
            raise ValueError("collate: empty batch")
        ids = [r["input_ids"] for r in rows]
        batch = {"input_ids": _pad(ids, self.pad_id)}
        if self.task == "seq_cls":
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        else:
            # seq2seq targets have their own length; causal labels match input_ids.
            length = None if self.task == "seq2seq" else batch["input_ids"].shape[1]
            batch["labels"] = _pad([r["labels"] for r in rows], IGNORE_INDEX, length)
        if "position_ids" in rows[0]:
            width = batch["input_ids"].shape[1]
            batch["position_ids"] = _pad([r["position_ids"] + list(range(width - len(r["position_ids"])))
                                          for r in rows], 0)
        else:
            batch["attention_mask"] = _pad([r["attention_mask"] for r in rows], 0)
        return batch
