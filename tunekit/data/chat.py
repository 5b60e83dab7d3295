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
   fix is to add generation tags to the template (tunekit's named templates,
   ``tunekit.data.templates``, have them).

``train_turns: last`` keeps the loss on the last reply only (LLaMA-Factory's
``mask_history``): the last run of assistant tokens, since a user turn (masked)
separates each reply from the one before.
"""

from __future__ import annotations

import re

from tunekit.data.config import DataConfig

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
NOT_PREFIX_STABLE = "chat template not prefix-stable (add {% generation %} tags)"


class SkipRow(Exception):
    """Raised by an encoder for a row it cannot use; ``args[0]`` is the reason it is counted under."""


class ChatEncoder:
    """Renders messages with a chat template; returns ids and a 0/1 assistant mask."""

    def __init__(self, cfg: DataConfig, tokenizer):
        from tunekit.data.templates import resolve_chat_template

        self.tokenizer, self.last_turn_only = tokenizer, cfg.train_turns == "last"
        self.template = resolve_chat_template(cfg.chat_template, tokenizer)
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
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        else:
            ids, mask = self._span_mask(messages)
        return ids, (_last_run(mask) if self.last_turn_only else mask)

    def _span_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Ids and assistant mask of an untagged template, from incremental renderings (module doc)."""
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
        return self.generation_ids(messages[:first_reply])

    def generation_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the whole conversation so far plus the generation prompt (a chat's next reply).

        Raises:
            SkipRow: the template rejects the messages.
        """
        text = self._render(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def end_of_turn(self) -> str | None:
        """The text the template closes a reply with (``<|im_end|>``, ``<|eot_id|>``, ``</s>``): where a
        generated reply ends. Found by rendering a marker reply; None when the template adds nothing."""
        marker = "\x00tunekit-reply\x00"
        text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                            tokenize=False)
        tail = text[text.index(marker) + len(marker):].strip() if marker in text else ""
        return tail.split()[0] if tail else None


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the token at characters ``[start, end)`` overlaps one of the ``[a, b)`` spans."""
    if start == end:  # a zero-width token (a special token, or whitespace a tokenizer trimmed away)
        return any(a <= start < b for a, b in spans)
    return any(start < b and end > a for a, b in spans)


def _last_run(mask: list[int]) -> list[int]:
    """``mask`` with only its last run of ones kept (the last assistant reply)."""
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [int(start <= i < end) for i in range(len(mask))]
