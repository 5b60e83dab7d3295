"""Conversations in the shapes users bring (ShareGPT, OpenAI, a mapping), system prompts, instruction
rows through a chat template, and the refusals. Oracle: the same conversation written as OpenAI
messages and rendered by transformers' ``apply_chat_template``."""

import pytest
from _bpe import bpe_tokenizer
from _tiny import write_rows

from tunekit.data import DataConfig, build_dataset
from tunekit.data.templates import named_template

IGN = -100
OPENAI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}]
SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"}]


def _oracle(tok, messages):
    return tok.apply_chat_template(messages, chat_template=named_template("chatml"), tokenize=True,
                                   return_dict=True)["input_ids"]


def _first(tmp_path, rows, **fields):
    tok = bpe_tokenizer(bos=False)
    path = write_rows(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train_files=[path], format=fields.pop("format", "chat"), chat_template="chatml", **fields)
    return build_dataset(cfg, tok).train[0], tok


@pytest.mark.parametrize(("row", "fields"), [
    ({"messages": OPENAI}, {}),
    ({"conversations": SHAREGPT}, {}),                                           # auto-detected
    ({"conversations": SHAREGPT}, {"chat_format": "sharegpt"}),
    ({"dialog": [{"speaker": m["from"].replace("gpt", "bot"), "text": m["value"]} for m in SHAREGPT]},
     {"messages_field": "dialog", "role_key": "speaker", "content_key": "text", "roles": {"bot": "assistant"}}),
    ({"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in OPENAI]}, {}),
], ids=["openai", "sharegpt-auto", "sharegpt-named", "mapping", "openai-content-parts"])
def test_every_shape_renders_the_same_conversation(tmp_path, row, fields):
    encoded, tok = _first(tmp_path, [row], **fields)
    assert encoded["input_ids"] == _oracle(tok, OPENAI)


def test_unknown_shape_error_shows_the_keys_found_and_the_mapping(tmp_path):
    rows = [{"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "text": "Yo"}]}]
    with pytest.raises(ValueError, match=r"no 'messages' or 'conversations' list \(row keys: dialog\); set "
                                         r"data.messages_field"):
        _first(tmp_path, rows)
    with pytest.raises(ValueError, match=r"messages have keys \[speaker, text\], not role/content; set "
                                         r"data.role_key=speaker data.content_key=text"):
        _first(tmp_path, rows, messages_field="dialog")
    with pytest.raises(ValueError, match=r"unknown role 'bot'; map it with data.roles"):
        _first(tmp_path, rows, messages_field="dialog", role_key="speaker", content_key="text")


def test_default_and_per_row_system_prompts(tmp_path):
    rows = [{"messages": OPENAI[1:], "sys": "Row system."}, {"messages": OPENAI[1:]}]
    tok = bpe_tokenizer(bos=False)
    path = write_rows(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train_files=[path], format="chat", chat_template="chatml", system="Default.", system_field="sys")
    first, second = build_dataset(cfg, tok).train[:2]
    assert first["input_ids"] == _oracle(tok, [{"role": "system", "content": "Row system."}, *OPENAI[1:]])
    assert second["input_ids"] == _oracle(tok, [{"role": "system", "content": "Default."}, *OPENAI[1:]])


def test_instruction_rows_through_a_chat_template(tmp_path):
    row = {"instruction": "Add.", "input": "1 2", "output": "3"}
    encoded, tok = _first(tmp_path, [row], format="instruction", system="Math.")
    messages = [{"role": "system", "content": "Math."}, {"role": "user", "content": "Add.\n1 2"},
                {"role": "assistant", "content": "3"}]
    assert encoded["input_ids"] == _oracle(tok, messages)
    assert tok.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGN]) == \
        "3<|im_end|>"


def test_instruction_system_prompt_before_the_template_or_in_its_placeholder(tmp_path):
    tok = bpe_tokenizer(bos=False)
    path = write_rows(tmp_path / "d.jsonl", [{"instruction": "Add.", "output": "3"}])
    plain = build_dataset(DataConfig(train_files=[path], format="instruction", system="Math.",
                                     prompt_template_no_input="Q: {prompt}\nA: "), tok).train[0]
    placed = build_dataset(DataConfig(train_files=[path], format="instruction", system="Math.",
                                      prompt_template_no_input="Q: {prompt} ({system})\nA: "), tok).train[0]
    assert tok.decode(plain["input_ids"]).startswith("Math.\n\nQ: Add.\nA: 3")
    assert tok.decode(placed["input_ids"]).startswith("Q: Add. (Math.)\nA: 3")


def test_add_eos_without_any_eos_is_refused_in_one_line(tmp_path):
    tok = bpe_tokenizer(bos=False)
    tok.eos_token = None  # and a GPT-2-like post-processor that closes nothing
    path = write_rows(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match="has no EOS token and closes a text with nothing.*data.add_eos: false"):
        build_dataset(DataConfig(train_files=[path]), tok)
    assert build_dataset(DataConfig(train_files=[path], add_eos=False), tok).train[0]["input_ids"] == \
        tok("hello")["input_ids"]
