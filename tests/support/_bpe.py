"""A real byte-level BPE tokenizer, trained in the test process with `tokenizers` (no Hub).

GPT-2 / Llama 3 / Qwen style: a ByteLevel pre-tokenizer (GPT-2's split regex, so a
word takes the space before it: ``"Ġyes"``), offsets not trimmed (Llama 3's and
GPT-2's ``trim_offsets=False``), merges learned from a small corpus. ``bos=True``
prepends ``<|bos|>`` as Llama 3 does; ``bos=False`` adds nothing, as GPT-2;
``close=True`` also appends ``<|eos|>`` after a text, as BERT's ``[SEP]`` or T5's ``</s>``.
"""

from __future__ import annotations

from functools import lru_cache

BPE_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"]
_CORPUS = [
    "user: hi there, how are you today?", "assistant: yes, I am fine. thank you!",
    "system: be nice and answer in one word.", "user: and then? tell me more about it.",
    "assistant: ok. the cat sat on the mat with the dog.", "Question: what is the capital of France?",
    "Answer: Paris is the capital of France.", "Instruction: repeat the word twice. Input: red",
    "café au lait, 日本語 and emoji 🙂 are all text too.", "the quick brown fox jumps over the lazy dog",
]


@lru_cache(maxsize=1)
def _trained_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_CORPUS * 4, trainer)
    return core.to_str()


def bpe_tokenizer(*, bos: bool = True, close: bool = False, chat_template: str | None = None):
    """A fresh byte-level BPE ``PreTrainedTokenizerFast`` (pad 0, bos 1, eos 2, ``<|end|>`` 3)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(_trained_json())
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos or close:
        head, tail = ("<|bos|> " if bos else ""), (" <|eos|>" if close else "")
        steps.append(processors.TemplateProcessing(
            single=f"{head}$A{tail}", pair=f"{head}$A{tail} $B{tail}",
            special_tokens=[("<|bos|>", 1), ("<|eos|>", 2)]))
    core.post_processor = processors.Sequence(steps)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>",
                                  eos_token="<|eos|>", additional_special_tokens=["<|end|>"])
    tok.chat_template = chat_template
    return tok
