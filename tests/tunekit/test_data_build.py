"""build_dataset: bad-row accounting, errors, eval split, truncation, order, storage."""

import logging
from pathlib import Path

import pytest
from _tiny import tiny_tokenizer, write_rows

from tunekit.data import DataConfig, TokenizedRows, build_dataset, label_names_for, train_order

BOS, EOS, IGN = 1, 2, -100


def _texts(n: int, width: int = 1) -> list[dict]:
    return [{"text": "ab" * width + str(i)} for i in range(n)]


def test_bad_rows_counted_by_reason_and_logged(tmp_path, caplog):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n[1, 2]\n{"body": "x"}\n{"text": "  "}\n{"text": 5}\n'
                    '{"text": "fine"}\n', encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="tunekit.data"):
        bundle = build_dataset(DataConfig(train_files=[str(path)]), tiny_tokenizer())
    stats = bundle.stats.train
    assert (stats.rows_read, stats.rows_used, len(bundle.train)) == (7, 2, 2)
    assert stats.bad_rows == {"invalid json": 1, "not an object": 1, "missing field 'text'": 1,
                              "empty field 'text'": 1, "field 'text' not text": 1}
    assert stats.tokens == 2 * 4 + 2 and stats.loss_tokens == stats.tokens - 2
    # logged at INFO, not shown: the caller shows the summary (finetune prints it, once)
    assert "missing field 'text': 1" in caplog.text and caplog.records[-1].levelno == logging.INFO


def test_finetune_shows_the_data_summary_once_with_skipped_rows(tmp_path, capsys, monkeypatch):
    from _tiny_runs import run_config

    import tunekit

    cfg = run_config(tmp_path, "causal_lm", steps=1)
    train = Path(cfg["data"]["train_files"][0])
    train.write_text(train.read_text(encoding="utf-8") + '{"instruction": "no output"}\n', encoding="utf-8")
    # logging as a plain `tunekit finetune` has it: no handlers, so warnings reach stderr (pytest's own
    # capture handlers would swallow them)
    monkeypatch.setattr(logging.root, "handlers", [])
    capsys.readouterr()
    tunekit.finetune(cfg)
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("data train:")]
    assert len(lines) == 1 and "missing field 'output': 1" in lines[0]


def test_zero_usable_rows_names_source_and_field(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [{"body": "a"}, {"body": "b"}])
    with pytest.raises(ValueError, match=r"no usable rows in data.train_files .*t.jsonl.*missing field 'text': 2"):
        build_dataset(DataConfig(train_files=[path]), tiny_tokenizer())


def test_missing_file_and_unknown_extension_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.train_files: file not found: .*nope.jsonl"):
        build_dataset(DataConfig(train_files=[str(tmp_path / "nope.jsonl")]), tiny_tokenizer())
    odd = tmp_path / "t.dat"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="set data.file_format"):
        build_dataset(DataConfig(train_files=[str(odd)]), tiny_tokenizer())


def test_eval_files_give_an_eval_split(tmp_path):
    cfg = DataConfig(train_files=[write_rows(tmp_path / "a.txt", _texts(3))],
                     eval_files=[write_rows(tmp_path / "b.csv", [{"text": "zz"}, {"text": ""}])])
    bundle = build_dataset(cfg, tiny_tokenizer())
    assert len(bundle.train) == 3 and len(bundle.eval) == 1
    assert bundle.stats.eval.bad_rows == {"empty field 'text'": 1}


def test_eval_fraction_split_is_deterministic(tmp_path):
    cfg = DataConfig(train_files=[write_rows(tmp_path / "a.jsonl", _texts(20))], eval_fraction=0.25)
    tok = tiny_tokenizer()

    def split(seed, **kw):
        bundle = build_dataset(cfg.model_copy(update=kw), tok, seed=seed)
        return [tuple(r["input_ids"]) for r in bundle.train], [tuple(r["input_ids"]) for r in bundle.eval]

    train, held = split(0)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert split(0) == (train, held)
    assert split(1)[1] != held
    assert split(1, eval_seed=0) == (train, held)  # eval_seed pins the split whatever the run seed


def test_truncation_counted_and_drop_mode(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"text": "abcdefgh"}, {"text": "ab"}])
    bundle = build_dataset(DataConfig(train_files=[path], max_seq_len=5), tiny_tokenizer())
    assert bundle.train.lengths() == [5, 4] and bundle.stats.train.truncated == 1
    assert bundle.train[0]["input_ids"] == [BOS, 8, 9, 10, 11]
    dropped = build_dataset(DataConfig(train_files=[path], max_seq_len=5, truncation="drop"), tiny_tokenizer())
    assert len(dropped.train) == 1 and dropped.stats.train.bad_rows == {"longer than max_seq_len": 1}


