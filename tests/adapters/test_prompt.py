"""Prompt tuning / P-tuning v1: PEFT interop both ways, text init, labels, generate(), checkpointing, lifecycle.

Oracles: PEFT 0.21 (logits, initial embeddings), a hand-computed shifted
cross-entropy, greedy decoding by full forwards, closed-form counts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import (
    VOCAB,
    greedy_by_full_forwards,
    model_output,
    tiny_bert,
    tiny_gpt2,
    tiny_inputs,
    tiny_llama,
    tiny_t5,
)
from _tolerances import FP32_EXACT, max_abs_diff
from pydantic import ValidationError

from tunekit.adapters import (
    PromptConfig,
    delete_adapter,
    disable_adapters,
    eject_adapters,
    inject_adapters,
    load_adapters,
    save_adapters,
    set_active_adapters,
    trainable_parameters,
)

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def _cfg(arch: str, **kw) -> PromptConfig:
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    return PromptConfig(num_virtual_tokens=3, **extra, **kw)


@pytest.mark.parametrize(("arch", "encoder"), [
    ("llama", "none"), ("llama", "mlp"), ("gpt2", "lstm"), ("bert", "none"), ("t5", "none"), ("t5", "mlp"),
])
def test_peft_loads_tunekit_prompt(tmp_path, arch, encoder):
    model = BUILDERS[arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(arch)
    inject_adapters(model, _cfg(arch, encoder=encoder, encoder_hidden_size=16))
    save_adapters(model, tmp_path)
    ours = model_output(model, inputs)
    theirs = model_output(peft.PeftModel.from_pretrained(base, tmp_path).eval(), inputs)
    assert max_abs_diff(ours, theirs) <= FP32_EXACT
    with disable_adapters(model):
        plain = model_output(model, inputs)
    assert max_abs_diff(plain, model_output(base, inputs)) == 0.0
    real = ours[:, 3:] if arch in ("llama", "gpt2") else ours  # causal LMs also score the virtual positions
    assert max_abs_diff(real, plain) > 1e-3


@pytest.mark.parametrize(("arch", "peft_cfg"), [
    ("llama", {"cls": "PromptTuningConfig"}),
    ("gpt2", {"cls": "PromptEncoderConfig", "encoder_reparameterization_type": "MLP"}),
    ("bert", {"cls": "PromptTuningConfig"}),
    ("t5", {"cls": "PromptEncoderConfig", "encoder_reparameterization_type": "LSTM"}),
])
def test_tunekit_loads_peft_prompt(tmp_path, arch, peft_cfg):
    model = BUILDERS[arch]()
    ours = copy.deepcopy(model)
    kwargs = {k: v for k, v in peft_cfg.items() if k != "cls"}
    theirs = peft.get_peft_model(model, getattr(peft, peft_cfg["cls"])(
        task_type=TASKS[arch], num_virtual_tokens=3, **kwargs))
    theirs.save_pretrained(tmp_path)
    cfg = load_adapters(ours, tmp_path)
    assert cfg.peft_type == theirs.peft_config["default"].peft_type.value
    inputs = tiny_inputs(arch)
    assert max_abs_diff(model_output(ours, inputs), model_output(theirs.eval(), inputs)) <= FP32_EXACT


def _word_tokenizer(folder) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "classify", "the", "sentiment", "of", "this", "review"]
    tok = Tokenizer(models.WordLevel({w: i + 3 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return str(folder)


def test_text_init_equals_peft(tmp_path):
    path = _word_tokenizer(tmp_path / "tok")
    text = "classify the sentiment"  # 3 tokens, repeated to fill 7 virtual tokens
    model = tiny_llama()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=path))
    inject_adapters(model, PromptConfig(num_virtual_tokens=7, init="text", init_text=text, tokenizer_name_or_path=path))
    ours = model.tunekit_prompt.adapters["default"].embedding.weight
    theirs = peft_model.prompt_encoder["default"].embedding.weight
    assert max_abs_diff(ours, theirs) == 0.0
    assert max_abs_diff(ours[0], ours[3]) == 0.0  # the text repeats


def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="init='text' needs init_text and tokenizer_name_or_path"):
        PromptConfig(init="text", init_text="hello")
    with pytest.raises(ValidationError, match="encoder"):
        PromptConfig(encoder="gru")
    with pytest.raises(ValueError, match="cannot load tokenizer '/no/such/tokenizer'"):
        inject_adapters(tiny_llama(), PromptConfig(init="text", init_text="hi", tokenizer_name_or_path="/no/such/tokenizer"))


def test_labels_ignore_virtual_tokens():
    model = tiny_llama()
    inject_adapters(model, PromptConfig(num_virtual_tokens=4))
    inputs = tiny_inputs("llama")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    # Position t predicts token t + 1: the last virtual token (3) predicts the first real one, and
    # nothing predicts a virtual token.
    logits = out.logits[:, 3:-1]  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "encoder"), [("llama", "none"), ("gpt2", "mlp"), ("t5", "lstm")])
def test_trainable_count_closed_form(arch, encoder):
    model = BUILDERS[arch]()
    inject_adapters(model, PromptConfig(num_virtual_tokens=5, encoder=encoder, encoder_hidden_size=6))
    h, w, n = 32, 6, 5 * (2 if arch == "t5" else 1)  # hidden, encoder width, rows (T5 keeps 2 x P, as PEFT)
    expected = {
        "none": n * h,
        "mlp": n * h + (h * w + w) + (w * w + w) + (w * h + h),
        # bi-LSTM, 2 layers (4 gates): layer 1 input h, layer 2 input 2w; then Linear(2w, 2w), Linear(2w, h)
        "lstm": n * h + 2 * 4 * w * (h + w + 2) + 2 * 4 * w * (2 * w + w + 2) + (4 * w * w + 2 * w) + (2 * w * h + h),
    }[encoder]
    assert trainable_parameters(model).trainable == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_greedy_full_forwards(arch):
    model = BUILDERS[arch]()
    inject_adapters(model, PromptConfig(num_virtual_tokens=4))
    model.generation_config.eos_token_id = None
    inputs = tiny_inputs(arch)  # the last row is left-padded
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, greedy_by_full_forwards(model, inputs["input_ids"], inputs["attention_mask"], 5))


def test_generate_t5_equals_peft(tmp_path):
    model = tiny_t5()
    base = copy.deepcopy(model)
    inject_adapters(model, PromptConfig(num_virtual_tokens=4))
    inputs = tiny_inputs("t5")
    inputs.pop("decoder_input_ids")
    save_adapters(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    for m in (model, theirs):
        m.generation_config.eos_token_id = None
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, theirs.generate(**inputs, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_gradient_checkpointing_same_loss_and_grads(arch):
    model = BUILDERS[arch](**({"dropout_rate": 0.0} if arch == "t5" else {}))
    inject_adapters(model, PromptConfig(num_virtual_tokens=3, encoder="mlp", encoder_hidden_size=8))
    twin = copy.deepcopy(model)
    twin.gradient_checkpointing_enable()
    inputs = tiny_inputs(arch)
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    results = []
    for m in (model, twin):
        m.train()
        loss = m(**inputs, labels=labels).loss
        loss.backward()
        results.append((loss.item(), [p.grad for p in m.parameters() if p.requires_grad]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert abs(loss - loss_ckpt) <= FP32_EXACT
    assert all(max_abs_diff(g, h) <= FP32_EXACT and g.abs().sum() > 0 for g, h in zip(grads, grads_ckpt))


def test_train_switch_delete_and_eject(tmp_path):
    model = tiny_gpt2()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tiny_inputs("gpt2")
    base = model_output(model, inputs)
    inject_adapters(model, PromptConfig(num_virtual_tokens=3))
    inject_adapters(model, PromptConfig(num_virtual_tokens=3), name="b", activate=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert [p.shape for p in params] == [(3, 32)]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    trained = model_output(model, inputs)
    save_adapters(model, tmp_path, names=["default"])
    set_active_adapters(model, "b")
    assert max_abs_diff(model_output(model, inputs), trained) > 1e-3
    delete_adapter(model, "b")
    eject_adapters(model, merge=False)
    assert not hasattr(model, "tunekit_prompt") and not model._forward_pre_hooks
    assert max_abs_diff(model_output(model, inputs), base) == 0.0
    load_adapters(model, tmp_path)
    assert max_abs_diff(model_output(model, inputs), trained) <= FP32_EXACT
