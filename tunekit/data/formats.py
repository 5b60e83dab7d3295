"""One raw row -> one tokenized example, per ``DataConfig.format``.

Causal-LM formats (text, instruction, chat) give ``input_ids`` and ``labels`` of the
same length; ``labels`` is ``input_ids`` with the prompt set to -100 (the model
shifts labels itself, so label ``t`` is predicted from tokens ``< t``).
Classification gives ``input_ids`` and one label id; seq2seq gives ``input_ids``
(encoder) and ``labels`` (decoder target ids).

Every prompt comes from ``tunekit.data.prompts.PromptRenderer``, the function
inference uses too. The prompt and the response of an instruction row are
tokenized separately and concatenated, so the prompt's ids are exactly the ids
the model sees when it is given that prompt at inference, and the masking
boundary is exact.

An encoder raises ``SkipRow(reason)`` for a row it cannot use; the builder counts
the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunekit.adapters.hf.tasks import IGNORE_INDEX
from tunekit.data.chat import SkipRow
from tunekit.data.config import DataConfig
from tunekit.data.prompts import PromptRenderer, text_field



@dataclass
class Example:
    """A tokenized example: ``labels`` is a list (causal LM, seq2seq) or one id (classification)."""

    input_ids: list[int]
    labels: list[int] | int
    truncated: bool = False


class Encoder:
    """Turns raw rows into ``Example``s for one config and tokenizer.

    Args:
        cfg: the data config.
        tokenizer: a Hugging Face tokenizer.
        label2id: label string -> id (classification only).
    """

    def __init__(self, cfg: DataConfig, tokenizer, label2id: dict[str, int] | None = None):
        self.cfg, self.tok, self.label2id = cfg, tokenizer, label2id
        self.prompts = PromptRenderer(cfg, tokenizer)
        if cfg.add_eos and cfg.task == "causal_lm" and self.prompts.chat is None:
            _check_can_stop(tokenizer, self.prompts.closing)
        self._encode = {"text": self._text_example, "instruction": self._instruction_example,
                        "chat": self._chat_example, "classification": self._classification_example,
                        "seq2seq": self._seq2seq_example}[cfg.format]

    def __call__(self, row: dict) -> Example:
        """Encode one row. Raises ``SkipRow`` when the row cannot be used."""
        return self._encode(row)

    def _closed(self, ids: list[int]) -> list[int]:
        """``ids`` + the closing specials + EOS (when ``add_eos`` and not already last)."""
        ids = [*ids, *self.prompts.closing]
        eos = self.tok.eos_token_id
        if self.cfg.add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        return ids

    def _causal(self, ids: list[int], labels: list[int]) -> Example:
        """Apply the length policy and check something is left to learn."""
        truncated = len(ids) > self.cfg.max_seq_len
        if truncated:
            if self.cfg.truncation == "drop":
                raise SkipRow("longer than max_seq_len")
            ids, labels = ids[: self.cfg.max_seq_len], labels[: self.cfg.max_seq_len]
        # Label 0 is never a target after the model's shift, so only labels[1:] count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise SkipRow("no trainable tokens (prompt fills max_seq_len)" if truncated else "no trainable tokens")
        return Example(ids, labels, truncated)

    def _text_example(self, row: dict) -> Example:
        ids = self._closed(self.prompts.prompt_ids(row)[0])
        return self._causal(ids, list(ids))

    def _instruction_example(self, row: dict) -> Example:
        if self.prompts.chat is not None:  # rendered through data.chat_template, as a one-turn chat
            return self._conversation(self.prompts.instruction_messages(row, with_response=True))
        prompt_ids = self.prompts.prompt_ids(row)[0]
        response_ids = self._closed(self.prompts.ids(text_field(row, self.cfg.response_field), special=False))
        ids = prompt_ids + response_ids
        if not self.cfg.mask_prompt:
            return self._causal(ids, list(ids))
        return self._causal(ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)

    def _chat_example(self, row: dict) -> Example:
        return self._conversation(self.prompts.messages.read(row))

    def _conversation(self, messages: list[dict]) -> Example:
        ids, assistant = self.prompts.chat.encode(messages)
        if not self.cfg.mask_prompt:
            return self._causal(ids, list(ids))
        return self._causal(ids, [t if a else IGNORE_INDEX for t, a in zip(ids, assistant)])

    def _classification_example(self, row: dict) -> Example:
        cfg = self.cfg
        text_field(row, cfg.text_field)  # a missing text is counted before a bad label
        if cfg.text_pair_field:
            text_field(row, cfg.text_pair_field)
        label = row.get(cfg.label_field)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise SkipRow(f"missing field {cfg.label_field!r}")
        if str(label) not in self.label2id:
            raise SkipRow("label not in label set")
        ids, truncated = self.prompts.prompt_ids(row)
        return Example(ids, self.label2id[str(label)], truncated)

    def _seq2seq_example(self, row: dict) -> Example:
        cfg = self.cfg
        text_field(row, cfg.source_field)  # a missing source is counted before a missing target
        target = text_field(row, cfg.target_field)
        ids, cut_source = self.prompts.prompt_ids(row)
        labels, cut_target = self.prompts.bounded(cfg.max_target_len or cfg.max_seq_len, None, text_target=target)
        return Example(ids, labels, cut_source or cut_target)


def _check_can_stop(tokenizer, closing: list[int]) -> None:
    """Refuse ``add_eos`` when nothing would end an example: no EOS token and no closing special.

    Adding a new EOS token is not done: its embedding and output rows would be new, untrained
    weights (a LoRA run trains neither), so the model would still not learn to stop.
    """
    if tokenizer.eos_token_id is None and not closing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"data.add_eos=true, but the tokenizer {name!r} has no EOS token and closes a text with "
                         "nothing, so the model could not learn to stop; use a tokenizer with an EOS token "
                         "(model.tokenizer) or set data.add_eos: false")
