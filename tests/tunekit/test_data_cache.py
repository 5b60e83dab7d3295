"""The cached, batched data path (tunekit.data.cache) against the row-wise one (``cache=False``):
identical rows and statistics, bad rows included; a second build reads instead of encoding; any
change to the rows, the settings or the tokenizer is a new key; concurrent builders agree."""

from __future__ import annotations

import json
import multiprocessing

import pytest
from _tiny import tiny_tokenizer, write_rows

from tunekit.data import DataConfig, build_dataset
from tunekit.data.formats import Encoder

SHORT = {"prompt_template": "{prompt}: {input}>", "prompt_template_no_input": "{prompt}>"}
BAD_LINES = '{"instruction": \n[1, 2]\n{"instruction": "no output"}\n{"instruction": "x", "output": 5}\n'


def _instruction_file(tmp_path, n=40, name="train.jsonl"):
    rows = [{"instruction": f"q{i} " + "w" * (i % 7), "input": "ctx" if i % 3 else "", "output": "a" * (1 + i % 9)}
            for i in range(n)]
    path = write_rows(tmp_path / name, rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(BAD_LINES)
    return path


def _configs(tmp_path) -> dict[str, DataConfig]:
    train = _instruction_file(tmp_path)
    chat = write_rows(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo" * (i % 4)}]}
        for i in range(12)] + [{"messages": "not a list"}])
    cls = write_rows(tmp_path / "cls.jsonl", [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3]} for i in range(12)]
                     + [{"text": "x", "label": "zzz"}, {"label": "a"}])
    s2s = write_rows(tmp_path / "s2s.jsonl", [{"source": f"s{i}", "target": "t" * (i % 5 + 1)} for i in range(10)])
    return {
        "instruction": DataConfig(train_files=[train], format="instruction", max_seq_len=64, eval_fraction=0.2,
                                  **SHORT),
        "drop": DataConfig(train_files=[train], format="instruction", max_seq_len=24, truncation="drop",
                           **SHORT),
        "text": DataConfig(train_files=[train], format="text", text_field="instruction", max_seq_len=12),
        "chat": DataConfig(train_files=[chat], format="chat", max_seq_len=64),
        "classification": DataConfig(train_files=[cls], format="classification", label_field="label",
                                     labels=["a", "b", "c"]),
        "seq2seq": DataConfig(train_files=[s2s], format="seq2seq"),
    }


def _same(a, b):
    assert a.stats == b.stats and a.stats.summary() == b.stats.summary()
    for split in ("train", "eval"):
        rows_a, rows_b = getattr(a, split), getattr(b, split)
        assert (rows_a is None) == (rows_b is None)
        if rows_a is not None:
            assert rows_a.columns == rows_b.columns and list(rows_a) == list(rows_b)


@pytest.mark.parametrize("name", ["instruction", "drop", "text", "chat", "classification", "seq2seq"])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_cached_build_equals_the_rowwise_build(tmp_path, name, packing):
    cfg = _configs(tmp_path)[name]
    if packing:
        if cfg.task != "causal_lm":
            pytest.skip("packing is for causal-LM formats")
        cfg = cfg.model_copy(update={"packing": True})
    tok = tiny_tokenizer()
    rowwise = build_dataset(cfg, tok, seed=3, cache=False)
    assert sum(rowwise.stats.train.bad_rows.values()) > 0 or name == "seq2seq"
    _same(build_dataset(cfg, tok, seed=3, cache=tmp_path / "cache"), rowwise)  # a miss: encoded by datasets.map
    _same(build_dataset(cfg, tok, seed=3, cache=tmp_path / "cache"), rowwise)  # a hit: read back


def _counting(monkeypatch) -> list:
    calls = []
    encode = Encoder.__call__
    monkeypatch.setattr(Encoder, "__call__", lambda self, row: calls.append(1) or encode(self, row))
    return calls


def test_a_second_build_does_not_call_the_encoder_and_changes_are_new_keys(tmp_path, monkeypatch):
    calls, cache, tok = _counting(monkeypatch), tmp_path / "cache", tiny_tokenizer()
    cfg = DataConfig(train_files=[_instruction_file(tmp_path)], format="instruction", max_seq_len=64, **SHORT)
    first = build_dataset(cfg, tok, cache=cache)
    encoded = len(calls)
    assert encoded == first.stats.train.rows_read - 2  # every row but the two the reader rejected
    _same(build_dataset(cfg, tok, cache=cache), first)
    packed = build_dataset(cfg.model_copy(update={"packing": True}), tok, cache=cache)  # packing follows encoding
    assert len(calls) == encoded and packed.stats.train.packed_rows == len(packed.train)
    changes = [
        (cfg.model_copy(update={"max_seq_len": 63}), tok),  # a setting
        (cfg, tiny_tokenizer(chat_template="{{ messages }}")),  # the tokenizer
        (DataConfig(train_files=[_instruction_file(tmp_path, n=41, name="more.jsonl")], format="instruction",
                    max_seq_len=64, **SHORT), tok),  # the rows
    ]
    for changed_cfg, changed_tok in changes:
        before = len(calls)
        build_dataset(changed_cfg, changed_tok, cache=cache)
        assert len(calls) > before


def test_a_folder_left_without_its_meta_is_rebuilt(tmp_path):
    cfg = DataConfig(train_files=[_instruction_file(tmp_path)], format="instruction", max_seq_len=64, **SHORT)
    cache, tok = tmp_path / "cache", tiny_tokenizer()
    first = build_dataset(cfg, tok, cache=cache)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    (folder / "meta.json").unlink()  # as a crash between the arrays and the metadata would leave it
    _same(build_dataset(cfg, tok, cache=cache), first)
    assert json.loads((folder / "meta.json").read_text(encoding="utf-8"))["rows_read"] == 44


def _build_in_child(args):
    cfg_json, cache, out = args
    bundle = build_dataset(DataConfig.model_validate_json(cfg_json), tiny_tokenizer(), cache=cache)
    with open(out, "w", encoding="utf-8") as f:
        json.dump([bundle.stats.train.summary(), list(bundle.train)], f)


@pytest.mark.slow
def test_concurrent_builders_encode_once_and_agree(tmp_path, monkeypatch):
    calls_file = tmp_path / "calls"
    encode = Encoder.__call__

    def counted(self, row):
        with open(calls_file, "a", encoding="utf-8") as f:
            f.write(".")
        return encode(self, row)

    monkeypatch.setattr(Encoder, "__call__", counted)  # forked children inherit it
    cfg = DataConfig(train_files=[_instruction_file(tmp_path)], format="instruction", max_seq_len=64, **SHORT)
    outs = [tmp_path / f"out{i}.json" for i in range(3)]
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(_build_in_child, [(cfg.model_dump_json(), str(tmp_path / "cache"), str(o)) for o in outs])
    results = [json.loads(o.read_text(encoding="utf-8")) for o in outs]
    assert results[0] == results[1] == results[2]
    assert len(calls_file.read_text(encoding="utf-8")) == 42  # one builder encoded, the others read
    rowwise = build_dataset(cfg, tiny_tokenizer(), cache=False)
    assert results[0] == json.loads(json.dumps([rowwise.stats.train.summary(), list(rowwise.train)]))


@pytest.mark.slow
def test_several_encoding_processes_give_the_same_rows(tmp_path):
    cfg = DataConfig(train_files=[_instruction_file(tmp_path, n=300)], format="instruction", max_seq_len=64, **SHORT)
    tok = tiny_tokenizer()
    _same(build_dataset(cfg, tok, cache=tmp_path / "cache", num_proc=2), build_dataset(cfg, tok, cache=False))
