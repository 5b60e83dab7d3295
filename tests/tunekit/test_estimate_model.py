"""The estimator's model side: shipped config snapshots, exact parameter counts, real storage bytes.

Oracles: the published parameter counts of the real checkpoints, PEFT's own trainable counts, counting
formulas written out here, bitsandbytes' real quantization on the CPU, and transformers' own 4-bit loading.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny import tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, PromptConfig
from tunekit.estimate.model import ModelSpec, build_model, default_task, inventory
from tunekit.estimate.sources import SNAPSHOT_DIR, load_model_config, shipped_snapshots, snapshot_folder
from tunekit.estimate.storage import layout_bytes, nf4_layout, optimizer_state_bytes
from tunekit.models.config import QuantizationConfig

# Parameter counts published with the checkpoints (model cards / safetensors metadata).
PUBLISHED = {
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,  # the base's architecture
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen3-0.6B": 596_049_920,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "openai-community/gpt2": 124_439_808,
    "openai-community/gpt2-medium": 354_823_168,
    "google-bert/bert-base-uncased": 109_482_240,  # BertModel (the published count has no task head)
    "FacebookAI/roberta-base": 124_645_632,
    "google-t5/t5-small": 60_506_624,
    "google-t5/t5-base": 222_903_552,
    # flan-t5-base publishes 247,577,856 (an untied lm_head); transformers 5 ties T5's head to the
    # shared embedding always (T5Config forces tie_word_embeddings=True), so it loads as T5-base's count.
    "google/flan-t5-base": 222_903_552,
}


def _spec(name: str, **kw) -> ModelSpec:
    config = load_model_config(name).config
    return ModelSpec(config, kw.pop("task", default_task(config)), **kw)


def test_every_snapshot_is_listed_and_every_listed_model_is_shipped():
    assert sorted(PUBLISHED) == shipped_snapshots()
    for name in PUBLISHED:
        folder = snapshot_folder(name)
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert folder.parent == SNAPSHOT_DIR and raw["model_type"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_model_counts_equal_the_published_sizes(name):
    spec = _spec(name, num_labels=2)  # each model's default head: causal LM, seq2seq LM, or classifier
    head = 0
    if spec.task == "seq_cls":  # the published encoder count has no head; a 2-way classifier adds H*2 + 2
        head = 2 * spec.config.hidden_size + 2
    assert inventory(build_model(spec)).total == PUBLISHED[name] + head


def test_lora_counts_match_the_closed_form_on_llama3_8b():
    spec = _spec("meta-llama/Llama-3.1-8B", dtype="bf16", adapter=LoRAConfig(rank=16))
    inv = inventory(build_model(spec))
    r, hidden, kv, layers = 16, 4096, 1024, 32  # q: 4096->4096, v: 4096->1024
    assert inv.trainable == layers * r * ((hidden + hidden) + (hidden + kv)) == 6_815_744
    assert inv.total == PUBLISHED["meta-llama/Llama-3.1-8B"] + inv.trainable
    assert inv.trainable_bytes == 4 * inv.trainable  # adapters train in fp32 beside the bf16 base
    rotary = 2 * (128 // 2) * 4  # inv_freq and original_inv_freq buffers: head_dim / 2 fp32 each
    assert inv.frozen_bytes == 2 * PUBLISHED["meta-llama/Llama-3.1-8B"] + rotary


def test_tied_embeddings_are_counted_once():
    inv = inventory(build_model(_spec("openai-community/gpt2")))
    assert sum(p.name.endswith("wte.weight") for p in inv.params) == 1
    assert not any(p.name == "lm_head.weight" for p in inv.params)


def test_bottleneck_counts_match_the_houlsby_formula():
    spec = _spec("google-bert/bert-base-uncased", adapter=BottleneckConfig(reduction_factor=16,
                                                                          modules_to_save=["classifier"]))
    inv = inventory(build_model(spec))
    h, m, layers = 768, 48, 12
    adapter = (h * m + m) + (m * h + h)  # down (with bias) + up (with bias)
    head = h * 2 + 2
    assert inv.trainable == layers * 2 * adapter + head


CASES = [
    ("lora", LoRAConfig(rank=4, target_modules="all-linear")),
    ("dora", LoRAConfig(rank=4, use_dora=True)),
    ("prefix", PrefixConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16)),
    ("prompt", PromptConfig(num_virtual_tokens=6)),
]


@pytest.mark.parametrize(("name", "adapter"), CASES, ids=[c[0] for c in CASES])
def test_trainable_counts_on_meta_equal_peft_on_a_real_model(name, adapter):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    peft_cfg = {
        "lora": lambda: LoraConfig(r=4, target_modules="all-linear"),
        "dora": lambda: LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                             encoder_hidden_size=16),
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    }[name]()
    theirs = get_peft_model(tiny_llama(), peft_cfg)
    trainable, total = theirs.get_nb_trainable_parameters()
    ours = inventory(build_model(ModelSpec(tiny_llama().config, "causal_lm", adapter=adapter)))
    assert ours.trainable == trainable
    if name in ("lora", "dora"):  # PEFT's total counts the same base + adapter (virtual tokens are extra there)
        assert ours.total == total


def test_storage_dtypes_follow_tunekit_loading():
    spec = _spec("meta-llama/Llama-3.2-1B", dtype="bf16", adapter=LoRAConfig(rank=8))
    inv = inventory(build_model(spec))
    assert {p.dtype for p in inv.params if not p.trainable} == {torch.bfloat16}
    assert {p.dtype for p in inv.params if p.trainable} == {torch.float32}
    units = inv.unit_bytes()
    assert len(units) == 16 + 1 and units[""] == 2 * 128256 * 2048 + 2 * 2048  # root: tied embedding + norm


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 32), (96, 200), (7, 64)])
def test_nf4_layout_equals_bitsandbytes_real_quantization(shape, double_quant):
    import bitsandbytes.functional as bnbF

    weight = torch.randn(shape, dtype=torch.bfloat16)
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = {"weight": packed, "absmax": state.absmax, "code": state.code}
    if double_quant:
        tensors.update({"offset": state.offset, "state2.absmax": state.state2.absmax,
                        "state2.code": state.state2.code})
    layout = nf4_layout(math.prod(shape), double_quant)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == layout
    assert layout_bytes(layout) == sum(t.numel() * t.element_size() for t in tensors.values())


def test_nf4_bits_per_parameter():
    n = 4096 * 4096
    tables = 16 * 4 + 256 * 4 + 4  # nf4 code, nested code, offset: fixed per layer
    assert (layout_bytes(nf4_layout(n, True)) - tables) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert (layout_bytes(nf4_layout(n, False)) - 16 * 4) * 8 / n == pytest.approx(4.5)
    assert 4 + 8 / 64 + 32 / (64 * 256) == pytest.approx(4.127, abs=5e-4)


def test_quantized_layers_and_bytes_equal_transformers_4bit_loading(tmp_path):
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    from tunekit.estimate.measure import resident_bytes
    from tunekit.models.loading import prepare_quantized

    prepare_quantized(loaded)
    real_4bit = sorted(n for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit")
    spec = ModelSpec(base.config, "causal_lm", "bf16", QuantizationConfig(), LoRAConfig(rank=4))
    meta = build_model(spec)
    ours_4bit = sorted(n.removesuffix(".base_layer") for n, m in meta.named_modules()
                       if type(m).__name__ == "Linear4bit")
    assert ours_4bit == real_4bit and "lm_head" not in ours_4bit
    inv = inventory(meta)
    assert inv.frozen_bytes == resident_bytes(loaded)  # packed weights + tables + fp32 norms/embeddings/head


def test_int8_frozen_bytes_equal_transformers_8bit_loading():
    from tunekit.estimate.measure import real_model, resident_bytes

    spec = ModelSpec(tiny_llama(hidden_size=64, intermediate_size=128).config, "causal_lm", "bf16",
                     QuantizationConfig(bits=8), LoRAConfig(rank=4))
    real = real_model(spec)  # saved and loaded back with load_in_8bit, then prepared as tunekit does
    assert any(type(m).__name__ == "Linear8bitLt" for m in real.modules())
    inv = inventory(build_model(spec))
    assert inv.frozen_bytes + inv.trainable_bytes == resident_bytes(real)


def test_int8_layout_equals_bitsandbytes_int8_params():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(64, 48, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(48, 64), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    from tunekit.estimate.storage import int8_layout

    real = {"weight": (tuple(layer.weight.shape), layer.weight.dtype), "SCB": (tuple(layer.weight.SCB.shape),
                                                                               layer.weight.SCB.dtype)}
    assert real == int8_layout(48, 64)


def test_optimizer_state_bytes_equal_real_optimizer_state():
    import bitsandbytes.optim as bnb_optim

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 80), (30,), (5000,)]]
    for name, make in [("adamw", lambda p: torch.optim.AdamW(p)), ("adamw_8bit", lambda p: bnb_optim.AdamW8bit(p)),
                       ("sgd", lambda p: torch.optim.SGD(p, lr=0.1))]:
        optimizer = make(params)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
        assert optimizer_state_bytes([(p.numel(), p.dtype) for p in params], name) == sum(storages.values()), name


def test_quantized_full_finetuning_is_refused():
    with pytest.raises(ValueError, match="full fine-tuning cannot train a quantized base"):
        build_model(ModelSpec(tiny_llama().config, "causal_lm", "bf16", QuantizationConfig(), None))


def test_config_sources_and_their_errors(tmp_path):
    assert "snapshot of meta-llama/Llama-3.1-8B" in load_model_config("meta-llama/Llama-3.1-8B").origin
    file = tmp_path / "config.json"
    file.write_text(json.dumps(LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()), encoding="utf-8")
    assert load_model_config(str(file)).config.hidden_size == 64
    assert load_model_config(str(tmp_path), {"num_hidden_layers": 3}).config.num_hidden_layers == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        load_model_config(str(empty))
    file.write_text(json.dumps({"model_type": "no-such-arch"}), encoding="utf-8")
    with pytest.raises(ValueError, match="model_type 'no-such-arch' is not an architecture"):
        load_model_config(str(file))
    with pytest.raises(ValueError, match="local folder not found"):
        load_model_config("./missing/folder")
