"""Text generation as ``tunekit generate`` / ``tunekit chat`` run it: options, stops, streaming.

A reply ends at the model's EOS, the ids training closed responses with
(``Loaded.stop_ids``), the chat template's end-of-turn text (``<|im_end|>``,
``<|eot_id|>``: an id when the tokenizer has it as one token, else a stop
string), or a user's ``--stop`` string. Stop strings are checked on the
decoded reply after every token (transformers' own ``stop_strings`` needs a
tokenizer whose vocabulary it can map back to text, which not every one
allows) and cut from the text; the streamer holds back the characters that
could still become a stop string, so what is printed while generating is
exactly what is returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

import torch

__all__ = ["GenerationOptions", "generate_text"]


@dataclass
class GenerationOptions:
    """Decoding settings (transformers' ``generate`` arguments)."""

    max_new_tokens: int = 64
    temperature: float | None = None
    """> 0 samples at this temperature; None or 0 decodes greedily (unless ``sample``)."""
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    """Strings that end a reply (cut from the text)."""
    sample: bool = False
    """Sample (at temperature 1 unless ``temperature``) instead of greedy decoding."""

    def __post_init__(self):
        checks = [(self.max_new_tokens is not None and self.max_new_tokens < 1, "--max-new-tokens must be >= 1"),
                  (self.temperature is not None and self.temperature < 0, "--temperature must be >= 0"),
                  (self.top_p is not None and not 0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
                  (self.top_k is not None and self.top_k < 1, "--top-k must be >= 1"),
                  (self.repetition_penalty is not None and self.repetition_penalty <= 0,
                   "--repetition-penalty must be > 0")]
        for failed, message in checks:
            if failed:
                raise ValueError(message)

    @property
    def do_sample(self) -> bool:
        """Sampling is on with ``sample``, a temperature > 0, or top-p / top-k (which only act when sampling)."""
        return self.sample or bool(self.temperature) or self.top_p is not None or self.top_k is not None

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kw.update({k: v for k, v in (("temperature", self.temperature or None), ("top_p", self.top_p),
                                         ("top_k", self.top_k)) if v is not None})
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])),
               default=0)


class _StopStreamer:
    """Writes a reply to ``out`` as it is generated, never past a stop string (a transformers streamer)."""

    def __init__(self, tokenizer, stops: list[str], out: IO[str]):
        self.tok, self.stops, self.out = tokenizer, stops, out
        self.ids: list[int] = []
        self.shown, self.stopped, self.skipped_prompt = 0, False, False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate() sends the prompt (a seq2seq model: the decoder start) first
            self.skipped_prompt = True
            return
        self.ids += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut, self.stopped = _cut(text, self.stops)
        ready = len(cut) if (final or self.stopped) else len(cut) - _held_back(cut, self.stops)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character
            ready = min(ready, len(text) - 1)
        if ready > self.shown:
            self.out.write(cut[self.shown: ready])
            self.out.flush()
            self.shown = ready


class _StopOnText:
    """A transformers stopping criterion: the reply (``ids[start:]``, decoded) holds a stop string."""

    def __init__(self, tokenizer, start: int, stops: list[str]):
        self.tok, self.start, self.stops = tokenizer, start, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [_cut(self.tok.decode(row[self.start:], skip_special_tokens=True), self.stops)[1] for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_ids_and_strings(loaded, options: GenerationOptions) -> tuple[list[int] | None, list[str]]:
    """(ids that end generation, strings that end it): the run's and the user's."""
    ids, strings = set(loaded.stop_ids() or []), list(options.stop)
    marker = loaded.end_of_turn()
    if marker:
        token = loaded.tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != loaded.tokenizer.unk_token_id and \
                loaded.tokenizer.convert_ids_to_tokens(token) == marker:
            ids.add(token)
        else:
            strings.append(marker)
    return (sorted(ids) or None), strings


@torch.no_grad()
def generate_text(loaded, ids: list[int], options: GenerationOptions | None = None, *,
                  stream: IO[str] | None = None) -> str:
    """The reply of a causal or seq2seq model to prompt ``ids`` (cut at stops); streamed to ``stream``."""
    options = options or GenerationOptions()
    model, tokenizer = loaded.model, loaded.tokenizer
    eos, stops = _stop_ids_and_strings(loaded, options)
    prompt = torch.tensor([ids], device=model.device)
    kw = options.generate_kwargs()
    if stops:
        from transformers import StoppingCriteriaList

        start = 0 if loaded.task == "seq2seq" else len(ids)  # a seq2seq model's ids are the decoder's
        kw["stopping_criteria"] = StoppingCriteriaList([_StopOnText(tokenizer, start, stops)])
    streamer = _StopStreamer(tokenizer, stops, stream) if stream is not None else None
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kw)
    new = generated[0] if loaded.task == "seq2seq" else generated[0, len(ids):]
    return _cut(tokenizer.decode(new, skip_special_tokens=True), stops)[0]
