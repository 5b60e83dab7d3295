"""The prompt side of every format, shared by training and inference.

A training example is its prompt followed by what the model learns; ``tunekit
generate`` / ``predict()`` feed a model the prompt alone. Both build it here, so
inference sees exactly the ids training saw before the learned part:

==============  ==============================================  ==========================================
format          prompt ids                                      training example
==============  ==============================================  ==========================================
text            ``tok(text)`` without its closing specials      prompt + closing specials + EOS
instruction     ``tok(filled template)``, same                  prompt + ``tok(response)`` + closing + EOS
chat            ``render(turns before the first reply,          the whole conversation, tokenized once
                add_generation_prompt)``, no special tokens     (``tunekit.data.chat``)
classification  ``tok(text[, pair])``                           the prompt (the label is separate)
seq2seq         ``tok(source)``                                 the prompt (encoder input)
==============  ==============================================  ==========================================

*Closing specials* are what a tokenizer's post-processor appends after a single
text (BERT's ``[SEP]``, T5's ``</s>``): they end a sequence, so they close the
example, after the response, not the prompt. The leading ones (Llama's BOS,
BERT's ``[CLS]``) stay at the front. GPT-2-like tokenizers add neither.

Instruction templates are filled in one pass (``fill_template``): braces other
than the placeholders stay as written (JSON in a template), and text put in is
never scanned again (an instruction that mentions ``{input}`` keeps it).
"""

from __future__ import annotations

import re

from tunekit.data.chat import ChatEncoder, SkipRow
from tunekit.data.config import DataConfig
from tunekit.data.messages import INLINE_MESSAGES, MessageReader

__all__ = ["PromptRenderer", "fill_template"]

_INLINE_SYSTEM = "_tunekit_system"  # row key of a system prompt given at inference


