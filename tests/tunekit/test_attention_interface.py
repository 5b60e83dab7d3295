"""attn_implementation="tunekit" anchored to transformers' own "sdpa" and "eager" attention.

Same weights, same inputs: logits, loss and every parameter gradient must agree
(padded batches, packed batches via restarting position ids, GQA/MQA, a KV cache
giving more keys than queries, ``generate()``), on the CPU reference and, for one
small case, on the Triton kernels under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from _tolerances import FP32_EXACT, max_abs_diff
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from tunekit.kernels._dispatch import use_backend
from tunekit.models.attention import (
    register_tunekit_attention,
    tunekit_attention_forward,
    tunekit_attention_mask,
)


@pytest.fixture(autouse=True)
def _registered():
    register_tunekit_attention()


def _twins(build, impls, **kw):
    """One model per attention implementation, all with the first one's weights."""
    models = [build(attn_implementation=impl, **kw) for impl in impls]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    return models


def _loss_and_grads(model, inputs, labels):
    model.zero_grad()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    return out.logits, out.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _labels(ids, real):
    """Next-token labels that only read logits of real tokens (padded query rows are undefined)."""
    labels = ids.masked_fill(~real, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(~real[:, :-1], -100)
    return labels


def _assert_close(a, b, what):
    assert max_abs_diff(a, b) <= FP32_EXACT, f"{what}: {max_abs_diff(a, b):.2e}"


def test_register_is_idempotent():
    assert register_tunekit_attention() == register_tunekit_attention() == "tunekit"
    assert AttentionInterface().get("tunekit") is tunekit_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["tunekit"] is tunekit_attention_mask


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa2", "mha"])
def test_llama_padded_batch_matches_sdpa_and_eager(kv_heads):
    ours, sdpa, eager = _twins(tiny_llama, ["tunekit", "sdpa", "eager"], kv_heads=kv_heads)
    inputs = tiny_inputs("llama", batch=3, length=9)
    real = inputs["attention_mask"].bool()
    labels = _labels(inputs["input_ids"], real)
    logits, loss, grads = _loss_and_grads(ours, inputs, labels)
    for other in (sdpa, eager):
        logits_o, loss_o, grads_o = _loss_and_grads(other, inputs, labels)
        _assert_close(logits[real], logits_o[real], "logits at real tokens")
        _assert_close(loss, loss_o, "loss")
        assert grads.keys() == grads_o.keys()
        for name in grads:
            _assert_close(grads[name], grads_o[name], name)


def test_llama_packed_row_equals_separate_examples():
    (ours,) = _twins(tiny_llama, ["tunekit"])
    g = torch.Generator().manual_seed(1)
    first, second = torch.randint(3, 96, (1, 5), generator=g), torch.randint(3, 96, (1, 9), generator=g)
    packed_ids = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(9)])[None]
    packed_logits = ours(input_ids=packed_ids, position_ids=position_ids).logits
    _assert_close(packed_logits[:, :5], ours(input_ids=first).logits, "first example")
    _assert_close(packed_logits[:, 5:], ours(input_ids=second).logits, "second example")
    # FlashAttention's varlen kwargs (DataCollatorWithFlattening) name the same boundaries
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    fa_kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 9, "max_length_k": 9}
    _assert_close(ours(input_ids=packed_ids, **fa_kwargs).logits, packed_logits, "cu_seq_lens kwargs")
    # and not what an unpacked row would give: the second example must not see the first
    assert max_abs_diff(packed_logits, ours(input_ids=packed_ids).logits) > 1e-3


def test_llama_packed_gradients_match_sdpa():
    ours, sdpa = _twins(tiny_llama, ["tunekit", "sdpa"])
    ids = torch.randint(3, 96, (2, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]])
    # use_cache=False: transformers' SDPA mask detects packing only without a cache (training)
    inputs = {"input_ids": ids, "position_ids": position_ids, "use_cache": False}
    logits, loss, grads = _loss_and_grads(ours, inputs, ids)
    logits_s, loss_s, grads_s = _loss_and_grads(sdpa, inputs, ids)
    _assert_close(logits, logits_s, "logits")
    for name in grads:
        _assert_close(grads[name], grads_s[name], name)


