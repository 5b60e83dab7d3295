"""Every row of the per-architecture table works on a tiny model of that architecture:
LoRA with the default targets (PEFT's), bottleneck adapters with the default placement,
prefix tuning where the row says so, and the kernel-swappable classes it names."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from _tiny import VOCAB
from _tolerances import FP32_EXACT, max_abs_diff

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, inject_adapters
from tunekit.adapters.hf.arch import ARCHS, supporting

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0)

BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_DECODER)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DECODER)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_DECODER)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_DECODER)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_DECODER)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_ENCODER)),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_ENCODER, num_labels=2)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**{**_ENCODER, "pad_token_id": 1},
                                                                           num_labels=2)),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                                            num_layers=2, num_heads=4, decoder_start_token_id=0)),
}


def test_every_table_row_has_a_tiny_model_here():
    assert set(BUILDERS) == set(ARCHS)


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids[:, :4]} if arch == "t5" else {}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_default_targets_wrap_what_peft_would(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]().eval()
    inputs = _inputs(arch)
    base = _logits(model, inputs)
    report = inject_adapters(model, LoRAConfig(rank=2, init="random"))
    targets = ARCHS[arch].lora_targets
    assert report.wrapped and all(name.rsplit(".", 1)[-1] in targets for name in report.wrapped)
    assert {name.rsplit(".", 1)[-1] for name in report.wrapped} == set(targets)
    assert max_abs_diff(_logits(model, inputs), base) > FP32_EXACT  # the adapters are in the forward


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("variant", ["serial", "parallel"])
def test_bottleneck_default_placement_is_identity_at_init(arch, variant):
    torch.manual_seed(0)
    model = BUILDERS[arch]().eval()
    inputs = _inputs(arch)
    base = _logits(model, inputs)
    report = inject_adapters(model, BottleneckConfig(variant=variant, hidden_size=4))
    assert len(report.wrapped) >= 4  # attention and MLP of 2 blocks (Houlsby)
    assert max_abs_diff(_logits(model, inputs), base) <= FP32_EXACT


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_virtual_tokens_column_says_which_models_take_a_prefix(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]().eval()
    inputs = _inputs(arch)
    if ARCHS[arch].virtual_tokens is None:
        with pytest.raises(ValueError, match=f"does not support model_type '{arch}'"):
            inject_adapters(model, PrefixConfig(num_virtual_tokens=2))
        return
    base = _logits(model, inputs)
    inject_adapters(model, PrefixConfig(num_virtual_tokens=2))
    adapted = _logits(model, inputs)
    assert torch.isfinite(adapted).all() and max_abs_diff(adapted, base) > FP32_EXACT


@pytest.mark.parametrize("arch", supporting("kernels"))
def test_kernels_column_names_the_classes_transformers_builds(arch):
    spec = ARCHS[arch].kernels
    model = BUILDERS[arch]()
    built = {(type(m).__module__, type(m).__name__) for m in model.modules()}
    assert {(spec.module, spec.norm), (spec.module, spec.mlp)} <= built
    assert getattr(model.config, spec.act_key) in ("silu", "gelu_pytorch_tanh")
