"""Rows -> a padded batch of tensors.

Rows are padded to the longest row of the batch: ``input_ids`` with the
tokenizer's pad id, ``labels`` with -100 (so padding never enters the loss).
Causal-LM and seq2seq rows are padded on the right. Classification rows follow
``padding_side``: decoder classifiers (Llama, GPT-2, ...: a ``score`` head) pool
the last position when the input reaches them as embeddings (transformers'
``GenericForSequenceClassification`` reads index -1 then, which prompt tuning
always causes), so ``tunekit.load_model`` sets their tokenizer to pad on the left,
where that position is a real token. Left-padded rows get ``position_ids``
counting real tokens only (``0, 0, 0, 1, 2``), so a row's outputs do not depend
on how much padding its batch needs, for absolute positions (GPT-2) as for RoPE.

Packed rows (they carry ``position_ids``) get no ``attention_mask``: transformers
then derives a block-diagonal causal mask from the position-id restarts (see
``tunekit.data.packing``). The padded tail gets positions ``0, 1, ...`` of its own,
so it forms one more sequence that no real token attends to. The model must run
with ``use_cache=False`` (``DataBundle.forward_kwargs``): with a cache object,
transformers 5 skips the packed-sequence detection and the examples attend to
each other. Packed batches also carry the same boundaries in FlashAttention's
varlen form, computed here once per batch on the host (as transformers'
``DataCollatorWithFlattening`` and TRL do): ``cu_seq_lens_q/k`` (N + 1,) int32
offsets into the flattened (B·T) tokens and ``max_length_q/k`` (Python ints).
Models pass them to their attention function: ``attn_implementation: tunekit``
and ``flash_attention_2`` use them instead of rebuilding them from the position
ids in every layer (a device sync each time on a GPU); sdpa and eager ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunekit.data.formats import IGNORE_INDEX
from tunekit.kernels.flash_attention import cu_seqlens_from_position_ids


def _pad(seqs: list[list[int]], value: int, length: int | None = None, *, left: bool = False) -> torch.Tensor:
    """(B, T) long tensor of ``seqs`` padded with ``value`` to ``length`` (default: the longest)."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            out[b, slice(length - len(s), None) if left else slice(0, len(s))] = torch.tensor(s, dtype=torch.long)
    return out


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """FlashAttention's varlen arguments for a packed (B, T) batch: the sequences its position ids delimit.

    Example:
        >>> varlen_kwargs(torch.tensor([[0, 1, 2, 0, 1]]))["cu_seq_lens_q"].tolist()
        [0, 3, 5]
    """
    cu_seqlens, longest = cu_seqlens_from_position_ids(position_ids)  # on the host: no device sync
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest,
            "max_length_k": longest}


@dataclass(frozen=True)
class Collator:
    """Callable ``collate(rows) -> dict[str, Tensor]`` for one task (picklable, for DataLoader workers).

    Args:
        pad_id: id used to pad ``input_ids``.
        task: ``causal_lm``, ``seq_cls`` or ``seq2seq``.
        padding_side: ``right`` or ``left``; applies to ``seq_cls`` rows (the others pad on the right).
    """

    pad_id: int
    task: str
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"collate: padding_side {self.padding_side!r} is not 'left' or 'right'")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Batch rows (rows without ``labels``, as at inference, give a batch without them).

        Returns:
            ``input_ids`` (B, T); ``labels`` (B, T), or (B,) for ``seq_cls``, or (B, T_target) for
            ``seq2seq``; ``attention_mask`` (B, T) for unpacked rows; ``position_ids`` (B, T) for
            packed and left-padded rows; for packed rows also ``varlen_kwargs``.
        """
        if not rows:
            raise ValueError("collate: empty batch")
        if self.task == "seq_cls":
            return self._classification(rows)
        batch = {"input_ids": _pad([r["input_ids"] for r in rows], self.pad_id)}
        if "labels" in rows[0]:
            # seq2seq targets have their own length; causal labels match input_ids.
            length = None if self.task == "seq2seq" else batch["input_ids"].shape[1]
            batch["labels"] = _pad([r["labels"] for r in rows], IGNORE_INDEX, length)
        if "position_ids" in rows[0]:
            width = batch["input_ids"].shape[1]
            batch["position_ids"] = _pad([r["position_ids"] + list(range(width - len(r["position_ids"])))
                                          for r in rows], 0)
            batch.update(varlen_kwargs(batch["position_ids"]))
        else:
            batch["attention_mask"] = _pad([r["attention_mask"] for r in rows], 0)
        return batch

    def _classification(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        left = self.padding_side == "left"
        batch = {"input_ids": _pad([r["input_ids"] for r in rows], self.pad_id, left=left),
                 "attention_mask": _pad([r["attention_mask"] for r in rows], 0, left=left)}
        if left:
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch
