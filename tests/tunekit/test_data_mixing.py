"""Several sources in one run (data.sources): each encoded with its own format and fields, mixed by
concatenation or by datasets.interleave_datasets (the oracle: the library's own interleaving of the raw
rows, each then encoded alone)."""

import datasets
import pytest
from _bpe import bpe_tokenizer
from _tiny import write_rows

from tunekit.config import ConfigError, load_config
from tunekit.data import DataConfig, build_dataset


def _sources(tmp_path):
    chat = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"yo {i}"}]}
            for i in range(6)]
    instruct = [{"q": f"add {i}", "a": f"{i + 1}"} for i in range(10)]
    return (write_rows(tmp_path / "chat.jsonl", chat), chat), (write_rows(tmp_path / "inst.jsonl", instruct), instruct)


def _cfg(tmp_path, **mix):
    (chat_path, _), (inst_path, _) = _sources(tmp_path)
    weight = mix.get("weight")
    return DataConfig(chat_template="chatml", sources=[
        {"train_files": [chat_path], "format": "chat", "weight": None if weight is None else 1.0},
        {"train_files": [inst_path], "format": "instruction", "prompt_field": "q", "response_field": "a",
         "weight": mix.pop("weight", None)}], **mix)


def _alone(tmp_path, rows, **fields):
    """Each row encoded by a single-source run of its own format: the reference ids."""
    path = write_rows(tmp_path / f"one-{fields['format']}.jsonl", rows)
    return [r["input_ids"] for r in build_dataset(DataConfig(train_files=[path], chat_template="chatml", **fields),
                                                  bpe_tokenizer()).train]


def test_concat_encodes_each_source_with_its_own_format(tmp_path):
    (_, chat), (_, instruct) = _sources(tmp_path)
    bundle = build_dataset(_cfg(tmp_path), bpe_tokenizer())
    expected = _alone(tmp_path, chat, format="chat") + _alone(tmp_path, instruct, format="instruction",
                                                               prompt_field="q", response_field="a")
    assert [r["input_ids"] for r in bundle.train] == expected
    assert bundle.stats.train.rows_used == 16


@pytest.mark.parametrize("stopping", ["first_exhausted", "all_exhausted"])
def test_interleave_is_datasets_interleaving_with_the_weights_and_seed(tmp_path, stopping):
    (_, chat), (_, instruct) = _sources(tmp_path)
    cfg = _cfg(tmp_path, mix="interleave", mix_stopping=stopping, weight=3.0)
    bundle = build_dataset(cfg, bpe_tokenizer(), seed=7)
    tagged = [datasets.Dataset.from_list([{"src": 0, "i": i} for i in range(6)]),
              datasets.Dataset.from_list([{"src": 1, "i": i} for i in range(10)])]
    oracle = datasets.interleave_datasets(tagged, probabilities=[0.25, 0.75], seed=7, stopping_strategy=stopping)
    alone = [_alone(tmp_path, chat, format="chat"),
             _alone(tmp_path, instruct, format="instruction", prompt_field="q", response_field="a")]
    assert [r["input_ids"] for r in bundle.train] == [alone[r["src"]][r["i"]] for r in oracle]
    again = build_dataset(cfg, bpe_tokenizer(), seed=7)
    assert [r["input_ids"] for r in again.train] == [r["input_ids"] for r in bundle.train]  # deterministic


def test_eval_fraction_holds_out_each_source_and_sources_validate(tmp_path):
    cfg = _cfg(tmp_path, eval_fraction=0.2)
    bundle = build_dataset(cfg, bpe_tokenizer())
    assert len(bundle.eval) == 1 + 2 and len(bundle.train) == 5 + 8
    with pytest.raises(ConfigError, match="data.sources replaces data.dataset"):
        load_config({"model": {"name_or_path": "gpt2"},
                     "data": {"train_files": ["a.jsonl"], "sources": [{"train_files": ["b.jsonl"]}]}})
    with pytest.raises(ConfigError, match="mix formats of different tasks"):
        load_config({"model": {"name_or_path": "gpt2"}, "data": {"sources": [
            {"train_files": ["a.jsonl"]}, {"train_files": ["b.jsonl"], "format": "classification", "label_field": "y"}]}})
