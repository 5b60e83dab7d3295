"""Chat loss masks with a real byte-level BPE tokenizer (GPT-2 / Llama 3 / Qwen style).

There the reply's first word takes the space before it (``"Ġyes"``); with a template whose
generation prompt ends in that space, the token starts in the prompt but carries the reply.
Oracles: the reply texts written out here (decoded learned tokens = reply + end-of-turn marker,
plus only the shared leading space), and transformers' ``return_assistant_tokens_mask`` on the
same template marked with ``{% generation %}`` tags.
"""

import pytest
from _bpe import bpe_tokenizer
from _tiny import write_rows

from tunekit.data import DataConfig, build_dataset

IGN = -100
CONVERSATION = [{"role": "system", "content": "be nice."}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "yes, I am fine."}, {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": "café 日本語 🙂 ok."}]

# "<role>: <content><|end|>" per turn; the generation prompt "assistant: " ends in the space.
SHARED_SPACE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
SHARED_SPACE_TAGGED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}{{ m['content'] }}<|end|>"
    "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")
# The reply starts after a newline: no token crosses the boundary.
NEWLINE = ("{% for m in messages %}{{ m['role'] }}:{{ '\\n' }}{{ m['content'] }}<|end|>{% endfor %}"
           "{% if add_generation_prompt %}assistant:{{ '\\n' }}{% endif %}")
NEWLINE_TAGGED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant:{{ '\\n' }}{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['role'] }}:{{ '\\n' }}{{ m['content'] }}<|end|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{{ '\\n' }}{% endif %}")


def _runs(ids: list[int], labels: list[int], learned: bool) -> list[list[int]]:
    """Maximal runs of consecutive positions whose label is (or is not) learned."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if (label != IGN) == learned:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def _row(tmp_path, template: str, *, bos: bool = True) -> tuple[dict, object]:
    tok = bpe_tokenizer(bos=bos, chat_template=template)
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    return build_dataset(DataConfig(train_files=[path], format="chat"), tok).train[0], tok


@pytest.mark.parametrize(("template", "lead"), [(SHARED_SPACE, " "), (NEWLINE, "")], ids=["shared-space", "newline"])
def test_learned_tokens_are_exactly_the_replies_and_end_markers(tmp_path, template, lead):
    row, tok = _row(tmp_path, template)
    learned = [tok.decode(run) for run in _runs(row["input_ids"], row["labels"], learned=True)]
    assert learned == [lead + "yes, I am fine.<|end|>", lead + "café 日本語 🙂 ok.<|end|>"]
    # nothing of the prompt is learned but the space the reply's first token shares
    prompts = [tok.decode(run) for run in _runs(row["input_ids"], row["labels"], learned=False)]
    sep = ": " if lead else ":\n"
    end = ":" if lead else ":\n"
    assert prompts == [f"system{sep}be nice.<|end|>user{sep}hi there<|end|>assistant{end}",
                       f"user{sep}and then?<|end|>assistant{end}"]


@pytest.mark.parametrize(("template", "tagged"), [(SHARED_SPACE, SHARED_SPACE_TAGGED), (NEWLINE, NEWLINE_TAGGED)],
                         ids=["shared-space", "newline"])
@pytest.mark.parametrize("bos", [True, False], ids=["llama3-like", "gpt2-like"])
def test_mask_equals_transformers_generation_tag_mask(tmp_path, template, tagged, bos):
    row, _ = _row(tmp_path, template, bos=bos)
    oracle = bpe_tokenizer(bos=bos).apply_chat_template(CONVERSATION, chat_template=tagged, tokenize=True,
                                                        return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(oracle["input_ids"])
    assert [label != IGN for label in row["labels"]] == [bool(m) for m in oracle["assistant_masks"]]
    # the tagged template through tunekit's own tagged path gives the same example
    tagged_row, _ = _row(tmp_path, tagged, bos=bos)
    assert tagged_row == row