def fill_template(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]``, in one pass.

    Example:
        >>> fill_template('{"q": "{prompt}"} {input}', prompt="say {input}", input="hi")
        '{"q": "say {input}"} hi'
    """
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return pattern.sub(lambda match: values[match.group(0)[1:-1]], template)


def text_field(row: dict, field: str, *, required: bool = True) -> str | None:
    """The text of ``row[field]``; ``SkipRow`` when it is missing, not text, or blank (unless optional)."""
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


def _closing_specials(tokenizer) -> list[int]:
    """The ids the tokenizer appends after a single text (``[SEP]``, ``</s>``; none for Llama / GPT-2)."""
    probe = "a"
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[start + len(plain):]
    return []


class PromptRenderer:
    """Prompt token ids of a row, for one data config and tokenizer.

    Args:
        cfg: the ``data:`` config the model was (or is being) trained with.
        tokenizer: its Hugging Face tokenizer.
        inference: cut over-long classification / seq2seq inputs even under
            ``truncation: drop`` (a prediction cannot be skipped).
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, inference: bool = False):
        self.cfg, self.tok, self.inference = cfg, tokenizer, inference
        # An instruction run with a chat template renders its rows as one-turn chats.
        templated = cfg.format == "chat" or (cfg.format == "instruction" and cfg.chat_template is not None)
        self.chat = ChatEncoder(cfg, tokenizer) if templated else None
        self.messages = MessageReader(cfg)
        self.closing = _closing_specials(tokenizer)

    def ids(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of one text (with the tokenizer's special tokens unless ``special=False``)."""
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _open(self, text: str) -> list[int]:
        """``ids(text)`` without the closing specials: a prompt that something follows."""
        ids, n = self.ids(text), len(self.closing)
        return ids[:-n] if n and ids[-n:] == self.closing else ids

    def _system(self, row: dict) -> str | None:
        """The row's system prompt (``system_field``), else the config's."""
        if _INLINE_SYSTEM in row:  # given at inference (generate --system)
            return row[_INLINE_SYSTEM] or None
        field = self.cfg.system_field
        own = text_field(row, field, required=False) if field else None
        return own or self.cfg.system

    def instruction_text(self, row: dict) -> str:
        """The filled prompt template of an instruction row (after its system prompt, if any)."""
        cfg = self.cfg
        prompt = text_field(row, cfg.prompt_field)
        extra = text_field(row, cfg.input_field, required=False) if cfg.input_field else None
        template = cfg.prompt_template_no_input if extra is None else cfg.prompt_template
        values = {"prompt": prompt} if extra is None else {"prompt": prompt, "input": extra}
        system = self._system(row)
        if "{system}" in template:
            return fill_template(template, **values, system=system or "")
        text = fill_template(template, **values)
        return f"{system}\n\n{text}" if system else text

    def instruction_messages(self, row: dict, *, with_response: bool = False) -> list[dict]:
        """An instruction row as a chat: [system], user (instruction, newline, input), [the response]."""
        cfg = self.cfg
        prompt = text_field(row, cfg.prompt_field)
        extra = text_field(row, cfg.input_field, required=False) if cfg.input_field else None
        system = self._system(row)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt if extra is None else f"{prompt}\n{extra}"})
        if with_response:
            messages.append({"role": "assistant", "content": text_field(row, cfg.response_field)})
        return messages

    def bounded(self, max_len: int, *texts: str | None, **kw) -> tuple[list[int], bool]:
        """Ids with special tokens, cut to ``max_len`` by the tokenizer's own truncation (so closing
        specials survive the cut); ``SkipRow`` instead under ``truncation: drop`` when training."""
        texts = [t for t in texts if t is not None]
        ids = list(self.tok(*texts, **kw)["input_ids"])
        if len(ids) <= max_len:
            return ids, False
        if self.cfg.truncation == "drop" and not self.inference:
            raise SkipRow("longer than max_seq_len")
        return list(self.tok(*texts, truncation=True, max_length=max_len, **kw)["input_ids"]), True

    def prompt_ids(self, row: dict) -> tuple[list[int], bool]:
        """``(ids, truncated)``: the prompt of ``row`` as the model is given it.

        Raises:
            SkipRow: a field is missing or empty, or the input is too long under ``truncation: drop``.
        """
        cfg = self.cfg
        if cfg.format == "text":
            return self._open(text_field(row, cfg.text_field)), False
        if cfg.format == "instruction" and self.chat is not None:
            return self.chat.prompt_ids(self.instruction_messages(row)), False
        if cfg.format == "instruction":
            return self._open(self.instruction_text(row)), False
        if cfg.format == "chat":
            return self.chat.prompt_ids(self.messages.read(row, prompt=True)), False
        if cfg.format == "classification":
            pair = text_field(row, cfg.text_pair_field) if cfg.text_pair_field else None
            return self.bounded(cfg.max_seq_len, text_field(row, cfg.text_field), pair)
        return self.bounded(cfg.max_seq_len, text_field(row, cfg.source_field))

    def row_for(self, prompt: str | dict, second: str | None = None, system: str | None = None) -> dict:
        """A row of this format holding a user's prompt text (a dict is already a row).

        ``second`` is an instruction's input (without one the no-input template applies) or a
        classification pair's second text; ``chat`` prompts are one user message. ``system``
        replaces the run's system prompt (chat and instruction formats).

        Raises:
            ValueError: ``second`` for a format that has no second text, ``system`` for one without.
        """
        if isinstance(prompt, dict):
            return prompt
        cfg = self.cfg
        if system is not None and cfg.format not in ("chat", "instruction"):
            raise ValueError(f"a system prompt fits a chat or instruction run, not data.format {cfg.format!r}")
        if cfg.format == "chat":
            head = [{"role": "system", "content": system}] if system else []
            row = {INLINE_MESSAGES: [*head, {"role": "user", "content": prompt}]}
        else:
            row = {{"text": cfg.text_field, "instruction": cfg.prompt_field, "classification": cfg.text_field,
                    "seq2seq": cfg.source_field}[cfg.format]: prompt}
        if second is not None:
            field = {"instruction": cfg.input_field, "classification": cfg.text_pair_field}.get(cfg.format)
            if field is None:
                raise ValueError(f"a second text (an input) fits an instruction run or a classification run on "
                                 f"text pairs, not data.format {cfg.format!r}")
            row[field] = second
        if system is not None and cfg.format == "instruction":
            row = {**row, _INLINE_SYSTEM: system}
        return row

    def end_ids(self) -> list[int]:
        """Ids training puts after a response (closing specials, EOS when ``add_eos``): where to stop."""
        if self.cfg.format not in ("text", "instruction"):
            return []
        eos = self.tok.eos_token_id
        return [*self.closing, *([eos] if self.cfg.add_eos and eos is not None else [])]