def test_llama_cache_gives_prefix_keys_bottom_right():
    """Continuing from a 4-token cache (Lk = 4 + Lq > Lq) equals one full pass with sdpa."""
    ours, sdpa = _twins(tiny_llama, ["tunekit", "sdpa"])
    inputs = tiny_inputs("llama", batch=2, length=10)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full = sdpa(**inputs).logits
    cache = DynamicCache(config=ours.config)
    ours(input_ids=ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True)
    rest = ours(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    _assert_close(rest, full[:, 4:], "continuation logits")


def test_generate_matches_sdpa():
    ours, sdpa = _twins(tiny_llama, ["tunekit", "sdpa"])
    inputs = tiny_inputs("llama", batch=2, length=6)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(**inputs, **kw), sdpa.generate(**inputs, **kw))


def test_bert_bidirectional_padded_matches_sdpa():
    ours, sdpa = _twins(tiny_bert, ["tunekit", "sdpa"])
    inputs = tiny_inputs("bert", batch=2, length=8)
    _assert_close(ours(**inputs).logits, sdpa(**inputs).logits, "bert logits")


def test_triton_kernels_through_hf_model(monkeypatch):
    """The same anchor on the Triton kernels (interpreter): forward and gradients of a 1-layer Llama."""
    from tunekit.kernels.flash_attention import launch

    calls = []
    triton_fn = launch.flash_attention_triton
    monkeypatch.setattr(launch, "flash_attention_triton", lambda *a, **k: calls.append(1) or triton_fn(*a, **k))
    ours, sdpa = _twins(tiny_llama, ["tunekit", "sdpa"], layers=1)
    inputs = tiny_inputs("llama", batch=2, length=7)
    real = inputs["attention_mask"].bool()
    labels = _labels(inputs["input_ids"], real)
    with use_backend("interpret"):
        logits, loss, grads = _loss_and_grads(ours, inputs, labels)
    assert calls, "the Triton path was not taken"
    logits_s, loss_s, grads_s = _loss_and_grads(sdpa, inputs, labels)
    _assert_close(logits[real], logits_s[real], "logits")
    for name in grads:
        _assert_close(grads[name], grads_s[name], name)


def test_attention_dropout_is_rejected_with_fix():
    model = tiny_gpt2(attn_implementation="tunekit").train()  # GPT-2 defaults to attn_pdrop=0.1
    with pytest.raises(ValueError, match="no attention dropout.*attention dropout to 0"):
        model(input_ids=torch.randint(3, 96, (1, 5)))


def test_softcap_and_short_sliding_window_are_rejected():
    q = torch.randn(1, 2, 6, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="logit softcapping"):
        tunekit_attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="no sliding window"):
        tunekit_attention_forward(module, q, q, q, None, sliding_window=4)


def _host_syncs(fn) -> int:
    """``aten::_local_scalar_dense`` (a device sync on a GPU) and ``aten::nonzero`` calls made by ``fn()``."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.name in ("aten::_local_scalar_dense", "aten::nonzero") for e in prof.events())


def test_collator_varlen_kwargs_leave_the_attention_without_host_syncs():
    from tunekit.data.collate import varlen_kwargs

    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]])
    kwargs = varlen_kwargs(position_ids)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 4, 12, 18, 21, 24] and kwargs["max_length_q"] == 8
    q = torch.randn(2, 4, 12, 8)
    k = torch.randn(2, 2, 12, 8)
    call = lambda: tunekit_attention_forward(torch.nn.Module(), q, k, k, None, position_ids=position_ids, **kwargs)  # noqa: E731
    assert _host_syncs(call) == 0
    assert _host_syncs(lambda: tunekit_attention_forward(torch.nn.Module(), q, k, k, None,
                                                         position_ids=position_ids)) > 0  # rebuilt from positions
    syncs = {}
    for layers in (1, 3):
        (model,) = _twins(tiny_llama, ["tunekit"], layers=layers)
        inputs = {"input_ids": ids, "position_ids": position_ids, "use_cache": False}
        with torch.no_grad():
            syncs[layers] = _host_syncs(lambda: model(**inputs, **kwargs))  # noqa: B023
            _assert_close(model(**inputs, **kwargs).logits, model(**inputs).logits, "varlen kwargs vs positions")
    assert syncs[1] == syncs[3]  # none per layer (transformers' own packed-sequence check stays, once)
