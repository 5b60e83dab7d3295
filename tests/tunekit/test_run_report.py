"""A finished run explains itself: results.json holds the summary line, metrics.jsonl the eval before
training at step 0, the run folder a training-curve PNG, adapter/ and merged/ a model card and the
tokenizer with the chat template; the folder can be moved. Oracles: the TrainResult the API returns,
PIL/matplotlib reading the PNG, transformers' AutoTokenizer, the same command before and after a move."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from _tiny import write_rows

from tunekit import finetune
from tunekit.cli import main
from tunekit.data.templates import named_template

ROWS = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["cat", "dog", "sun", "red", "big", "top"]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = {"model": {"from_config": True, "model_type": "llama", "tokenizer": str(_tokenizer_folder(tmp)),
                     "config_overrides": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 1, "num_attention_heads": 4,
                                          "num_key_value_heads": 2, "max_position_embeddings": 96,
                                          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}},
           "adapter": {"method": "lora", "rank": 2, "alpha": 4},
           "data": {"train_files": [write_rows(tmp / "chat.jsonl", ROWS)], "format": "chat",
                    "chat_template": "chatml", "eval_fraction": 0.34},
           "train": {"max_steps": 3, "batch_size": 2, "lr": 0.01, "log_every": 1},
           "output": {"dir": str(tmp / "run"), "save_merged": True}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return tmp, finetune(tmp / "run.yaml")


def _tokenizer_folder(tmp):
    from _tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp / "tok")
    return tmp / "tok"


def test_results_json_holds_the_summary_line_and_step_0_holds_the_eval_before(run):
    _, result = run
    results = json.loads((result.output_dir / "results.json").read_text(encoding="utf-8"))
    trained = result.train
    assert results["train"]["steps"] == trained.global_step == 3
    assert results["train"]["train_seconds"] == round(trained.train_seconds, 1)
    assert results["train"]["tokens_per_second"] == round(trained.tokens_per_second, 1)
    assert results["train"]["peak_memory_mib"] == round(trained.peak_memory_mib)
    records = [json.loads(line) for line in result.metrics_file.read_text(encoding="utf-8").splitlines()]
    assert records[0]["split"] == "eval" and records[0]["step"] == 0
    assert {k: records[0][k] for k in result.metrics_before} == results["before"] == result.metrics_before


def test_training_curves_png_and_model_cards(run):
    from matplotlib.image import imread

    _, result = run
    image = imread(result.output_dir / "training_curves.png")
    assert image.ndim == 3 and image.shape[0] > 100
    card = (result.adapter_dir / "README.md").read_text(encoding="utf-8")
    assert f"tunekit chat {result.adapter_dir}" in card and "## Results" in card and "## Training" in card
    assert f"| loss | {result.metrics_before['loss']:.4f} | {result.metrics['loss']:.4f} |" in card
    assert "![Training loss](../training_curves.png)" in card
    merged_card = (result.merged_dir / "README.md").read_text(encoding="utf-8")
    assert f'AutoModelForCausalLM.from_pretrained("{result.merged_dir}")' in merged_card


def test_the_chat_template_is_saved_with_the_tokenizers(run):
    from transformers import AutoTokenizer

    _, result = run
    for folder in (result.adapter_dir, result.merged_dir):
        assert AutoTokenizer.from_pretrained(folder).chat_template == named_template("chatml")


def test_the_run_folder_can_be_moved_and_a_missing_base_names_the_fix(run, tmp_path, capsys):
    tmp, result = run
    record = json.loads((result.adapter_dir / "tunekit_base.json").read_text(encoding="utf-8"))
    assert record["model"]["name_or_path"] == "../base"
    args = ["--prompt", "say cat", "--max-new-tokens", "3"]
    assert main(["generate", str(result.adapter_dir), *args]) == 0
    before = capsys.readouterr().out
    moved = shutil.copytree(result.output_dir, tmp_path / "elsewhere" / "run")
    assert main(["generate", str(moved / "adapter"), *args]) == 0
    assert capsys.readouterr().out == before
    shutil.rmtree(moved / "base")
    assert main(["generate", str(moved / "adapter"), *args]) == 1
    err = capsys.readouterr().err
    assert "records its base model at" in err and "pass --base MODEL" in err
