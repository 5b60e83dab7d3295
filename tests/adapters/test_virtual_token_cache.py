"""Virtual tokens and the model's KV-cache keyword and kind.

transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache``; the prefix and
prompt hooks follow whichever the model's forward takes. ``CacheKeywordLlama`` takes the new
name on any transformers version, so the pinned environment checks the renamed path too (CI's
second environment, with the newest transformers, runs the real one). Oracle: greedy decoding
by full forwards without a cache (transformers' own forward).
"""

from __future__ import annotations

import pytest
import torch
from _tiny import greedy_by_full_forwards, tiny_inputs, tiny_llama
from _tolerances import FP32_EXACT, max_abs_diff
from transformers import LlamaForCausalLM

from tunekit.adapters import PrefixConfig, PromptConfig, inject_adapters

CONFIGS = {"prefix": PrefixConfig(num_virtual_tokens=3), "prompt": PromptConfig(num_virtual_tokens=3)}


class CacheKeywordLlama(LlamaForCausalLM):
    """A Llama whose forward takes its KV cache as ``cache`` (transformers 5.24's name)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=cache, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, **kwargs)


def _trained(model, method: str):
    inject_adapters(model, CONFIGS[method])
    with torch.no_grad():  # a clearly non-trivial prefix / prompt
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.generation_config.eos_token_id = None
    return model


def _renamed(method: str):
    """(a plain tiny Llama, the same weights as a CacheKeywordLlama with a trained ``method`` adapter)."""
    base = tiny_llama()
    model = CacheKeywordLlama(base.config).eval()
    model.load_state_dict(base.state_dict())
    return base, _trained(model, method)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_virtual_tokens_reach_a_model_whose_cache_keyword_is_cache(method):
    base, model = _renamed(method)
    inputs = tiny_inputs("llama")  # the last row is left-padded
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, greedy_by_full_forwards(model, inputs["input_ids"], inputs["attention_mask"], 5))
    base.generation_config.eos_token_id = None
    assert not torch.equal(out, base.generate(**inputs, max_new_tokens=5, do_sample=False))  # it did reach attention


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_cache_passed_under_the_other_keyword_is_continued(method):
    """A caller still spelling ``past_key_values=`` (deprecated in 5.24) continues its sequence."""
    _, model = _renamed(method)
    ids = tiny_inputs("llama", batch=1)["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
        full = model(input_ids=ids, use_cache=False).logits
    assert max_abs_diff(step[:, -1], full[:, -1]) <= FP32_EXACT


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_static_cache_is_refused_in_one_line(method):
    model = _trained(tiny_llama(), method)
    with pytest.raises(ValueError, match=r"does not support static KV caches .*drop cache_implementation") as err:
        model.generate(**tiny_inputs("llama"), max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert "\n" not in str(err.value)
