"""One raw row -> one tokenized example, per ``DataConfig.format``.

Causal-LM formats (text, instruction, chat) give ``input_ids`` and ``labels`` of the
same length; ``labels`` is ``input_ids`` with the prompt set to -100 (the model
shifts labels itself, so label ``t`` is predicted from tokens ``< t``).
Classification gives ``input_ids`` and one label id; seq2seq gives ``input_ids``
(encoder) and ``labels`` (decoder target ids).

The prompt and the response of an instruction row are tokenized separately and
concatenated, so the prompt's ids are exactly the ids the model sees when it is
given that prompt at inference, and the masking boundary is exact.

An encoder raises ``SkipRow(reason)`` for a row it cannot use; the builder counts
the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunekit.adapters.hf.tasks import IGNORE_INDEX
from tunekit.data.chat import ChatEncoder, SkipRow, parse_messages
from tunekit.data.config import DataConfig



@dataclass
class Example:
    """A tokenized example: ``labels`` is a list (causal LM, seq2seq) or one id (classification)."""

    input_ids: list[int]
    labels: list[int] | int
    truncated: bool = False


def _text(row: dict, field: str, *, required: bool = True) -> str | None:
    value = row.get(field)
    if value is None:
        if required:
            raise SkipRow(f"missing field {field!r}")
        return None
    if not isinstance(value, str):
        raise SkipRow(f"field {field!r} not text")
    if not value.strip():
        if required:
            raise SkipRow(f"empty field {field!r}")
        return None
    return value


class Encoder:
    """Turns raw rows into ``Example``s for one config and tokenizer.

    Args:
        cfg: the data config.
        tokenizer: a Hugging Face tokenizer.
        label2id: label string -> id (classification only).
    """

    def __init__(self, cfg: DataConfig, tokenizer, label2id: dict[str, int] | None = None):
        self.cfg, self.tok, self.label2id = cfg, tokenizer, label2id
        self.chat = ChatEncoder(cfg, tokenizer) if cfg.format == "chat" else None
        self._encode = {"text": self._text_example, "instruction": self._instruction_example,
                        "chat": self._chat_example, "classification": self._classification_example,
                        "seq2seq": self._seq2seq_example}[cfg.format]

    def __call__(self, row: dict) -> Example:
        """Encode one row. Raises ``SkipRow`` when the row cannot be used."""
        return self._encode(row)

    def _ids(self, text: str, *, special: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _with_eos(self, ids: list[int]) -> list[int]:
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
        ids = self._with_eos(self._ids(_text(row, self.cfg.text_field)))
        return self._causal(ids, list(ids))

    def prompt_text(self, row: dict) -> str:
        """The filled prompt template of an instruction row."""
        cfg = self.cfg
        prompt = _text(row, cfg.prompt_field)
        extra = _text(row, cfg.input_field, required=False) if cfg.input_field else None
        if extra is None:
            return cfg.prompt_template_no_input.replace("{prompt}", prompt)
        return cfg.prompt_template.replace("{prompt}", prompt).replace("{input}", extra)

    def _instruction_example(self, row: dict) -> Example:
        prompt_ids = self._ids(self.prompt_text(row))
        response_ids = self._with_eos(self._ids(_text(row, self.cfg.response_field), special=False))
        ids = prompt_ids + response_ids
        if not self.cfg.mask_prompt:
            return self._causal(ids, list(ids))
        return self._causal(ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)

    def _chat_example(self, row: dict) -> Example:
        if self.cfg.messages_field not in row:
            raise SkipRow(f"missing field {self.cfg.messages_field!r}")
        messages = parse_messages(row[self.cfg.messages_field], self.cfg.mask_prompt)
        ids, assistant = self.chat.encode(messages)
        if not self.cfg.mask_prompt:
            return self._causal(ids, list(ids))
        return self._causal(ids, [t if a else IGNORE_INDEX for t, a in zip(ids, assistant)])

    def _bounded(self, max_len: int, *texts: str | None, **kw) -> tuple[list[int], bool]:
        """Tokenize with special tokens, re-tokenizing with the tokenizer's truncation when too long
        (so special tokens such as a final EOS/SEP survive the cut)."""
        texts = [t for t in texts if t is not None]
        ids = list(self.tok(*texts, **kw)["input_ids"])
        if len(ids) <= max_len:
            return ids, False
        if self.cfg.truncation == "drop":
            raise SkipRow("longer than max_seq_len")
        return list(self.tok(*texts, truncation=True, max_length=max_len, **kw)["input_ids"]), True

    def _classification_example(self, row: dict) -> Example:
        cfg = self.cfg
        text = _text(row, cfg.text_field)
        pair = _text(row, cfg.text_pair_field) if cfg.text_pair_field else None
        label = row.get(cfg.label_field)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise SkipRow(f"missing field {cfg.label_field!r}")
        if str(label) not in self.label2id:
            raise SkipRow("label not in label set")
        ids, truncated = self._bounded(cfg.max_seq_len, text, pair)
        return Example(ids, self.label2id[str(label)], truncated)

    def _seq2seq_example(self, row: dict) -> Example:
        cfg = self.cfg
        source, target = _text(row, cfg.source_field), _text(row, cfg.target_field)
        ids, cut_source = self._bounded(cfg.max_seq_len, source)
        labels, cut_target = self._bounded(cfg.max_target_len or cfg.max_seq_len, None, text_target=target)
        return Example(ids, labels, cut_source or cut_target)
