"""tunekit <-> PEFT: a folder saved by one loads in the other and gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import TINY_MODELS, model_output, tiny_inputs
from _tolerances import FP32_EXACT, max_abs_diff
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from tunekit.adapters import LoRAConfig, inject_adapters, load_adapters, save_adapters

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
PEFT_KW = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
CASES = [(arch, v) for arch in ("llama", "gpt2") for v in VARIANTS] + [("bert", "lora"), ("t5", "dora")]


def _fresh(arch):
    torch.manual_seed(0)  # same base weights every time
    return TINY_MODELS[arch]()


def _perturb(model):
    """Non-zero B and a non-trivial DoRA magnitude, as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_tunekit_saved_loads_in_peft(arch, variant, tmp_path):
    model, inputs = _fresh(arch), tiny_inputs(arch)
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    inject_adapters(model, LoRAConfig(rank=4, alpha=8, **VARIANTS[variant], **extra))
    _perturb(model)
    ours = model_output(model, inputs)
    save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8

    peft_model = PeftModel.from_pretrained(_fresh(arch), tmp_path).eval()
    assert max_abs_diff(model_output(peft_model, inputs), ours) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_peft_saved_loads_in_tunekit(arch, variant, tmp_path):
    inputs = tiny_inputs(arch)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"],
               "t5": ["q", "v", "wo"]}[arch]
    task = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}[arch]
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, **PEFT_KW[variant])
    peft_model = get_peft_model(_fresh(arch), peft_cfg)
    _perturb(peft_model)
    peft_model.eval()
    theirs = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    model = _fresh(arch)
    cfg = load_adapters(model, tmp_path)
    assert cfg.rank == 4 and cfg.use_dora == (variant == "dora")
    assert max_abs_diff(model_output(model, inputs), theirs) <= FP32_EXACT


def test_peft_option_tunekit_lacks_is_refused(tmp_path):
    peft_model = get_peft_model(_fresh("llama"), LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rank_pattern"):
        load_adapters(_fresh("llama"), tmp_path)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_interoperate_both_ways(bias, tmp_path):
    """bias="all" / "lora_only" train base biases too; PEFT saves and loads them under the same keys."""
    inputs = tiny_inputs("gpt2")

    def bump_biases(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith("bias"):
                    p.add_(0.1)

    ours = _fresh("gpt2")
    inject_adapters(ours, LoRAConfig(rank=4, init="random", bias=bias))
    assert any(n.endswith("bias") for n, p in ours.named_parameters() if p.requires_grad)
    bump_biases(ours)
    save_adapters(ours, tmp_path / "tunekit")
    peft_model = PeftModel.from_pretrained(_fresh("gpt2"), tmp_path / "tunekit").eval()
    assert max_abs_diff(model_output(peft_model, inputs), model_output(ours, inputs)) <= FP32_EXACT

    theirs = get_peft_model(_fresh("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], bias=bias,
                                                       init_lora_weights=False))
    bump_biases(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = _fresh("gpt2")
    load_adapters(loaded, tmp_path / "peft")
    assert max_abs_diff(model_output(loaded, inputs), model_output(theirs.eval(), inputs)) <= FP32_EXACT


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_adapters_train_in_fp32_beside_a_bf16_base_like_peft(variant, tmp_path):
    """As PEFT's autocast_adapter_dtype: fp32 adapter weights, bf16 outputs, PEFT-equal logits."""
    inputs = tiny_inputs("llama")
    ours = _fresh("llama").to(torch.bfloat16)
    inject_adapters(ours, LoRAConfig(rank=4, alpha=8, **VARIANTS[variant]))
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    _perturb(ours)
    logits = model_output(ours, inputs)
    assert logits.dtype == torch.bfloat16
    save_adapters(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(_fresh("llama").to(torch.bfloat16), tmp_path).eval()
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    assert max_abs_diff(model_output(peft_model, inputs), logits) <= FP32_EXACT


def test_llama_classifier_with_a_trained_score_head_interoperates(tmp_path):
    """SEQ_CLS: PEFT wraps `score` as modules_to_save; the trained head travels both ways."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()

    inputs = tiny_inputs("llama")
    ours = fresh()
    inject_adapters(ours, LoRAConfig(rank=4, modules_to_save=["score"]))
    _perturb(ours)
    save_adapters(ours, tmp_path / "tunekit")
    peft_model = PeftModel.from_pretrained(fresh(), tmp_path / "tunekit").eval()
    assert max_abs_diff(model_output(peft_model, inputs), model_output(ours, inputs)) <= FP32_EXACT

    theirs = get_peft_model(fresh(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = fresh()
    load_adapters(loaded, tmp_path / "peft")
    assert max_abs_diff(model_output(loaded, inputs), model_output(theirs.eval(), inputs)) <= FP32_EXACT


def _tunekit_name(peft_name: str) -> str:
    """A PEFT parameter name (``get_peft_model(...).named_parameters()``) as tunekit spells it."""
    name = peft_name.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
        name = name.replace(f".{part}.default", f".adapters.default.{part}")
    return name.replace(".modules_to_save.default.", ".adapters.default.")


def test_bias_all_with_modules_to_save_trains_and_saves_what_peft_does(tmp_path):
    """bias="all" beside a trained head: the frozen original head's bias is neither trained nor saved."""
    peft_cfg = LoraConfig(r=4, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"],
                          task_type="SEQ_CLS", init_lora_weights=False)
    theirs = get_peft_model(_fresh("bert"), peft_cfg)
    ours = _fresh("bert")
    inject_adapters(ours, LoRAConfig(rank=4, target_modules=["query", "value"], bias="all", init="random",
                                     modules_to_save=["classifier"]))
    peft_trainable = {_tunekit_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == peft_trainable

    _perturb(ours)
    save_adapters(ours, tmp_path / "tunekit")
    theirs.save_pretrained(tmp_path / "peft")
    saved = set(load_file(tmp_path / "tunekit" / "adapter_model.safetensors"))
    # PEFT also writes two copies it reads back itself: the original head's (unchanged) bias and a
    # second copy of the trained one. Everything else is the same key set.
    peft_saved = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert saved == {k for k in peft_saved if not (".original_module." in k or ".modules_to_save." in k)}

    inputs = tiny_inputs("bert")
    loaded_by_peft = PeftModel.from_pretrained(_fresh("bert"), tmp_path / "tunekit").eval()
    assert max_abs_diff(model_output(loaded_by_peft, inputs), model_output(ours, inputs)) <= FP32_EXACT
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = _fresh("bert")
    load_adapters(loaded, tmp_path / "peft")
    assert max_abs_diff(model_output(loaded, inputs), model_output(theirs.eval(), inputs)) <= FP32_EXACT
