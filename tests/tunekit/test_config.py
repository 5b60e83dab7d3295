"""The config tree: YAML + dotted overrides, one validator, one-line errors (exit 2), --print-config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunekit.adapters import LoRAConfig
from tunekit.cli import main
from tunekit.config import ConfigError, FinetuneConfig, apply_overrides, config_to_yaml, load_config

VALID = {
    "model": {"name_or_path": "some-org/some-model"},
    "adapter": {"method": "lora", "rank": 8},
    "data": {"format": "text", "train_files": ["train.jsonl"]},
    "train": {"lr": 1e-4, "max_steps": 10},
}
CLS = {**VALID, "data": {"format": "classification", "train_files": ["t.jsonl"], "label_field": "label"}}


@pytest.fixture
def config_file(tmp_path):
    def write(tree=VALID, text=None):
        path = tmp_path / "run.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(tree), encoding="utf-8")
        return str(path)

    return write


# (overrides on VALID, the key the one-line message must name)
BAD = [
    (["train.lrr=1e-4"], "train.lrr"),
    (["trian.lr=1e-4"], "trian"),
    (["train.lr=-1"], "train.lr"),
    (["train.lr=fast"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.optimizer=adam"], "train.optimizer"),
    (["train.warmup_steps=5", "train.warmup_ratio=0.1"], "train.warmup_ratio"),
    (["adapter.method=lorax"], "adapter.method"),
    (["adapter.rank=0"], "adapter.rank"),
    (["adapter.rank=2.5"], "adapter.rank"),
    (["adapter.dropout=1.5"], "adapter.dropout"),
    (["adapter.bias=some"], "adapter.bias"),
    (["adapter.target_modules=5"], "adapter.target_modules"),
    (["adapter.num_virtual_tokens=4"], "adapter.num_virtual_tokens"),
    (["adapter.method=prefix", "adapter.rank=8"], "adapter.rank"),
    (["model.dtype=fp8"], "model.dtype"),
    (["model.name_or_path=null"], "model.name_or_path"),
    (["model.quantization.bits=3"], "model.quantization.bits"),
    (["model.attn_implementation=flash"], "model.attn_implementation"),
    (["model.model_type=llama"], "model.model_type"),
    (["model.task=seq2seq"], "model.task"),
    (["data.format=tabular"], "data.format"),
    (["data.dataset=imdb"], "data.dataset"),
    (["distributed.strategy=zero"], "distributed.strategy"),
    (["distributed.tp_size=0"], "distributed.tp_size"),
    (["hub.push=true"], "hub.repo_id"),
    (["output.save_merged=true", "model.quantization.bits=4"], "output.save_merged"),
    (["output.save_merged=maybe"], "output.save_merged"),
    (["train.lr.value=1"], "train.lr"),
    (["train.lr"], "train.lr"),
    (["adapter={method: prefix, num_virtual_tokens: 4}", "data.packing=true"], "data.packing"),
    (["data.max_seq_len=0"], "data.max_seq_len = 0"),
    (["data.max_rows=-1"], "data.max_rows = -1"),
    (["data.length_group_size=0"], "data.length_group_size"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.resume_with_changes=maybe"], "train.resume_with_changes"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_line_naming_the_key(config_file, capsys, overrides, key):
    code = main(["finetune", config_file(), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert key in err[0] and "Traceback" not in err[0]


def test_bad_values_are_shown_with_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        load_config(VALID, ["model.dtype=fp8"])
    assert info.value.lines == ["model.dtype = 'fp8': Input should be 'auto', 'fp32', 'bf16' or 'fp16'"]
    with pytest.raises(ConfigError) as info:
        load_config(VALID, ["train.lrr=1"])
    assert "did you mean train.lr?" in info.value.lines[0] and "batch_size" in info.value.lines[0]


def test_seq_cls_without_a_trained_head_is_refused():
    with pytest.raises(ConfigError, match=r"adapter.modules_to_save.*classifier"):
        load_config(CLS)
    assert load_config(CLS, ["adapter.modules_to_save=[classifier]"]).adapter.modules_to_save == ["classifier"]


@pytest.mark.parametrize(("text", "needle"), [
    ("model: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_malformed_yaml_is_one_line(config_file, capsys, text, needle):
    assert main(["finetune", config_file(text=text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_missing_config_file(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_unreadable_config_files_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: {name_or_path: café}\n".encode("latin-1"))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    locked = tmp_path / "locked.yaml"
    locked.write_text("model: {}\n", encoding="utf-8")
    real_read = Path.read_text

    def read_text(self, *args, **kwargs):  # chmod cannot lock a file against root, so refuse the read here
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    for file, needle in [(latin1, "is not UTF-8 text (byte 25"), (folder, "is a folder"),
                         (locked, "cannot be read (Permission denied)")]:
        assert main(["finetune", str(file)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(file) in err[0] and needle in err[0], err


def test_a_utf8_config_reads_the_same_under_an_ascii_locale(tmp_path, monkeypatch):
    # What LC_ALL=C (without Python's UTF-8 mode) does to text files opened without an encoding.
    import io

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**VALID, "output": {"dir": "runs/café-ü"}}, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "ascii")
    assert str(load_config(str(path)).output.dir) == "runs/café-ü"


@pytest.mark.parametrize("argv", [
    ["{cfg}", "--print-config", "adapter.rank=16"],
    ["--print-config", "{cfg}", "adapter.rank=16"],
    ["adapter.rank=16", "--print-config", "--config", "{cfg}"],
    ["{cfg}", "adapter.rank=2", "--print-config", "adapter.rank=16"],  # the later override wins
])
def test_flags_and_overrides_in_any_order(config_file, capsys, argv):
    cfg = config_file()
    assert main(["finetune", *[a.format(cfg=cfg) for a in argv]]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["adapter"]["rank"] == 16


@pytest.mark.parametrize(("args", "shown"), [
    (["--train.lr=1e-4"], "train.lr=1e-4 (not --train.lr=1e-4)"),
    (["--train.lr", "1e-4"], "train.lr=1e-4 (not --train.lr 1e-4)"),
    (["train.lr", "1e-4"], "train.lr=1e-4 (not train.lr 1e-4)"),
    (["--no-such-flag"], "unknown option --no-such-flag"),
])
def test_misspelled_overrides_show_the_key_value_form(config_file, capsys, args, shown):
    assert main(["finetune", config_file(), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shown in err[0], err


def test_config_file_count_must_be_one(config_file, capsys):
    assert main(["finetune"]) == 2
    assert "no config file" in capsys.readouterr().err
    assert main(["finetune", config_file(), "--config", config_file()]) == 2
    assert "several config files" in capsys.readouterr().err


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(VALID, ["train.lr=3e-4", "train.gradient_checkpointing=true", "train.max_steps=7",
                              "adapter.target_modules=[q_proj, v_proj]", "model.config_overrides.num_layers=2"])
    assert cfg.train.lr == 3e-4 and cfg.train.gradient_checkpointing is True and cfg.train.max_steps == 7
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.config_overrides == {"num_layers": 2}


def test_overrides_do_not_mutate_the_input():
    tree = {"train": {"lr": 1.0}}
    assert apply_overrides(tree, ["train.lr=2"])["train"]["lr"] == 2
    assert tree == {"train": {"lr": 1.0}}


def test_adapter_method_defaults_to_lora_and_switches_by_name():
    cfg = load_config({**VALID, "adapter": {"rank": 4}})
    assert isinstance(cfg.adapter, LoRAConfig) and cfg.adapter.rank == 4
    prefix = load_config({**VALID, "adapter": {"method": "prefix", "num_virtual_tokens": 5}})
    assert type(prefix.adapter).__name__ == "PrefixConfig" and prefix.adapter.num_virtual_tokens == 5


def test_print_config_round_trips(config_file, capsys):
    assert main(["finetune", "--config", config_file(), "--print-config", "adapter.rank=16"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    again = load_config(printed)
    assert again.adapter.rank == 16 and again == load_config(VALID, ["adapter.rank=16"])
    assert printed["train"]["batch_size"] == FinetuneConfig.model_fields["train"].default.batch_size


def test_config_object_and_yaml_text_agree(config_file):
    cfg = load_config(config_file())
    assert load_config(cfg) == cfg
    assert load_config(yaml.safe_load(config_to_yaml(cfg))) == cfg
