"""DataConfig: documented fields, and errors that name the key to fix."""

import pytest
from pydantic import ValidationError

from tunekit.data import DataConfig


def test_every_field_is_documented():
    undocumented = [name for name, f in DataConfig.model_fields.items() if not f.description]
    assert undocumented == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of data.dataset"),
    ({"dataset": "x", "train_files": ["a.jsonl"]}, "exactly one of data.dataset"),
    ({"dataset": "x", "eval_files": ["b.jsonl"]}, "data.eval_files needs data.train_files"),
    ({"train_files": ["a"], "eval_split": "validation"}, "data.eval_split needs data.dataset"),
    ({"train_files": ["a"], "eval_fraction": 1.5}, r"data.eval_fraction must be in \(0, 1\)"),
    ({"train_files": ["a"], "eval_files": ["b"], "eval_fraction": 0.1}, "conflicts with data.eval_files"),
    ({"dataset": "x", "streaming": True}, "data.streaming needs data.max_rows"),
    ({"train_files": ["a"], "format": "classification"}, "needs data.label_field"),
    ({"train_files": ["a"], "format": "seq2seq", "packing": True}, "not data.format 'seq2seq'"),
    ({"train_files": ["a"], "prompt_template": "{prompt}"}, r"needs both \{prompt\} and \{input\}"),
    ({"train_files": ["a"], "labels": ["a", "a"]}, "data.labels has duplicates"),
    ({"train_files": ["a"], "max_seq_len": 0}, "max_seq_len"),
    ({"train_files": ["a"], "format": "chatml"}, "format"),
    ({"train_files": ["a"], "text_feild": "body"}, "text_feild"),
])
def test_invalid_config_names_the_key(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**kwargs)


def test_labels_from_yaml_ints_become_strings_and_task_follows_format():
    cfg = DataConfig(train_files=["a.csv"], format="classification", label_field="y", labels=[0, 1])
    assert cfg.labels == ["0", "1"] and cfg.task == "seq_cls"
    assert DataConfig(dataset="d").task == "causal_lm"
    assert DataConfig(dataset="d", format="seq2seq").task == "seq2seq"
