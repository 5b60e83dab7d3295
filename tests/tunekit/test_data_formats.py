"""Every format, from every file type, tokenized and masked token by token.

Expected ids are written by hand from the character-level tiny tokenizer
(one id per character, ``[bos]`` = 1, ``[eos]`` = 2), not by the code under test.
"""

import json

import pytest
import torch
from _tiny import (
    TINY_CHARS,
    TINY_CHAT_TEMPLATE,
    TINY_CHAT_TEMPLATE_TAGGED,
    TINY_SPECIALS,
    tiny_t5,
    tiny_tokenizer,
    write_rows,
)

from tunekit.data import DataConfig, build_dataset, label_names_for

BOS, EOS, IGN = 1, 2, -100
_VOCAB = {tok: i for i, tok in enumerate([*TINY_SPECIALS, *TINY_CHARS])}


def ids(text: str) -> list[int]:
    """Hand tokenization: special markers whole, every other character on its own."""
    out, i = [], 0
    while i < len(text):
        special = next((s for s in TINY_SPECIALS if text.startswith(s, i)), None)
        out.append(_VOCAB[special or text[i]])
        i += len(special or text[i])
    return out


@pytest.mark.parametrize("ext", ["json", "jsonl", "csv", "parquet", "txt"])
def test_text_format_reads_each_file_type(tmp_path, ext):
    path = write_rows(tmp_path / f"train.{ext}", [{"text": "ab c"}, {"text": "Hi!"}])
    bundle = build_dataset(DataConfig(train_files=[path]), tiny_tokenizer())
    assert [r["input_ids"] for r in bundle.train] == [[BOS, *ids("ab c"), EOS], [BOS, *ids("Hi!"), EOS]]
    assert all(r["labels"] == r["input_ids"] for r in bundle.train)
    assert bundle.task == "causal_lm" and bundle.eval is None


def test_file_format_overrides_extension(tmp_path):
    path = tmp_path / "data.log"
    path.write_text('{"text": "ab"}\n', encoding="utf-8")
    bundle = build_dataset(DataConfig(train_files=[str(path)], file_format="jsonl"), tiny_tokenizer())
    assert bundle.train[0]["input_ids"] == [BOS, *ids("ab"), EOS]


def _instruction_cfg(path, **kw) -> DataConfig:
    return DataConfig(train_files=[path], format="instruction", prompt_template="Q:{prompt}#{input}\nA:",
                      prompt_template_no_input="Q:{prompt}\nA:", **kw)


def test_instruction_prompt_masked_token_by_token(tmp_path):
    rows = [{"instruction": "add", "input": "1 2", "output": "3"}, {"instruction": "hi", "output": "yo"},
            {"instruction": "hi", "input": "", "output": "yo"}]
    bundle = build_dataset(_instruction_cfg(write_rows(tmp_path / "a.jsonl", rows)), tiny_tokenizer())
    with_input = [BOS, *ids("Q:add#1 2\nA:")]
    no_input = [BOS, *ids("Q:hi\nA:")]
    assert bundle.train[0]["input_ids"] == with_input + ids("3") + [EOS]
    assert bundle.train[0]["labels"] == [IGN] * len(with_input) + ids("3") + [EOS]
    # A missing and an empty input both take the no-input template.
    for row in (bundle.train[1], bundle.train[2]):
        assert row["input_ids"] == no_input + ids("yo") + [EOS]
        assert row["labels"] == [IGN] * len(no_input) + ids("yo") + [EOS]


def test_instruction_without_prompt_masking_trains_on_everything(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "yo"}])
    row = build_dataset(_instruction_cfg(path, mask_prompt=False, add_eos=False), tiny_tokenizer()).train[0]
    assert row["labels"] == row["input_ids"] == [BOS, *ids("Q:hi\nA:yo")]


def test_instruction_default_template_is_alpaca(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "yo"}])
    cfg = DataConfig(train_files=[path], format="instruction")
    row = build_dataset(cfg, tiny_tokenizer()).train[0]
    prompt = cfg.prompt_template_no_input.replace("{prompt}", "hi")
    assert prompt.endswith("### Instruction:\nhi\n\n### Response:\n")
    assert row["labels"].count(IGN) == 1 + len(prompt)


CONVERSATION = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "ok."}]


@pytest.mark.parametrize(("template", "turn_end"), [(TINY_CHAT_TEMPLATE, "<|end|>\n"),
                                                    (TINY_CHAT_TEMPLATE_TAGGED, "<|end|>")],
                         ids=["incremental", "generation-tags"])
