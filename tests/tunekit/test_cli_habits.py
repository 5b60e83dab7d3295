"""CLI habits from the peers: an adapter.method override drops the old method's fields, `finetune -h`
lists the config sections (the oracle: FinetuneConfig's own fields) and points to docs/config.md, which
is regenerated here from the pydantic models and must equal the checked-in file, and --preview-data
shows what the model will see (the oracle: the tokenizer decoding the ids and labels build_dataset made)."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from _tiny import tiny_tokenizer, write_rows

from tunekit.cli import CONFIG_SECTIONS, main
from tunekit.config import FinetuneConfig, load_config
from tunekit.config_docs import render_config_reference

REPO = Path(__file__).resolve().parents[2]


def test_a_method_override_drops_the_previous_methods_fields(caplog):
    with caplog.at_level(logging.WARNING, logger="tunekit.config"):
        cfg = load_config(REPO / "cookbook/quickstart.yaml", ["adapter.method=prefix", "adapter.num_virtual_tokens=4"])
    assert cfg.adapter.method == "prefix" and cfg.adapter.num_virtual_tokens == 4
    assert cfg.adapter.modules_to_save == ["classifier"]  # a field both methods have is kept
    assert "dropped adapter.alpha, adapter.dropout, adapter.rank, adapter.target_modules" in caplog.text
    # written in the file itself, a field of another method is still an error
    raw = yaml.safe_load((REPO / "cookbook/quickstart.yaml").read_text(encoding="utf-8"))
    raw["adapter"]["method"] = "prefix"
    try:
        load_config(raw)
    except ValueError as err:
        assert "unknown key adapter.rank" in str(err)
    else:
        raise AssertionError("a prefix adapter with a rank was accepted")


def test_finetune_help_lists_every_config_section_and_the_reference(capsys):
    assert main(["finetune", "-h"]) == 0
    out = capsys.readouterr().out
    assert list(CONFIG_SECTIONS) == list(FinetuneConfig.model_fields)
    assert all(f"  {section} " in out for section in FinetuneConfig.model_fields)
    assert "docs/config.md" in out and out.count("tunekit finetune ") >= 2


def test_docs_config_md_is_generated_from_the_models():
    text = render_config_reference()
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == text, \
        "docs/config.md is stale: run .venv/bin/python -m tunekit.config_docs docs/config.md"
    for section, field in FinetuneConfig.model_fields.items():
        cls = field.annotation
        for key in getattr(cls, "model_fields", {}):
            assert f"`{section}.{key}`" in text


def test_preview_data_marks_the_loss_and_counts_tokens(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    rows = [{"instruction": "say", "input": "ab", "output": "ab"}, {"instruction": "say", "output": "cd"}]
    cfg = {"model": {"from_config": True, "model_type": "llama", "tokenizer": str(tok_dir),
                     "config_overrides": {"vocab_size": 96, "max_position_embeddings": 64}},
           "data": {"train_files": [write_rows(tmp_path / "d.jsonl", rows)], "format": "instruction",
                    "prompt_template": "Q {prompt} {input} A ", "prompt_template_no_input": "Q {prompt} A ",
                    "packing": True},
           "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["finetune", str(tmp_path / "c.yaml"), "--preview-data"]) == 0
    out = capsys.readouterr().out
    assert "data train: 2/2 rows used" in out
    assert "packing: 2 examples in 1 rows of up to 64 tokens" in out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)  # as the run loads it

    def text(s, eos=False):
        return tok.decode(tok(s, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []))

    # the response and EOS are what is learned; the prompt is shown unmarked before it
    assert f"{text('[bos]Q say ab A ')}⟦{text('ab', eos=True)}⟧" in out
    assert f"⟦{text('cd', eos=True)}⟧" in out and "tokens, 3 in the loss" in out
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
