"""Chat messages -> token ids with loss only on assistant turns.

Two ways to find which tokens the assistant wrote:

1. The template marks them with ``{% generation %} ... {% endgeneration %}``:
   transformers' ``apply_chat_template(return_assistant_tokens_mask=True)`` returns
   the mask directly.
2. Otherwise, render incrementally. For assistant message ``i``::

       before = render(messages[:i], add_generation_prompt=True)   # ... <|assistant|>
       after  = render(messages[:i + 1])                           # ... <|assistant|>reply<|end|>
       span   = [len(before), len(after))   in the full rendering

   The span holds the reply and the end-of-turn marker (so the model learns to
   stop). The full text is tokenized once, and a token is an assistant token when
   its characters overlap a span (character offsets from the fast tokenizer). With
   byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) the reply's first word often
   shares a token with the space before it (``"Ġyes"`` for ``": " + "yes"``); that
   token starts in the prompt but carries the reply, so it is learned, as
   transformers' ``return_assistant_tokens_mask`` marks it for tagged templates.
   The ids are those the model sees at inference (``prompt_ids``: the rendering up
   to the generation prompt, tokenized the same way). Templates that render
   earlier turns differently once later turns exist (``before`` is not a prefix of
   the full text) cannot be split this way; such rows are counted as bad, and the
   fix is to add generation tags to the template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunekit.data.config import DataConfig

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
NOT_PREFIX_STABLE = "chat template not prefix-stable (add {% generation %} tags)"


class SkipRow(Exception):
    """Raised by an encoder for a row it cannot use; ``args[0]`` is the reason it is counted under."""


def resolve_template(cfg: DataConfig, tokenizer) -> str:
    """The chat template to use: ``cfg.chat_template`` (text or a ``.jinja`` path), else the tokenizer's.

    Raises:
        ValueError: neither the config nor the tokenizer has one.
    """
    template = cfg.chat_template
    if template is not None and template.endswith(".jinja"):
        path = Path(template).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.chat_template: file not found: {template!r}")
        template = path.read_text(encoding="utf-8")
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("data.format 'chat' needs a chat template: the tokenizer has none; "
                         "set data.chat_template (Jinja text or a .jinja file)")
    return template


def parse_messages(value, mask_prompt: bool) -> list[dict]:
    """Validate a row's messages (a list, or a JSON string of one, as in CSV files)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SkipRow("messages not a list of {role, content}") from None
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)
    if not ok:
        raise SkipRow("messages not a list of {role, content}")
    if mask_prompt and not any(m["role"] == "assistant" for m in value):
        raise SkipRow("no assistant turn")
    return value


class ChatEncoder:
    """Renders messages with a chat template; returns ids and a 0/1 assistant mask."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.tokenizer = tokenizer
        self.template = resolve_template(cfg, tokenizer)
        self.tagged = bool(_GENERATION_TAG.search(self.template))
        if not self.tagged and not getattr(tokenizer, "is_fast", False):
            raise ValueError("data.format 'chat': a template without {% generation %} tags needs a fast "
                             "tokenizer (character offsets); add the tags to data.chat_template")

    def _render(self, messages: list[dict], **kw):
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kw)
        except TemplateError as err:
            raise SkipRow(f"chat template error: {err}") from None

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and, per token, 1 if the assistant wrote it.

        Raises:
            SkipRow: the template rejects the messages, or cannot be split into turns.
        """
        if self.tagged:
            out = self._render(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return list(out["input_ids"]), list(out["assistant_masks"])
        full = self._render(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            after = self._render(messages[: i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
                raise SkipRow(NOT_PREFIX_STABLE)
            spans.append((len(before), len(after)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(_overlaps(start, end, spans)) for start, end in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the turns before the first assistant reply plus the generation prompt: what the
        model is given at inference (tokenized as ``encode`` tokenizes, without added special tokens).

        Raises:
            SkipRow: the template rejects the messages.
        """
        first_reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        text = self._render(messages[:first_reply], tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the token at characters ``[start, end)`` overlaps one of the ``[a, b)`` spans."""
    if start == end:  # a zero-width token (a special token, or whitespace a tokenizer trimmed away)
        return any(a <= start < b for a, b in spans)
    return any(start < b and end > a for a, b in spans)