def test_prompt_filling_max_seq_len_is_a_bad_row(tmp_path):
    rows = [{"instruction": "a long instruction", "output": "x"}, {"instruction": "a", "output": "b"}]
    cfg = DataConfig(train_files=[write_rows(tmp_path / "a.jsonl", rows)], format="instruction",
                     prompt_template="{prompt}{input}", prompt_template_no_input="{prompt}", max_seq_len=6)
    bundle = build_dataset(cfg, tiny_tokenizer())
    assert bundle.train[0]["labels"] == [IGN, IGN, 9, EOS]
    assert bundle.stats.train.bad_rows == {"no trainable tokens (prompt fills max_seq_len)": 1}


def test_max_rows_caps_each_source(tmp_path):
    cfg = DataConfig(train_files=[write_rows(tmp_path / "a.jsonl", _texts(10))], max_rows=4)
    assert build_dataset(cfg, tiny_tokenizer()).stats.train.rows_read == 4


def test_dataset_folder_through_datasets_streaming(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_rows(folder / "train.jsonl", _texts(6))
    write_rows(folder / "validation.jsonl", _texts(2))
    cfg = DataConfig(dataset=str(folder), eval_split="validation", streaming=True, max_rows=4)
    bundle = build_dataset(cfg, tiny_tokenizer())
    assert len(bundle.train) == 4 and len(bundle.eval) == 2
    assert bundle.train[0]["input_ids"] == [BOS, 8, 9, 60, EOS]


def test_label_names_for_is_none_outside_classification_and_reads_config_labels(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"text": "a", "y": "b"}])
    assert label_names_for(DataConfig(train_files=[path])) is None
    cfg = DataConfig(train_files=[path], format="classification", label_field="y", labels=[1, 0])
    assert label_names_for(cfg) == ["1", "0"]
    with pytest.raises(ValueError, match="data.label_field 'z'"):
        label_names_for(cfg.model_copy(update={"label_field": "z", "labels": None}))


def test_train_order_deterministic_per_epoch_and_seed():
    lengths = list(range(50))
    first = train_order(lengths, epoch=0, seed=3)
    assert sorted(first) == lengths and first == train_order(lengths, epoch=0, seed=3)
    assert first != train_order(lengths, epoch=1, seed=3) and first != train_order(lengths, epoch=0, seed=4)


def test_group_by_length_groups_lengths(tmp_path):
    rows = [{"text": "a" * n} for n in [1, 30, 2, 29, 3, 28, 4, 27] * 4]
    cfg = DataConfig(train_files=[write_rows(tmp_path / "a.jsonl", rows)], group_by_length=True,
                     length_group_size=8)
    bundle = build_dataset(cfg, tiny_tokenizer())
    lengths = bundle.train.lengths()
    order = bundle.train_order(epoch=0, seed=0)
    assert sorted(order) == list(range(32)) and order == bundle.train_order(epoch=0, seed=0)
    groups = [[lengths[i] for i in order[s: s + 8]] for s in range(0, 32, 8)]
    assert all(g == sorted(g, reverse=True) for g in groups)
    assert lengths[order[0]] == max(lengths)  # the longest batch comes first

    def padding(order, batch=4):
        return sum(max(lengths[i] for i in order[s: s + batch]) * batch - sum(lengths[i] for i in order[s: s + batch])
                   for s in range(0, len(order), batch))

    assert padding(order) < padding(train_order(lengths, 0, 0)) / 2


def test_tokenized_rows_index_slice_and_lengths():
    rows = TokenizedRows(("input_ids", "labels"))
    rows.append(input_ids=[5, 6, 7], labels=[IGN, 6, 7])
    rows.append(input_ids=[8], labels=[8])
    assert len(rows) == 2 and rows.lengths() == [3, 1]
    assert rows[-1] == {"input_ids": [8], "labels": [8], "attention_mask": [1]}
    assert rows[0:1] == [{"input_ids": [5, 6, 7], "labels": [IGN, 6, 7], "attention_mask": [1, 1, 1]}]
    with pytest.raises(IndexError):
        rows[2]
    with pytest.raises(ValueError, match="row columns"):
        rows.append(input_ids=[1])


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    bundle = build_dataset(DataConfig(train_files=[write_rows(tmp_path / "a.jsonl", _texts(2, 2))]), tok)
    batch = bundle.collate([bundle.train[0], {"input_ids": [1], "labels": [1], "attention_mask": [1]}])
    assert batch["input_ids"][1].tolist() == [1] + [EOS] * 6 and batch["labels"][1, 1:].eq(IGN).all()


def test_unloadable_dataset_names_the_key(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_rows(folder / "train.jsonl", _texts(2))
    cfg = DataConfig(dataset=str(folder), eval_split="validaton", streaming=True, max_rows=2)
    with pytest.raises(ValueError, match=r"data.dataset '.*ds' \(split 'validaton'\) could not be loaded"):
        build_dataset(cfg, tiny_tokenizer())
