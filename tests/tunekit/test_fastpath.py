"""The default training path (tunekit.models.fastpath): packing and the varlen attention where a
packed row gives each example's own logits, measured against the examples run alone."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_gpt2, tiny_llama
from _tolerances import FP32_EXACT, max_abs_diff
from transformers import BloomConfig, BloomForCausalLM, Gemma2Config, Gemma2ForCausalLM

from tunekit.models.fastpath import choose_fast_path, packs_exactly


def _choose(model, packing=None, attn="auto", method="lora", task="causal_lm"):
    return choose_fast_path(model, task=task, method=method, packing=packing, attn_implementation=attn)


def _bloom():
    # Bloom builds its mask without the position ids: packed examples would see each other.
    return BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4)).eval()


def test_llama_packs_with_the_varlen_attention_by_default():
    model = tiny_llama()
    fast = _choose(model)
    assert (fast.packing, fast.attn_implementation) == (True, "tunekit")
    assert model.config._attn_implementation == "tunekit" and "data.packing: false opts out" in fast.note
    # and what was chosen is exact: a packed row of two examples gives each one's own logits
    first, second = torch.randint(3, 96, (1, 6)), torch.randint(3, 96, (1, 4))
    positions = torch.cat([torch.arange(6), torch.arange(4)])[None]
    packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
    assert max_abs_diff(packed[:, 6:], model(input_ids=second).logits) <= FP32_EXACT


def test_settings_written_by_the_user_are_kept():
    model = tiny_llama(attn_implementation="sdpa")
    assert _choose(model, attn="sdpa").attn_implementation == "sdpa"  # packs, keeps sdpa
    fast = _choose(model, packing=False)
    assert not fast.packing and model.config._attn_implementation == "sdpa"
    assert _choose(tiny_llama(), packing=True).packing  # explicit packing on a model that keeps examples apart


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_methods_and_other_tasks_never_pack(method):
    assert not _choose(tiny_llama(), method=method).packing
    assert not _choose(tiny_llama(), task="seq_cls").packing


def test_a_model_that_mixes_packed_examples_is_not_packed_and_an_explicit_request_is_an_error():
    assert packs_exactly(_bloom()) is False
    model = _bloom()
    fast = _choose(model)
    assert not fast.packing and model.config._attn_implementation == fast.attn_implementation
    with pytest.raises(ValueError, match="lets packed examples attend to each other; set data.packing: false"):
        _choose(_bloom(), packing=True)


def test_attention_the_varlen_kernel_cannot_run_falls_back_to_the_loaded_one():
    # Gemma 2 soft-caps attention logits (tunekit's attention refuses it); GPT-2 trains with attention dropout.
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            pad_token_id=0, attn_implementation="eager"))
    gpt2 = tiny_gpt2(attn_implementation="sdpa")  # attn_pdrop 0.1
    for model, loaded in ((gemma2, "eager"), (gpt2, "sdpa")):
        fast = _choose(model)
        assert (fast.packing, fast.attn_implementation, model.config._attn_implementation) == (True, loaded, loaded)


def test_the_probe_leaves_the_random_streams_and_the_mode_alone():
    model = tiny_gpt2().train()
    state = torch.random.get_rng_state()
    assert packs_exactly(model)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    with torch.device("meta"):
        assert packs_exactly(tiny_llama()) is None
