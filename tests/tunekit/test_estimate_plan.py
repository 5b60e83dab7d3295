"""The planner: candidate layouts, the fit rule, the recommendation order, and advice when nothing fits.

Peaks of the model-state terms are checked against the formulas they claim (ZeRO sharding, DeepSpeed's
documented accounting); the recommendation against the rule stated in the planner's docstring.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from _tiny import tiny_llama

from tunekit.adapters import LoRAConfig
from tunekit.estimate import Devices, ModelSpec, RunSettings, StepShape, plan, recommend
from tunekit.estimate.memory import deepspeed_zero3_model_states, rank_model_states
from tunekit.estimate.model import build_model, inventory
from tunekit.estimate.planner import candidate_layouts

CONFIG = tiny_llama(num_hidden_layers=4, num_key_value_heads=4, vocab_size=2048).config
LORA = ModelSpec(CONFIG, "causal_lm", "bf16", adapter=LoRAConfig(rank=4), attn="sdpa")
SETTINGS = RunSettings(StepShape(batch=2, seq_len=64, mixed_precision="bf16"))
HUGE = 2**40


def _rows(result):
    return {(r.layout.strategy, r.layout.cpu_offload, r.layout.tp_size, r.layout.reshard_after_forward): r
            for r in result.rows}


def test_peak_is_the_sum_of_its_terms_and_fits_means_under_the_usable_memory():
    result = plan(LORA, SETTINGS, Devices(count=4, memory=HUGE), tp_sizes=[])
    for row in result.rows:
        if row.supported:
            assert row.peak == sum(row.terms().values()) and row.fits == (row.peak <= result.devices.usable)
    assert result.recommended.layout.strategy == "ddp"


def test_candidates_are_cheapest_first_with_tp_inside_a_node_and_dividing_the_heads():
    layouts = candidate_layouts(CONFIG, Devices(count=16, per_node=8))
    names = [(l.strategy, l.cpu_offload) for l in layouts]
    assert names.index(("ddp", False)) < names.index(("fsdp", False)) < names.index(("fsdp", True))
    assert all(not l.cpu_offload for l in layouts[: names.index(("fsdp", True))])
    tp = sorted(l.tp_size for l in layouts if l.strategy == "fsdp_tp")
    assert tp == [2, 4]  # 4 heads: 8 (a whole node) does not divide them; 16 would leave the node
    assert [l.strategy for l in candidate_layouts(CONFIG, Devices(count=1))] == ["none", "fsdp", "deepspeed"]


def test_recommendation_is_the_first_layout_that_fits():
    full = ModelSpec(CONFIG, "causal_lm", "fp32", attn="sdpa")  # model states dominate: sharding pays
    peaks = {k: r.peak for k, r in _rows(plan(full, SETTINGS, Devices(count=4, memory=HUGE), tp_sizes=[])).items()}
    ddp, zero3 = peaks[("ddp", False, 1, True)], peaks[("fsdp", False, 1, True)]
    assert zero3 < ddp
    between = Devices(count=4, memory=int((ddp + zero3) / 2 / 0.9))
    chosen = plan(full, SETTINGS, between, tp_sizes=[])
    first_fitting = next(r for r in chosen.rows if r.fits)
    assert chosen.recommended is first_fitting and chosen.recommended.layout.strategy != "ddp"
    assert "DDP needs" in chosen.reason and not chosen.recommended.layout.cpu_offload


def test_fsdp_shards_model_states_exactly_and_adds_gathered_units():
    result = plan(LORA, SETTINGS, Devices(count=4, memory=HUGE), tp_sizes=[])
    zero3 = _rows(result)[("fsdp", False, 1, True)]
    inv = inventory(build_model(LORA))
    states = rank_model_states(inv, "adamw", dp=4)
    assert (zero3.frozen, zero3.trainable, zero3.gradients, zero3.optimizer) == (
        states.frozen, states.trainable, states.gradients, states.optimizer)
    units = inv.unit_bytes()
    root, block = units.pop(""), max(units.values())
    none_temps = plan(LORA, SETTINGS, Devices(count=1, memory=HUGE)).rows[0].temporaries
    assert zero3.temporaries - none_temps >= root + 2 * block  # root + current + prefetched block gathered


def test_deepspeed_row_follows_deepspeeds_documented_accounting():
    full = ModelSpec(CONFIG, "causal_lm", "bf16", attn="sdpa")  # full fine-tuning: every parameter trains
    row = _rows(plan(full, SETTINGS, Devices(count=4, memory=HUGE), tp_sizes=[]))[("deepspeed", False, 1, True)]
    inv = inventory(build_model(full))
    _, gpu = deepspeed_zero3_model_states(inv.total, inv.largest_layer_params, gpus_per_node=4)
    states = row.frozen + row.trainable + row.gradients + row.optimizer
    steps = 4 * sum(p.trainable for p in inv.params) // 4  # AdamW's fp32 step scalars, which DeepSpeed leaves out
    assert abs(states - steps - (gpu - 4 * inv.largest_layer_params)) <= 4  # integer division per term


def test_offload_moves_the_states_to_the_host_and_is_checked_against_it():
    one_gpu = plan(LORA, SETTINGS, Devices(count=1, memory=HUGE, host_memory=HUGE))
    offload = _rows(one_gpu)[("fsdp", True, 1, True)]
    assert offload.frozen == offload.trainable == offload.optimizer == 0
    assert offload.host == rank_model_states(inventory(build_model(LORA)), "adamw").total
    tiny_host = plan(LORA, SETTINGS, Devices(count=1, memory=HUGE, host_memory=offload.host // 2))
    assert not _rows(tiny_host)[("fsdp", True, 1, True)].fits


def test_quantized_bases_rule_out_deepspeed_and_tensor_parallelism():
    from tunekit.models.config import QuantizationConfig

    qlora = replace(LORA, quantization=QuantizationConfig())
    rows = plan(qlora, SETTINGS, Devices(count=4, memory=HUGE)).rows
    unsupported = {r.layout.strategy for r in rows if not r.supported}
    assert unsupported == {"deepspeed", "fsdp_tp", "tp"}


def test_nothing_fits_gives_the_dominant_term_and_fixes_that_do_fit():
    full = ModelSpec(CONFIG, "causal_lm", "fp32", attn="sdpa")
    settings = RunSettings(StepShape(batch=4, seq_len=128))
    best = min(r.peak for r in plan(full, settings, Devices(count=1, memory=HUGE)).rows if r.supported)
    devices = Devices(count=1, memory=int(best * 0.8 / 0.9))
    result = plan(full, settings, devices)
    assert result.recommended is None and "nothing fits" in result.reason
    assert result.advice[0].startswith("dominant term: ")
    fixes = result.advice[1:]
    assert any(line.startswith("--grad-checkpointing") or line.startswith("LoRA") for line in fixes)
    if any(line.startswith("--gpus 2") for line in fixes):  # a listed fix really fits
        assert plan(full, settings, replace(devices, count=2), advise=False).recommended is not None


def test_recommend_gives_a_distributed_config_and_a_reason():
    rec = recommend(LORA, SETTINGS, Devices(count=2, memory=HUGE))
    assert rec.layout.config() == {"strategy": "ddp"} and "fits" in rec.reason
    nothing = recommend(LORA, SETTINGS, Devices(count=1, memory=1))
    assert nothing.layout is None and "dominant term" in nothing.reason


def test_a_tp_degree_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        plan(LORA, SETTINGS, Devices(count=6), tp_sizes=[3])