def test_chat_labels_only_assistant_turns(tmp_path, template, turn_end):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    row = build_dataset(DataConfig(train_files=[path], format="chat"), tiny_tokenizer(template)).train[0]
    pieces = [("<|system|>be nice<|end|>\n<|user|>hi<|end|>\n<|assistant|>", False), ("yo" + turn_end, True),
              ("\n" if turn_end == "<|end|>" else "", False), ("<|user|>and?<|end|>\n<|assistant|>", False),
              ("ok." + turn_end, True), ("\n" if turn_end == "<|end|>" else "", False)]
    expected_ids = [BOS] + [t for text, _ in pieces for t in ids(text)]
    expected_labels = [IGN] + [t if learn else IGN for text, learn in pieces for t in ids(text)]
    assert row["input_ids"] == expected_ids and row["labels"] == expected_labels


def test_chat_from_csv_json_strings_and_template_file(tmp_path):
    path = write_rows(tmp_path / "c.csv", [{"messages": json.dumps(CONVERSATION[1:3])}])
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")
    cfg = DataConfig(train_files=[path], format="chat", chat_template=str(template_file))
    row = build_dataset(cfg, tiny_tokenizer(chat_template=None)).train[0]
    assert [t for t in row["labels"] if t != IGN] == ids("yo<|end|>\n")


def test_chat_without_any_template_names_the_fix(tmp_path):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="data.chat_template"):
        build_dataset(DataConfig(train_files=[path], format="chat"), tiny_tokenizer(chat_template=None))


def test_chat_template_not_prefix_stable_is_counted_then_explained(tmp_path):
    # Prints the number of messages first: the rendering of a prefix is not a prefix of the whole.
    unstable = "{{ messages|length }}" + TINY_CHAT_TEMPLATE
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="generation"):
        build_dataset(DataConfig(train_files=[path], format="chat"), tiny_tokenizer(unstable))


def test_classification_labels_inferred_sorted_and_pairs_encoded(tmp_path):
    rows = [{"a": "ab", "b": "c", "y": 10}, {"a": "d", "b": "e", "y": 2}, {"a": "f", "b": "g", "y": 1},
            {"a": "h", "b": "i", "y": 2}]
    path = write_rows(tmp_path / "c.jsonl", rows)
    cfg = DataConfig(train_files=[path], format="classification", text_field="a", text_pair_field="b",
                     label_field="y")
    bundle = build_dataset(cfg, tiny_tokenizer())
    assert bundle.label_names == label_names_for(cfg) == ["1", "2", "10"]  # numeric order, not "10" < "2"
    assert bundle.task == "seq_cls"
    assert bundle.train[0]["input_ids"] == [BOS, *ids("ab"), EOS, *ids("c")]
    assert [r["labels"] for r in bundle.train] == [2, 1, 0, 1]
    batch = bundle.collate(bundle.train[:3])
    assert batch["labels"].tolist() == [2, 1, 0] and batch["attention_mask"].shape == (3, 5)


def test_classification_label_set_from_config_counts_unknown_labels(tmp_path):
    rows = [{"text": "ab", "label": "pos"}, {"text": "cd", "label": "neg"}, {"text": "ef", "label": "meh"}]
    cfg = DataConfig(train_files=[write_rows(tmp_path / "c.csv", rows)], format="classification",
                     label_field="label", labels=["neg", "pos"])
    bundle = build_dataset(cfg, tiny_tokenizer())
    assert [r["labels"] for r in bundle.train] == [1, 0]
    assert bundle.stats.train.bad_rows == {"label not in label set": 1}


def test_seq2seq_source_target_and_t5_loss(tmp_path):
    rows = [{"source": "ab c", "target": "xy"}, {"source": "d", "target": "long one"}]
    cfg = DataConfig(train_files=[write_rows(tmp_path / "s.parquet", rows)], format="seq2seq")
    bundle = build_dataset(cfg, tiny_tokenizer())
    assert bundle.task == "seq2seq"
    assert bundle.train[0]["input_ids"] == [BOS, *ids("ab c")] and bundle.train[0]["labels"] == [BOS, *ids("xy")]
    batch = bundle.collate(bundle.train[:2])
    assert batch["input_ids"].shape == (2, 5) and batch["labels"].shape == (2, 9)
    assert batch["labels"][0, 3:].eq(IGN).all() and batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    loss = tiny_t5()(**batch).loss
    assert torch.isfinite(loss)
