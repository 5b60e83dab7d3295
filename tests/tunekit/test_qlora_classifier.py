"""QLoRA (and 8-bit) on a classifier: the new head stays a full-precision nn.Linear beside the quantized
encoder (transformers' own default misses a head with a bias and quantizes it), trains, and reloads
without transformers' "newly initialized" report. Oracles: bitsandbytes' layer classes, the head's
weights changing under training, the logits of the reloaded adapter against the trained model."""

from __future__ import annotations

import pytest
import torch
import yaml
from _tiny import tiny_tokenizer, write_rows
from transformers import BertConfig, BertModel

from tunekit import finetune
from tunekit.inference import load_adapted
from tunekit.models import ModelConfig, load_model


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    """A BERT encoder without a head, wide enough for bitsandbytes' CPU block (64)."""
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bits", [4, 8])
def test_the_new_head_is_not_quantized(bert_base, bits):
    import bitsandbytes as bnb

    model, _ = load_model(ModelConfig(name_or_path=str(bert_base), quantization={"bits": bits}), task="seq_cls",
                          label_names=["a", "b"])
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, quantized)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_classifier_trains_and_reloads_quietly(bert_base, tmp_path, bits, capfd):
    rows = [{"text": t, "label": l} for t, l in [("cat dog", "a"), ("sun sky", "b")] * 4]
    cfg = {"model": {"name_or_path": str(bert_base), "quantization": {"bits": bits, "compute_dtype": "fp32"}},
           "adapter": {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["query", "value"],
                       "modules_to_save": ["classifier"]},
           "data": {"train_files": [write_rows(tmp_path / "d.jsonl", rows)], "format": "classification",
                    "label_field": "label", "max_seq_len": 16},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 0.01},
           "output": {"dir": str(tmp_path / "run"), "eval_before": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = finetune(tmp_path / "run.yaml")
    assert result.train.global_step == 2
    capfd.readouterr()
    loaded = load_adapted(result.adapter_dir)
    report = capfd.readouterr()
    assert "newly initialized" not in report.out + report.err and "MISSING" not in report.out + report.err
    from safetensors.torch import load_file

    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    in_use = dict(loaded.model.classifier.adapters["default"].named_parameters())  # the trained copy in use
    assert torch.equal(in_use["weight"], saved["base_model.model.classifier.weight"])  # the trained head, loaded
    assert torch.equal(in_use["bias"], saved["base_model.model.classifier.bias"])
