"""Inference builds exactly the prompt ids training built, for every format.

For each format and three tokenizer kinds (Llama-like: adds BOS; GPT-2-like: adds
nothing; BERT/T5-like: BOS and a closing EOS after each text), a row goes through
``build_dataset`` (training) and the same prompt through ``Loaded.prompt_ids`` (what
``predict`` / ``tunekit generate`` feed the model). Oracles: the prompt text written
out here, tokenized by the tokenizer itself with its special tokens spelled out.
Templates hold literal braces (JSON) and instructions mention ``{input}`` / ``{prompt}``.
"""

from __future__ import annotations

import pytest
from _bpe import bpe_tokenizer
from _tiny import write_rows

from tunekit.data import DataConfig, build_dataset
from tunekit.data.prompts import fill_template
from tunekit.inference import Loaded

BOS, EOS, IGN = 1, 2, -100
KINDS = {"llama-like": {"bos": True}, "gpt2-like": {"bos": False}, "closing-eos": {"bos": True, "close": True}}
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ '\\n' }}{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{{ '\\n' }}{% endif %}")
INSTRUCTION = {"prompt_template": 'Q: {prompt} {"k": [1, 2]}\nIn: {input}\nA:',
               "prompt_template_no_input": "Q: {prompt} {}\nA:"}

# format -> (config fields, training row, the prompt a user passes to predict, the prompt text, opens?)
# "opens": the prompt is followed by the response, so a closing EOS is not part of it.
CASES = {
    "text": ({}, {"text": "the quick fox"}, "the quick fox", "the quick fox", True),
    "instruction-input": (
        {"format": "instruction", **INSTRUCTION},
        {"instruction": "say {input} twice", "input": "red {prompt}", "output": "red red"},
        {"instruction": "say {input} twice", "input": "red {prompt}"},
        'Q: say {input} twice {"k": [1, 2]}\nIn: red {prompt}\nA:', True),
    "instruction-no-input": (
        {"format": "instruction", **INSTRUCTION}, {"instruction": "use {prompt} here", "output": "ok"},
        "use {prompt} here", "Q: use {prompt} here {}\nA:", True),
    "chat": ({"format": "chat"},
             {"messages": [{"role": "user", "content": "hi {there}"}, {"role": "assistant", "content": "yes"}]},
             "hi {there}", "<|bos|>user:\nhi {there}<|end|>assistant:\n", None),
    "classification": ({"format": "classification", "label_field": "label", "labels": ["a", "b"]},
                       {"text": "the cat sat", "label": "b"}, "the cat sat", "the cat sat", False),
    "seq2seq": ({"format": "seq2seq"}, {"source": "the dog", "target": "a dog"}, "the dog", "the dog", False),
}


def _expected(tok, kind: dict, text: str, opens: bool | None) -> list[int]:
    """The prompt's ids from the tokenizer, special tokens added by hand (None: a chat rendering,
    whose special tokens are in the text)."""
    plain = list(tok(text, add_special_tokens=False)["input_ids"])
    if opens is None:
        return plain
    closing = [EOS] if kind.get("close") and not opens else []
    return [BOS] * kind["bos"] + plain + closing


def _train_and_infer(tmp_path, case: str, kind_name: str):
    fields, row, prompt, text, opens = CASES[case]
    kind = KINDS[kind_name]
    tok = bpe_tokenizer(**kind)
    if case == "chat":  # the template as a .jinja file, as data.chat_template allows
        (tmp_path / "chat.jinja").write_text(CHAT, encoding="utf-8")
        fields = {**fields, "chat_template": str(tmp_path / "chat.jinja")}
    cfg = DataConfig(train_files=[write_rows(tmp_path / "d.jsonl", [row])], **fields)
    example = build_dataset(cfg, tok).train[0]
    inferred = Loaded(None, tok, cfg.task, cfg.model_dump(mode="json")).prompt_ids(prompt)
    return example, inferred, _expected(tok, kind, text, opens), tok


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(CASES))
def test_inference_prompt_ids_equal_the_training_prompt(tmp_path, case, kind):
    example, inferred, expected, tok = _train_and_infer(tmp_path, case, kind)
    assert inferred == expected
    ids, labels = example["input_ids"], example["labels"]
    if case == "text":
        assert ids == expected + [EOS]
    elif case.startswith("instruction"):
        n = labels.count(IGN)
        assert ids[:n] == expected and labels[:n] == [IGN] * n
        response = tok(CASES[case][1]["output"], add_special_tokens=False)["input_ids"]
        assert ids[n:] == labels[n:] == [*response, EOS]
    elif case == "chat":
        first_learned = next(i for i, label in enumerate(labels) if label != IGN)
        assert ids[:first_learned] == expected
        assert expected.count(BOS) == 1
    else:
        assert ids == expected


def test_fill_template_leaves_other_braces_and_inserted_text_alone():
    template = '{"instruction": "{prompt}", "context": "{input}", "empty": {}}'
    assert fill_template(template, prompt="say {input}", input="{prompt} and {x}") == \
        '{"instruction": "say {input}", "context": "{prompt} and {x}", "empty": {}}'


def test_a_second_text_is_the_instruction_input_or_the_pair(tmp_path):
    tok = bpe_tokenizer()
    _, row, _, text, _ = CASES["instruction-input"]
    cfg = DataConfig(train_files=["unused.jsonl"], format="instruction", **INSTRUCTION)
    loaded = Loaded(None, tok, cfg.task, cfg.model_dump(mode="json"))
    assert loaded.prompt_ids(row["instruction"], row["input"]) == _expected(tok, KINDS["llama-like"], text, True)

    rows = [{"premise": "the cat sat", "hypothesis": "a cat", "label": "yes"}]
    cfg = DataConfig(train_files=[write_rows(tmp_path / "p.jsonl", rows)], format="classification",
                     text_field="premise", text_pair_field="hypothesis", label_field="label")
    trained = build_dataset(cfg, tok).train[0]["input_ids"]
    inferred = Loaded(None, tok, cfg.task, cfg.model_dump(mode="json")).prompt_ids("the cat sat", "a cat")
    assert inferred == trained == tok("the cat sat", "a cat")["input_ids"]

    cfg = DataConfig(train_files=["unused.jsonl"])
    with pytest.raises(ValueError, match="not data.format 'text'"):
        Loaded(None, tok, cfg.task, cfg.model_dump(mode="json")).prompt_ids("the", "fox")
