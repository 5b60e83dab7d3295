"""The fake-tensor step simulation against the allocator, and its extrapolation in depth.

Oracle: PyTorch's profiler records every CPU allocation and free of the same forward + backward run on
real tensors (random weights, a padded batch). The simulation must see the same peak: to the byte up to
a few scalars in fp32; bf16 matmuls on a CPU also take oneDNN scratch buffers that no op reports, so
those cases get a looser bound.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from transformers import Gemma2Config, T5Config

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, PromptConfig
from tunekit.estimate import ModelSpec, StepShape, profile_activations
from tunekit.estimate.activations import _enable_checkpointing, simulate_step
from tunekit.estimate.measure import _profiled_step_peak, padded_batch, real_model
from tunekit.estimate.model import build_model
from tunekit.models.config import QuantizationConfig


def _real_peak(spec: ModelSpec, shape: StepShape) -> int:
    model = real_model(spec)
    model.train()
    if shape.grad_checkpointing:
        _enable_checkpointing(model)
    batch = padded_batch(spec.task, shape, spec.config.vocab_size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if shape.mixed_precision == "bf16"
                else contextlib.nullcontext())

    def step():
        fresh = {k: v.clone() for k, v in batch.items()}
        with autocast:
            loss = model(**fresh, **({"use_cache": False} if shape.packed else {})).loss
        loss.backward()

    return _profiled_step_peak(step)


FP32 = [
    ("llama-lora-dropout", tiny_llama().config, "causal_lm", "sdpa", LoRAConfig(dropout=0.1), StepShape(2, 24)),
    ("llama-eager-ckpt", tiny_llama().config, "causal_lm", "eager", LoRAConfig(), StepShape(2, 24, grad_checkpointing=True)),
    ("llama-dora-packed", tiny_llama().config, "causal_lm", "sdpa", LoRAConfig(use_dora=True), StepShape(2, 24, packed=True)),
    ("llama-full", tiny_llama().config, "causal_lm", "sdpa", None, StepShape(2, 24)),
    ("llama-prompt", tiny_llama().config, "causal_lm", "sdpa", PromptConfig(num_virtual_tokens=5), StepShape(2, 24)),
    ("gpt2-prefix", tiny_gpt2().config, "causal_lm", None, PrefixConfig(num_virtual_tokens=4), StepShape(2, 24)),
    ("bert-bottleneck", tiny_bert().config, "seq_cls", None, BottleneckConfig(modules_to_save=["classifier"]),
     StepShape(2, 24)),
    ("t5-lora", tiny_t5().config, "seq2seq", None, LoRAConfig(), StepShape(2, 24, target_len=8)),
]


@pytest.mark.parametrize(("name", "config", "task", "attn", "adapter", "shape"), FP32, ids=[c[0] for c in FP32])
def test_simulated_peak_equals_the_profiled_one(name, config, task, attn, adapter, shape):
    spec = ModelSpec(config, task, adapter=adapter, attn=attn, num_labels=3)
    simulated = simulate_step(build_model(spec), task, shape).peak_with_gradients
    assert abs(simulated - _real_peak(spec, shape)) <= 128  # a few scalars


def test_tunekit_kernel_modules_are_simulated_as_they_run():
    spec = ModelSpec(tiny_llama().config, "causal_lm", adapter=LoRAConfig(), attn="sdpa", kernels=True)
    shape = StepShape(2, 24)
    simulated = simulate_step(build_model(spec), "causal_lm", shape).peak_with_gradients
    assert abs(simulated - _real_peak(spec, shape)) <= 128


@pytest.mark.parametrize(("bits", "checkpointing"), [(4, False), (4, True), (8, False)])
def test_bf16_and_quantized_peaks_are_close_to_the_profiled_ones(bits, checkpointing):
    config = tiny_llama(hidden_size=64, intermediate_size=128).config
    spec = ModelSpec(config, "causal_lm", "bf16", QuantizationConfig(bits=bits), LoRAConfig(), attn="sdpa")
    shape = StepShape(2, 24, mixed_precision="bf16", grad_checkpointing=checkpointing)
    simulated = simulate_step(build_model(spec), "causal_lm", shape, spec.quantization).peak_with_gradients
    real = _real_peak(spec, shape)
    assert abs(simulated - real) <= 0.12 * real  # oneDNN's bf16 scratch is invisible to the simulation


@pytest.mark.parametrize(("config", "layers"), [
    (tiny_llama(num_hidden_layers=5).config, {"num_hidden_layers": 5}),
    (Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, sliding_window=8), {"num_hidden_layers": 5}),
    (T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=3, num_heads=4,
              decoder_start_token_id=0), {"num_hidden_layers": 4, "num_decoder_layers": 3}),
], ids=["llama", "gemma2-alternating", "t5-uneven"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_depth_extrapolation_equals_simulating_the_whole_model(config, layers, checkpointing):
    task = "seq2seq" if config.model_type == "t5" else "causal_lm"
    spec = ModelSpec(config, task, adapter=LoRAConfig(), attn="eager")
    shape = StepShape(2, 16, target_len=6, grad_checkpointing=checkpointing)
    whole = simulate_step(build_model(spec, layers=layers), task, shape)
    profile = profile_activations(spec, shape)
    assert profile.activations == whole.activations
    # exact but for a few scalars where block kinds alternate (the extra replica block is a sliding one)
    assert abs(profile.activations + profile.temporaries - whole.peak) <= 64


def test_eager_attention_materialises_the_scores_and_sdpa_does_not():
    # Unpadded rows: with padding, CPU SDPA turns the bool mask into an fp32 (B, 1, T, T) one per block.
    def per_block(attn: str, t: int) -> int:
        spec = ModelSpec(tiny_llama().config, "causal_lm", adapter=LoRAConfig(), attn=attn)
        return profile_activations(spec, StepShape(2, t, padded=False)).per_block["num_hidden_layers"]

    assert per_block("sdpa", 64) == 2 * per_block("sdpa", 32)  # flash path: output + log-sum-exp, linear in T
    heads, batch = 4, 2
    # eager keeps softmax probabilities and the dropout-free attention weights: (B, H, T, T) fp32 per block
    quadratic = (per_block("eager", 64) - 2 * per_block("eager", 32)) - (per_block("sdpa", 64) - 2 * per_block("sdpa", 32))
    assert quadratic >= batch * heads * (64 * 64 - 2 * 32 * 32) * 4


def test_tensor_parallel_replica_divides_the_per_block_activations():
    spec = ModelSpec(tiny_llama(num_key_value_heads=4).config, "causal_lm", adapter=LoRAConfig(), attn="sdpa")
    shape = StepShape(2, 32)
    one, two = profile_activations(spec, shape), profile_activations(spec, shape, tp=2)
    assert two.per_block["num_hidden_layers"] < one.per_block["num_hidden_layers"]
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        profile_activations(spec, shape, tp=3)


def test_a_simulation_failure_names_the_model_and_keeps_the_cause(monkeypatch):
    import tunekit.estimate.activations as activations

    def broken(*args, **kwargs):
        raise NotImplementedError("aten::something has no fake kernel")

    monkeypatch.setattr(activations, "simulate_step", broken)
    monkeypatch.setattr(activations, "_PROFILES", {})  # no cached profile may answer instead
    spec = ModelSpec(tiny_llama(num_hidden_layers=3).config, "causal_lm", adapter=LoRAConfig(rank=3))
    with pytest.raises(RuntimeError, match="this llama model could not be simulated") as info:
        profile_activations(spec, StepShape(1, 8))
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_run_settings_the_model_cannot_train_with_are_input_errors():
    spec = ModelSpec(Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8),
                     "causal_lm", adapter=LoRAConfig(), attn="eager")
    with pytest.raises(ValueError, match="final_logit_softcapping"):  # the fused loss refuses it, as training does
        profile_activations(spec, StepShape(1, 8, fused_cross_entropy=True))


def test_the_fused_loss_on_target_positions_is_simulated():
    # the target-position head gathers hidden[labels != -100], a data-dependent shape fake tensors cannot
    # give; the simulation selects every position (its labels mask none). Oracle: the profiled real step.
    from tunekit.models.kernels import fused_causal_lm_loss

    spec = ModelSpec(tiny_llama().config, "causal_lm", adapter=LoRAConfig(), attn="sdpa")
    shape = StepShape(2, 24, packed=True, fused_cross_entropy=True)
    simulated = simulate_step(build_model(spec), "causal_lm", shape).peak_with_gradients
    model = real_model(spec)
    model.train()
    batch = padded_batch("causal_lm", shape, spec.config.vocab_size)

    def step():
        fused_causal_lm_loss(model, {k: v.clone() for k, v in batch.items()}).backward()

    real = _profiled_step_peak(step)
    assert abs(simulated - real) <= 0.1 * real, (simulated, real)
